"""Encoder embeddings for videos or for the clips of a shard directory, into one ``.npz``.

The embedding is the fine-tune model's pooled feature: the mean of the encoder's output tokens after ``fc_norm``
(the vector the classifier head reads). A pre-train checkpoint is used through the fine-tune backbone, as the
reference's fine-tuning loader does (FINETUNING §6): its encoder weights, the encoder's final ``norm`` dropped, and
a fresh ``fc_norm`` with unit scale and zero bias — a plain LayerNorm of the mean token.

* videos (files or folders): one embedding per window and face track (the streamed sliding windows of
  ``predict``, face crop by default; bounded memory for videos of any length);
* shard directory (``*.array_record``, e.g. written by ``data_pipelines.build``): one embedding per clip, from the
  16 frames of the evaluation protocol's first temporal view (DATA §5: frames 0, sr, 2sr, ..., the last repeated
  in short clips), resized to the model's input size with PIL bilinear like the evaluation pipeline.

CLI::

    python -m facemae_jax.extract VIDEO [VIDEO ...] | SHARD_DIR --checkpoint CKPT [--model NAME]
        --out features.npz [--tokens] [--batch N] [--split NAME]

Arrays in the ``.npz`` (strings as numpy unicode, so ``np.load`` needs no pickle):

* always: ``embeddings`` float32 [N, C]; ``frame_indices`` int64 [N, T]; ``kind`` ('videos' | 'shards');
  ``checkpoint``, ``model_config`` (JSON), ``sampling_rate``, ``class_names``, ``head_trained``;
* ``--tokens``: ``tokens`` float32 [N, L, C], the tokens before mean pooling (all patch tokens; for LGI with the
  published 'region' classify type, its region tokens);
* videos: ``video`` [N] (path), ``window_index``, ``start_frame``, ``end_frame`` int64 [N], ``start_time``,
  ``end_time`` float64 [N] (NaN without a frame rate), ``padded`` bool [N], ``track_id`` int64 [N] (face track);
  ``failed_videos`` and ``failed_reasons`` for videos that could not be used; ``truncated_videos`` and
  ``truncated_notes`` for files that decode to fewer frames than they declare (used for what decodes);
* shards: ``clip_id``, ``source`` [N]; ``label`` int64 [N] (-1 = none) for class labels or float32 [N, K] (NaN =
  none) for regression targets; ``num_source_frames`` int64 [N].
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
from typing import Any, Iterator, Sequence

import numpy as np

from facemae_jax import convert, inference, loading
from facemae_jax.loading import LoadedModel


def is_shard_input(path: str) -> bool:
    """A directory holding ``*.array_record`` files, a shard file, or a glob matching shard files."""
    if os.path.isdir(path):
        return bool(glob.glob(os.path.join(path, "*.array_record")))
    if path.endswith(".array_record"):
        return True
    return any(ch in path for ch in "*?[") and any(p.endswith(".array_record") for p in glob.glob(path))


# ---------------------------------------------------------------------------------------------------------------
# Videos
# ---------------------------------------------------------------------------------------------------------------


def extract_videos(videos: Sequence[str], loaded: LoadedModel, forward: inference.ClipForward, *,
                   stride: int | None = None, face_crop: bool = True, tracking=None,
                   largest_face: bool = False) -> dict[str, np.ndarray]:
    """Per-window features of every usable video, streamed (``facemae_jax.video_stream``: bounded memory);
    one set of windows per face track (``track_id``). Failures (unreadable, no face, too short) are listed, not
    raised; truncated files are used for what decodes and listed in ``truncated_videos``."""
    from data_pipelines import progress
    from data_pipelines.faces import NoFaceFound
    from data_pipelines.video_io import VideoReadError, truncation_note
    from facemae_jax import video_stream

    cfg = loaded.cfg
    parts: list[dict[str, Any]] = []
    failed: list[tuple[str, str]] = []
    truncated: list[tuple[str, str]] = []
    for path in progress.bar(videos, desc="videos", unit="video", disable=len(videos) < 2):
        meta: list[tuple[int, inference.Window]] = []
        try:
            stream = video_stream.VideoClips(path, cfg.num_frames, loaded.sampling_rate, cfg.img_size,
                                             stride=stride, face_crop=face_crop, tracking=tracking,
                                             largest_face=largest_face)
            stream.find_faces()

            def clips() -> Iterator[np.ndarray]:
                for item in stream.windows():  # noqa: B023  (consumed before the loop moves on)
                    meta.append((item.track_id, item.window))  # noqa: B023
                    yield item.clip

            out = forward(clips(), desc=f"windows {os.path.basename(path)}")
        except (VideoReadError, NoFaceFound, inference.VideoTooShort) as e:
            message = str(e) if isinstance(e, VideoReadError) else f"{path}: {e}"
            progress.write(f"skipped: {message}")
            failed.append((os.path.abspath(path), message))
            continue
        if stream.truncation is not None:
            note = truncation_note(path, stream.truncation)
            progress.write(f"warning: {note}")
            truncated.append((os.path.abspath(path), note))
        windows = [w for _, w in meta]
        times = np.array([w.times(stream.fps) for w in windows], dtype=np.float64)  # None -> NaN
        parts.append({
            **out,
            "video": np.array([os.path.abspath(path)] * len(windows)),
            "track_id": np.array([t for t, _ in meta], np.int64),
            "window_index": np.array([w.index for w in windows], np.int64),
            "start_frame": np.array([w.start_frame for w in windows], np.int64),
            "end_frame": np.array([w.end_frame for w in windows], np.int64),
            "start_time": times[:, 0],
            "end_time": times[:, 1],
            "padded": np.array([w.padded for w in windows], bool),
            "frame_indices": np.stack([w.frame_indices for w in windows]),
        })
    if not parts:
        raise RuntimeError("no video could be used:\n  " + "\n  ".join(m for _, m in failed))
    result = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    result["failed_videos"] = np.array([p for p, _ in failed], dtype=str)
    result["failed_reasons"] = np.array([m for _, m in failed], dtype=str)
    result["truncated_videos"] = np.array([p for p, _ in truncated], dtype=str)
    result["truncated_notes"] = np.array([m for _, m in truncated], dtype=str)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------------------------


def iter_shard_records(path: str, split: str | None = None) -> Iterator[Any]:
    """Records of a shard directory / file / glob in storage order, or of one split of a dataset directory (in the
    split's order, read through the dataset's ``dataset_info.json``)."""
    from data_pipelines import records

    if split is None:
        yield from records.read_records(path)
        return
    from data_pipelines import pipeline

    source = pipeline.ClipSource(pipeline.DatasetSplit.open(path, split))
    for position in range(len(source)):
        yield source[position].record


def eval_clip(record: Any, clip_len: int, sampling_rate: int, img_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A record's first evaluation view -> (uint8 [T, S, S, 3], frame indices int64 [T])."""
    from data_pipelines import records, transforms

    indices = transforms.eval_frame_indices(record.num_frames, 0, 1, clip_len, sampling_rate)
    frames = records.decode_frames(record, indices)
    return transforms.resize_frames_pil(frames, img_size, img_size), indices


def _labels(values: list[Any]) -> np.ndarray:
    if all(v is None or (isinstance(v, (int, np.integer)) and not isinstance(v, bool)) for v in values):
        return np.array([-1 if v is None else int(v) for v in values], np.int64)
    width = max(len(v) for v in values if isinstance(v, (list, tuple)))
    out = np.full((len(values), width), np.nan, np.float32)
    for i, v in enumerate(values):
        if isinstance(v, (list, tuple)):
            out[i, : len(v)] = v
    return out


def extract_shards(path: str, loaded: LoadedModel, forward: inference.ClipForward, *,
                   split: str | None = None) -> dict[str, np.ndarray]:
    """One feature per clip of the shards (see the module docstring)."""
    cfg = loaded.cfg
    meta: dict[str, list[Any]] = {"clip_id": [], "source": [], "label": [], "num_source_frames": [],
                                  "frame_indices": []}

    def clips() -> Iterator[np.ndarray]:
        for record in iter_shard_records(path, split):
            clip, indices = eval_clip(record, cfg.num_frames, loaded.sampling_rate, cfg.img_size)
            meta["clip_id"].append(record.clip_id)
            meta["source"].append(record.source)
            meta["label"].append(record.label)
            meta["num_source_frames"].append(record.num_frames)
            meta["frame_indices"].append(indices)
            yield clip

    out = forward(clips(), desc="clips")
    return {
        **out,
        "clip_id": np.array(meta["clip_id"], dtype=str),
        "source": np.array(meta["source"], dtype=str),
        "label": _labels(meta["label"]),
        "num_source_frames": np.array(meta["num_source_frames"], np.int64),
        "frame_indices": np.stack(meta["frame_indices"]).astype(np.int64),
    }


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m facemae_jax.extract", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", metavar="VIDEO_OR_SHARDS",
                    help="video files, or one shard directory / .array_record file / glob")
    ap.add_argument("--out", required=True, help="output .npz file")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out file (default: refuse)")
    ap.add_argument("--tokens", action="store_true", help="also store the per-token features (large)")
    ap.add_argument("--batch", type=int, default=8, help="clips per forward pass")
    ap.add_argument("--stride_frames", type=int, default=None, help="videos: frames between window starts")
    ap.add_argument("--no_face_crop", action="store_true", help="videos: use whole frames resized to the input")
    ap.add_argument("--detect_every", type=int, default=None,
                    help="videos: re-detect tracked faces every N frames (default: face_tracks.TrackingOptions)")
    ap.add_argument("--largest_face", action="store_true",
                    help="videos: only the largest face (default: every face track lasting a window)")
    ap.add_argument("--search_whole_video", action="store_true",
                    help="videos: do not give up when no face appears in the first seconds")
    ap.add_argument("--split", default=None, help="shards: only this split of the dataset directory")
    loading.add_model_args(ap)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.out.endswith(".npz"):
        raise SystemExit(f"--out must name a .npz file, got {args.out!r}")
    if os.path.exists(args.out) and not args.overwrite:  # refuse before the (long) extraction, not after
        raise SystemExit(f"--out {args.out!r} already exists; pass --overwrite to replace it, or choose another --out")
    shard_inputs = [p for p in args.inputs if is_shard_input(p)]
    if shard_inputs and len(args.inputs) > 1:
        raise SystemExit(f"give either video files or one shard directory, not both / several: {args.inputs}")
    if args.split is not None and not shard_inputs:
        raise SystemExit("--split applies to a shard (dataset) directory only")
    try:
        overrides = convert.parse_overrides(args.override)
        loaded = loading.as_backbone(loading.load_model(args.checkpoint, model=args.model,
                                                            sampling_rate=args.sampling_rate, overrides=overrides))
    except ValueError as e:  # ModelLoadError, or a malformed --override
        print(f"error: {e}", file=sys.stderr)
        return 2
    outputs = ("pooled", "tokens") if args.tokens else ("pooled",)
    forward = inference.ClipForward(loaded, batch_size=args.batch, outputs=outputs)
    try:
        if shard_inputs:
            result = extract_shards(shard_inputs[0], loaded, forward, split=args.split)
            kind = "shards"
        else:
            from data_pipelines.face_tracks import TrackingOptions
            from facemae_jax import predict

            tracking = TrackingOptions()
            if args.detect_every is not None:
                tracking = dataclasses.replace(tracking, detect_every=args.detect_every)
            if args.search_whole_video:
                tracking = dataclasses.replace(tracking, search_seconds=None)
            result = extract_videos(predict.collect_videos(args.inputs), loaded, forward, stride=args.stride_frames,
                                    face_crop=not args.no_face_crop, tracking=tracking,
                                    largest_face=args.largest_face)
            kind = "videos"
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result["embeddings"] = result.pop("pooled")
    result.update(
        kind=np.array(kind),
        checkpoint=np.array(loaded.source),
        model_config=np.array(json.dumps(loaded.cfg.to_dict())),
        sampling_rate=np.int64(loaded.sampling_rate),
        class_names=np.array(list(loaded.class_names), dtype=str),
        head_trained=np.bool_(loaded.head_trained),
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez(args.out, **result)
    n, c = result["embeddings"].shape
    print(f"wrote {args.out}: {n} embeddings of {c} ({kind})"
          + (f", tokens {list(result['tokens'].shape[1:])}" if "tokens" in result else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
