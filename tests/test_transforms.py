"""Per-clip transforms against the spec's rules and worked examples (PRETRAINING §1, FINETUNING §3-4, DATA §5-6)."""

import math

import numpy as np
import pytest
from PIL import Image

from data_pipelines import transforms as T


def rng(seed=0):
    return np.random.default_rng(seed)


def reference_loader_run(start, num_frames, clip_len, sr):
    """The VideoMAE loader loop in words: 1-based position advances by sr only while the next one is < F."""
    position, out = start + 1, []
    for _ in range(clip_len):
        out.append(position - 1)
        if position + sr < num_frames:
            position += sr
    return out


# --- temporal sampling ---------------------------------------------------------------------------------------------


def test_pretrain_short_clip_worked_example():
    idx = T.pretrain_frame_indices(rng(), 30, 16, 4)
    assert idx.shape == (1, 16)
    assert idx[0].tolist() == [0, 4, 8, 12, 16, 20, 24, 28, 28, 28, 28, 28, 28, 28, 28, 28]


@pytest.mark.parametrize("num_frames,sr", [(1, 4), (5, 4), (29, 4), (30, 4), (63, 4), (10, 2), (7, 3), (15, 1)])
def test_pretrain_short_clip_rule_matches_loader_loop_and_closed_form(num_frames, sr):
    idx = T.pretrain_frame_indices(rng(), num_frames, 16, sr)[0].tolist()
    assert idx == reference_loader_run(0, num_frames, 16, sr)
    j_star = max(0, math.ceil((num_frames - 1 - sr) / sr))  # PRETRAINING §1.1 general formula
    assert idx == [sr * min(i, j_star) for i in range(16)]


def test_pretrain_long_clip_uniform_start_and_exact_stride():
    starts = set()
    for seed in range(400):
        idx = T.pretrain_frame_indices(rng(seed), 100, 16, 4)[0]
        assert np.array_equal(np.diff(idx), np.full(15, 4))
        assert 0 <= idx[0] <= 36
        starts.add(int(idx[0]))
    assert starts == set(range(37))  # every start in [0, F - 64] occurs
    assert T.pretrain_frame_indices(rng(), 64, 16, 4)[0].tolist() == list(range(0, 64, 4))  # only start 0 fits


def test_pretrain_repeated_sampling_segments():
    # F = 200, n = 2: avg = (200 - 64 + 1) // 2 = 68 -> starts in [0, 67] and [68, 135]
    for seed in range(50):
        idx = T.pretrain_frame_indices(rng(seed), 200, 16, 4, num_samples=2)
        assert idx.shape == (2, 16)
        assert 0 <= idx[0, 0] <= 67 and 68 <= idx[1, 0] <= 135
        assert (np.diff(idx, axis=1) == 4).all()
    short = T.pretrain_frame_indices(rng(), 30, 16, 4, num_samples=3)
    assert (short == short[0]).all() and short[0].tolist() == reference_loader_run(0, 30, 16, 4)


def test_finetune_train_short_clip():
    # F = 30 <= 64: linspace(0, 30, 7) = 0,5,...,30 then 9 copies of 30, clipped to 29
    assert T.finetune_train_frame_indices(rng(), 30, 16, 4).tolist() == [0, 5, 10, 15, 20, 25] + [29] * 10
    # FERV39k (sr 1), F = 10: linspace(0, 10, 10) floored, then 6 copies of F -> 9
    assert T.finetune_train_frame_indices(rng(), 10, 16, 1).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] + [9] * 6
    assert T.finetune_train_frame_indices(rng(), 3, 16, 4).tolist() == [2] * 16  # F // sr == 0


def test_finetune_train_long_clip_window():
    ends = set()
    for seed in range(300):
        idx = T.finetune_train_frame_indices(rng(seed), 100, 16, 4)
        start = int(idx[0])
        end = start + 64
        assert 64 <= end <= 99
        expected = np.clip(np.linspace(start, end, 16), start, end - 1).astype(int)
        assert idx.tolist() == expected.tolist()
        assert idx[-1] == end - 1
        ends.add(end)
    assert min(ends) == 64 and max(ends) == 99


def test_eval_views():
    # F = 100, sr 4: strided 0..96 (25 entries); segment 0 the first 16, segment 1 the last 16
    assert T.eval_frame_indices(100, 0, 2, 16, 4).tolist() == list(range(0, 64, 4))
    assert T.eval_frame_indices(100, 1, 2, 16, 4).tolist() == list(range(36, 100, 4))
    # three segments: step 9/2 = 4.5 -> starts 0, 4, 9
    assert T.eval_frame_indices(100, 1, 3, 16, 4)[0] == 16
    # short clip: strided 0..28 padded with 28 -> M = 16, both segments identical
    short = [0, 4, 8, 12, 16, 20, 24, 28] + [28] * 8
    assert T.eval_frame_indices(30, 0, 2, 16, 4).tolist() == short
    assert T.eval_frame_indices(30, 1, 2, 16, 4).tolist() == short
    # one segment: offset 0 instead of a division by zero (Q20)
    assert T.eval_frame_indices(100, 0, 1, 16, 4).tolist() == list(range(0, 64, 4))
    with pytest.raises(ValueError, match="segment 2"):
        T.eval_frame_indices(100, 2, 2)


def test_sampling_rejects_empty_clips():
    with pytest.raises(ValueError, match="0 frames"):
        T.pretrain_frame_indices(rng(), 0)
    with pytest.raises(ValueError, match="0 frames"):
        T.finetune_train_frame_indices(rng(), 0)


# --- crops and resizes ---------------------------------------------------------------------------------------------


def noise_clip(t=4, h=160, w=160, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def test_fixed_crop_boxes():
    assert T.top_centre_crop_box(224, 224, 160) == (0, 32, 160, 160)
    assert T.top_centre_crop_box(224, 224, 192) == (0, 16, 192, 192)
    clip = noise_clip(2, 224, 224)
    assert np.array_equal(T.crop_frames(clip, (0, 32, 160, 160)), clip[:, 0:160, 32:192])
    with pytest.raises(ValueError, match="does not fit"):
        T.crop_frames(clip, (100, 0, 160, 160))
    with pytest.raises(ValueError, match="at least"):
        T.top_centre_crop_box(150, 224, 160)


def test_multiscale_candidates():
    crop = T.GroupMultiScaleCrop(160)
    pairs = crop.size_candidates(160, 160)
    sides = [160, 140, 120, 105]
    expected = [(sides[j], sides[i]) for i in range(4) for j in range(4) if abs(i - j) <= 1]
    assert pairs == expected and len(pairs) == 10
    # 13 positions in step units; crop 120 wide x 105 high -> steps (10, 13)
    offsets = crop.offset_candidates(160, 160, 120, 105)
    assert len(offsets) == 13 and len(set(offsets)) == 13
    assert offsets[:5] == [(0, 0), (40, 0), (0, 52), (40, 52), (20, 26)]
    assert set(offsets) == {(10 * x, 13 * y) for x, y in T.GroupMultiScaleCrop.POSITIONS}
    # snapping: 0.99 * 160 = 158 is within 3 px of 160
    assert T.GroupMultiScaleCrop(160, scales=(1, 0.99, 0.75)).size_candidates(160, 160)[1] == (160, 160)


def test_multiscale_crop_samples_only_candidates_and_resizes_with_pil():
    crop = T.GroupMultiScaleCrop(160)
    seen_sizes, seen_positions = set(), set()
    for seed in range(400):
        top, left, h, w = crop.sample_box(rng(seed), 160, 160)
        assert (w, h) in crop.size_candidates(160, 160)
        offsets = crop.offset_candidates(160, 160, w, h)
        assert (left, top) in offsets
        seen_sizes.add((w, h))
        if len(set(offsets)) == 13:  # crops smaller than the frame both ways: the corner identifies the position
            seen_positions.add(offsets.index((left, top)))
    assert len(seen_sizes) == 10
    assert seen_positions == set(range(13))
    clip = noise_clip(3)
    out = crop(clip, rng(5))
    top, left, h, w = crop.sample_box(rng(5), 160, 160)
    for t in range(3):
        expected = np.asarray(
            Image.fromarray(clip[t, top : top + h, left : left + w]).resize((160, 160), Image.BILINEAR)
        )
        assert np.array_equal(out[t], expected)  # same window on every frame


def test_multiscale_crop_cv2_resize_is_within_one_level_of_pil():
    clip = noise_clip(3)
    pil = T.GroupMultiScaleCrop(160)
    fast = T.GroupMultiScaleCrop(160, resize="cv2")
    for seed in range(5):
        a, b = pil(clip, rng(seed)), fast(clip, rng(seed))
        assert np.abs(a.astype(int) - b).max() <= 1
    with pytest.raises(ValueError, match="resize"):
        T.GroupMultiScaleCrop(160, resize="area")


def test_multiscale_crop_non_square_frames():
    crop = T.GroupMultiScaleCrop(160)
    assert crop.size_candidates(160, 200)[0] == (160, 160)  # base = short side
    out = crop(noise_clip(2, 160, 200), rng())
    assert out.shape == (2, 160, 160, 3) and out.dtype == np.uint8


def torch_bilinear_reference(frames, out_h, out_w):
    """float64 torch interpolate(bilinear, align_corners=False, antialias=False), written from its definition."""

    def axis(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    x = frames.astype(np.float64)
    y0, y1, ly = axis(x.shape[1], out_h)
    x0, x1, lx = axis(x.shape[2], out_w)
    rows = x[:, y0] * (1 - ly)[None, :, None, None] + x[:, y1] * ly[None, :, None, None]
    return rows[:, :, x0] * (1 - lx)[None, None, :, None] + rows[:, :, x1] * lx[None, None, :, None]


@pytest.mark.parametrize("shape", [(37, 101), (160, 90), (200, 220)])
def test_resize_bilinear_matches_torch_semantics(shape):
    clip = noise_clip(2, *shape)
    out = T.resize_bilinear(clip, 160, 160)
    ref = torch_bilinear_reference(clip, 160, 160)
    assert out.dtype == np.uint8 and out.shape == (2, 160, 160, 3)
    assert np.abs(out - ref).max() <= 0.5 + 1e-3  # only the final rounding differs from the float reference


def test_resize_frames_pil_is_pil_bilinear():
    clip = noise_clip(2, 120, 200)
    out = T.resize_frames_pil(clip, 160, 160)
    assert np.array_equal(out[1], np.asarray(Image.fromarray(clip[1]).resize((160, 160), Image.BILINEAR)))
    assert T.resize_frames_pil(out, 160, 160) is out


def test_random_resized_crop_box_bounds_and_scale():
    for seed in range(300):
        top, left, h, w = T.random_resized_crop_box(rng(seed), 160, 160)
        assert 0 < h <= 160 and 0 < w <= 160 and top + h <= 160 and left + w <= 160 and top >= 0 and left >= 0
    fractions = [
        np.prod(T.random_resized_crop_box(rng(s), 160, 160, scale=(0.8, 1.0))[2:]) / 160**2 for s in range(200)
    ]
    assert min(fractions) > 0.75  # Q23 option: >= 0.8 of the area up to rounding
    small = [np.prod(T.random_resized_crop_box(rng(s), 160, 160)[2:]) / 160**2 for s in range(300)]
    assert min(small) < 0.2  # the faithful 0.08 lower bound produces small crops
    # impossible scale -> all tries fail -> whole frame
    assert T.random_resized_crop_box(rng(), 160, 160, scale=(2.0, 3.0)) == (0, 0, 160, 160)
    assert T.random_resized_crop_box(rng(), 100, 200, scale=(2.0, 3.0)) == (0, 33, 100, 133)  # ratio clamped to 4/3


def test_random_resized_crop_is_identical_across_frames():
    clip = noise_clip(4)
    out = T.RandomResizedCrop(160)(clip, rng(3))
    top, left, h, w = T.random_resized_crop_box(rng(3), 160, 160)  # the same draw
    assert (h, w) != (160, 160)
    for t in range(4):
        expected = T.resize_bilinear(clip[t : t + 1, top : top + h, left : left + w], 160, 160)[0]
        assert np.array_equal(out[t], expected)


def test_horizontal_flip():
    clip = noise_clip(2)
    assert np.array_equal(T.random_horizontal_flip(clip, rng(), 1.0), clip[:, :, ::-1])
    assert T.random_horizontal_flip(clip, rng(), 0.0) is clip
    flips = sum(T.random_horizontal_flip(clip, rng(s)) is not clip for s in range(400))
    assert 160 < flips < 240


def test_random_erasing_box():
    assert T.random_erasing_box(rng(), 160, 160, probability=0.0).tolist() == [0, 0, 0, 0]
    erased = 0
    for seed in range(400):
        box = T.random_erasing_box(rng(seed), 160, 160, probability=1.0)
        assert box.dtype == np.int32 and box.shape == (4,)
        top, left, h, w = box.tolist()
        assert 0 < h < 160 and 0 < w < 160 and top + h <= 160 and left + w <= 160
        area = h * w / 160**2
        assert 0.015 < area < 0.36  # U(0.02, 1/3) of the frame, up to rounding
        assert 0.2 < h / w < 4.5  # aspect in (0.3, 3.33) up to rounding
        erased += T.random_erasing_box(rng(seed + 1000), 160, 160).any()
    assert 70 < erased < 130  # probability 0.25


def test_eval_spatial_crop():
    clip = noise_clip(2, 160, 160)
    for crop in range(2):
        assert np.array_equal(T.eval_spatial_crop(clip, crop, 2, 160), clip)  # identical views (Q20)
    tall = noise_clip(1, 200, 160)
    assert np.array_equal(T.eval_spatial_crop(tall, 1, 2, 160), tall[:, 40:200])
    assert np.array_equal(T.eval_spatial_crop(tall, 0, 1, 160), tall[:, 0:160])  # one crop: offset 0


# --- RandAugment ---------------------------------------------------------------------------------------------------


def test_parse_published_policy():
    cfg = T.parse_rand_augment("rand-m7-n4-mstd0.5-inc1")
    assert (cfg.magnitude, cfg.num_layers, cfg.magnitude_std, cfg.prob, cfg.increasing) == (7, 4, 0.5, 0.5, True)
    assert len(cfg.ops) == 15 and cfg.ops == T.INCREASING_OPS
    default = T.parse_rand_augment("rand-m9")
    assert (default.magnitude, default.num_layers, default.increasing) == (9, 2, False)
    assert default.ops == T.STANDARD_OPS
    assert T.parse_rand_augment("rand-m5-n1-p1.0-mmax8").magnitude_max == 8
    for bad in ["augmix-m5", "rand-w0", "rand-m", "rand-x3"]:
        with pytest.raises(ValueError):
            T.parse_rand_augment(bad)


def test_rand_augment_op_arguments_at_magnitude_7():
    ra = T.RandAugment("rand-m7-n4-inc1")  # no magnitude noise -> exact arguments
    expected = {
        "Rotate": 21.0, "PosterizeIncreasing": 2, "SolarizeIncreasing": 77, "SolarizeAdd": 77,
        "ShearX": 0.21, "ShearY": 0.21, "TranslateXRel": 0.315, "TranslateYRel": 0.315,
    }  # fmt: skip
    seen, counts = set(), []
    for seed in range(300):
        ops = ra.sample(rng(seed))
        counts.append(len(ops))
        for name, args in ops:
            seen.add(name)
            if name in expected:
                assert abs(abs(args[0]) - expected[name]) < 1e-9, (name, args)
            elif name.endswith("Increasing"):
                assert abs(abs(args[0] - 1.0) - 0.63) < 1e-9, (name, args)
            else:
                assert args == ()
    assert seen == set(T.INCREASING_OPS)
    assert 1.7 < np.mean(counts) < 2.3  # 4 draws, each applied with p = 0.5
    assert max(counts) == 4


def test_rand_augment_magnitude_noise_is_clipped():
    ra = T.RandAugment("rand-m10-n4-mstd5-inc1")
    rotations = [abs(a[0]) for s in range(300) for n, a in ra.sample(rng(s)) if n == "Rotate"]
    assert max(rotations) <= 30.0 + 1e-9 and sum(r == 30.0 for r in rotations) > len(rotations) / 3
    assert min(rotations) < 25


@pytest.mark.parametrize("name", T.INCREASING_OPS + ("Posterize", "Solarize", "Color", "Contrast", "Brightness"))
def test_rand_augment_same_arguments_on_every_frame(name):
    ra = T.RandAugment("rand-m7-n4-mstd0.5-inc1")
    clip = noise_clip(3, 40, 48, seed=2)
    enhance = name.endswith("Increasing") or name in ("Color", "Contrast", "Brightness")
    args = {
        "Rotate": (-12.5,), "ShearX": (0.2,), "ShearY": (-0.2,), "TranslateXRel": (0.3,), "TranslateYRel": (-0.3,),
        "PosterizeIncreasing": (2,), "Posterize": (3,), "SolarizeIncreasing": (100,), "Solarize": (100,),
        "SolarizeAdd": (50,),
    }.get(name, (1.4,) if enhance else ())  # fmt: skip
    out = ra.apply(clip, [(name, args)])
    per_frame = np.stack([np.asarray(ra.apply_op(Image.fromarray(f), name, args)) for f in clip])
    assert out.shape == clip.shape and out.dtype == np.uint8
    assert np.array_equal(out, per_frame)  # stacked pixel-wise ops == frame-by-frame
    if name not in ("AutoContrast", "Equalize"):  # noise frames have full range -> these may be no-ops
        assert not np.array_equal(out, clip)


def test_rand_augment_geometric_fill_and_identical_frames():
    ra = T.RandAugment("rand-m7-n4-mstd0.5-inc1")
    white = np.full((2, 32, 40, 3), 255, np.uint8)
    shifted = ra.apply(white, [("TranslateXRel", (0.45,))])  # content moves left by 18 px -> right side filled
    assert (shifted[:, :, -10:] == 128).all() and (shifted[:, :, :10] == 255).all()
    same = np.repeat(noise_clip(1, 48, 48), 4, axis=0)
    for seed in range(30):
        out = ra(same, rng(seed))
        assert all(np.array_equal(out[0], f) for f in out[1:])


# --- fast resize and DCT-domain decode (input-pipeline throughput) --------------------------------------------------


def _face_clip(frames=4, size=160, seed=0):
    from data_pipelines import synthetic

    return synthetic.generate_clip(np.random.default_rng(seed), seed % 7, frames=frames, size=size)[0]


def test_fast_resize_is_within_one_grey_level_of_pil_on_average():
    clip = _face_clip()
    crop = T.GroupMultiScaleCrop(160)
    r = rng(3)
    worst = 0.0
    for _ in range(6):  # the multi-scale crop's enlargements (the pre-training case)
        box = crop.sample_box(r, 160, 160)
        part = T.crop_frames(clip, box)
        diff = np.abs(T.resize_frames_fast(part, 160, 160).astype(int) - T.resize_frames_pil(part, 160, 160))
        worst = max(worst, diff.mean())
    assert worst < 0.5  # measured ~0.2
    shrunk = np.abs(T.resize_frames_fast(clip, 112, 96).astype(int) - T.resize_frames_pil(clip, 112, 96))
    assert shrunk.mean() < 1.0  # shrinking: INTER_AREA vs PIL's widened bilinear support
    assert T.resize_frames_fast(clip, 160, 160) is clip
    out = T.GroupMultiScaleCrop(160, resize="fast")(clip, rng(0))
    assert out.shape == (4, 160, 160, 3) and out.dtype == np.uint8
    with pytest.raises(ValueError, match="resize must be one of"):
        T.GroupMultiScaleCrop(160, resize="area")


def test_dct_scaled_decode_only_when_frames_are_twice_the_needed_size():
    from data_pipelines import records

    big = _face_clip(frames=3, size=320)
    rec = records.make_record("big", big)
    full = records.decode_frames(rec, [0, 2, 2])
    scaled = records.decode_frames(rec, [0, 2, 2], min_size=160)
    assert full.shape == (3, 320, 320, 3) and scaled.shape == (3, 160, 160, 3)
    reference = T.resize_frames_pil(full, 160, 160)  # what the pipeline did before: full decode, PIL resize
    assert np.abs(scaled.astype(int) - reference).mean() < 2.0
    assert records.decode_frames(rec, [1], min_size=200).shape == (1, 320, 320, 3)  # 320 < 2 x 200: full size
