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
from typing import Any, Iterator, Sequence

import av
import numpy as np

# A shortfall of more than this many frames against the header's count is reported as truncation. One frame of
# slack so that a container whose sample count and decoder output differ by a single frame (edit lists, a dropped
# trailing frame) is not flagged; this slack was not measured on real datasets here (none can be downloaded).
TRUNCATION_TOLERANCE_FRAMES = 1


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
        # Frame count as written in the container header (0 when unknown); compared after decoding (truncation).
        self.declared_frames: int = int(self._stream.frames or 0)
        self.decoded_frames: int = 0
        self.reached_end: bool = False
        self.decode_error: str | None = None

    def frames(self, *, frame_stride: int = 1, max_frames: int | None = None, format: str = "rgb24",
               on_error: str = "raise") -> Iterator[np.ndarray]:
        """Yield frames 0, s, 2s, ... (s = ``frame_stride``), at most ``max_frames`` of them.

        format: "rgb24" -> uint8 [H, W, 3]; "gray" -> uint8 [H, W] luma (for YUV video the decoder's own Y plane,
            no colour conversion at all: what face detection needs, at a fraction of the cost).
        on_error: "raise" -> VideoReadError when decoding fails part-way; "stop" -> end the stream there and keep
            what was decoded (``decode_error`` says why; :meth:`truncation` reports it). Zero decoded frames always
            raise.

        Every frame is still decoded (inter-coded video cannot skip), but only the kept ones are converted. After
        the generator finishes, ``decoded_frames`` counts every decoded frame and ``reached_end`` tells whether the
        stream was read to its end (False when ``max_frames`` stopped it), which :meth:`truncation` needs.
        """
        if frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
        if format not in ("rgb24", "gray"):
            raise ValueError(f"format must be 'rgb24' or 'gray', got {format!r}")
        if on_error not in ("raise", "stop"):
            raise ValueError(f"on_error must be 'raise' or 'stop', got {on_error!r}")
        decoded = kept = 0
        self.decoded_frames, self.reached_end, self.decode_error = 0, False, None
        try:
            for frame in self._container.decode(self._stream):
                if decoded % frame_stride == 0:
                    yield frame.to_ndarray(format="rgb24") if format == "rgb24" else _luma(frame)
                    kept += 1
                    if max_frames is not None and kept >= max_frames:
                        self.decoded_frames = decoded + 1
                        return
                decoded += 1
                self.decoded_frames = decoded
        except av.FFmpegError as e:
            self.decoded_frames = decoded
            if on_error == "raise" or decoded == 0:
                raise VideoReadError(
                    f"{self.path}: decoding failed after {decoded} frame(s) - truncated or corrupt file? ({e})"
                ) from e
            self.decode_error = f"decoding failed after {decoded} frame(s): {e}"
        self.reached_end = True
        if decoded == 0:
            raise VideoReadError(f"{self.path}: no frame could be decoded (zero-frame video)")

    def truncation(self) -> dict[str, Any] | None:
        """After a complete :meth:`frames` pass: what is missing, or None for a complete file.

        A file is truncated when decoding stopped with an error (``on_error="stop"``) or when more than
        ``TRUNCATION_TOLERANCE_FRAMES`` fewer frames decoded than the container header declares (a faststart mp4
        cut short keeps its full header, so it opens and decodes "successfully" into a shorter clip). Returns
        ``{"declared_frames", "decoded_frames", "error"}``.
        Containers that declare no count (0: many mkv / webm / avi) can only be caught by a decoding error.
        """
        if not self.reached_end:
            return None
        short = self.declared_frames > 0 and self.declared_frames - self.decoded_frames > TRUNCATION_TOLERANCE_FRAMES
        if not short and self.decode_error is None:
            return None
        return {"declared_frames": self.declared_frames or None, "decoded_frames": self.decoded_frames,
                "error": self.decode_error}

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> "VideoFile":
        return self

    def __exit__(self, *_) -> None:
        self.close()


def truncation_note(path: str, truncation: dict[str, Any]) -> str:
    """One sentence for outputs and warnings: declared vs decoded frames, and the decoder's error if any."""
    declared = truncation.get("declared_frames")
    text = (f"{path}: truncated or damaged video - {truncation['decoded_frames']} frame(s) decoded"
            + (f" of {declared} declared in the file header" if declared else ""))
    if truncation.get("error"):
        text += f" ({truncation['error']})"
    return text + "; results cover the decoded frames only"


def _luma(frame: "av.VideoFrame") -> np.ndarray:
    """uint8 [H, W] brightness of a decoded frame: the Y plane as it is for YUV formats, else a conversion."""
    name = frame.format.name
    if name.startswith(("yuv", "yuvj", "nv12", "nv21")) and "p1" not in name and "p9" not in name:
        plane = frame.planes[0]
        rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
        return rows[:, : plane.width]
    return frame.to_ndarray(format="gray")


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


class VideoWriter:
    """Encode frames one at a time (bounded memory for videos of any length); use as a context manager.

    ``write(frame)`` takes uint8 RGB [H, W, 3]; the first frame fixes the size (odd sizes are padded by one
    replicated row/column at the bottom/right, as libx264's yuv420p needs even sizes). See :func:`write_video`.
    """

    def __init__(self, path: str | os.PathLike, fps: float, *, codec: str = "libx264", crf: int = 18):
        if not fps or fps <= 0:
            raise ValueError(f"VideoWriter({path}): fps must be positive, got {fps}")
        self.path = os.fspath(path)
        self.fps, self.codec, self.crf = fps, codec, crf
        self._container = av.open(self.path, "w")
        self._stream = None
        self._shape: tuple[int, ...] | None = None
        self.frames_written = 0

    def write(self, frame: np.ndarray) -> None:
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
            raise ValueError(f"VideoWriter({self.path}): expected a uint8 [H, W, 3] frame, got {frame.dtype} "
                             f"{frame.shape}")
        if self._stream is None:
            self._shape = frame.shape
            stream = self._container.add_stream(self.codec,
                                                rate=fractions.Fraction(self.fps).limit_denominator(100_000))
            stream.width, stream.height = frame.shape[1] + frame.shape[1] % 2, frame.shape[0] + frame.shape[0] % 2
            stream.pix_fmt = "yuv420p"
            if self.codec in ("libx264", "libx265"):
                stream.options = {"crf": str(self.crf)}
            self._stream = stream
        elif frame.shape != self._shape:
            raise ValueError(f"VideoWriter({self.path}): frame {self.frames_written} is {frame.shape}, the first "
                             f"was {self._shape}")
        pad_h, pad_w = frame.shape[0] % 2, frame.shape[1] % 2
        if pad_h or pad_w:
            frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        for packet in self._stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
            self._container.mux(packet)
        self.frames_written += 1

    def close(self) -> None:
        try:
            if self._stream is not None:
                for packet in self._stream.encode(None):  # flush the encoder's delayed frames
                    self._container.mux(packet)
        finally:
            self._container.close()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *_) -> None:
        self.close()


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
    18 is visually lossless, 23 is FFmpeg's default. For long videos use :class:`VideoWriter` frame by frame.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(
            f"write_video({path}): expected uint8 frames [T>0, H, W, 3], got {frames.dtype} {frames.shape}"
        )
    if not fps or fps <= 0:
        raise ValueError(f"write_video({path}): fps must be positive, got {fps}")
    with VideoWriter(path, fps, codec=codec, crf=crf) as writer:
        for rgb in frames:
            writer.write(rgb)
