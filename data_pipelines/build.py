"""Dataset converter: official annotation CSVs or raw videos -> a dataset directory of ArrayRecord shards.

    python -m data_pipelines.build dfew --annotations /data/dfew/org --path_remap /mnt/data1/brain/AC/Dataset/DFEW=/data/DFEW --out /data/shards/dfew
    python -m data_pipelines.build ferv39k --annotations /data/ferv39k/all_scenes --path_remap OLD=NEW --out DIR
    python -m data_pipelines.build csv --annotations my_splits/ --classes a,b,c --out DIR       # or --targets v,a / --unlabeled
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
import dataclasses
import datetime
import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import shlex
import sys
import time
from collections import Counter
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from data_pipelines import records, video_io
from data_pipelines.progress import bar as progress_bar
from data_pipelines.sources import official_csv, videos

CSV_NAMES = (*official_csv.OFFICIAL_LAYOUTS, "csv")
VIDEO_NAMES = ("voxceleb2", "videos")
SIDECAR_DIR = "_build"
# --face_crop on a video whose decoded frames would exceed this goes through the streamed two-pass tracker
# (data_pipelines.face_tracks); shorter clips keep the in-memory detect_and_crop (their bytes stay as before).
STREAMED_FACE_CROP_BYTES = 256 * 2**20
INFO_FILE = "dataset_info.json"


class BuildConfigError(ValueError):
    """The command line or the input layout cannot work; raised before anything is written."""


class ClipSkipped(Exception):
    """One input cannot become a record. ``category`` groups the stderr summary; str() is 'category: detail'."""

    def __init__(self, category: str, detail: str):
        super().__init__(f"{category}: {detail}")
        self.category = category


# ---------------------------------------------------------------------------------------------------------------
# What to convert, and how
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClipInput:
    """One planned record: a clip folder, a single image, or a video file."""

    clip_id: str
    path: str
    label: int | tuple[float, ...] | None
    fold: int | None
    split: str | None


@dataclasses.dataclass(frozen=True)
class FrameOptions:
    """Everything that decides the bytes of a record (all of it except decode_threads is in the fingerprint)."""

    short_side: int
    jpeg_quality: int
    frame_ext: str
    fixed_crop: bool
    face_crop: bool
    face_margin: float | None
    face_detect_every: int | None
    max_frames: int | None
    frame_stride: int
    decode_threads: int = 0
    store_original: bool = False  # keep frame files' bytes as they are (no resize, no re-encoding)
    keep_truncated: bool = False  # keep videos that decode to fewer frames than declared (flagged), or skip them

    def content_fields(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        del fields["decode_threads"]
        if not self.store_original:  # absent = re-encoded, so shards built before the option keep their fingerprint
            del fields["store_original"]
        if not fields["keep_truncated"]:  # the default leaves the fingerprints of earlier builds unchanged
            del fields["keep_truncated"]
        return fields


@dataclasses.dataclass
class BuildPlan:
    name: str
    source: str
    task: str
    class_names: list[str] | None
    target_names: list[str] | None
    folds: int | None
    inputs: list[ClipInput]  # sorted by clip_id: the record order
    splits: dict[str, list[str]]  # split name -> clip ids
    skipped: list[dict[str, str]]  # problems found while planning (annotation lines, class folders)
    warnings: list[str]
    extra: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ShardTask:
    out_dir: str
    shard_name: str
    inputs: tuple[ClipInput, ...]
    options: FrameOptions
    fingerprint: str


# ---------------------------------------------------------------------------------------------------------------
# Frame processing: decode -> (fixed crop | face crop | resize) -> JPEG
# ---------------------------------------------------------------------------------------------------------------


def short_side_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side = ``short_side`` and the aspect ratio kept (long side rounded)."""
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


def resize_short_side(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """PIL bilinear resize to ``size`` (w, h); Pillow widens the filter when shrinking (area-aware, anti-aliased),
    which is what the reference's PIL-based loader does."""
    return img if img.size == size else img.resize(size, Image.Resampling.BILINEAR)


def fixed_top_centre_crop(img: Image.Image, side: int) -> Image.Image:
    """Rows [0, side), cols [(W - side)//2, (W - side)//2 + side): QUIRKS Q24's VoxCeleb2 crop for W=224, side=160."""
    w, h = img.size
    if w < side or h < side:
        raise ClipSkipped("frame too small", f"{w}x{h} frame cannot hold the {side}x{side} fixed top-centre crop")
    left = (w - side) // 2
    return img.crop((left, 0, left + side, side))


def _source_frames(inp: ClipInput, opts: FrameOptions,
                   extra: dict | None = None) -> tuple[Iterator[Image.Image], float | None, str]:
    """Open the clip input -> (RGB frames in temporal order, fps of the stored frames, kind).

    A video that decodes to fewer frames than its header declares, or stops with a decoding error, is truncated
    (a faststart mp4 cut short opens fine and would silently become a shorter clip): the frame iterator raises
    ClipSkipped("truncated video") at its end, or with ``opts.keep_truncated`` records
    ``extra["truncated"] = {declared_frames, decoded_frames, error}`` and keeps what decoded."""
    path = inp.path
    if not os.path.exists(path):
        raise ClipSkipped("missing path", f"{path} does not exist")
    if os.path.isdir(path):
        files = official_csv.list_frame_files(path, opts.frame_ext)
        if not files:
            raise ClipSkipped("empty clip folder", f"no *.{opts.frame_ext} frame in {path}")
        files = files[:: opts.frame_stride][: opts.max_frames]
        return (official_csv.open_frame(f) for f in files), None, "frames"
    if path.lower().endswith(official_csv.IMAGE_EXTENSIONS):  # the reference repeats a lone image 16 times
        return iter([official_csv.open_frame(path)]), None, "image"
    video = video_io.VideoFile(path, threads=opts.decode_threads)
    fps = video.fps / opts.frame_stride if video.fps else None

    def frames() -> Iterator[Image.Image]:
        with video:
            for rgb in video.frames(frame_stride=opts.frame_stride, max_frames=opts.max_frames,
                                    on_error="stop" if opts.keep_truncated else "raise"):
                yield Image.fromarray(rgb)
            truncation = video.truncation()
        if truncation is not None and not opts.keep_truncated:
            raise ClipSkipped("truncated video", f"{video_io.truncation_note(path, truncation)} (--keep_truncated "
                                                 f"keeps such clips, flagged in the record's extra.truncated)")
        if truncation is not None and extra is not None:
            extra["truncated"] = truncation

    return frames(), fps, "video"


def convert_clip(inp: ClipInput, opts: FrameOptions) -> tuple[records.ClipRecord, str]:
    """One input -> (record, 'HxW' of the source frames). Raises ClipSkipped for unusable inputs."""
    try:
        extra: dict[str, Any] = {}
        frames, fps, kind = _source_frames(inp, opts, extra)
        if kind == "image":
            extra["single_image"] = True
        if opts.frame_stride > 1:
            extra["frame_stride"] = opts.frame_stride
        if opts.store_original:
            jpegs, size, source_size = _original_frames(inp, opts)
            extra["stored"] = "original"
        elif opts.face_crop and kind == "video" and _decoded_bytes(inp.path, opts) > STREAMED_FACE_CROP_BYTES:
            jpegs, size, source_size = _streamed_face_crop_frames(inp, opts, extra)
        elif opts.face_crop:
            jpegs, size, source_size = _face_crop_frames(inp, frames, opts, extra)
        else:
            jpegs, size, source_size = _plain_frames(frames, opts)
    except official_csv.FrameReadError as e:
        raise ClipSkipped("unreadable frame", str(e)) from e
    except video_io.VideoReadError as e:
        raise ClipSkipped("unreadable video", str(e)) from e
    extra["source_size"] = list(source_size)
    rec = records.ClipRecord(
        clip_id=inp.clip_id, frames=jpegs, height=size[0], width=size[1], source=inp.path, label=inp.label,
        fold=inp.fold, split=inp.split, fps=fps, extra=extra,
    )
    return rec, f"{source_size[0]}x{source_size[1]}"


def _plain_frames(frames: Iterator[Image.Image], opts: FrameOptions):
    """Resize (or fixed-crop) and JPEG-encode frame by frame, so memory stays bounded for long videos."""
    jpegs: list[bytes] = []
    target = source_size = None
    for img in frames:
        if source_size is None:
            source_size = (img.height, img.width)
            target = None if opts.fixed_crop else short_side_size(img.width, img.height, opts.short_side)
        # Every frame goes to the first frame's target size (the reference resizes each frame to 160x160 too).
        out = fixed_top_centre_crop(img, opts.short_side) if opts.fixed_crop else resize_short_side(img, target)
        jpegs.append(records.encode_jpeg(np.asarray(out), opts.jpeg_quality))
    if not jpegs:
        raise ClipSkipped("no frames", "the input yielded no frame")
    return jpegs, (out.height, out.width), source_size


def _original_frames(inp: ClipInput, opts: FrameOptions):
    """The frame files' own bytes (JPEG or PNG), unchanged: what the reference loader reads, so eval views are
    bit-identical to the reference's (``--store_original_frames``; the eval-views golden checks this). Every file
    is decoded once here so that a corrupt frame is skipped at conversion, as with the default storage."""
    if os.path.isdir(inp.path):
        files = official_csv.list_frame_files(inp.path, opts.frame_ext)[:: opts.frame_stride][: opts.max_frames]
    elif inp.path.lower().endswith(official_csv.IMAGE_EXTENSIONS):
        files = [inp.path]
    else:
        raise ClipSkipped("not a frame folder", f"{inp.path} is a video: --store_original_frames keeps frame files")
    data, size = [], None
    for f in files:
        with open(f, "rb") as fh:
            raw = fh.read()
        if not raw.startswith(records.ORIGINAL_FRAME_MAGIC):
            raise ClipSkipped("unsupported frame format", f"{f}: only JPEG and PNG frames can be stored unchanged")
        img = official_csv.open_frame(f)
        if size is None:
            size = (img.height, img.width)
        elif (img.height, img.width) != size:
            raise ClipSkipped("frame size changes", f"{f} is {img.width}x{img.height}, the clip's first frame "
                                                    f"{size[1]}x{size[0]}: stored frames must share one size")
        data.append(raw)
    return data, size, size


def _decoded_bytes(path: str, opts: FrameOptions) -> int:
    """RGB bytes of the frames a video would decode to (header frame count; 0 when the header has none)."""
    with video_io.VideoFile(path, threads=1) as video:
        frames = -(-video.declared_frames // opts.frame_stride)
        if opts.max_frames is not None:
            frames = min(frames, opts.max_frames)
        return frames * video.height * video.width * 3


def _streamed_face_crop_frames(inp: ClipInput, opts: FrameOptions, extra: dict):
    """Face crop of a long video in two streamed passes (data_pipelines.face_tracks): memory stays bounded."""
    from data_pipelines import face_tracks, faces

    defaults = face_tracks.TrackingOptions()
    options = face_tracks.TrackingOptions(
        detect_every=opts.face_detect_every or defaults.detect_every, search_seconds=None,
        margin=defaults.margin if opts.face_margin is None else opts.face_margin)
    try:
        track, crops, truncation, source_size = face_tracks.largest_face_crops(
            inp.path, opts.short_side, options, frame_stride=opts.frame_stride, max_frames=opts.max_frames,
            threads=opts.decode_threads, on_error="stop" if opts.keep_truncated else "raise")
    except faces.NoFaceFound as e:
        raise ClipSkipped("no face found", f"{inp.path}: {e}") from e
    if truncation is not None and not opts.keep_truncated:
        raise ClipSkipped("truncated video", f"{video_io.truncation_note(inp.path, truncation)} (--keep_truncated "
                                             f"keeps such clips, flagged in the record's extra.truncated)")
    if truncation is not None:
        extra["truncated"] = truncation
    extra["face_boxes"] = np.round(np.asarray(track.boxes, np.float64), 1).tolist()
    extra["face_detected_fraction"] = float(np.mean(track.detected))
    extra["face_crop_streamed"] = True
    jpegs = [records.encode_jpeg(c, opts.jpeg_quality) for c in crops]
    return jpegs, (opts.short_side, opts.short_side), source_size


def _face_crop_frames(inp: ClipInput, frames: Iterator[Image.Image], opts: FrameOptions, extra: dict):
    """Detect, track and crop the face over the whole clip (needs all frames in memory: T x H x W x 3 bytes)."""
    from data_pipelines import faces  # lazy: the converter works without the face module unless --face_crop

    arrays = [np.asarray(img) for img in frames]
    if not arrays:
        raise ClipSkipped("no frames", "the input yielded no frame")
    if len({a.shape for a in arrays}) > 1:
        raise ClipSkipped("inconsistent frame sizes", f"{sorted({a.shape[:2] for a in arrays})} in {inp.path}")
    kwargs = {}
    if opts.face_margin is not None:
        kwargs["margin"] = opts.face_margin
    if opts.face_detect_every is not None:
        kwargs["detect_every"] = opts.face_detect_every
    try:
        track = faces.detect_and_crop(np.stack(arrays), opts.short_side, **kwargs)
    except faces.NoFaceFound as e:
        raise ClipSkipped("no face found", f"{inp.path}: {e}") from e
    extra["face_boxes"] = np.round(np.asarray(track.boxes, np.float64), 1).tolist()
    extra["face_detected_fraction"] = float(np.mean(track.detected))
    jpegs = [records.encode_jpeg(c, opts.jpeg_quality) for c in track.crops]
    return jpegs, track.crops.shape[1:3], arrays[0].shape[:2]


# ---------------------------------------------------------------------------------------------------------------
# Shards (run in worker processes)
# ---------------------------------------------------------------------------------------------------------------


def sidecar_path(out_dir: str, shard_name: str) -> str:
    return os.path.join(out_dir, SIDECAR_DIR, shard_name + ".json")


def build_shard(task: ShardTask, progress: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    """Convert the inputs of one shard, write the shard and its sidecar; return the sidecar dict."""
    start = time.monotonic()
    written: list[str] = []
    skipped: list[dict[str, str]] = []
    num_frames: list[int] = []
    source_sizes: Counter = Counter()
    labels: Counter = Counter()
    with records.ShardWriter(os.path.join(task.out_dir, task.shard_name)) as writer:
        for inp in task.inputs:
            try:
                rec, source_size = convert_clip(inp, task.options)
            except ClipSkipped as e:
                skipped.append({"input": inp.path, "reason": str(e)})
            except Exception as e:  # a broken input must never stop a million-clip build; the reason says what
                skipped.append({"input": inp.path, "reason": f"unexpected error: {type(e).__name__}: {e}"})
            else:
                writer.write(rec)
                written.append(inp.clip_id)
                num_frames.append(rec.num_frames)
                source_sizes[source_size] += 1
                if isinstance(inp.label, int):
                    labels[str(inp.label)] += 1
            progress(1)
    sidecar = {
        "shard": task.shard_name,
        "fingerprint": task.fingerprint,
        "num_records": len(written),
        "clip_ids": written,
        "num_frames": num_frames,
        "source_frame_sizes": dict(source_sizes),
        "label_histogram": dict(sorted(labels.items(), key=lambda kv: int(kv[0]))),
        "skipped": skipped,
        "seconds": round(time.monotonic() - start, 3),
    }
    _write_json_atomic(sidecar_path(task.out_dir, task.shard_name), sidecar)
    return sidecar


_worker_counter = None


def _init_worker(counter) -> None:
    global _worker_counter
    _worker_counter = counter


def _count_clip(n: int) -> None:
    with _worker_counter.get_lock():
        _worker_counter.value += n


def _build_shard_in_worker(task: ShardTask) -> dict[str, Any]:
    return build_shard(task, _count_clip)


def _write_json_atomic(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def shard_fingerprint(shard_name: str, inputs: Sequence[ClipInput], options: FrameOptions) -> str:
    """Hash of what decides a shard's bytes: a shard built from other inputs or options is rebuilt on resume."""
    payload = json.dumps(
        {"shard": shard_name, "options": options.content_fields(), "inputs": [dataclasses.astuple(i) for i in inputs]},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _load_finished_sidecar(task: ShardTask) -> dict[str, Any] | None:
    """The sidecar of a shard finished by an earlier run with the same plan, else None (shard must be built)."""
    if not os.path.exists(os.path.join(task.out_dir, task.shard_name)):
        return None
    try:
        with open(sidecar_path(task.out_dir, task.shard_name)) as f:
            sidecar = json.load(f)
    except (OSError, ValueError):
        return None
    return sidecar if sidecar.get("fingerprint") == task.fingerprint else None


def run_tasks(
    tasks: Sequence[ShardTask], *, workers: int, total_clips: int, done_clips: int, progress: bool
) -> list[dict]:
    """Build the shards (in-process for one worker, else a spawn pool); progress bar counts clips."""
    bar = progress_bar(total=total_clips, initial=done_clips, unit="clip", desc="converting", disable=not progress,
               file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    try:
        if workers <= 1 or len(tasks) <= 1:
            return [build_shard(t, bar.update) for t in tasks]
        ctx = mp.get_context("spawn")  # fork is unsafe once a parent has threads (e.g. JAX in the same process)
        counter = ctx.Value("q", 0)
        with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(counter,)) as pool:
            pending = [pool.apply_async(_build_shard_in_worker, (t,)) for t in tasks]
            results: list[dict | None] = [None] * len(tasks)
            shown = 0
            while any(r is None for r in results):
                time.sleep(0.2)
                for i, r in enumerate(pending):
                    if results[i] is None and r.ready():
                        results[i] = r.get()  # re-raises a worker's crash (disk full, ...) here
                bar.update(counter.value - shown)
                shown = counter.value
            return results
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------------------


def plan_from_annotations(args: argparse.Namespace) -> BuildPlan:
    layout = official_csv.OFFICIAL_LAYOUTS.get(args.name)
    if layout is None and args.classes is None and args.targets is None and not args.unlabeled:
        task_note = "inferred from the column count (no --classes/--targets/--unlabeled)"
    else:
        task_note = None
    try:
        remaps = [official_csv.PathRemap.parse(r) for r in args.path_remap]
        ann = official_csv.load_annotations(
            args.annotations,
            num_folds=layout.num_folds if layout else None,
            required_splits=official_csv.OFFICIAL_REQUIRED_SPLITS if layout else (),
            class_names=layout.class_names if layout else args.classes,
            target_names=args.targets,
            unlabeled=args.unlabeled,
            path_remaps=remaps,
            root=args.root,
        )
    except official_csv.AnnotationError as e:
        raise BuildConfigError(str(e)) from e
    inputs = [ClipInput(c.clip_id, c.path, c.label, c.fold, c.split) for c in ann.clips]
    extra = {
        "input": "annotation CSVs over frame folders",
        "annotations": os.path.abspath(args.annotations),
        "annotation_files": [os.path.relpath(f, args.annotations) if os.path.isdir(args.annotations) else f
                             for f in ann.files],
        "path_remap": [f"{r.old}={r.new}" for r in remaps],
        "structure_check": ann.checks,
    }
    if task_note:
        extra["task_inferred"] = f"{ann.task}: {task_note}"
    return BuildPlan(
        name=args.dataset_name, source=ann.root, task=ann.task, class_names=ann.class_names,
        target_names=ann.target_names, folds=ann.num_folds or None, inputs=inputs, splits=ann.splits,
        skipped=ann.skipped, warnings=ann.warnings, extra=extra,
    )


def plan_from_videos(args: argparse.Namespace) -> BuildPlan:
    try:
        if args.name == "voxceleb2":
            listing = videos.find_voxceleb2(args.root)
        else:
            listing = videos.find_videos(args.root, labels_from_folders=args.labels_from_folders,
                                         class_names=args.classes)
    except videos.VideoSourceError as e:
        raise BuildConfigError(str(e)) from e
    split = args.split or ("train" if listing.class_names else "pretrain")
    inputs = [ClipInput(c.clip_id, c.path, c.label, None, split) for c in listing.clips]
    return BuildPlan(
        name=args.dataset_name, source=listing.root, task="classification" if listing.class_names else "unlabeled",
        class_names=listing.class_names, target_names=None, folds=None, inputs=inputs,
        splits={split: [c.clip_id for c in listing.clips]}, skipped=listing.skipped, warnings=[],
        extra={"input": "video files" + (" (VoxCeleb2 layout)" if args.name == "voxceleb2" else ""),
               "labels_from_folders": bool(args.labels_from_folders)},
    )


# ---------------------------------------------------------------------------------------------------------------
# dataset_info.json
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
    info: dict[str, Any] = {
        "format": "facemae_dataset",
        "version": 1,
        "name": plan.name,
        "source": plan.source,
        "creation_command": creation_command,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "num_clips": len(clip_index),
        "shards": list(shard_names),
        "frame_size": (
            {"original": True} if opts.store_original  # as the files are; extra.source_frame_sizes has them
            else {"height": opts.short_side, "width": opts.short_side} if square else {"short_side": opts.short_side}
        ),
        "task": plan.task,
    }
    if plan.task == "classification":
        info["class_names"] = list(plan.class_names)
    if plan.task == "regression":
        info["target_names"] = list(plan.target_names)
    if plan.task == "classification":
        totals = Counter()
        for sidecar in sidecars:
            totals.update(sidecar["label_histogram"])
        info["label_histogram"] = {str(i): totals.get(str(i), 0) for i in range(len(plan.class_names))}
    else:
        info["label_histogram"] = {}
    info["splits"] = splits
    if plan.folds:
        info["folds"] = plan.folds
    info["skipped"] = list(plan.skipped) + [entry for s in sidecars for entry in s["skipped"]]
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
    info["extra"] = extra
    return info


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
    foreign = sorted(set(n for n in os.listdir(out_dir) if n.endswith(".array_record")) - set(names))
    if foreign:
        raise BuildConfigError(
            f"--out {out_dir!r} already holds {len(foreign)} shard(s) of another build plan (e.g. {foreign[0]}; this "
            f"plan makes {names[0]} ...): the inputs or --clips_per_shard changed. Use a new folder or delete them."
        )

    tasks = []
    for i, name in enumerate(names):
        chunk = tuple(plan.inputs[i * args.clips_per_shard:(i + 1) * args.clips_per_shard])
        tasks.append(ShardTask(out_dir, name, chunk, opts, shard_fingerprint(name, chunk, opts)))
    sidecars: list[dict | None] = [_load_finished_sidecar(t) for t in tasks]
    todo = [t for t, s in zip(tasks, sidecars) if s is None]
    done_clips = sum(len(t.inputs) for t, s in zip(tasks, sidecars) if s is not None)

    info_path = os.path.join(out_dir, INFO_FILE)
    if todo and os.path.exists(info_path):  # while shards change, the folder must not look like a finished dataset
        os.remove(info_path)
    start = time.monotonic()
    fresh = iter(run_tasks(todo, workers=args.workers, total_clips=len(plan.inputs), done_clips=done_clips,
                           progress=not args.no_progress))
    sidecars = [s if s is not None else next(fresh) for s in sidecars]

    info = assemble_info(plan, opts, names, sidecars, creation_command)
    _write_json_atomic(info_path, info)
    _summarise(info, out_dir, len(todo), len(tasks) - len(todo), time.monotonic() - start, plan.warnings)
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
