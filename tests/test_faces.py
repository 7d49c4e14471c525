"""Face detection, tracking and cropping on a real face photo (scikit-image's astronaut, Eileen Collins).

The face region below was checked by eye on a 3x zoom with a pixel ruler: cheeks x 178-272, eyebrows y ~85,
chin y ~163; the Haar box OpenCV finds is about (176, 66)-(274, 163). Every crop must contain this region.
"""

import cv2
import numpy as np
import pytest
import skimage.data

from data_pipelines import faces

ASTRONAUT = skimage.data.astronaut()  # uint8 [512, 512, 3] RGB
FACE_REGION = (180.0, 75.0, 270.0, 160.0)  # (x0, y0, x1, y1): eyebrows, eyes, nose, mouth, chin
FACE_CENTRE = ((FACE_REGION[0] + FACE_REGION[2]) / 2, (FACE_REGION[1] + FACE_REGION[3]) / 2)
GREY = 128


def box_centres(boxes):
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)


def frame_to_frame_jitter(boxes):
    """Mean absolute change of centre x, centre y and side between consecutive frames, in pixels."""
    trajectory = np.concatenate([box_centres(boxes), (boxes[:, 2:3] - boxes[:, 0:1])], axis=1)
    return float(np.abs(np.diff(trajectory, axis=0)).mean())


def contains(box, region, tolerance=0.0):
    return (
        box[0] <= region[0] + tolerance
        and box[1] <= region[1] + tolerance
        and box[2] >= region[2] - tolerance
        and box[3] >= region[3] - tolerance
    )


def translated_video(num_frames, step, blank=()):
    """The face part of the photo sliding right by `step` px per frame over a grey canvas.

    Returns uint8 [T, 300, 280 + step * (T - 1), 3]; frame t shows photo column c at canvas column c - 100 + step*t,
    so the face region of frame t is FACE_REGION shifted by (step * t - 100, 0). Frames in `blank` are plain grey.
    """
    part = ASTRONAUT[0:300, 100:380]
    frames = np.full((num_frames, 300, 280 + step * (num_frames - 1), 3), GREY, np.uint8)
    for t in range(num_frames):
        if t not in blank:
            frames[t, :, step * t : step * t + 280] = part
    return frames


# ------------------------------------------------------------------------------------------------ (1) one frame


def test_single_frame_box_contains_face_and_is_square_with_margin():
    tight = faces.detect_and_crop(ASTRONAUT[None], 160, margin=0.0)
    track = faces.detect_and_crop(ASTRONAUT[None], 160, margin=0.25)

    assert track.crops.shape == (1, 160, 160, 3) and track.crops.dtype == np.uint8
    assert track.boxes.shape == (1, 4) and track.boxes.dtype == np.float32
    assert track.detected.dtype == bool and track.detected.tolist() == [True]

    box, tight_box = track.boxes[0], tight.boxes[0]
    tight_side = tight_box[2] - tight_box[0]
    assert 80 <= tight_side <= 130, f"Haar face box side {tight_side} px is not a face-sized box"
    assert contains(tight_box, FACE_REGION, tolerance=6), tight_box
    assert contains(box, FACE_REGION), box
    side = box[2] - box[0]
    assert side == pytest.approx(box[3] - box[1], abs=1e-3), "box is not square"
    assert side == pytest.approx(1.5 * tight_side, rel=1e-4), "margin 0.25 must add a quarter face size per side"
    np.testing.assert_allclose(box_centres(track.boxes), box_centres(tight.boxes), atol=1e-3)

    # The crop is the box cut from the frame (it lies inside the photo), enlarged bilinearly to 160 px; at 96 px
    # it is shrunk with INTER_AREA.
    x0, y0 = round(float(box[0])), round(float(box[1]))
    pixels = round(float(side))
    assert 96 < pixels < 160
    cut = ASTRONAUT[y0 : y0 + pixels, x0 : x0 + pixels]
    np.testing.assert_array_equal(track.crops[0], cv2.resize(cut, (160, 160), interpolation=cv2.INTER_LINEAR))
    small = faces.detect_and_crop(ASTRONAUT[None], 96, margin=0.25)
    np.testing.assert_array_equal(small.boxes, track.boxes)
    np.testing.assert_array_equal(small.crops[0], cv2.resize(cut, (96, 96), interpolation=cv2.INTER_AREA))


# ------------------------------------------------------------------------------------------------ (2) motion


@pytest.mark.parametrize("detect_every", [1, 4])
def test_boxes_follow_a_moving_face(detect_every):
    num_frames, step = 16, 8
    frames = translated_video(num_frames, step)
    track = faces.detect_and_crop(frames, 112, detect_every=detect_every)

    assert track.crops.shape == (num_frames, 112, 112, 3)
    searched = set(range(0, num_frames, detect_every)) | {num_frames - 1}
    assert set(np.flatnonzero(track.detected)) == searched

    centres = box_centres(track.boxes)
    expected_x = FACE_CENTRE[0] - 100 + step * np.arange(num_frames)
    # The Haar box centre sits a few px off the centre of FACE_REGION; the motion itself must be followed.
    offset = centres[:, 0] - expected_x
    assert np.abs(offset).max() < 8, offset
    assert np.ptp(offset) < 3, f"box does not move with the face: offsets {offset}"
    assert np.ptp(centres[:, 1]) < 3, f"face moves only horizontally, box y centres {centres[:, 1]}"
    for t in range(num_frames):
        shifted = np.array(FACE_REGION) + [step * t - 100, 0, step * t - 100, 0]
        assert contains(track.boxes[t], shifted), (t, track.boxes[t], shifted)


# ------------------------------------------------------------------------------------------------ (3) jitter


def test_smoothing_removes_jitter_of_a_shaky_video():
    """Tiny random shifts and zooms (a hand-held camera); the crops should not shake with them."""
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(24):
        zoom = rng.uniform(0.97, 1.03)
        shift_x, shift_y = rng.uniform(-1.5, 1.5, size=2)
        warp = np.array(
            [[zoom, 0, shift_x + (1 - zoom) * FACE_CENTRE[0]], [0, zoom, shift_y + (1 - zoom) * FACE_CENTRE[1]]]
        )
        frames.append(cv2.warpAffine(ASTRONAUT, warp, (512, 512), borderMode=cv2.BORDER_REFLECT))
    frames = np.stack(frames)[:, 16:272, 96:352]  # 256x256 around the face keeps the test fast

    raw = faces.detect_and_crop(frames, 64, smoothing=0.0)
    smoothed = faces.detect_and_crop(frames, 64)

    assert raw.detected.all() and smoothed.detected.all()
    raw_jitter, smoothed_jitter = frame_to_frame_jitter(raw.boxes), frame_to_frame_jitter(smoothed.boxes)
    print(f"frame-to-frame jitter: raw {raw_jitter:.2f} px, smoothed {smoothed_jitter:.2f} px")
    assert raw_jitter > 0.5, f"test video too steady to test smoothing (raw jitter {raw_jitter:.2f} px)"
    assert smoothed_jitter < 0.25 * raw_jitter, (raw_jitter, smoothed_jitter)
    # Smoothing must not drift away from where the face is.
    assert np.abs(box_centres(smoothed.boxes) - box_centres(raw.boxes).mean(0)).max() < 3


def test_smoothing_rejects_simulated_detector_noise(monkeypatch):
    """Detector noise simulated around a known still face: smoothed boxes are closer to it and far steadier."""
    true_box = np.array([100.0, 60.0, 180.0, 140.0])
    num_frames = 40
    detections = true_box + np.random.default_rng(1).normal(0, 3.0, size=(num_frames, 4))
    detections[20:22] += [25, 20, 25, 20]  # two wild detections in a row, still close enough to join the track
    frames = np.zeros((num_frames, 240, 320, 3), np.uint8)
    frames[:, 0, 0, 0] = np.arange(num_frames)  # lets the fake detector know which frame it is looking at

    def noisy_detector(frame, *, min_face):
        return detections[frame[0, 0, 0]][None].astype(np.float32)

    monkeypatch.setattr(faces, "detect_faces", noisy_detector)
    raw = faces.detect_and_crop(frames, 32, margin=0.0, smoothing=0.0)
    smoothed = faces.detect_and_crop(frames, 32, margin=0.0)

    assert frame_to_frame_jitter(smoothed.boxes) < 0.2 * frame_to_frame_jitter(raw.boxes)
    true_centre = box_centres(true_box[None])[0]
    raw_error = np.linalg.norm(box_centres(raw.boxes) - true_centre, axis=1)
    smoothed_error = np.linalg.norm(box_centres(smoothed.boxes) - true_centre, axis=1)
    assert raw_error[20:22].min() > 20, "the outlier frames should be visible in the raw boxes"
    assert smoothed_error[17:25].max() < 4, f"median + Gaussian should reject the outliers: {smoothed_error[17:25]}"
    inliers = np.r_[0:20, 22:num_frames]
    raw_rms, smoothed_rms = np.sqrt((raw_error[inliers] ** 2).mean()), np.sqrt((smoothed_error**2).mean())
    assert smoothed_rms < 0.6 * raw_rms, (raw_rms, smoothed_rms)
    smoothed_sides = smoothed.boxes[:, 2] - smoothed.boxes[:, 0]
    assert np.abs(smoothed_sides - 80).max() < 3


def test_smooth_trajectory_keeps_steady_motion_and_averages_noise():
    ramp = 5.0 + 8.0 * np.arange(20)
    np.testing.assert_allclose(faces.smooth_trajectory(ramp, 3.0), ramp, atol=1e-9)  # no lag, even at the ends
    noise = np.random.default_rng(2).normal(0, 1, size=200)
    assert faces.smooth_trajectory(noise, 3.0).std() < 0.35 * noise.std()
    np.testing.assert_array_equal(faces.smooth_trajectory(noise, 0.0), noise)
    np.testing.assert_allclose(faces.smooth_trajectory(np.array([7.0]), 3.0), [7.0])


# ------------------------------------------------------------------------------------------------ tracking


def test_tracking_keeps_the_large_persistent_face(monkeypatch):
    """Main face in most frames, a brief larger false positive, a smaller face throughout, and a gap."""
    main_face = np.array([100.0, 50.0, 180.0, 130.0])
    small_face = np.array([300.0, 60.0, 340.0, 100.0])
    false_positive = np.array([10.0, 100.0, 130.0, 220.0])
    num_frames = 12

    def scripted_detector(frame, *, min_face):
        t = int(frame[0, 0, 0])
        boxes = [small_face + [0, t, 0, t]]
        if t not in (6, 7):
            boxes.append(main_face + [2 * t, 0, 2 * t, 0])
        if t in (3, 4):
            boxes.append(false_positive)
        return np.array(boxes, np.float32)

    monkeypatch.setattr(faces, "detect_faces", scripted_detector)
    frames = np.zeros((num_frames, 240, 360, 3), np.uint8)
    frames[:, 0, 0, 0] = np.arange(num_frames)
    track = faces.detect_and_crop(frames, 32, margin=0.0, smoothing=0.0)

    assert track.detected.tolist() == [t not in (6, 7) for t in range(num_frames)]
    expected = main_face + 2 * np.arange(num_frames)[:, None] * [1, 0, 1, 0]  # also across the gap (interpolated)
    np.testing.assert_allclose(track.boxes, expected, atol=1e-3)


def test_profile_cascade_finds_a_turned_face_in_both_directions(monkeypatch):
    """With the frontal cascade swapped for one that finds nothing, the cameraman is found by the profile cascade,
    facing either way; the mirrored detection must be mapped back to unmirrored coordinates."""
    camera = np.repeat(skimage.data.camera()[..., None], 3, axis=-1)  # 512x512, face about x 180-272, y 100-190
    frontal_box = faces.detect_faces(camera)
    assert frontal_box.shape == (1, 4)

    monkeypatch.setattr(faces, "FRONTAL_CASCADE_FILE", "haarcascade_frontalcatface.xml")
    found = faces.detect_faces(camera)
    found_mirrored = faces.detect_faces(np.ascontiguousarray(camera[:, ::-1]))
    assert found.shape == (1, 4) and found_mirrored.shape == (1, 4)
    np.testing.assert_allclose(found[0], frontal_box[0], atol=15)
    unmirrored = [512 - found_mirrored[0, 2], found_mirrored[0, 1], 512 - found_mirrored[0, 0], found_mirrored[0, 3]]
    np.testing.assert_allclose(unmirrored, found[0], atol=2)


# ------------------------------------------------------------------------------------------------ (4) gaps


def test_blank_frames_in_the_middle_are_interpolated():
    num_frames, step, blank = 16, 6, set(range(5, 11))
    frames = translated_video(num_frames, step, blank=blank)
    track = faces.detect_and_crop(frames, 96)

    assert track.detected.tolist() == [t not in blank for t in range(num_frames)]
    assert track.crops.shape == (num_frames, 96, 96, 3)
    centres = box_centres(track.boxes)
    offset = centres[:, 0] - step * np.arange(num_frames)
    assert np.ptp(offset) < 3, f"boxes across the gap are not on the face's straight path: {offset}"
    assert np.ptp(centres[:, 1]) < 3
    sides = track.boxes[:, 2] - track.boxes[:, 0]
    assert np.ptp(sides) < 3
    # Crops of blank frames are crops of the grey canvas, not garbage.
    assert (track.crops[7] == GREY).all()


# ------------------------------------------------------------------------------------------------ (5) no face


def test_all_blank_video_raises_no_face_found():
    blank = np.full((10, 120, 160, 3), GREY, np.uint8)
    with pytest.raises(faces.NoFaceFound, match=r"any of the 10 searched frames"):
        faces.detect_and_crop(blank, 64)
    with pytest.raises(faces.NoFaceFound, match=r"any of the 4 searched frames \(video of 10 frames"):
        faces.detect_and_crop(blank, 64, detect_every=3)  # frames 0, 3, 6, 9
    assert issubclass(faces.NoFaceFound, ValueError)


# ------------------------------------------------------------------------------------------------ (6) border


def test_face_at_the_border_is_padded_black():
    frame = ASTRONAUT[70:330, 172:432]  # face starts ~5 px from the top-left corner
    frames = np.stack([frame, frame, frame])
    track = faces.detect_and_crop(frames, 128, margin=0.25)

    assert track.crops.shape == (3, 128, 128, 3)
    box = track.boxes[0]
    assert box[0] < 0 and box[1] < 0, f"box {box} should pass the top-left frame edge"
    assert contains(box, np.array(FACE_REGION) - [172, 70, 172, 70])

    # Independent reference: pad the frame with black, cut the box, shrink with INTER_AREA.
    pad = 200
    padded = np.pad(frame, ((pad, pad), (pad, pad), (0, 0)), mode="constant", constant_values=0)
    x0, y0, side = round(float(box[0])), round(float(box[1])), round(float(box[2] - box[0]))
    cut = padded[y0 + pad : y0 + pad + side, x0 + pad : x0 + pad + side]
    expected = cv2.resize(cut, (128, 128), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(track.crops[0], expected)
    padded_rows = int(-y0 * 128 / side)
    assert padded_rows >= 2 and (track.crops[0, : padded_rows - 1] == 0).all()
    assert track.crops[0, 64, 64].min() > 0  # the face itself is not black


def test_crop_square_pads_and_enlarges_small_boxes():
    frame = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    crop = faces.crop_square(frame, np.array([-2.0, -1.0, 2.0, 3.0]), 8)  # 4 px box, upscaled to 8
    assert crop.shape == (8, 8, 3)
    expected = cv2.resize(
        np.pad(frame, ((1, 0), (2, 0), (0, 0)))[:4, :4], (8, 8), interpolation=cv2.INTER_LINEAR
    )
    np.testing.assert_array_equal(crop, expected)
    fully_outside = faces.crop_square(frame, np.array([50.0, 50.0, 60.0, 60.0]), 5)
    assert fully_outside.shape == (5, 5, 3) and not fully_outside.any()


# ------------------------------------------------------------------------------------------------ errors, drawing


@pytest.mark.parametrize(
    "frames, kwargs, message",
    [
        (np.zeros((2, 32, 32, 3), np.float32), {}, "uint8"),
        (np.zeros((32, 32, 3), np.uint8), {}, r"\[T, H, W, 3\]"),
        (np.zeros((2, 32, 32, 4), np.uint8), {}, r"\[T, H, W, 3\]"),
        (np.zeros((0, 32, 32, 3), np.uint8), {}, "at least one"),
        (np.zeros((2, 32, 32, 3), np.uint8), {"detect_every": 0}, "detect_every"),
        (np.zeros((2, 32, 32, 3), np.uint8), {"margin": -0.1}, "margin"),
        (np.zeros((2, 32, 32, 3), np.uint8), {"smoothing": float("nan")}, "smoothing"),
        (np.zeros((2, 32, 32, 3), np.uint8), {"min_face": 0}, "min_face"),
    ],
)
def test_bad_arguments_are_named(frames, kwargs, message):
    with pytest.raises(ValueError, match=message):
        faces.detect_and_crop(frames, 64, **kwargs)
    with pytest.raises(ValueError, match="out_size"):
        faces.detect_and_crop(np.zeros((1, 8, 8, 3), np.uint8), 0)


def test_draw_box_outlines_and_labels_without_touching_the_input():
    frame = np.full((120, 160, 3), 40, np.uint8)
    before = frame.copy()
    annotated = faces.draw_box(frame, np.array([40.5, 50.0, 120.0, 110.0]), text="happy 0.91", color=(255, 0, 0))

    np.testing.assert_array_equal(frame, before)
    assert annotated.shape == frame.shape and annotated.dtype == np.uint8
    assert (annotated[80, 40] == [255, 0, 0]).all() and (annotated[50, 80] == [255, 0, 0]).all()
    assert (annotated[80, 80] == 40).all(), "inside of the box must stay untouched"
    label = annotated[:50, 40:130]
    assert (label == [255, 0, 0]).all(-1).sum() > 100, "label background missing above the box"
    assert (label.min(-1) > 200).sum() > 10, "label text (white on red, anti-aliased) missing"
    unlabeled = faces.draw_box(frame, [40, 50, 120, 110], color=(255, 0, 0))
    assert (unlabeled[:45] == 40).all()
    with pytest.raises(ValueError, match="box"):
        faces.draw_box(frame, [1, 2, 3])
    with pytest.raises(ValueError, match="frame"):
        faces.draw_box(frame[..., 0], [1, 2, 3, 4])


# ------------------------------------------------------------------------------ (6) streaming tracker (face_tracks)


def grey_frames(frames):
    return [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]


def test_streaming_tracker_follows_a_moving_face_with_few_full_scans():
    from data_pipelines import face_tracks

    frames = translated_video(60, 2)
    options = face_tracks.TrackingOptions(detect_every=5, scan_every=50)
    (track,), tracker = face_tracks.track_frames(grey_frames(frames), options, fps=25)
    assert (track.start_frame, track.end_frame) == (0, 59) and track.boxes.shape == (60, 4)
    assert tracker.scans == 2 and tracker.redetections >= 10  # frames 0 and 50 scanned; the rest re-detected
    assert track.detected[[0, 5, 10, 55, 59]].all()  # every 5th frame and the last one
    for t in (0, 30, 59):  # the crop box holds the face region, shifted with the slide
        region = (FACE_REGION[0] - 100 + 2 * t, FACE_REGION[1], FACE_REGION[2] - 100 + 2 * t, FACE_REGION[3])
        assert contains(track.boxes[t], region, tolerance=4)
    # the crops of the second pass come from those boxes
    t, frame, crops = list(face_tracks.crop_tracks(frames, [track], 64))[30]
    np.testing.assert_array_equal(crops[0], faces.crop_square(frame, track.boxes[30], 64))


def test_streaming_tracker_keeps_a_face_across_a_short_gap_and_splits_a_long_one():
    from data_pipelines import face_tracks

    options = face_tracks.TrackingOptions(detect_every=5, scan_every=10, max_gap=20)
    short_gap = translated_video(60, 1, blank=range(20, 32))
    kept = dict(min_frames=16, min_detections=3)  # what predict keeps (one-off false hits on the suit are dropped)
    (track,), _ = face_tracks.track_frames(grey_frames(short_gap), options, fps=25, **kept)
    assert (track.start_frame, track.end_frame) == (0, 59) and not track.detected[20:32].any()
    long_gap = translated_video(90, 1, blank=range(20, 60))
    tracks, _ = face_tracks.track_frames(grey_frames(long_gap), options, fps=25, **kept)
    assert [t.track_id for t in tracks] == [0, 1]  # 40 blank frames > max_gap: the face comes back as a new track
    assert tracks[0].start_frame == 0 and 15 <= tracks[0].end_frame < 20
    assert 60 <= tracks[1].start_frame < 70 and tracks[1].end_frame == 89


def test_streaming_tracker_gives_up_early_without_a_face():
    from data_pipelines import face_tracks

    noise = np.random.default_rng(0).integers(0, 255, (200, 120, 160), dtype=np.uint8)
    early = face_tracks.TrackingOptions(search_seconds=2.0)
    fed = []
    with pytest.raises(faces.NoFaceFound, match=r"no face in the first 2 s \(50 frames.*--search_whole_video"):
        face_tracks.track_frames((fed.append(t) or g for t, g in enumerate(noise)), early, fps=25)
    assert len(fed) == 50  # the rest of the video was never read
    whole = face_tracks.TrackingOptions(search_seconds=None)
    with pytest.raises(faces.NoFaceFound, match="no face found in 200 frames"):
        face_tracks.track_frames(noise, whole, fps=25)
    with pytest.raises(ValueError, match="detect_every must be a positive int"):
        face_tracks.TrackingOptions(detect_every=0)


def test_streaming_tracker_searches_face_free_stretches_sparsely():
    from data_pipelines import face_tracks

    noise = np.random.default_rng(1).integers(0, 255, (300, 60, 80), dtype=np.uint8)
    options = face_tracks.TrackingOptions(detect_every=5, scan_every=50, search_seconds=None)
    tracker = face_tracks.FaceTracker(60, 80, options, fps=10)  # dense search for the first 10 s = 100 frames
    for t, grey in enumerate(noise):
        tracker.update(t, grey)
    assert tracker.scans == 100 // 5 + 200 // 50  # every 5th frame, then every 50th
