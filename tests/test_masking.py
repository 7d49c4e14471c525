"""Masks: counts, tube structure, window contract, symmetric variants, exact arithmetic, LGI contract check."""

import pickle
import sys

import numpy as np
import pytest

from facemae_jax import masking

GRID = (8, 10, 10)


@pytest.mark.parametrize(
    "total,ratio,expected",
    [(100, 0.9, 90), (50, 0.9, 45), (800, 0.9, 720), (100, 0.29, 29), (100, 0.57, 57), (10, 0.0, 0), (10, 1.0, 10)],
)
def test_num_masked_exact(total, ratio, expected):
    assert masking.num_masked(total, ratio) == expected


def test_truncation_would_lose_a_token():
    # Q22: the reference's int(total * ratio) gives 28 and 56 here; num_masked gives 29 and 57 (above).
    assert int(100 * 0.29) == 28 and int(100 * 0.57) == 56


@pytest.mark.parametrize("total,ratio", [(100, 0.905), (50, 0.75), (7, 0.5)])
def test_num_masked_rejects_fractional_counts(total, ratio):
    with pytest.raises(ValueError, match="not a whole number"):
        masking.num_masked(total, ratio)


def test_num_masked_rejects_bad_ratio():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        masking.num_masked(100, 1.5)


def test_tube_mask_counts_and_tube_property():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = masking.tube_mask(rng, GRID, 0.9)
        assert mask.dtype == bool and mask.shape == (800,)
        assert mask.sum() == 720
        per_frame = mask.reshape(8, 100)
        assert (per_frame == per_frame[0]).all()  # identical spatial mask at every time step
        assert (~per_frame[0]).sum() == 10


def test_tube_mask_is_random_and_reproducible():
    a = masking.tube_mask(np.random.default_rng(1), GRID, 0.9)
    b = masking.tube_mask(np.random.default_rng(1), GRID, 0.9)
    c = masking.tube_mask(np.random.default_rng(2), GRID, 0.9)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_tube_mask_positions_are_uniform():
    rng = np.random.default_rng(3)
    visible_counts = np.zeros(100)
    for _ in range(2000):
        visible_counts += ~masking.tube_mask(rng, GRID, 0.9)[:100]
    # each position visible with probability 0.1 -> 200 expected, std ~13.4
    assert visible_counts.min() > 140 and visible_counts.max() < 260


def test_tube_window_mask_window_contract():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = masking.tube_window_mask(rng, GRID, (5, 10), 0.9)
        assert mask.shape == (800,) and mask.sum() == 720
        spatial = mask.reshape(8, 10, 10)
        assert (spatial == spatial[0]).all()
        assert (~spatial[0, :5]).sum() == 5  # upper band: rows 0-4
        assert (~spatial[0, 5:]).sum() == 5  # lower band: rows 5-9


def test_tube_window_bands_are_independent():
    rng = np.random.default_rng(4)
    same = 0
    for _ in range(50):
        s = masking.tube_window_mask(rng, GRID, (5, 10), 0.9).reshape(8, 10, 10)[0]
        same += np.array_equal(s[:5], s[5:])
    assert same < 3


@pytest.mark.parametrize("symmetry", ["global", "local"])
def test_tube_window_symmetric_variants(symmetry):
    rng = np.random.default_rng(5)
    sides_differ = 0
    for _ in range(60):
        s = masking.tube_window_mask(rng, GRID, (5, 10), 0.9, symmetry=symmetry).reshape(8, 10, 10)
        assert (s == s[0]).all()
        sides = []
        for band in (s[0, :5], s[0, 5:]):
            left_visible, right_visible = (~band[:, :5]).sum(), (~band[:, 5:]).sum()
            assert left_visible + right_visible == 5
            assert left_visible == 0 or right_visible == 0  # visible tokens confined to one half
            sides.append(0 if left_visible else 1)
        sides_differ += sides[0] != sides[1]
    if symmetry == "global":
        assert sides_differ == 0  # one side per clip
    else:
        assert 10 < sides_differ < 50  # one side per band, independently (expected 30)


def test_tube_window_argument_checks():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="must equal the grid width"):
        masking.tube_window_mask(rng, GRID, (5, 5), 0.9)
    with pytest.raises(ValueError, match="not divisible"):
        masking.tube_window_mask(rng, GRID, (3, 10), 0.9)
    with pytest.raises(ValueError, match="even"):
        masking.tube_window_mask(rng, (8, 10, 9), (5, 9), 0.8)
    with pytest.raises(ValueError, match="symmetry"):
        masking.tube_window_mask(rng, GRID, (5, 10), 0.9, symmetry="left")
    with pytest.raises(ValueError, match="half window"):
        masking.tube_window_mask(rng, GRID, (5, 10), 0.4, symmetry="global")  # 30 visible > 25 cells


def test_random_mask_counts():
    rng = np.random.default_rng(0)
    masks = np.stack([masking.random_mask(rng, GRID, 0.9) for _ in range(10)])
    assert (masks.sum(1) == 720).all()
    assert not (masks.reshape(10, 8, 100) == masks.reshape(10, 8, 100)[:, :1]).all()  # not a tube


def test_num_visible():
    assert masking.num_visible("tube", GRID, 0.9) == 80
    assert masking.num_visible("tube_window", GRID, 0.9, window=(5, 10)) == 80
    assert masking.num_visible("random", GRID, 0.9) == 80
    assert masking.num_visible("tube_window", (4, 4, 4), 0.75, window=(2, 4)) == 4 * 2 * 2
    with pytest.raises(ValueError, match="window"):
        masking.num_visible("tube_window", GRID, 0.9)
    with pytest.raises(ValueError, match="unknown mask kind"):
        masking.num_visible("block", GRID, 0.9)


def test_check_lgi_mask_accepts_tube_window_batches():
    rng = np.random.default_rng(0)
    batch = np.stack([masking.tube_window_mask(rng, GRID, (5, 10), 0.9) for _ in range(4)])
    assert masking.check_lgi_mask(batch, GRID, (2, 5, 10)) == 5
    assert masking.check_lgi_mask(batch[0], GRID, (2, 5, 10)) == 5
    # tiny geometry: grid (4, 4, 4), bands of 2 rows, 2 of 8 tokens visible per band
    small = masking.tube_window_mask(rng, (4, 4, 4), (2, 4), 0.75)
    assert masking.check_lgi_mask(small, (4, 4, 4), (2, 2, 4)) == 2


def test_check_lgi_mask_accepts_golden_mask():
    # CHECKPOINTS §6 step 3: visible positions {3,14,25,36,47,58,69,70,81,92} satisfy both contracts.
    spatial = np.ones(100, bool)
    spatial[[3, 14, 25, 36, 47, 58, 69, 70, 81, 92]] = False
    assert masking.check_lgi_mask(np.tile(spatial, 8), GRID, (2, 5, 10)) == 5


def test_check_lgi_mask_rejects_plain_tube_with_named_cell():
    spatial = np.ones(100, bool)
    spatial[:10] = False  # all 10 visible tokens in row 0 -> upper band 10, lower band 0
    mask = np.tile(spatial, 8)
    with pytest.raises(
        masking.MaskContractError, match=r"sample 0, frame 0, band 0 .* holds 10 visible tokens, expected 5"
    ):
        masking.check_lgi_mask(mask, GRID, (2, 5, 10))


@pytest.mark.parametrize("generator", [masking.random_mask, masking.tube_mask])
def test_check_lgi_mask_rejects_random_and_tube_masks(generator):
    rng = np.random.default_rng(7)
    # a plain tube satisfies the contract only by chance (~26% of draws), a random mask almost never
    batch = np.stack([generator(rng, GRID, 0.9) for _ in range(4)])
    with pytest.raises(masking.MaskContractError, match=r"sample \d+, frame \d+, band \d+ .* visible tokens"):
        masking.check_lgi_mask(batch, GRID, (2, 5, 10))


def test_check_lgi_mask_names_the_offending_sample():
    rng = np.random.default_rng(0)
    good = masking.tube_window_mask(rng, GRID, (5, 10), 0.9)
    bad = good.copy().reshape(8, 10, 10)
    upper_visible = np.argwhere(~bad[3, :5])[0]
    lower_masked = np.argwhere(bad[3, 5:])[0]
    bad[3, upper_visible[0], upper_visible[1]] = True  # frame 3: move one visible token from band 0 to band 1
    bad[3, 5 + lower_masked[0], lower_masked[1]] = False
    batch = np.stack([good, good, bad.reshape(-1)])
    with pytest.raises(
        masking.MaskContractError, match=r"sample 2, frame 3, band 0 .* holds 4 visible tokens, expected 5"
    ):
        masking.check_lgi_mask(batch, GRID, (2, 5, 10))


def test_check_lgi_mask_structural_errors():
    mask = masking.tube_window_mask(np.random.default_rng(0), GRID, (5, 10), 0.9)
    with pytest.raises(masking.MaskContractError, match="full-width"):
        masking.check_lgi_mask(mask, GRID, (2, 5, 5))
    with pytest.raises(masking.MaskContractError, match="different numbers of visible tokens"):
        other = mask.copy()
        other[np.flatnonzero(~other)[0]] = True
        masking.check_lgi_mask(np.stack([mask, other]), GRID, (2, 5, 10))
    with pytest.raises(masking.MaskContractError, match="boolean"):
        masking.check_lgi_mask(mask.astype(np.int32), GRID, (2, 5, 10))
    with pytest.raises(masking.MaskContractError, match=r"\[B, 800\]"):
        masking.check_lgi_mask(mask[:700], GRID, (2, 5, 10))


def test_make_mask_generator():
    gen = masking.make_mask_generator("tube_window", grid=GRID, window=(5, 10), mask_ratio=0.9)
    mask = gen(np.random.default_rng(0))
    assert masking.check_lgi_mask(mask, GRID) == 5
    assert gen.num_visible == 80 and gen.num_tokens == 800
    assert np.array_equal(pickle.loads(pickle.dumps(gen))(np.random.default_rng(0)), mask)  # workers get a copy
    tube = masking.make_mask_generator("tube", grid=(4, 4, 4), mask_ratio=0.75)
    assert tube(np.random.default_rng(0)).sum() == 48
    with pytest.raises(ValueError, match="needs window"):
        masking.make_mask_generator("tube_window", grid=GRID)
    with pytest.raises(ValueError, match="only apply"):
        masking.make_mask_generator("tube", grid=GRID, window=(5, 10))
    with pytest.raises(TypeError, match="unknown arguments"):
        masking.make_mask_generator("tube", grid=GRID, ratio=0.9)
    with pytest.raises(ValueError, match="unknown mask kind"):
        masking.make_mask_generator("cube")
    with pytest.raises(ValueError, match="not a whole number"):
        masking.make_mask_generator("tube", grid=GRID, mask_ratio=0.905)


def test_importing_masking_does_not_pull_in_jax():
    import subprocess

    code = "import sys, facemae_jax.masking; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_mask_generator_for_model_derives_grid_kind_and_lgi_window():
    from facemae_jax.models.config import ModelConfig

    lgi = ModelConfig(mode="pretrain", family="lgi", mask_kind="tube_window", num_frames=8, img_size=64,
                      patch_size=16, tubelet_size=2, region_size=(2, 2, 4), mask_ratio=0.75)
    gen = masking.MaskGenerator.for_model(lgi)
    assert (gen.kind, gen.grid, gen.mask_ratio, gen.window) == ("tube_window", (4, 4, 4), 0.75, (2, 4))
    assert gen.grid == lgi.grid
    assert masking.check_lgi_mask(gen(np.random.default_rng(0)), lgi.grid, lgi.region_size) == 2
    tube = masking.MaskGenerator.for_model(ModelConfig(mode="pretrain", family="tpsbt", mask_kind="tube"))
    assert (tube.kind, tube.grid, tube.window) == ("tube", (8, 10, 10), None)  # no window outside tube_window
