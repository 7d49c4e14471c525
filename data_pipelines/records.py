"""The clip record format: the one place that knows the bytes of a shard record.

One ArrayRecord record = one clip = one msgpack map (format ``facemae_clip``, version 1)::

    {
      "format": "facemae_clip", "version": 1,
      "clip_id": str,            # unique within a dataset (e.g. DFEW "02522", VoxCeleb2 "id00012/abc/00001")
      "source": str,             # where the clip came from (original path), for error messages and provenance
      "label": int | [float, ...] | None,   # class index, regression target vector, or None (unlabeled)
      "fold": int | None,        # k-fold datasets: the (0-based) fold whose *test* split holds this clip
      "split": str | None,       # single-split datasets: "train" / "test" / "unlabeled" ...
      "fps": float | None,
      "height": int, "width": int,          # size of every stored frame
      "frames": [bytes, ...],    # JPEG bytes of all frames of the clip, in temporal order (or, built with
                                 #   --store_original_frames, the frame files' own JPEG/PNG bytes)
      "extra": {str: msgpack-able}          # free-form metadata (optional)
    }

Why msgpack: it is tiny, fast, language-neutral, needs no TensorFlow (tfds' Video feature does), and a
versioned map lets later versions add keys without breaking old shards. Frames are stored as JPEG (not raw
pixels): a 16-frame 160x160 clip is ~100 KB instead of 1.2 MB, and simplejpeg decodes ~8k frames/s/core.

Shards are written with ``group_size:1`` so that any record can be read at random (grain needs random access).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, Iterable, Sequence

import msgpack
import numpy as np
import simplejpeg

FORMAT = "facemae_clip"
VERSION = 1
# group size 1 = random access; uncompressed: JPEG bytes do not compress (3% smaller shards with ArrayRecord's
# default compression) but decompressing cost ~0.6 ms of CPU per 80-frame clip read (benchmarks/data_pipeline.py).
# Readers handle both, so shards written with compression stay readable.
SHARD_OPTIONS = "group_size:1,uncompressed"


class RecordError(ValueError):
    """A record that cannot be decoded; the message names the record and what is wrong."""


@dataclasses.dataclass
class ClipRecord:
    clip_id: str
    frames: list[bytes]  # JPEG bytes, temporal order
    height: int
    width: int
    source: str = ""
    label: int | list[float] | None = None
    fold: int | None = None
    split: str | None = None
    fps: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return len(self.frames)


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    """uint8 RGB [H, W, 3] -> JPEG bytes."""
    frame = np.ascontiguousarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"encode_jpeg expects uint8 [H, W, 3], got {frame.dtype} {frame.shape}")
    return simplejpeg.encode_jpeg(frame, quality=quality, colorspace="RGB")


def decode_jpeg(data: bytes, min_size: int = 0) -> np.ndarray:
    """JPEG bytes -> uint8 RGB [H, W, 3]. ``min_size > 0``: libjpeg-turbo may decode at a reduced DCT scale (k/8)
    as long as both sides stay >= min_size (much cheaper than a full decode followed by a downscale)."""
    return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_size, min_width=min_size)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ORIGINAL_FRAME_MAGIC = (b"\xff\xd8", PNG_MAGIC)  # JPEG SOI, PNG signature: the formats a record may hold


def decode_frame(data: bytes, min_size: int = 0) -> np.ndarray:
    """Stored frame bytes -> uint8 RGB [H, W, 3]. Frames are JPEG unless the dataset was built with
    ``--store_original_frames`` from PNG folders (MAFW); PNG goes through PIL's ``convert('RGB')`` as in the
    reference loader (simplejpeg and PIL decode the same JPEG bytes identically; checked on the eval-views golden).
    ``min_size``: see ``decode_jpeg`` (PNG is always decoded at full size)."""
    if data[:8] == PNG_MAGIC:
        import io

        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    return decode_jpeg(data, min_size)


def make_record(
    clip_id: str,
    frames: np.ndarray | Sequence[np.ndarray],
    *,
    quality: int = 90,
    **meta: Any,
) -> ClipRecord:
    """Build a record from uint8 frames [T, H, W, 3] (JPEG-encodes them)."""
    frames = [np.asarray(f) for f in frames]
    if not frames:
        raise ValueError(f"clip {clip_id!r}: no frames")
    h, w = frames[0].shape[:2]
    for i, f in enumerate(frames):
        if f.shape != (h, w, 3):
            raise ValueError(f"clip {clip_id!r}: frame {i} has shape {f.shape}, expected {(h, w, 3)}")
    return ClipRecord(clip_id=clip_id, frames=[encode_jpeg(f, quality) for f in frames], height=h, width=w, **meta)


def _label_to_msgpack(label: Any) -> Any:
    if label is None:
        return None
    if isinstance(label, (int, np.integer)):
        return int(label)
    return [float(v) for v in np.asarray(label, dtype=np.float64).reshape(-1)]


def encode_clip(rec: ClipRecord) -> bytes:
    """ClipRecord -> record bytes."""
    return msgpack.packb(
        {
            "format": FORMAT,
            "version": VERSION,
            "clip_id": rec.clip_id,
            "source": rec.source,
            "label": _label_to_msgpack(rec.label),
            "fold": None if rec.fold is None else int(rec.fold),
            "split": rec.split,
            "fps": None if rec.fps is None else float(rec.fps),
            "height": int(rec.height),
            "width": int(rec.width),
            "frames": list(rec.frames),
            "extra": rec.extra,
        },
        use_bin_type=True,
    )


def decode_clip(data: bytes, where: str = "record") -> ClipRecord:
    """Record bytes -> ClipRecord. ``where`` names the record in error messages (e.g. 'train-00003 #17')."""
    try:
        d = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises several types
        raise RecordError(f"{where}: not a msgpack record ({e})") from e
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        found = d.get("format") if isinstance(d, dict) else type(d)
        raise RecordError(f"{where}: not a {FORMAT} record (format={found})")
    if d.get("version") != VERSION:
        raise RecordError(f"{where}: record version {d.get('version')} is not supported (this code reads {VERSION})")
    try:
        return ClipRecord(
            clip_id=d["clip_id"],
            frames=d["frames"],
            height=d["height"],
            width=d["width"],
            source=d.get("source", ""),
            label=d.get("label"),
            fold=d.get("fold"),
            split=d.get("split"),
            fps=d.get("fps"),
            extra=d.get("extra") or {},
        )
    except KeyError as e:
        raise RecordError(f"{where}: missing key {e}") from e


def decode_frames(rec: ClipRecord, indices: Iterable[int] | None = None, min_size: int | None = None) -> np.ndarray:
    """Decode the frames at ``indices`` (default all) -> uint8 [T, H, W, 3]. Indices may repeat.

    ``min_size``: the caller resizes the frames to ``min_size`` x ``min_size`` next, so frames stored at least twice
    as large (both sides) are decoded at the smallest DCT scale that keeps both sides >= min_size."""
    idx = range(rec.num_frames) if indices is None else list(indices)
    scale_to = int(min_size) if min_size and min(rec.height, rec.width) >= 2 * min_size else 0
    expected = (rec.height, rec.width, 3)
    out: np.ndarray | None = None
    cache: dict[int, np.ndarray] = {}
    for j, i in enumerate(idx):
        if i not in cache:
            if not 0 <= i < rec.num_frames:
                raise RecordError(f"clip {rec.clip_id!r}: frame index {i} out of range [0, {rec.num_frames})")
            try:
                cache[i] = decode_frame(rec.frames[i], scale_to)
            except Exception as e:
                raise RecordError(
                    f"clip {rec.clip_id!r} ({rec.source}): frame {i} is not a valid JPEG/PNG ({e})") from e
            if scale_to and out is None:  # the DCT scale is the same for every frame of the record's size
                expected = cache[i].shape
            if cache[i].shape != expected:
                raise RecordError(
                    f"clip {rec.clip_id!r}: frame {i} decodes to {cache[i].shape}, record says "
                    f"{(rec.height, rec.width, 3)}"
                )
        if out is None:
            out = np.empty((len(idx), *expected), np.uint8)
        out[j] = cache[i]
    return out if out is not None else np.empty((0, *expected), np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Shard files
# ---------------------------------------------------------------------------------------------------------------


def shard_name(prefix: str, index: int, count: int) -> str:
    return f"{prefix}-{index:05d}-of-{count:05d}.array_record"


class ShardWriter:
    """Writes records to one ArrayRecord shard (group size 1 = random access). Use as a context manager.

    Writes go to ``path + '.tmp'`` and are renamed on close, so a shard file that exists is complete — the
    converters rely on this for resumability (an interrupted shard is simply rewritten).
    """

    def __init__(self, path: str):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path = path
        self._tmp = path + ".tmp"
        self._w = ArrayRecordWriter(self._tmp, SHARD_OPTIONS)
        self.count = 0

    def write(self, rec: ClipRecord | bytes) -> None:
        self._w.write(rec if isinstance(rec, bytes) else encode_clip(rec))
        self.count += 1

    def close(self) -> None:
        self._w.close()
        os.replace(self._tmp, self.path)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:  # leave no half-written shard behind under the final name
            try:
                self._w.close()
            finally:
                if os.path.exists(self._tmp):
                    os.remove(self._tmp)


def list_shards(path_or_glob: str | Sequence[str]) -> list[str]:
    """A directory (all ``*.array_record`` in it), a glob, or an explicit list -> sorted shard paths."""
    if not isinstance(path_or_glob, str):
        return [str(p) for p in path_or_glob]
    if os.path.isdir(path_or_glob):
        paths = sorted(glob.glob(os.path.join(path_or_glob, "*.array_record")))
    else:
        paths = sorted(glob.glob(path_or_glob))
    if not paths:
        raise FileNotFoundError(f"no ArrayRecord shards found at {path_or_glob!r}")
    return paths


def read_records(paths: str | Sequence[str]) -> Iterable[ClipRecord]:
    """Sequentially yield every record of the shards (for tools and tests; training reads through grain)."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    paths = list_shards(paths)
    src = ArrayRecordDataSource(paths)
    for i in range(len(src)):
        yield decode_clip(src[i], where=f"{paths} #{i}")
