"""A video of any length as a stream of model clips: decode -> face tracks -> crops -> windows (-> batches).

Why: the inference commands used to decode the whole video into one array, crop every frame and stack the crops
(a 3-minute 640x480 video peaked at 8 GiB). Here nothing holds more than a window's worth of frames:

* **pass 1** (face cropping only) decodes the video's luma plane frame by frame and runs the fast multi-face
  tracker (:mod:`data_pipelines.face_tracks`), which keeps only detections and per-frame boxes;
* **pass 2** decodes the RGB frames again, crops every face track (or resizes the whole frame) to the model's
  input size, and feeds each track's crops to a :class:`Windower` that holds only the last window span of crops
  and emits each window's clip as soon as its last frame arrives.

Memory bound (besides the model and the decoder's own reference frames): per live track one window span of
crops, ``num_frames * sampling_rate * S * S * 3`` bytes (DFEW geometry: 64 x 160 x 160 x 3 = 4.9 MB), plus the
forward batch (``batch * num_frames * S * S * 3`` bytes of uint8 and 4x that as float32: 8 x 16 x 160^2 x 3 x 5 =
49 MB), plus per track 17 bytes per frame of its span for the boxes (an hour at 30 fps: 1.8 MB). It does not
depend on the video's resolution beyond one decoded frame, nor on its length beyond those boxes.

The windows are exactly :func:`facemae_jax.inference.plan_windows` over each track's frames (checked by the
tests), so streaming changes no number that the array version computed.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Iterator

import numpy as np

from facemae_jax import inference
from facemae_jax.inference import Window

MIN_TRACK_DETECTIONS = 3  # a face track needs this many detector hits to get predictions (drops one-off false hits)


@dataclasses.dataclass
class TrackWindow:
    """One emitted window: the track it belongs to, the window (source-frame indices), the model clip."""

    track_id: int
    window: Window
    clip: np.ndarray  # uint8 [T, S, S, 3]


class Windower:
    """The windows of one frame sequence, built as its frames arrive; holds the last span of frames only.

    Frames are pushed in order; ``push`` returns the windows completed by that frame, ``finish`` the end-aligned
    (or, for a sequence shorter than one span, the single padded) window that :func:`inference.plan_windows`
    adds. Window frame indices are offset by ``start_frame`` (the sequence's first source frame).
    """

    def __init__(self, clip_len: int, sampling_rate: int, stride: int | None = None, *, start_frame: int = 0):
        self.clip_len, self.sampling_rate = clip_len, sampling_rate
        self.span = clip_len * sampling_rate
        self.stride = max(1, self.span // 2) if stride is None else stride
        if self.stride < 1:
            raise ValueError(f"window stride must be >= 1 frame, got {self.stride}")
        self.start_frame = start_frame
        self.buffer: collections.deque[np.ndarray] = collections.deque(maxlen=self.span)
        self.count = 0
        self.next_start = 0
        self.last_end = -1
        self.num_windows = 0
        self._offsets = np.arange(clip_len, dtype=np.int64) * sampling_rate

    def _clip(self, local_indices: np.ndarray) -> np.ndarray:
        first = self.count - len(self.buffer)
        return np.stack([self.buffer[i - first] for i in local_indices])

    def _emit(self, local_start: int, local_indices: np.ndarray, local_end: int, padded: bool) -> tuple[Window,
                                                                                                       np.ndarray]:
        clip = self._clip(local_indices)
        window = Window(self.num_windows, self.start_frame + local_start, self.start_frame + local_end,
                        self.start_frame + local_indices, padded=padded)
        self.num_windows += 1
        self.last_end = local_end
        return window, clip

    def push(self, frame: np.ndarray) -> list[tuple[Window, np.ndarray]]:
        self.buffer.append(frame)
        self.count += 1
        out = []
        if self.count - 1 == self.next_start + self.span - 1:
            out.append(self._emit(self.next_start, self.next_start + self._offsets, self.count - 1, False))
            self.next_start += self.stride
        return out

    def finish(self) -> list[tuple[Window, np.ndarray]]:
        """The last window(s); raises inference.VideoTooShort below ``clip_len`` frames."""
        n = self.count
        if n < self.span:
            (only,) = inference.plan_windows(n, self.clip_len, self.sampling_rate, self.stride)  # checks clip_len
            return [self._emit(0, only.frame_indices, n - 1, only.padded)]
        if self.last_end < n - 1:
            return [self._emit(n - self.span, n - self.span + self._offsets, n - 1, False)]
        return []


@dataclasses.dataclass
class VideoClips:
    """Stream one video's model clips; read the findings (tracks, truncation, notes, timings) afterwards.

    Use: ``clips = VideoClips(path, ...)``; ``clips.find_faces()`` (pass 1; raises NoFaceFound / VideoReadError /
    VideoTooShort); then iterate ``clips.windows()`` (pass 2). ``progress``: a callable taking a frame count, for
    a progress bar. Without ``face_crop`` the whole frame is resized to S x S (PIL bilinear, aspect ratio not kept,
    as the reference loaders do) and there is a single "track" 0 covering the video.
    """

    path: str
    clip_len: int
    sampling_rate: int
    img_size: int
    stride: int | None = None
    face_crop: bool = True
    tracking: Any = None  # face_tracks.TrackingOptions (None: its defaults)
    largest_face: bool = False
    decode_threads: int = 0

    def __post_init__(self):
        from data_pipelines import face_tracks, video_io

        if self.tracking is None:
            self.tracking = face_tracks.TrackingOptions()
        with video_io.VideoFile(self.path, threads=self.decode_threads) as video:
            self.fps: float | None = video.fps
            self.width, self.height = video.width, video.height
            self.declared_frames: int = video.declared_frames
        self.num_frames: int | None = None
        self.tracks: list = []  # face_tracks.Track per track that gets predictions
        self.truncation: dict[str, Any] | None = None
        self.notes: list[str] = []
        self.tracker_stats: dict[str, Any] = {}
        self.seconds = {"tracking": 0.0, "cropping": 0.0}
        self._found = False

    @property
    def span(self) -> int:
        return self.clip_len * self.sampling_rate

    def expected_frames(self) -> int | None:
        """Frames a progress bar can expect: the decoded count once known, else the header's, else None."""
        return self.num_frames or self.declared_frames or None

    def find_faces(self, progress=lambda n: None) -> None:
        """Pass 1: the face tracks (a no-op without face cropping). Frames are counted through ``progress``."""
        from data_pipelines import face_tracks, video_io

        self._found = True
        if not self.face_crop:
            return
        started = time.perf_counter()
        tracker = None
        with video_io.VideoFile(self.path, threads=self.decode_threads) as video:
            for t, grey in enumerate(video.frames(format="gray", on_error="stop")):
                if tracker is None:
                    tracker = face_tracks.FaceTracker(grey.shape[0], grey.shape[1], self.tracking, fps=self.fps)
                tracker.update(t, grey)
                progress(1)
            self._set_truncation(video)
        n = self.num_frames = tracker.num_frames
        if n < self.clip_len:
            raise inference.VideoTooShort(f"{n} frames: too short, the model needs at least {self.clip_len} frames")
        tracks = tracker.finish(min_frames=min(self.span, n), min_detections=MIN_TRACK_DETECTIONS,
                                largest_only=self.largest_face)
        found = len(tracker.active) + len(tracker.dormant) + len(tracker.closed)
        if not tracks:  # faces were seen, but none long enough: the largest one over the whole video
            tracks = tracker.finish(largest_only=True)
            self.notes.append(f"no face track lasted a full window ({min(self.span, n)} frames with "
                              f"{MIN_TRACK_DETECTIONS}+ detections); the largest face found is used over the whole "
                              f"video")
        self.tracks = tracks
        self.tracker_stats = {"full_frame_searches": tracker.scans, "redetections": tracker.redetections,
                              "tracks_found": found, "tracks_kept": len(tracks),
                              **{k: v for k, v in dataclasses.asdict(self.tracking).items()},
                              "largest_face_only": self.largest_face}
        self.seconds["tracking"] = time.perf_counter() - started

    def _set_truncation(self, video) -> None:
        from data_pipelines import video_io

        truncation = video.truncation()
        if truncation is not None and self.truncation is None:
            self.truncation = truncation
            self.notes.append(video_io.truncation_note(self.path, truncation))

    def windows(self, progress=lambda n: None) -> Iterator[TrackWindow]:
        """Pass 2: every track's windows in the order they complete (by end frame), clips uint8 [T, S, S, 3]."""
        from data_pipelines import faces, transforms, video_io

        if not self._found:
            self.find_faces()
        size = self.img_size
        if self.face_crop:
            windowers = {track.track_id: Windower(self.clip_len, self.sampling_rate, self.stride,
                                                  start_frame=track.start_frame) for track in self.tracks}
            ends = {track.track_id: track.end_frame for track in self.tracks}
        else:
            windowers = {0: Windower(self.clip_len, self.sampling_rate, self.stride)}
            ends = {}
        resumed = time.perf_counter()
        t = -1
        with video_io.VideoFile(self.path, threads=self.decode_threads) as video:
            for t, frame in enumerate(video.frames(on_error="stop")):
                if self.num_frames is not None and t >= self.num_frames:
                    break  # pass 1 decoded this many; never more (a damaged file decodes the same way twice)
                emitted: list[TrackWindow] = []
                if self.face_crop:
                    for track in self.tracks:
                        if track.covers(t):
                            crop = faces.crop_square(frame, track.box(t), size)
                            emitted += [TrackWindow(track.track_id, w, c)
                                        for w, c in windowers[track.track_id].push(crop)]
                            if t == ends[track.track_id]:
                                emitted += [TrackWindow(track.track_id, w, c)
                                            for w, c in windowers[track.track_id].finish()]
                else:
                    resized = transforms.resize_frames_pil(frame[None], size, size)[0]
                    emitted += [TrackWindow(0, w, c) for w, c in windowers[0].push(resized)]
                progress(1)
                for item in emitted:
                    self.seconds["cropping"] += time.perf_counter() - resumed
                    yield item
                    resumed = time.perf_counter()
            if self.num_frames is None:
                self.num_frames = t + 1
                self._set_truncation(video)
        if not self.face_crop:
            for w, c in windowers[0].finish():  # raises VideoTooShort for fewer than clip_len frames
                self.seconds["cropping"] += time.perf_counter() - resumed
                yield TrackWindow(0, w, c)
                resumed = time.perf_counter()
        self.seconds["cropping"] += time.perf_counter() - resumed
