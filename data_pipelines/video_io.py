"""Reading and writing video files with PyAV (FFmpeg bundled in the wheel, libx264 included).

Why PyAV: the reference decodes with decord, which has no maintained wheels for current Python; PyAV ships FFmpeg
inside its wheel, decodes every container/codec FFmpeg knows, and can also *encode* (tests make their own mp4s,
the inference command writes annotated videos).

Decoding is strict on purpose: a file that cannot be opened, has no video stream, fails half-way through, or
yields no frame raises :class:`VideoReadError` (a ``ValueError``) whose message names the file and what went wrong.
The reference treats such files the same way — decord fails and the sample is replaced — but silently; the
converters catch this error, list the file in ``dataset_info.json["skipped"]`` and go on.

Frames are uint8 RGB, channels last: ``[T, H, W, 3]``.
"""

from __future__ import annotations

import fractions
import os
from typing import Iterator, Sequence

import av
import numpy as np


class VideoReadError(ValueError):
    """A video that cannot be decoded; the message names the file and the reason."""


class VideoFile:
    """An open video file: metadata up front, frames streamed one at a time (bounded memory for long videos).

    Use as a context manager::

        with VideoFile(path, threads=1) as video:
            video.fps, video.height, video.width
            for frame in video.frames(frame_stride=4, max_frames=64):   # uint8 [H, W, 3]
                ...

    ``threads``: FFmpeg decoding threads; 0 lets FFmpeg choose (good for one process), 1 avoids oversubscribing
    the cores when many worker processes decode at once (what the reference's decord does too).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int = 0):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise VideoReadError(f"{self.path}: no such file")
        try:
            self._container = av.open(self.path)
        except Exception as e:  # av raises several FFmpegError subclasses (InvalidDataError, ...)
            raise VideoReadError(f"{self.path}: cannot open as a video ({e})") from e
        if not self._container.streams.video:
            self._container.close()
            raise VideoReadError(f"{self.path}: the file has no video stream")
        self._stream = self._container.streams.video[0]
        if threads > 0:
            self._stream.codec_context.thread_count = threads
        else:
            self._stream.thread_type = "AUTO"
        rate = self._stream.average_rate or self._stream.guessed_rate or self._stream.base_rate
        self.fps: float | None = float(rate) if rate else None
        self.width: int = int(self._stream.codec_context.width)
        self.height: int = int(self._stream.codec_context.height)
        # Frame count as written in the container header (0 when unknown); informative only.
        self.declared_frames: int = int(self._stream.frames or 0)

    def frames(self, *, frame_stride: int = 1, max_frames: int | None = None) -> Iterator[np.ndarray]:
        """Yield frames 0, s, 2s, ... (s = ``frame_stride``) as uint8 [H, W, 3], at most ``max_frames`` of them.

        Every frame is still decoded (inter-coded video cannot skip), but only the kept ones are converted to RGB.
        Raises VideoReadError if decoding fails part-way or if not a single frame could be decoded.
        """
        if frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
        decoded = kept = 0
        try:
            for frame in self._container.decode(self._stream):
                if decoded % frame_stride == 0:
                    yield frame.to_ndarray(format="rgb24")
                    kept += 1
                    if max_frames is not None and kept >= max_frames:
                        return
                decoded += 1
        except av.FFmpegError as e:
            raise VideoReadError(
                f"{self.path}: decoding failed after {decoded} frame(s) - truncated or corrupt file? ({e})"
            ) from e
        if decoded == 0:
            raise VideoReadError(f"{self.path}: no frame could be decoded (zero-frame video)")

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> "VideoFile":
        return self

    def __exit__(self, *_) -> None:
        self.close()


def read_video(
    path: str | os.PathLike, *, frame_stride: int = 1, max_frames: int | None = None, threads: int = 0
) -> tuple[np.ndarray, float | None]:
    """Decode a whole video -> (frames uint8 [T, H, W, 3] RGB, frames per second of the file or None if unknown).

    ``frame_stride`` / ``max_frames`` as in :meth:`VideoFile.frames` (the returned fps is the file's, not divided
    by the stride). Raises VideoReadError for missing, unreadable, truncated or zero-frame files.
    """
    with VideoFile(path, threads=threads) as video:
        frames = list(video.frames(frame_stride=frame_stride, max_frames=max_frames))
        return np.stack(frames), video.fps


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray | Sequence[np.ndarray],
    fps: float,
    *,
    codec: str = "libx264",
    crf: int = 18,
) -> None:
    """Encode uint8 RGB frames [T, H, W, 3] into a video file (container chosen by the extension, e.g. .mp4).

    libx264 with yuv420p (what every player reads) needs even width and height: odd sizes are padded by one
    replicated row/column at the bottom/right. ``crf`` 0 is lossless in luma (tests use it for exact checks),
    18 is visually lossless, 23 is FFmpeg's default.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(
            f"write_video({path}): expected uint8 frames [T>0, H, W, 3], got {frames.dtype} {frames.shape}"
        )
    if not fps or fps <= 0:
        raise ValueError(f"write_video({path}): fps must be positive, got {fps}")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(100_000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec in ("libx264", "libx265"):
            stream.options = {"crf": str(crf)}
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):  # flush the encoder's delayed frames
            container.mux(packet)
