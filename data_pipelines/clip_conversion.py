"""Frame conversion of one clip input (a frame folder, a single image or a video file) into a clip record.

Why a module of its own: this is what decides the bytes of a record - decode, then (fixed top-centre crop | face
crop | resize to the short side), then JPEG - and it runs inside the converter's worker processes, JAX-free. The
stored-size, crop and truncation rules are explained in ``data_pipelines.build``'s docstring. :func:`convert_clip`
converts one input; :func:`write_shard` is the ``shard_runner`` writer that converts the inputs of one shard and
reports what the shard holds (its sidecar); :func:`shard_fingerprint` is the hash that decides whether a finished
shard can be reused on resume.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from data_pipelines import records, shard_runner, video_io
from data_pipelines.sources import official_csv

# --face_crop on a video whose decoded frames would exceed this goes through the streamed two-pass tracker
# (data_pipelines.face_tracks); shorter clips keep the in-memory detect_and_crop (their bytes stay as before).
STREAMED_FACE_CROP_BYTES = 256 * 2**20


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
# One shard (runs in the shard runner's worker processes)
# ---------------------------------------------------------------------------------------------------------------


def write_shard(job: shard_runner.ShardJob, writer: records.ShardWriter,
                count: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    """shard_runner writer: convert the inputs of one shard (``job.work = (inputs, options)``) into ``writer``;
    returns the sidecar content (clip ids written, frame counts, source sizes, label histogram, skipped inputs)."""
    inputs, options = job.work
    written: list[str] = []
    skipped: list[dict[str, str]] = []
    num_frames: list[int] = []
    source_sizes: Counter = Counter()
    labels: Counter = Counter()
    for inp in inputs:
        try:
            rec, source_size = convert_clip(inp, options)
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
        count(1)
    return {
        "num_records": len(written),
        "clip_ids": written,
        "num_frames": num_frames,
        "source_frame_sizes": dict(source_sizes),
        "label_histogram": dict(sorted(labels.items(), key=lambda kv: int(kv[0]))),
        "skipped": skipped,
    }


def shard_fingerprint(shard_name: str, inputs: Sequence[ClipInput], options: FrameOptions) -> str:
    """Hash of what decides a shard's bytes: a shard built from other inputs or options is rebuilt on resume."""
    return shard_runner.fingerprint(
        {"shard": shard_name, "options": options.content_fields(), "inputs": [dataclasses.astuple(i) for i in inputs]})
