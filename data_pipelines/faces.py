"""Face detection, tracking and square cropping for videos that come without official face crops.

Why this module exists: the fine-tuning datasets ship pre-cropped face frames, but users' own videos (and raw
datasets) do not. The models expect one face, roughly centred and filling the frame, at a fixed square size. This
module turns ``frames: uint8 [T, H, W, 3] RGB`` into ``crops: uint8 [T, S, S, 3]`` of the main face, using only
what pip installs offline: OpenCV's Haar cascades (``opencv-python-headless`` 4.x; 5.x ships none).

The steps, and why each is there:

1. **Detect** on a downscaled, histogram-equalised grey copy of every ``detect_every``-th frame (the last frame is
   always searched too, so the end of the clip is never extrapolated). Haar cascades see nothing smaller than
   their 20 px window and miss many faces below about twice that size, so the downscale factor is chosen so that a
   face of ``min_face`` source pixels still spans two windows, and otherwise the longer side is brought to
   ``DETECT_LONG_SIDE`` for speed. A frontal cascade runs first; where it finds nothing, a profile cascade runs on
   the frame and on its mirror image (the profile cascade only knows faces looking one way).
2. **Link** detections over time into tracks by normalised centre distance with a size gate (greedy, cheapest pair
   first), and keep the track with the largest sum of face sizes: this prefers a face that is both large and
   present for long, and drops isolated false positives (a Haar box on a curtain pattern lives for a frame or two).
3. **Smooth**: jittering crops are the most common complaint about face-video tools, so the box is described by
   centre (x, y) and log-size, each cleaned by a running median over the detections (removes single outliers
   while keeping steady motion intact), linearly interpolated over frames without a detection (ends hold the
   nearest detection), then smoothed by a zero-phase Gaussian-weighted local-linear fit (see
   :func:`smooth_trajectory`). The size is smoothed ``SIZE_SMOOTHING_RATIO`` times more strongly than the centre,
   because a breathing zoom is more disturbing than a slow pan.
4. **Crop**: the box is enlarged by ``margin`` face sizes on every side, kept square, cut out with constant black
   padding where it passes the frame edge, and resized to ``out_size`` (``cv2.INTER_AREA`` when shrinking, which
   averages instead of aliasing; ``cv2.INTER_LINEAR`` when enlarging).

Padding is constant black, not edge-replicate: replicated border pixels make streaks that change every frame with
whatever lies on the frame edge (flicker and fake texture beside the face), and reflection would mirror facial
parts (a second ear or eye). A constant fill carries no content, stays still while the box moves, and looks like
the letterboxing the datasets already contain.

For long videos, several people and bounded memory, :mod:`data_pipelines.face_tracks` streams frames through the
same detector and smoothing (re-detection around each tracked face, rare full-frame scans); ``predict`` uses it.

Nothing here imports jax (data_pipelines rule).
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading

import cv2
import numpy as np
from scipy import ndimage

# alt2 over _default: on 640x360 test frames it found more small faces (21 vs 15 of 24 at 68 px), ran faster and
# gave no more false positives on scikit-image's non-face photos.
FRONTAL_CASCADE_FILE = "haarcascade_frontalface_alt2.xml"
PROFILE_CASCADE_FILE = "haarcascade_profileface.xml"  # detects faces turned to the image's right only
DETECT_LONG_SIDE = 320  # longer side of the detection image, unless min_face needs more pixels
RELIABLE_WINDOW_MULTIPLE = 2.0  # Haar cascades find faces reliably from about twice their window size (measured)
HAAR_SCALE_FACTOR = 1.1  # pyramid step between window sizes (smaller = slower, finer sizes)
HAAR_MIN_NEIGHBORS = 5  # overlapping hits a face needs; lower = more recall and more false positives
MAX_CENTRE_SHIFT = 0.5  # linking gate: centre moves at most this many face sizes per searched frame
MAX_LINK_PASSES = 3  # ...and the gate stops growing after this many searched frames without the face
MAX_SIZE_RATIO = 1.6  # linking gate: face size changes at most by this factor between linked detections
MEDIAN_WINDOW = 5  # detections in the running median that removes outliers before smoothing
SIZE_SMOOTHING_RATIO = 3.0  # the size's Gaussian sigma is this multiple of the centre's


class NoFaceFound(ValueError):
    """No face was detected in any searched frame of a video."""


@dataclasses.dataclass
class FaceTrack:
    """The main face of a video, cropped square.

    crops: uint8 [T, S, S, 3] RGB, the square face crops resized to ``out_size`` S.
    boxes: float32 [T, 4] (x0, y0, x1, y1) in source-frame pixels, after smoothing, margin and squaring; may
        extend past the frame (those parts of the crop are black padding).
    detected: bool [T], True where the detector itself found the tracked face (False where the box was
        interpolated or held, and on frames skipped by ``detect_every``).
    """

    crops: np.ndarray
    boxes: np.ndarray
    detected: np.ndarray


# ---------------------------------------------------------------------------------------------------------------
# detection


_thread_local_cascades = threading.local()


def _cascade(file_name: str) -> cv2.CascadeClassifier:
    """A loaded Haar cascade, cached per thread (OpenCV does not promise detectMultiScale is thread-safe)."""
    cache = getattr(_thread_local_cascades, "by_name", None)
    if cache is None:
        cache = _thread_local_cascades.by_name = {}
    if file_name not in cache:
        path = os.path.join(cv2.data.haarcascades, file_name)
        classifier = cv2.CascadeClassifier(path)
        if classifier.empty():
            raise RuntimeError(
                f"could not load the Haar cascade {path!r}: opencv-python-headless 4.x ships it, 5.x does not "
                f"(installed: {cv2.__version__})"
            )
        cache[file_name] = classifier
    return cache[file_name]


def detection_scale(height: int, width: int, min_face: int) -> float:
    """Factor from source pixels to detection pixels.

    Small enough that the longer side is about ``DETECT_LONG_SIDE`` (speed), large enough that a face of
    ``min_face`` source pixels spans RELIABLE_WINDOW_MULTIPLE cascade windows (recall); above 1 only when the
    caller asks for faces smaller than that. Measured on the astronaut face pasted at random places into 640x360
    frames (scale factor 1.1, 5 neighbours): faces spanning 1.0 / 1.2 / 1.4 / 1.7 / 2+ windows were found in
    0 / 0 / 2 / 16 / 16 of 16 frames.
    """
    window = max(_cascade(FRONTAL_CASCADE_FILE).getOriginalWindowSize())
    return max(min(1.0, DETECT_LONG_SIDE / max(height, width)), RELIABLE_WINDOW_MULTIPLE * window / min_face)


def _haar_boxes(grey: np.ndarray, classifier: cv2.CascadeClassifier, **kwargs) -> np.ndarray:
    """Run one cascade on a grey image; float64 [N, 4] (x0, y0, x1, y1) in that image's pixels.

    kwargs: detectMultiScale options overriding the module defaults (minNeighbors, minSize, maxSize)."""
    options = {"scaleFactor": HAAR_SCALE_FACTOR, "minNeighbors": HAAR_MIN_NEIGHBORS, **kwargs}
    found = classifier.detectMultiScale(grey, **options)
    found = np.asarray(found, np.float64).reshape(-1, 4)
    return np.concatenate([found[:, :2], found[:, :2] + found[:, 2:]], axis=1)


def detect_faces(frame: np.ndarray, *, min_face: int = 80) -> np.ndarray:
    """All faces the Haar cascades find in one frame.

    frame: uint8 [H, W, 3] RGB. min_face: see :func:`detect_and_crop`.
    Returns float32 [N, 4] boxes (x0, y0, x1, y1) in source pixels, unsmoothed and without margin (a Haar box
    spans roughly eyebrows to chin). Frontal faces first; the profile cascade (both directions) runs only if no
    frontal face is found.
    """
    _check_frame(frame, "frame")
    if not (isinstance(min_face, (int, np.integer)) and min_face >= 1):
        raise ValueError(f"min_face must be a positive int (pixels), got {min_face!r}")
    height, width = frame.shape[:2]
    scale = detection_scale(height, width, int(min_face))
    small_w, small_h = max(1, round(width * scale)), max(1, round(height * scale))
    grey = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
    shrinking = small_w < width
    grey = cv2.resize(grey, (small_w, small_h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    grey = cv2.equalizeHist(grey)  # Haar features are contrast-sensitive; this evens out dim or washed-out frames

    boxes = _haar_boxes(grey, _cascade(FRONTAL_CASCADE_FILE))
    if len(boxes) == 0:
        profile = _cascade(PROFILE_CASCADE_FILE)
        facing_right = _haar_boxes(grey, profile)
        mirrored = _haar_boxes(np.ascontiguousarray(grey[:, ::-1]), profile)
        facing_left = np.stack([small_w - mirrored[:, 2], mirrored[:, 1], small_w - mirrored[:, 0], mirrored[:, 3]], 1)
        boxes = np.concatenate([facing_right, facing_left])
    boxes = boxes * np.array([width / small_w, height / small_h] * 2)  # back to source pixels
    return boxes.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# linking detections into tracks


@dataclasses.dataclass
class _Track:
    frames: list[int]
    boxes: list[np.ndarray]
    last_pass: int  # index (among searched frames) of the latest detection

    @property
    def score(self) -> float:
        """Sum of face sizes: rewards both a large face and a persistent one."""
        return float(sum(_box_size(box) for box in self.boxes))


def _box_size(box: np.ndarray) -> float:
    return math.sqrt(max(box[2] - box[0], 1e-6) * max(box[3] - box[1], 1e-6))


def _box_centre(box: np.ndarray) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def _link_tracks(detections: list[tuple[int, np.ndarray]]) -> list[_Track]:
    """Greedy frame-by-frame association of detections into tracks.

    detections: (frame index, float32 [N, 4] boxes) for every searched frame, in temporal order. A detection joins
    the track whose latest box is nearest in centre distance (measured in face sizes), if that distance is within
    MAX_CENTRE_SHIFT per searched frame since the track was last seen (capped at MAX_LINK_PASSES) and the size
    ratio is within MAX_SIZE_RATIO; otherwise it starts a new track. Tracks never end, so a face that disappears
    (occlusion, blank frames) and comes back nearby continues its track.
    """
    tracks: list[_Track] = []
    for pass_index, (frame_index, boxes) in enumerate(detections):
        candidates = []
        for track_index, track in enumerate(tracks):
            last = track.boxes[-1]
            last_size = _box_size(last)
            gate = MAX_CENTRE_SHIFT * min(pass_index - track.last_pass, MAX_LINK_PASSES)
            for box_index, box in enumerate(boxes):
                size = _box_size(box)
                distance = np.linalg.norm(_box_centre(box) - _box_centre(last)) / math.sqrt(size * last_size)
                if distance <= gate and max(size, last_size) / min(size, last_size) <= MAX_SIZE_RATIO:
                    candidates.append((distance, track_index, box_index))
        taken_tracks, taken_boxes = set(), set()
        for _, track_index, box_index in sorted(candidates):
            if track_index in taken_tracks or box_index in taken_boxes:
                continue
            taken_tracks.add(track_index)
            taken_boxes.add(box_index)
            track = tracks[track_index]
            track.frames.append(frame_index)
            track.boxes.append(boxes[box_index])
            track.last_pass = pass_index
        for box_index, box in enumerate(boxes):
            if box_index not in taken_boxes:
                tracks.append(_Track(frames=[frame_index], boxes=[box], last_pass=pass_index))
    return tracks


# ---------------------------------------------------------------------------------------------------------------
# smoothing


def smooth_trajectory(values: np.ndarray, sigma: float) -> np.ndarray:
    """Zero-phase Gaussian smoothing that does not lag at the ends of the clip.

    values: [T] one coordinate per frame. Returns float64 [T].

    At each frame t a straight line is fitted to the neighbourhood by least squares with Gaussian weights
    exp(-(s - t)^2 / (2 sigma^2)) and evaluated at t. Away from the ends the weights are symmetric, the slope term
    cancels and this is exactly a Gaussian filter. Near the ends, where a plain Gaussian filter (with any padding
    mode) bends a moving face's trajectory back toward the last value and the crop lags by about sigma times the
    speed, the line fit follows steady motion exactly. The window sums are correlations with three kernels, so the
    cost is O(T * sigma).
    """
    values = np.asarray(values, np.float64)
    if values.ndim != 1:
        raise ValueError(f"smooth_trajectory expects a 1-D trajectory [T], got shape {values.shape}")
    if sigma <= 0 or values.size < 2:
        return values.copy()
    radius = max(1, math.ceil(4 * sigma))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)

    def window_sum(signal: np.ndarray, kernel: np.ndarray) -> np.ndarray:
        # out[t] = sum_d kernel[d] * signal[t + d]; zero outside the clip, so windows shrink at the ends.
        return ndimage.correlate1d(signal, kernel, mode="constant", cval=0.0)

    inside = np.ones_like(values)
    s0 = window_sum(inside, weights)
    s1 = window_sum(inside, weights * offsets)
    s2 = window_sum(inside, weights * offsets**2)
    y0 = window_sum(values, weights)
    y1 = window_sum(values, weights * offsets)
    determinant = s0 * s2 - s1**2
    line_fits = determinant > 1e-9 * np.maximum(s0 * s2, np.finfo(np.float64).tiny)
    local_linear = (s2 * y0 - s1 * y1) / np.where(line_fits, determinant, 1.0)
    return np.where(line_fits, local_linear, y0 / s0)


def _track_boxes(track: _Track, num_frames: int, *, smoothing: float, margin: float) -> np.ndarray:
    """Per-frame square boxes float64 [T, 4] from a track's detections: median, interpolate, smooth, enlarge."""
    frames = np.asarray(track.frames)
    boxes = np.stack(track.boxes).astype(np.float64)
    centre_x = (boxes[:, 0] + boxes[:, 2]) / 2
    centre_y = (boxes[:, 1] + boxes[:, 3]) / 2
    log_size = np.log(np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
    if smoothing > 0:
        # nearest-mode median keeps monotone motion intact at the ends: the median of [a, a, a, b, c] is a.
        centre_x, centre_y, log_size = (
            ndimage.median_filter(signal, size=MEDIAN_WINDOW, mode="nearest")
            for signal in (centre_x, centre_y, log_size)
        )
    every_frame = np.arange(num_frames)
    # np.interp holds the first / last detection beyond the ends.
    centre_x, centre_y, log_size = (np.interp(every_frame, frames, signal) for signal in (centre_x, centre_y, log_size))
    centre_x = smooth_trajectory(centre_x, smoothing)
    centre_y = smooth_trajectory(centre_y, smoothing)
    log_size = smooth_trajectory(log_size, smoothing * SIZE_SMOOTHING_RATIO)
    half_side = np.exp(log_size) * (1 + 2 * margin) / 2
    return np.stack([centre_x - half_side, centre_y - half_side, centre_x + half_side, centre_y + half_side], 1)


# ---------------------------------------------------------------------------------------------------------------
# cropping


def crop_square(frame: np.ndarray, box: np.ndarray, out_size: int) -> np.ndarray:
    """Cut ``box`` out of ``frame`` (black padding past the edges) and resize it to uint8 [out_size, out_size, 3].

    frame: uint8 [H, W, 3]. box: (x0, y0, x1, y1) in frame pixels, square; x0, y0 and the side x1 - x0 are rounded
    to whole pixels with Python's round() (a half-pixel shift of the source moves the crop by at most
    ``out_size / (2 * side)`` output pixels).
    """
    height, width = frame.shape[:2]
    x0, y0 = round(float(box[0])), round(float(box[1]))
    side = max(1, round(float(box[2]) - float(box[0])))
    inner_x0, inner_y0 = max(x0, 0), max(y0, 0)
    inner_x1, inner_y1 = min(x0 + side, width), min(y0 + side, height)
    if inner_x0 == x0 and inner_y0 == y0 and inner_x1 == x0 + side and inner_y1 == y0 + side:
        square = frame[y0 : y0 + side, x0 : x0 + side]
    else:
        square = np.zeros((side, side, 3), np.uint8)
        if inner_x1 > inner_x0 and inner_y1 > inner_y0:
            square[inner_y0 - y0 : inner_y1 - y0, inner_x0 - x0 : inner_x1 - x0] = frame[
                inner_y0:inner_y1, inner_x0:inner_x1
            ]
    interpolation = cv2.INTER_AREA if side > out_size else cv2.INTER_LINEAR
    return cv2.resize(square, (out_size, out_size), interpolation=interpolation)


# ---------------------------------------------------------------------------------------------------------------
# public entry points


def _check_frame(frame: np.ndarray, name: str) -> None:
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        description = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
        raise ValueError(f"{name} must be a uint8 [H, W, 3] RGB array, got {description}")


def detect_and_crop(
    frames: np.ndarray,
    out_size: int,
    *,
    margin: float = 0.25,
    detect_every: int = 1,
    smoothing: float = 3.0,
    min_face: int = 80,
) -> FaceTrack:
    """Find the main face of a video and return its square crops, stable over time.

    frames: uint8 [T, H, W, 3] RGB. out_size: side S of the output crops.
    margin: extra context on every side, in face sizes (0.25 makes the crop 1.5x the Haar face box, which spans
        roughly eyebrows to chin, so the crop shows the whole head).
    detect_every: run the detector on every k-th frame (and the last); boxes in between are interpolated.
    smoothing: Gaussian sigma in frames for the box centre (the size uses SIZE_SMOOTHING_RATIO times more);
        0 turns all temporal filtering off (raw detections, interpolated over gaps).
    min_face: smallest face side (Haar box, source pixels) that must be found reliably; faces down to about half
        of it may still be found, less reliably. Smaller values detect on a larger image: slower. On frames up to
        DETECT_LONG_SIDE (320 px) long, detection runs at full size and finds faces from about 40 px anyway.

    Returns a FaceTrack (crops uint8 [T, S, S, 3], boxes float32 [T, 4], detected bool [T]).
    Raises NoFaceFound if no searched frame has a face, ValueError on malformed arguments.
    """
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        description = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise ValueError(f"frames must be a uint8 [T, H, W, 3] RGB array, got {description}")
    num_frames, height, width = frames.shape[:3]
    if num_frames == 0 or height == 0 or width == 0:
        raise ValueError(f"frames must have at least one non-empty frame, got shape {frames.shape}")
    if not (isinstance(out_size, (int, np.integer)) and out_size >= 1):
        raise ValueError(f"out_size must be a positive int, got {out_size!r}")
    if not (isinstance(detect_every, (int, np.integer)) and detect_every >= 1):
        raise ValueError(f"detect_every must be a positive int, got {detect_every!r}")
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0 (face sizes per side), got {margin!r}")
    if not (math.isfinite(smoothing) and smoothing >= 0):
        raise ValueError(f"smoothing must be a finite number >= 0 (frames), got {smoothing!r}")
    if not (isinstance(min_face, (int, np.integer)) and min_face >= 1):
        raise ValueError(f"min_face must be a positive int (pixels), got {min_face!r}")

    searched = list(range(0, num_frames, detect_every))
    if searched[-1] != num_frames - 1:
        searched.append(num_frames - 1)
    detections = [(index, detect_faces(frames[index], min_face=int(min_face))) for index in searched]
    tracks = _link_tracks(detections)
    if not tracks:
        raise NoFaceFound(
            f"no face found in any of the {len(searched)} searched frames (video of {num_frames} frames of "
            f"{width}x{height}, detect_every={detect_every}, min_face={min_face} px)"
        )
    main = max(tracks, key=lambda track: track.score)  # max() keeps the earliest track on ties

    # Crop from the float32 boxes that are returned, so that every crop can be reproduced from its box.
    boxes = _track_boxes(main, num_frames, smoothing=float(smoothing), margin=float(margin)).astype(np.float32)
    detected = np.zeros(num_frames, bool)
    detected[main.frames] = True
    crops = np.stack([crop_square(frames[t], boxes[t], int(out_size)) for t in range(num_frames)])
    return FaceTrack(crops=crops, boxes=boxes, detected=detected)


def draw_box(
    frame: np.ndarray,
    box: np.ndarray,
    text: str | None = None,
    color: tuple[int, int, int] = (0, 255, 0),
) -> np.ndarray:
    """A copy of ``frame`` with ``box`` outlined and an optional label above it (for annotated output videos).

    frame: uint8 [H, W, 3] RGB (not modified). box: (x0, y0, x1, y1) in frame pixels; parts outside the frame are
    clipped. color: RGB. text: drawn on a filled box of ``color`` in black or white, whichever contrasts more;
    OpenCV's Hershey font covers ASCII only (other characters show as '?'). Line width and font scale follow the
    frame size so labels stay legible on both 224x224 and 1080p frames.
    """
    _check_frame(frame, "frame")
    box = np.asarray(box, np.float64).reshape(-1)
    if box.shape != (4,) or not np.all(np.isfinite(box)):
        raise ValueError(f"box must be 4 finite numbers (x0, y0, x1, y1), got {box!r}")
    if len(color) != 3:
        raise ValueError(f"color must be an (R, G, B) triple, got {color!r}")
    color = tuple(int(channel) for channel in color)
    annotated = np.ascontiguousarray(frame).copy()
    height, width = frame.shape[:2]
    thickness = max(1, round(min(height, width) / 200))
    x0, y0, x1, y1 = (round(value) for value in box)
    cv2.rectangle(annotated, (x0, y0), (x1, y1), color, thickness)  # axis-aligned: no anti-aliasing needed
    if text:
        font, font_scale = cv2.FONT_HERSHEY_SIMPLEX, max(0.35, min(height, width) / 600)
        (text_w, text_h), baseline = cv2.getTextSize(text, font, font_scale, thickness)
        label_h = text_h + baseline + 2 * thickness
        # Above the box if there is room, else just inside its top edge; kept within the frame horizontally.
        label_y0 = y0 - label_h if y0 - label_h >= 0 else max(0, y0)
        label_x0 = min(max(0, x0), max(0, width - text_w - 2 * thickness))
        cv2.rectangle(
            annotated, (label_x0, label_y0), (label_x0 + text_w + 2 * thickness, label_y0 + label_h), color, cv2.FILLED
        )
        luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        text_color = (0, 0, 0) if luminance > 128 else (255, 255, 255)
        cv2.putText(
            annotated,
            text,
            (label_x0 + thickness, label_y0 + thickness + text_h),
            font,
            font_scale,
            text_color,
            thickness,
            lineType=cv2.LINE_AA,
        )
    return annotated
