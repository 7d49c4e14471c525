"""Dataset converter: official annotation CSVs or raw videos -> a dataset directory of ArrayRecord shards.

    python -m data_pipelines.build dfew --annotations /data/dfew/org \
        --path_remap /mnt/data1/brain/AC/Dataset/DFEW=/data/DFEW --out /data/shards/dfew
    python -m data_pipelines.build ferv39k --annotations /data/ferv39k/all_scenes --path_remap OLD=NEW --out DIR
    python -m data_pipelines.build csv --annotations my_splits/ --classes a,b,c --out DIR  # or --targets / --unlabeled
    python -m data_pipelines.build voxceleb2 --root /data/VoxCeleb2/dev/mp4 --out DIR --workers 16
    python -m data_pipelines.build videos --root my_videos/ --labels_from_folders --face_crop --out DIR

NAME is one of dfew | mafw | ferv39k | crema_d | ravdess | enterface | csv (annotation CSVs over frame folders,
``sources/official_csv.py``) or voxceleb2 | videos (video files, ``sources/videos.py``). The output folder follows
the shared dataset-directory convention: shards named ``records.shard_name(NAME, i, n)`` and a ``dataset_info.json``
with counts, class names, label histogram, frame size, splits as global record indices, the skipped inputs and
an ``extra`` block recording every preprocessing choice. Each clip is stored once: the five DFEW folds share one
set of shards and differ only in their ``fold{k}/train|val|test`` index lists.

Stored frame size (``--short_side``, default 160). Frames are resized so that their short side is S (aspect kept,
PIL bilinear, which low-pass filters when shrinking like the reference's loader); face crops and the VoxCeleb2 fixed
crop are S x S. 160 is exactly what the 160 x 160 training crop needs: the reference keeps the 256/224-pixel frames
on disk and resizes every frame on every read. 160 has (256/160)^2 = 2.6x fewer pixels than 256 (measured on
synthetic 256-pixel test frames: shards 2.2x smaller, JPEG decoding - the input pipeline's main cost - 3x faster),
and the loader's resize becomes a no-op for square clips. The price: a model at a larger input size (e.g. 224)
cannot be trained from these shards without upsampling - rebuild with ``--short_side 224`` (or 256). Non-square
sources (FERV39k, raw videos) are resized twice in total (here to short side S, later to S x S by the loader), which
is not bit-identical to the reference's single resize. ``--store_original_frames`` keeps each frame file's bytes
(JPEG or PNG) unchanged instead: the test views are then bit-identical to the reference loader's (checked on the
eval-views golden, ``facemae_jax.parity``), at the cost of larger shards and the reference's per-read resize; with
the default storage the views differ by 0.86 grey levels on average there (JPEG re-encoding, max 20).

Storage of long videos (``--max_frames`` / ``--frame_stride``). All frames are kept by default (the faithful choice:
pre-training draws a 64-frame window, stride 4, anywhere in the clip). VoxCeleb2 dev has ~1.09 M clips of ~8 s at 25
fps (~200 frames); at roughly 6 KB per 160 x 160 JPEG frame (a 16-frame clip is ~100 KB) that is ~1.2 MB per clip
and ~1.3 TB in total. ``--frame_stride 4`` stores every 4th frame (~4x less disk and decode work; records carry
``fps/4`` and ``extra.frame_stride``) but the pipeline must then sample with rate 1, and window starts can only be
multiples of 4. ``--max_frames 64`` stores the first 64 frames (~3x less), which removes the temporal jitter of
where in the clip the window lies. ``--frame_stride 4 --max_frames 16`` keeps one fixed window per clip (~12x less),
i.e. no temporal augmentation at all.

VoxCeleb2 crop (``--vox_fixed_crop``, default on for voxceleb2 unless ``--face_crop``): the reference crops every
decoded 224 x 224 frame to rows 0-159, cols 32-191 before augmentation (QUIRKS Q24). Here that is the top-centre S x
S square, rows [0, S), cols [(W-S)//2, (W-S)//2 + S) - for W = 224 and S = 160 exactly the reference crop, for S =
192 the reference's ``_192`` variant (rows 0-191, cols 16-207) - applied at the decoded resolution.

Resumable and parallel. Inputs are sorted and cut into shards of ``--clips_per_shard`` clips (a deterministic plan);
``--workers`` processes (spawned, JAX-free) each convert whole shards. ShardWriter writes ``.tmp`` then renames, and
each finished shard leaves a small sidecar ``_build/<shard>.json`` (clip ids written, frame counts, label histogram,
skipped inputs, and a fingerprint of its inputs and options). On a re-run, a shard whose file and matching sidecar
exist is not touched, and ``dataset_info.json`` is rebuilt from all sidecars - so an interrupted build continues
where it stopped and ends with the complete info. Two builds must not write to one folder at once.

Bad inputs never stop a build: missing or empty clip folders, unreadable frames, truncated or zero-frame videos,
labels out of range, clips without a face (``--face_crop``) are listed in ``dataset_info.json["skipped"]`` with
the input and the reason, and summarised on stderr. Bad *configuration* (annotation folder missing, fold layout
wrong, a ``--path_remap`` that matches nothing, no clip path existing at all) stops before anything is written.

Truncated videos and long videos. A video that decodes to fewer frames than its header declares (a faststart mp4
cut short opens fine) is skipped as "truncated video", or kept with what decoded and flagged in
``extra.truncated`` with ``--keep_truncated``. ``--face_crop`` on a video whose decoded frames exceed
``STREAMED_FACE_CROP_BYTES`` tracks and crops in two streamed passes (``face_tracks``), so it never has to fit in
memory.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import sys
from collections import Counter
from typing import Any, Sequence

import numpy as np

from data_pipelines import dataset_info, records, shard_runner
from data_pipelines.build_plans import (
    CSV_NAMES,
    VIDEO_NAMES,
    BuildConfigError,
    BuildPlan,
    plan_from_annotations,
    plan_from_videos,
)
from data_pipelines.clip_conversion import FrameOptions, shard_fingerprint, write_shard
from data_pipelines.sources import official_csv

INFO_FILE = dataset_info.FILE

# ---------------------------------------------------------------------------------------------------------------
# dataset_info.json from the plan and the shards' sidecars
# ---------------------------------------------------------------------------------------------------------------


def assemble_info(plan: BuildPlan, opts: FrameOptions, shard_names: list[str], sidecars: list[dict],
                  creation_command: str) -> dict[str, Any]:
    """Combine the plan and the per-shard sidecars into the dataset_info.json dict (global indices in shard order)."""
    clip_index: dict[str, int] = {}
    for sidecar in sidecars:
        for clip_id in sidecar["clip_ids"]:
            clip_index[clip_id] = len(clip_index)
    label_of = {inp.clip_id: inp.label for inp in plan.inputs}

    def histogram(clip_ids) -> dict[str, int]:
        counts = Counter(label_of[c] for c in clip_ids)
        return {str(i): counts.get(i, 0) for i in range(len(plan.class_names))}

    splits = {name: sorted(clip_index[c] for c in ids if c in clip_index) for name, ids in plan.splits.items()}
    num_frames = [n for s in sidecars for n in s["num_frames"]]
    source_sizes: Counter = Counter()
    for s in sidecars:
        source_sizes.update(s["source_frame_sizes"])
    square = opts.fixed_crop or opts.face_crop
    label_histogram = {}
    if plan.task == "classification":
        totals = Counter()
        for sidecar in sidecars:
            totals.update(sidecar["label_histogram"])
        label_histogram = {str(i): totals.get(str(i), 0) for i in range(len(plan.class_names))}
    extra = dict(plan.extra)
    extra["builder"] = "data_pipelines.build"
    extra["preprocessing"] = {
        **opts.content_fields(),
        "resize": None if square or opts.store_original else
                  "short side to short_side, aspect kept, PIL bilinear (anti-aliased)",
        "fixed_crop_rule": "rows [0, S), cols [(W-S)//2, (W-S)//2+S) of the decoded frame, S = short_side "
                           "(QUIRKS Q24: rows 0-159, cols 32-191 for 224x224 VoxCeleb2)" if opts.fixed_crop else None,
        "jpeg": "frame files stored unchanged" if opts.store_original else f"simplejpeg quality {opts.jpeg_quality}",
    }
    extra["num_frames"] = (
        {"min": min(num_frames), "max": max(num_frames), "mean": round(float(np.mean(num_frames)), 2),
         "total": int(sum(num_frames))} if num_frames else {}
    )
    extra["source_frame_sizes"] = dict(sorted(source_sizes.items(), key=lambda kv: -kv[1]))
    if plan.task == "classification":
        extra["split_label_histograms"] = {name: histogram(c for c in ids if c in clip_index)
                                           for name, ids in plan.splits.items()}
    if plan.warnings:
        extra["warnings"] = list(plan.warnings)
    return dataset_info.make(
        name=plan.name, source=plan.source, creation_command=creation_command, num_clips=len(clip_index),
        shards=shard_names,
        frame_size=({"original": True} if opts.store_original  # as the files are; extra.source_frame_sizes has them
                    else {"height": opts.short_side, "width": opts.short_side} if square
                    else {"short_side": opts.short_side}),
        task=plan.task, class_names=plan.class_names if plan.task == "classification" else None,
        target_names=plan.target_names if plan.task == "regression" else None, label_histogram=label_histogram,
        splits=splits, folds=plan.folds, skipped=list(plan.skipped) + [e for s in sidecars for e in s["skipped"]],
        extra=extra,
    )


def _summarise(info: dict, out_dir: str, built: int, reused: int, seconds: float, warnings: Sequence[str]) -> None:
    err = sys.stderr
    print(f"data_pipelines.build: {info['name']}: {info['num_clips']} clips in {len(info['shards'])} shard(s) -> "
          f"{out_dir} ({built} shard(s) built in {seconds:.1f} s, {reused} reused from an earlier run)", file=err)
    skipped = info["skipped"]
    if skipped:
        print(f"skipped {len(skipped)} input(s):", file=err)
        for reason, n in Counter(s["reason"].split(":", 1)[0] for s in skipped).most_common():
            example = next(s for s in skipped if s["reason"].startswith(reason))
            detail = example["reason"][len(reason) + 1:].strip()[:200]
            print(f"  {n:7d} x {reason}   (e.g. {example['input']}: {detail})", file=err)
        print(f"  full list: {os.path.join(out_dir, INFO_FILE)} [\"skipped\"]", file=err)
    for w in warnings:
        print(f"warning: {w}", file=err)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def _comma_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.build", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=[*CSV_NAMES, *VIDEO_NAMES], help="dataset / input kind")
    p.add_argument("--out", required=True, help="output dataset folder (created; re-running resumes)")
    g = p.add_argument_group("annotation CSVs (dfew mafw ferv39k crema_d ravdess enterface csv)")
    g.add_argument("--annotations", help="split folder root (split01..0K/ or the folder of train.csv/test.csv)")
    g.add_argument("--path_remap", action="append", default=[], metavar="OLD=NEW",
                   help="move annotation paths under OLD to NEW (repeatable)")
    g.add_argument("--frame_ext", help="frame file extension in clip folders (default: png for mafw, else jpg)")
    g.add_argument("--targets", type=_comma_list, help="csv: regression target names (one float column each)")
    g.add_argument("--unlabeled", action="store_true", help="csv: ignore label columns")
    g = p.add_argument_group("videos (voxceleb2 videos)")
    g.add_argument("--root", help="videos: folder to scan; csv: base folder of relative annotation paths")
    g.add_argument("--labels_from_folders", action="store_true", help="videos: class = name of the parent folder")
    g.add_argument("--split", help="videos: split name (default pretrain, or train with --labels_from_folders)")
    g.add_argument("--classes", type=_comma_list, help="csv / videos: class names, index = label")
    g = p.add_argument_group("frames")
    g.add_argument("--short_side", type=int, default=160, help="stored short side (crops: side) in pixels")
    g.add_argument("--jpeg_quality", type=int, default=90)
    g.add_argument("--store_original_frames", action="store_true",
                   help="csv datasets: keep each frame file's bytes unchanged (no resize or re-encoding; "
                        "bit-identical test views, larger shards)")
    g.add_argument("--vox_fixed_crop", dest="vox_fixed_crop", action="store_true", default=None,
                   help="top-centre S x S crop (QUIRKS Q24); default on for voxceleb2 unless --face_crop")
    g.add_argument("--no_vox_fixed_crop", dest="vox_fixed_crop", action="store_false",
                   help="keep the whole frame (resize to the short side) for voxceleb2")
    g.add_argument("--face_crop", action="store_true", help="detect, track and crop the face (data_pipelines.faces)")
    g.add_argument("--face_margin", type=float, help="face box enlargement (faces.detect_and_crop default if unset)")
    g.add_argument("--face_detect_every", type=int, help="run the detector every n frames (default: faces' default)")
    g.add_argument("--max_frames", type=int, help="store at most this many frames per clip (after the stride)")
    g.add_argument("--frame_stride", type=int, default=1, help="store every n-th frame")
    g.add_argument("--keep_truncated", action="store_true",
                   help="videos that decode to fewer frames than their header declares (cut short, damaged): keep "
                        "the decoded frames, flagged in the record's extra.truncated (default: skip and report)")
    g = p.add_argument_group("run")
    g.add_argument("--workers", type=int, default=1, help="worker processes")
    g.add_argument("--clips_per_shard", type=int, default=256)
    g.add_argument("--dataset_name", help="name in dataset_info.json and shard prefix (default: NAME)")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def _validate(args: argparse.Namespace) -> FrameOptions:
    """Check the command line as a whole; returns the frame options. Raises BuildConfigError."""
    official = args.name in official_csv.OFFICIAL_LAYOUTS
    if args.name in CSV_NAMES and not args.annotations:
        raise BuildConfigError(f"{args.name}: --annotations (the split folder) is required")
    if args.name in VIDEO_NAMES and not args.root:
        raise BuildConfigError(f"{args.name}: --root (the folder of videos) is required")
    if args.name in VIDEO_NAMES and (args.annotations or args.path_remap):
        raise BuildConfigError(f"{args.name}: --annotations/--path_remap are for the CSV datasets")
    if official and args.classes:
        raise BuildConfigError(f"{args.name} has fixed classes (FINETUNING §2); use NAME csv for other classes")
    if args.name != "csv" and (args.targets or args.unlabeled):
        raise BuildConfigError("--targets / --unlabeled are options of NAME csv")
    if sum(bool(x) for x in (args.classes, args.targets, args.unlabeled)) > 1:
        raise BuildConfigError("give at most one of --classes, --targets, --unlabeled")
    if args.name != "videos" and args.labels_from_folders:
        raise BuildConfigError("--labels_from_folders is an option of NAME videos")
    if args.name == "voxceleb2" and args.classes:
        raise BuildConfigError("voxceleb2 is unlabeled; --classes does not apply")
    if args.name == "videos" and args.classes and not args.labels_from_folders:
        raise BuildConfigError("videos: --classes needs --labels_from_folders (the classes are folder names)")
    if args.name in CSV_NAMES and args.split:
        raise BuildConfigError("--split is for video folders; CSV datasets take split names from the file names")
    for flag, value, low in (("--short_side", args.short_side, 1), ("--frame_stride", args.frame_stride, 1),
                             ("--workers", args.workers, 1), ("--clips_per_shard", args.clips_per_shard, 1),
                             ("--max_frames", args.max_frames, 1), ("--face_detect_every", args.face_detect_every, 1),
                             ("--jpeg_quality", args.jpeg_quality, 1)):
        if value is not None and value < low:
            raise BuildConfigError(f"{flag} must be >= {low}, got {value}")
    if args.jpeg_quality > 100:
        raise BuildConfigError(f"--jpeg_quality must be <= 100, got {args.jpeg_quality}")
    if args.store_original_frames and (args.name in VIDEO_NAMES or args.face_crop or args.vox_fixed_crop):
        raise BuildConfigError("--store_original_frames keeps frame files unchanged: it applies to the csv "
                               "datasets (frame folders) without --face_crop / --vox_fixed_crop")
    if args.face_crop and args.vox_fixed_crop:
        raise BuildConfigError("--face_crop and --vox_fixed_crop are alternatives; choose one")
    if not args.face_crop and (args.face_margin is not None or args.face_detect_every is not None):
        raise BuildConfigError("--face_margin / --face_detect_every need --face_crop")
    if args.face_crop:
        try:
            from data_pipelines import faces  # noqa: F401  (fail now rather than once per clip)
        except ImportError as e:
            raise BuildConfigError(f"--face_crop needs data_pipelines.faces, which cannot be imported ({e})") from e
    fixed_crop = args.vox_fixed_crop
    if fixed_crop is None:  # the reference crops VoxCeleb2 (Q24); a face crop replaces that crop
        fixed_crop = args.name == "voxceleb2" and not args.face_crop
    layout = official_csv.OFFICIAL_LAYOUTS.get(args.name)
    frame_ext = (args.frame_ext or (layout.frame_ext if layout else "jpg")).lstrip(".")
    args.dataset_name = args.dataset_name or args.name
    return FrameOptions(
        short_side=args.short_side, jpeg_quality=args.jpeg_quality, frame_ext=frame_ext, fixed_crop=bool(fixed_crop),
        face_crop=bool(args.face_crop), face_margin=args.face_margin, face_detect_every=args.face_detect_every,
        max_frames=args.max_frames, frame_stride=args.frame_stride, decode_threads=1 if args.workers > 1 else 0,
        store_original=bool(args.store_original_frames),
        keep_truncated=bool(getattr(args, "keep_truncated", False)),
    )


def build(args: argparse.Namespace, creation_command: str) -> dict[str, Any]:
    """Plan, convert the shards not finished yet, write dataset_info.json; returns the info dict."""
    opts = _validate(args)
    plan = plan_from_annotations(args) if args.name in CSV_NAMES else plan_from_videos(args)
    if not plan.inputs:
        first = f" (first problem: {plan.skipped[0]['input']}: {plan.skipped[0]['reason']})" if plan.skipped else ""
        raise BuildConfigError(f"{args.name}: no clip to convert{first}")

    out_dir = args.out
    prefix = re.sub(r"[^A-Za-z0-9_.]+", "_", plan.name)
    num_shards = math.ceil(len(plan.inputs) / args.clips_per_shard)
    names = [records.shard_name(prefix, i, num_shards) for i in range(num_shards)]
    if os.path.isfile(out_dir):
        raise BuildConfigError(f"--out {out_dir!r} is a file")
    os.makedirs(out_dir, exist_ok=True)
    foreign = shard_runner.stray_shards(out_dir, names)
    if foreign:
        raise BuildConfigError(
            f"--out {out_dir!r} already holds {len(foreign)} shard(s) of another build plan (e.g. {foreign[0]}; this "
            f"plan makes {names[0]} ...): the inputs or --clips_per_shard changed. Use a new folder or delete them."
        )

    jobs = []
    for i, name in enumerate(names):
        chunk = tuple(plan.inputs[i * args.clips_per_shard:(i + 1) * args.clips_per_shard])
        jobs.append(shard_runner.ShardJob(out_dir, name, shard_fingerprint(name, chunk, opts), len(chunk),
                                          (chunk, opts)))
    result = shard_runner.run(jobs, write_shard, workers=args.workers, progress=not args.no_progress,
                              desc="converting")
    info = assemble_info(plan, opts, names, result.sidecars, creation_command)
    dataset_info.write(out_dir, info)
    _summarise(info, out_dir, result.built, result.reused, result.seconds, plan.warnings)
    return info


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(argv)
    try:
        info = build(args, "python -m data_pipelines.build " + shlex.join(argv))
    except BuildConfigError as e:
        print(f"data_pipelines.build: error: {e}", file=sys.stderr)
        return 2
    empty = sorted(name for name, ids in info["splits"].items() if not ids)
    if not info["num_clips"]:  # every input was skipped: an empty dataset is a failed conversion
        print(f"data_pipelines.build: error: no clip was converted (all {len(info['skipped'])} input(s) skipped, "
              f"reasons above and in {os.path.join(args.out, INFO_FILE)} [\"skipped\"])", file=sys.stderr)
        return 1
    if empty:
        print(f"data_pipelines.build: warning: split(s) {empty} hold no clip", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

