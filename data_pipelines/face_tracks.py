"""Fast face tracking over a stream of frames, for videos of any length and any number of people.

Why this module exists: :func:`faces.detect_and_crop` runs the full-frame Haar search on every searched frame of a
clip that is held in memory. That is fine for a 2-second dataset clip, but a full-frame search of a 640x480 frame
cost 50 ms (frontal cascade) and 147 ms when no face is found and the profile cascade runs twice more (measured on
this 2-core machine at load 1.2), so a face-free 3-minute video took 11 minutes, and the clip had to fit in memory.
Here:

1. **Frames come one at a time** (grey luma is enough; the decoder's Y plane costs nothing), and only the
   detections are kept: 16 bytes per searched frame and face, so memory does not grow with resolution and stays
   tiny with length.
2. **Full-frame scans are rare**: every ``scan_every`` frames (default 50, two seconds at 25 fps: a person who
   comes into view is tracked within two seconds, less than one window of the published models) the frontal
   cascade searches the whole downscaled frame for faces that are not tracked yet; while nothing is tracked, every
   ``detect_every`` frames during the first seconds and right after a face was lost (a long face-free stretch of
   a recording, e.g. slides, falls back to every ``scan_every`` frames). Scans dominate the cost: ~100-130 ms each at
   640x480 at load 6-7 on 2 cores, against ~8 ms for a re-detection (``benchmarks/predict_video.py``).
3. **Tracked faces are re-detected around their last box** every ``detect_every`` frames (default 5): a region of
   ``ROI_SIDE`` face sizes around the last box, scaled so the face spans ~``REDETECT_FACE_PX`` pixels, with the
   cascade's window sizes limited to the plausible range (4 ms for a 72 px face at load 3, against ~100 ms for a
   full scan at that load).
4. **Adaptive when lost**: when the re-detection misses, the frontal-then-profile search runs on every following
   frame (``LOST_DENSE_ATTEMPTS`` attempts) before the face is declared lost; a lost face that reappears near its
   last place within ``max_gap`` frames continues its track (short occlusions, a turned head), otherwise a new
   track starts.
5. **Early stop**: when no face at all appears in the first ``search_seconds`` seconds, :class:`faces.NoFaceFound`
   is raised at that point instead of after reading the whole video (None: search the whole video).

Between detections the box is interpolated and smoothed exactly as in :mod:`faces` (running median, zero-phase
local-linear Gaussian smoothing), per track over the track's own time span. That smoothing looks ahead, so the
tracker works in two passes over the video: this pass finds the tracks; the caller decodes again and crops with
:func:`crop_tracks` (decoding is ~1 ms per 640x480 frame, cheap next to detection).

Nothing here imports jax (data_pipelines rule).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Iterator

import cv2
import numpy as np

from data_pipelines import faces

ROI_SIDE = 2.5  # re-detection region: this many face sizes around the last box's centre
REDETECT_SCALE_FACTOR = 1.15  # pyramid step of re-detection (its size range is narrow; 20/20 found at 40 px)
SCAN_MIN_FACE_FRACTION = 0.75  # full scans ignore faces smaller than this fraction of min_face (halves their cost)
REDETECT_FACE_PX = 40  # the ROI is scaled so the expected face spans about this many pixels (2 Haar windows)
REDETECT_MIN_NEIGHBORS = 3  # fewer neighbours than a full scan: the previous box is strong prior evidence
SCAN_GATE = 1.0  # a full-scan detection continues a track whose last box is within this many face sizes
LOST_DENSE_ATTEMPTS = 5  # consecutive missed re-detections (every frame after the first miss) = face lost
DUPLICATE_IOU = 0.5  # two tracks whose boxes overlap this much on the same frame follow one face: the younger stops
DEFAULT_FPS = 25.0  # for search_seconds when the file has no frame rate
DENSE_SEARCH_SECONDS = 10.0  # with search_seconds=None: how long the first face is searched for every detect_every


@dataclasses.dataclass(frozen=True)
class TrackingOptions:
    """How often and how hard to look for faces (defaults: >= 100 frames/s of 640x480 on 2 cores, measured in
    ``benchmarks/predict_video.py``).

    detect_every: re-detect each tracked face every k frames (boxes in between are interpolated and smoothed).
    scan_every: search the whole frame for new faces every m frames (every ``detect_every`` while none tracked).
    min_face: smallest face side (Haar box, source pixels) to find reliably in full scans (see faces).
    max_gap: frames a lost face may stay unseen and still continue its track when it reappears nearby.
    search_seconds: stop with NoFaceFound when no face appears in the first N seconds; None searches everything.
    margin, smoothing: crop enlargement and temporal smoothing, as in :func:`faces.detect_and_crop`.
    """

    detect_every: int = 5
    scan_every: int = 50
    min_face: int = 80
    max_gap: int = 50
    search_seconds: float | None = 10.0
    margin: float = 0.25
    smoothing: float = 3.0

    def __post_init__(self):
        for name in ("detect_every", "scan_every", "min_face"):
            value = getattr(self, name)
            if not (isinstance(value, (int, np.integer)) and value >= 1):
                raise ValueError(f"TrackingOptions.{name} must be a positive int, got {value!r}")
        if not (isinstance(self.max_gap, (int, np.integer)) and self.max_gap >= 0):
            raise ValueError(f"TrackingOptions.max_gap must be an int >= 0 (frames), got {self.max_gap!r}")
        if self.search_seconds is not None and not self.search_seconds > 0:
            raise ValueError(f"TrackingOptions.search_seconds must be > 0 or None, got {self.search_seconds!r}")
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"TrackingOptions.margin must be a finite number >= 0, got {self.margin!r}")
        if not (math.isfinite(self.smoothing) and self.smoothing >= 0):
            raise ValueError(f"TrackingOptions.smoothing must be a finite number >= 0, got {self.smoothing!r}")


@dataclasses.dataclass
class Track:
    """One person's face over time.

    track_id: 0, 1, ... in order of first appearance. start_frame / end_frame: inclusive span in the video.
    boxes: float32 [L, 4] square crop boxes (x0, y0, x1, y1, source pixels, smoothed, margin included) for the
        L = end - start + 1 frames of the span. detected: bool [L], frames where a detector found the face.
    score: sum of the detected face sizes (large and long-lived faces score high; the largest-face rule).
    """

    track_id: int
    start_frame: int
    end_frame: int
    boxes: np.ndarray
    detected: np.ndarray
    score: float

    @property
    def num_frames(self) -> int:
        return self.end_frame - self.start_frame + 1

    def box(self, frame_index: int) -> np.ndarray:
        return self.boxes[frame_index - self.start_frame]

    def covers(self, frame_index: int) -> bool:
        return self.start_frame <= frame_index <= self.end_frame


@dataclasses.dataclass
class _Live:
    """A track while the video is being read."""

    uid: int
    frames: list[int]
    boxes: list[np.ndarray]  # raw detector boxes, source pixels
    last_attempt: int
    misses: int = 0

    @property
    def last_frame(self) -> int:
        return self.frames[-1]

    @property
    def last_box(self) -> np.ndarray:
        return self.boxes[-1]

    @property
    def score(self) -> float:
        return float(sum(faces._box_size(b) for b in self.boxes))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class FaceTracker:
    """Feed grey frames in order with :meth:`update`; :meth:`finish` returns the tracks.

    Every frame is fed (the luma plane is a view of the decoder's buffer, so this costs nothing); the tracker
    decides which frames it searches.
    """

    def __init__(self, height: int, width: int, options: TrackingOptions = TrackingOptions(),
                 fps: float | None = None):
        self.options = options
        self.height, self.width = int(height), int(width)
        self.scale = faces.detection_scale(self.height, self.width, int(options.min_face))
        window = max(faces._cascade(faces.FRONTAL_CASCADE_FILE).getOriginalWindowSize())
        self.scan_min_size = max(window, round(SCAN_MIN_FACE_FRACTION * options.min_face * self.scale))
        self.fps = fps
        self.search_limit = (None if options.search_seconds is None
                             else max(1, round(options.search_seconds * (fps or DEFAULT_FPS))))
        # dense searching (every detect_every frames) while nothing is tracked: during the first seconds, and within
        # max_gap frames after a face was last seen; elsewhere (long face-free stretches) every scan_every frames
        self.dense_search_frames = round((options.search_seconds or DENSE_SEARCH_SECONDS) * (fps or DEFAULT_FPS))
        self._last_seen = None
        self.active: list[_Live] = []
        self.dormant: list[_Live] = []
        self.closed: list[_Live] = []
        self.num_frames = 0
        self.scans = self.redetections = 0
        self._next_uid = 0
        self._last_grey: np.ndarray | None = None
        self._last_searched = -1

    # ----- per frame

    def _scan_due(self, t: int) -> bool:
        searching_hard = not self.active and (
            t < self.dense_search_frames
            or (self._last_seen is not None and t - self._last_seen <= self.options.max_gap))
        return t % (self.options.detect_every if searching_hard else self.options.scan_every) == 0

    def _interval(self, live: _Live) -> int:
        return 1 if live.misses else self.options.detect_every

    def update(self, t: int, grey: np.ndarray) -> None:
        """Process frame ``t`` (uint8 [H, W] luma; frames must come in order 0, 1, 2, ...)."""
        if t != self.num_frames:
            raise ValueError(f"frames must be fed in order: expected frame {self.num_frames}, got {t}")
        if grey.shape != (self.height, self.width):
            raise ValueError(f"frame {t}: expected a {self.width}x{self.height} grey frame, got {grey.shape}")
        self.num_frames = t + 1
        self._last_grey = grey
        self._search(t, grey)
        if (self.search_limit is not None and t + 1 >= self.search_limit and not self._ever_found()):
            raise faces.NoFaceFound(
                f"no face in the first {self.options.search_seconds:g} s ({t + 1} frames of {self.width}x"
                f"{self.height}, {self.scans} full-frame searches, min_face={self.options.min_face} px); the "
                f"search stopped there (search the whole video with --search_whole_video)")

    def _ever_found(self) -> bool:
        return bool(self.active or self.dormant or self.closed)

    def _search(self, t: int, grey: np.ndarray) -> None:
        searched = False
        matched: set[int] = set()
        if self._scan_due(t):
            searched = True
            self.scans += 1
            matched = self._full_scan(t, grey)
        for live in list(self.active):
            if live.uid in matched or t - live.last_attempt < self._interval(live):
                continue
            searched = True
            self._redetect(t, grey, live)
        if searched:
            self._last_searched = t
            self._drop_duplicates(t)
        # dormant tracks that stayed away too long are closed for good
        for live in list(self.dormant):
            if t - live.last_frame > self.options.max_gap:
                self.dormant.remove(live)
                self.closed.append(live)

    def _full_scan(self, t: int, grey: np.ndarray) -> set[int]:
        boxes = _detect_frontal(grey, self.scale, self.scan_min_size)
        candidates = []
        for pool in (self.active, self.dormant):
            for live in pool:
                last = live.last_box
                last_size = faces._box_size(last)
                for i, box in enumerate(boxes):
                    size = faces._box_size(box)
                    distance = np.linalg.norm(faces._box_centre(box) - faces._box_centre(last)) / math.sqrt(
                        size * last_size)
                    if distance <= SCAN_GATE and max(size, last_size) / min(size, last_size) <= faces.MAX_SIZE_RATIO:
                        candidates.append((distance, live.uid, i, live))
        taken_tracks: set[int] = set()
        taken_boxes: set[int] = set()
        for _, uid, i, live in sorted(candidates, key=lambda c: c[:3]):
            if uid in taken_tracks or i in taken_boxes:
                continue
            taken_tracks.add(uid)
            taken_boxes.add(i)
            self._hit(live, t, boxes[i])
        for i, box in enumerate(boxes):
            if i not in taken_boxes:
                self._last_seen = t
                live = _Live(uid=self._next_uid, frames=[t], boxes=[box], last_attempt=t)
                self._next_uid += 1
                self.active.append(live)
                taken_tracks.add(live.uid)
        return taken_tracks

    def _hit(self, live: _Live, t: int, box: np.ndarray) -> None:
        self._last_seen = t
        live.frames.append(t)
        live.boxes.append(np.asarray(box, np.float32))
        live.last_attempt = t
        live.misses = 0
        if live in self.dormant:
            self.dormant.remove(live)
            self.active.append(live)

    def _redetect(self, t: int, grey: np.ndarray, live: _Live) -> None:
        self.redetections += 1
        live.last_attempt = t
        box = _redetect_near(grey, live.last_box, profile_too=live.misses > 0)
        if box is not None:
            self._hit(live, t, box)
            return
        live.misses += 1
        if live.misses >= LOST_DENSE_ATTEMPTS:
            self.active.remove(live)
            (self.dormant if self.options.max_gap > 0 else self.closed).append(live)

    def _drop_duplicates(self, t: int) -> None:
        current = [live for live in self.active if live.last_frame == t]
        current.sort(key=lambda live: live.uid)
        for i, older in enumerate(current):
            for younger in current[i + 1:]:
                if younger.last_frame == t and older.last_frame == t and _iou(older.last_box,
                                                                              younger.last_box) > DUPLICATE_IOU:
                    younger.frames.pop()
                    younger.boxes.pop()
                    self.active.remove(younger)
                    if younger.frames:
                        self.closed.append(younger)

    # ----- end of the video

    def finish(self, *, min_frames: int = 1, min_detections: int = 1, largest_only: bool = False) -> list[Track]:
        """The tracks of the video, smoothed per frame.

        The last frame is searched for the active tracks if it was not (so a face present to the end gets a box
        to the end, not an extrapolation). ``largest_only``: only the track with the largest score, its boxes held
        over the whole video like :func:`faces.detect_and_crop` (one face per video). Otherwise every track
        spanning at least ``min_frames`` frames with at least ``min_detections`` detections, numbered 0, 1, ... by
        first appearance. Raises NoFaceFound when no face was found at all.
        """
        if self.num_frames == 0:
            raise ValueError("finish() before any frame was fed")
        last = self.num_frames - 1
        if self._last_searched != last and self._last_grey is not None:
            for live in list(self.active):
                if live.last_frame != last:
                    self._redetect(last, self._last_grey, live)
            self._drop_duplicates(last)
        self._last_grey = None
        every = [live for live in self.active + self.dormant + self.closed if live.frames]
        if not every:
            raise faces.NoFaceFound(
                f"no face found in {self.num_frames} frames of {self.width}x{self.height} ({self.scans} full-frame "
                f"searches, min_face={self.options.min_face} px)")
        every.sort(key=lambda live: (live.frames[0], live.uid))
        if largest_only:
            main = max(every, key=lambda live: live.score)  # max() keeps the earliest on ties
            return [self._smooth(main, 0, last, track_id=0)]
        kept = [live for live in every
                if live.frames[-1] - live.frames[0] + 1 >= min_frames and len(live.frames) >= min_detections]
        return [self._smooth(live, live.frames[0], live.frames[-1], track_id=i) for i, live in enumerate(kept)]

    def _smooth(self, live: _Live, start: int, end: int, *, track_id: int) -> Track:
        local = faces._Track(frames=[f - start for f in live.frames], boxes=live.boxes, last_pass=0)
        boxes = faces._track_boxes(local, end - start + 1, smoothing=float(self.options.smoothing),
                                   margin=float(self.options.margin)).astype(np.float32)
        detected = np.zeros(end - start + 1, bool)
        detected[np.asarray(live.frames) - start] = True
        return Track(track_id=track_id, start_frame=start, end_frame=end, boxes=boxes, detected=detected,
                     score=live.score)


def _detect_frontal(grey: np.ndarray, scale: float, min_size: int) -> np.ndarray:
    """Frontal faces of at least ``min_size`` detection pixels in a full grey frame (downscaled by ``scale``,
    equalised) -> float32 [N, 4] boxes in source pixels."""
    height, width = grey.shape
    small_w, small_h = max(1, round(width * scale)), max(1, round(height * scale))
    interpolation = cv2.INTER_AREA if small_w < width else cv2.INTER_LINEAR
    small = cv2.equalizeHist(cv2.resize(grey, (small_w, small_h), interpolation=interpolation))
    boxes = faces._haar_boxes(small, faces._cascade(faces.FRONTAL_CASCADE_FILE), minSize=(min_size, min_size))
    return (boxes * np.array([width / small_w, height / small_h] * 2)).astype(np.float32)


def _redetect_near(grey: np.ndarray, last: np.ndarray, *, profile_too: bool) -> np.ndarray | None:
    """The face nearest to ``last`` within a region around it, or None (frontal, then profile if asked)."""
    height, width = grey.shape
    size = faces._box_size(last)
    cx, cy = faces._box_centre(last)
    half = ROI_SIDE * size / 2
    x0, y0 = max(0, int(cx - half)), max(0, int(cy - half))
    x1, y1 = min(width, int(math.ceil(cx + half))), min(height, int(math.ceil(cy + half)))
    if x1 - x0 < 8 or y1 - y0 < 8:
        return None
    scale = REDETECT_FACE_PX / size
    roi = grey[y0:y1, x0:x1]
    small_w, small_h = max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))
    small = cv2.resize(roi, (small_w, small_h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    small = cv2.equalizeHist(small)
    expected = size * scale
    window = max(faces._cascade(faces.FRONTAL_CASCADE_FILE).getOriginalWindowSize())
    lo = max(window, int(expected / faces.MAX_SIZE_RATIO))
    hi = max(lo + 1, int(math.ceil(expected * faces.MAX_SIZE_RATIO)))
    options = dict(scaleFactor=REDETECT_SCALE_FACTOR, minNeighbors=REDETECT_MIN_NEIGHBORS, minSize=(lo, lo),
                   maxSize=(hi, hi))
    boxes = faces._haar_boxes(small, faces._cascade(faces.FRONTAL_CASCADE_FILE), **options)
    if len(boxes) == 0 and profile_too:
        profile = faces._cascade(faces.PROFILE_CASCADE_FILE)
        right = faces._haar_boxes(small, profile, **options)
        mirrored = faces._haar_boxes(np.ascontiguousarray(small[:, ::-1]), profile, **options)
        left = np.stack([small_w - mirrored[:, 2], mirrored[:, 1], small_w - mirrored[:, 0], mirrored[:, 3]], 1)
        boxes = np.concatenate([right, left])
    if len(boxes) == 0:
        return None
    boxes = boxes / scale + np.array([x0, y0, x0, y0])
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)
    nearest = int(np.argmin(np.linalg.norm(centres - np.array([cx, cy]), axis=1)))
    return boxes[nearest].astype(np.float32)


def track_frames(greys: Iterable[np.ndarray], options: TrackingOptions = TrackingOptions(), *,
                 fps: float | None = None, **finish_kwargs) -> tuple[list[Track], FaceTracker]:
    """Run the tracker over grey frames uint8 [H, W] (any iterable, consumed once) -> (tracks, tracker).

    ``finish_kwargs`` go to :meth:`FaceTracker.finish`. The tracker is returned for its statistics
    (``num_frames``, ``scans``, ``redetections``).
    """
    tracker: FaceTracker | None = None
    for t, grey in enumerate(greys):
        if tracker is None:
            tracker = FaceTracker(grey.shape[0], grey.shape[1], options, fps=fps)
        tracker.update(t, grey)
    if tracker is None:
        raise ValueError("no frames to track")
    return tracker.finish(**finish_kwargs), tracker


def crop_tracks(frames: Iterable[np.ndarray], tracks: list[Track], out_size: int
                ) -> Iterator[tuple[int, np.ndarray, dict[int, np.ndarray]]]:
    """Second pass: RGB frames uint8 [H, W, 3] in order -> (frame index, frame, {track_id: crop [S, S, 3]}) for the
    tracks covering that frame (crops as :func:`faces.crop_square`, black padding past the frame edges)."""
    for t, frame in enumerate(frames):
        crops = {track.track_id: faces.crop_square(frame, track.box(t), out_size)
                 for track in tracks if track.covers(t)}
        yield t, frame, crops


def largest_face_crops(path: str, out_size: int, options: TrackingOptions = TrackingOptions(), *,
                       frame_stride: int = 1, max_frames: int | None = None, threads: int = 0,
                       on_error: str = "raise") -> tuple[Track, Iterator[np.ndarray], dict | None, tuple[int, int]]:
    """The largest face of a video file, cropped, in two streamed passes (what the dataset converter uses for
    videos too long to hold in memory).

    Pass 1 (here) tracks on the luma plane of frames 0, s, 2s, ... (``frame_stride`` s, at most ``max_frames``);
    returns ``(track, crops, truncation, (height, width))`` where ``crops`` is a generator running pass 2 (uint8
    [out_size, out_size, 3] per kept frame), ``truncation`` is :meth:`VideoFile.truncation` of pass 1. Raises
    NoFaceFound, or video_io.VideoReadError for unreadable files.
    """
    from data_pipelines import video_io

    kept = dict(frame_stride=frame_stride, max_frames=max_frames, on_error=on_error)
    with video_io.VideoFile(path, threads=threads) as video:
        (track,), tracker = track_frames(video.frames(format="gray", **kept), options, fps=video.fps,
                                         largest_only=True)
        truncation = video.truncation()
        size = (video.height, video.width)

    def crops() -> Iterator[np.ndarray]:
        with video_io.VideoFile(path, threads=threads) as again:
            for t, frame in enumerate(again.frames(**kept)):
                if t >= tracker.num_frames:
                    return
                yield faces.crop_square(frame, track.box(t), out_size)

    return track, crops(), truncation, size
