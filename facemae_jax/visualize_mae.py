"""What a pre-trained masked autoencoder sees and rebuilds, for one clip.

Takes one clip (window ``--index`` of a video, face-cropped like ``predict``; or record ``--index`` of a shard
directory, the evaluation protocol's first view), draws a mask with the model's own generator (tube-window bands
for LGI / MAE-DFER, tubes for TPSBT / SVFAP, at the model's mask ratio), runs the model and writes a figure:
original frames / masked input / reconstruction / true and reconstructed frame differences
(``visualize.reconstruction_figure``). The reconstruction loss on this clip (the training objective: MSE to the
normalised targets of the hidden tokens, PRETRAINING §3) is printed and written into the title.

CLI::

    python -m facemae_jax.visualize_mae VIDEO_OR_SHARDS --checkpoint PRETRAIN_CKPT --out recon.png [--index i]
        [--model pretrain_NAME] [--seed S] [--frame_diff auto|on|off] [--no_face_crop]

``PRETRAIN_CKPT``: a converted directory / training workdir export of a pre-train model, or an official pre-train
``.pth`` with ``--model pretrain_...``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np

from facemae_jax import convert, inference, loading
from facemae_jax.loading import LoadedModel


def clip_from_video(path: str, loaded: LoadedModel, index: int = 0, *, face_crop: bool = True) -> np.ndarray:
    """Window ``index`` of a video's largest face (the windows of ``predict``) -> uint8 [T, S, S, 3].

    Streamed: decoding stops as soon as that window is complete (``facemae_jax.video_stream``)."""
    from facemae_jax import video_stream

    cfg = loaded.cfg
    stream = video_stream.VideoClips(path, cfg.num_frames, loaded.sampling_rate, cfg.img_size, face_crop=face_crop,
                                     largest_face=True)
    count = 0
    for item in stream.windows():
        if item.window.index == index:
            return item.clip
        count += 1
    raise IndexError(f"{path}: window {index} does not exist; the video has {count} windows")


def clip_from_shards(path: str, loaded: LoadedModel, index: int = 0) -> tuple[np.ndarray, str]:
    """Record ``index`` of the shards (storage order) -> (uint8 [T, S, S, 3], clip id)."""
    from facemae_jax import extract

    cfg = loaded.cfg
    count = 0
    for record in extract.iter_shard_records(path):
        if count == index:
            clip, _ = extract.eval_clip(record, cfg.num_frames, loaded.sampling_rate, cfg.img_size)
            return clip, record.clip_id
        count += 1
    raise IndexError(f"record {index} does not exist; the shards hold {count} records")


def reconstruction_loss(clip: np.ndarray, mask: np.ndarray, pred: np.ndarray, cfg, frame_diff: bool) -> float:
    """MSE between the prediction and the normalised-patch targets of the hidden tokens (the training loss)."""
    from facemae_jax import targets

    pixels01 = clip.astype(np.float32)[None] / np.float32(255.0)
    target = np.asarray(targets.normalized_patch_targets(pixels01, cfg.patch_size, cfg.tubelet_size, frame_diff))
    return float(np.mean((target[0][np.asarray(mask, bool)] - pred) ** 2))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m facemae_jax.visualize_mae", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", metavar="VIDEO_OR_SHARDS", help="a video file, or a shard directory / file / glob")
    ap.add_argument("--out", required=True, help="output PNG")
    ap.add_argument("--index", type=int, default=0, help="record of the shards / window of the video (default 0)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the mask")
    ap.add_argument("--frame_diff", choices=("auto", "on", "off"), default="auto",
                    help="prediction holds frame differences (auto: yes for the LGI / MAE-DFER family)")
    ap.add_argument("--no_face_crop", action="store_true", help="videos: use whole frames resized to the input")
    loading.add_model_args(ap, pretrain=True)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from data_pipelines.faces import NoFaceFound
    from data_pipelines.video_io import VideoReadError
    from facemae_jax import extract, visualize

    args = build_parser().parse_args(argv)
    try:
        overrides = convert.parse_overrides(args.override)
        loaded = loading.load_model(args.checkpoint, model=args.model, sampling_rate=args.sampling_rate,
                                      overrides=overrides)
    except ValueError as e:  # ModelLoadError, or a malformed --override
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = loaded.cfg
    if cfg.mode != "pretrain":
        print(f"error: {args.checkpoint} is a fine-tune model (no decoder); visualize_mae needs a pre-train "
              f"checkpoint", file=sys.stderr)
        return 2
    try:
        if extract.is_shard_input(args.input):
            clip, name = clip_from_shards(args.input, loaded, args.index)
            name = f"clip {name}"
        else:
            clip = clip_from_video(args.input, loaded, args.index, face_crop=not args.no_face_crop)
            name = f"{os.path.basename(args.input)} window {args.index}"
    except (VideoReadError, NoFaceFound, inference.VideoTooShort, IndexError) as e:
        print(f"error: {args.input}: {e}" if not isinstance(e, VideoReadError) else f"error: {e}", file=sys.stderr)
        return 1
    frame_diff = cfg.family == "lgi" if args.frame_diff == "auto" else args.frame_diff == "on"
    mask = inference.make_mask(cfg, args.seed)
    pred = inference.predict_masked_patches(loaded, clip, mask)
    loss = reconstruction_loss(clip, mask, pred, cfg, frame_diff)
    title = (f"{name} | {cfg.family} {cfg.mask_kind} mask {mask.mean():.0%} hidden | "
             f"{'appearance + frame difference' if frame_diff else 'appearance'} target | loss {loss:.4f}")
    visualize.reconstruction_figure(clip, mask, pred, cfg, frame_diff, args.out, title=title)
    print(f"wrote {args.out} ({name}; reconstruction loss {loss:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
