"""Device RandAugment (facemae_jax/randaugment.py) against the PIL reference path of data_pipelines/transforms.py.

Frames: synthetic face clips (data_pipelines/synthetic.py, 'wild' scenario: textured background, shading, hair),
2 frames of 96x96. Mean absolute difference to PIL in grey levels at magnitude 7 (both signs), measured with this
file (``pytest tests/test_randaugment.py -k matches_pil -s`` prints the table):

| op | mean abs. difference | max |
|---|---|---|
| Invert, Posterize(Increasing), Solarize(Increasing), SolarizeAdd, Brightness(Increasing) | 0 | 0 |
| Color, Contrast, Sharpness (and Increasing) | 0 to 0.00002 (float32 rounding at integer boundaries) | 1 |
| Equalize | 0 | 0 |
| AutoContrast | ~0.001 (PIL's float64 ``int(i*scale+offset)`` vs exact integers) | 1 |
| Rotate | < 0.001 | 1 |
| ShearX, ShearY | < 0.001 | 1 |
| TranslateXRel, TranslateYRel | ~0.002 | 1 |

The bounds asserted below are a few times these; a wrong kernel, rounding or fill rule moves them by 0.1-1 level.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from data_pipelines import synthetic
from data_pipelines import transforms as T
from facemae_jax import augment
from facemae_jax import randaugment as R

PUBLISHED = "rand-m7-n4-mstd0.5-inc1"
EXACT = {"Invert", "Posterize", "PosterizeIncreasing", "Solarize", "SolarizeIncreasing", "SolarizeAdd", "Equalize",
         "Brightness", "BrightnessIncreasing"}  # fmt: skip
BLEND = {"Color", "ColorIncreasing", "Contrast", "ContrastIncreasing", "Sharpness", "SharpnessIncreasing"}
BOUND = {**{name: 0.001 for name in BLEND}, "AutoContrast": 0.01, "Rotate": 0.01, "ShearX": 0.01, "ShearY": 0.01,
         "TranslateXRel": 0.02, "TranslateYRel": 0.02}  # fmt: skip


@pytest.fixture(scope="module")
def faces():
    clips = [synthetic.generate_clip(np.random.default_rng(s), s % 7, frames=2, size=96)[0] for s in range(2)]
    return np.stack(clips)  # uint8 [2, 2, 96, 96, 3]


@functools.lru_cache(maxsize=None)
def _layer_fn(ra: R.DeviceRandAugment):
    return jax.jit(lambda v, op, arg: R.apply_layer(v, op, arg, ra))


def host_args(name: str, arg: float) -> tuple:
    """A device argument in the form the PIL ops take (ints for bit counts and thresholds, none for some ops)."""
    if name in ("AutoContrast", "Equalize", "Invert"):
        return ()
    if name.removesuffix("Increasing") in ("Posterize", "Solarize", "SolarizeAdd"):
        return (int(round(arg)),)
    return (float(arg),)


def host_ops(draw: dict, clip: int, ra: R.DeviceRandAugment) -> list[tuple[str, tuple]]:
    ops = []
    for layer in range(ra.policy.num_layers):
        op, arg = (np.asarray(a) for a in R.layer_arguments(draw, layer, ra))
        if op[clip] >= 0:
            name = ra.ops[int(op[clip])]
            ops.append((name, host_args(name, float(arg[clip]))))
    return ops


@pytest.mark.parametrize("policy", [PUBLISHED, pytest.param("rand-m7-n4-mstd0.5-inc0", marks=pytest.mark.slow)])
def test_each_op_matches_pil_at_fixed_magnitude(faces, policy, capsys):
    ra = R.DeviceRandAugment.from_string(policy)
    host = T.RandAugment(policy)
    video = jnp.asarray(faces)
    n = faces.shape[0]
    rows = []
    for index, name in enumerate(ra.ops):
        for negate in (False, True):
            arg = float(R.op_argument(name, jnp.float32(7.0), jnp.bool_(negate), ra))
            out = np.asarray(_layer_fn(ra)(video, jnp.full((n,), index, jnp.int32), jnp.full((n,), arg, jnp.float32)))
            ref = np.stack([host.apply(clip, [(name, host_args(name, arg))]) for clip in faces])
            diff = np.abs(out.astype(int) - ref.astype(int))
            rows.append((name, arg, diff.mean(), diff.max()))
            assert (ref != faces).mean() > 0.05, f"{name} barely changes the frames: the comparison would be empty"
            if name in EXACT:
                assert diff.max() == 0, (name, arg, diff.mean())
            else:
                assert diff.mean() <= BOUND[name] and diff.max() <= 1, (name, arg, diff.mean(), diff.max())
    with capsys.disabled():
        print(f"\n{policy}: op, argument, mean |device - PIL|, max")
        for name, arg, mean, worst in rows:
            print(f"  {name:22s} {arg:8.3f} {mean:.4f} {worst}")


@pytest.mark.slow
@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_other_geometric_interpolations_match_pil(faces, interpolation):
    ra = R.DeviceRandAugment.from_string(PUBLISHED, interpolation=interpolation)
    host = T.RandAugment(PUBLISHED, interpolation=interpolation)
    n = faces.shape[0]
    for name, arg in (("Rotate", 17.3), ("ShearX", -0.2)):
        out = np.asarray(_layer_fn(ra)(jnp.asarray(faces), jnp.full((n,), ra.ops.index(name), jnp.int32),
                                       jnp.full((n,), arg, jnp.float32)))  # fmt: skip
        ref = np.stack([host.apply(clip, [(name, (arg,))]) for clip in faces])
        diff = np.abs(out.astype(int) - ref.astype(int))
        # nearest: a coordinate on a pixel boundary may round to the neighbour (rare, but a full-level jump)
        assert diff.mean() <= 0.02 and (diff.max() <= 1 or interpolation == "nearest"), (name, diff.mean())


@functools.lru_cache(maxsize=None)
def _policy_fn(ra: R.DeviceRandAugment):
    return jax.jit(ra.__call__)


def test_sampled_policy_matches_pil_with_the_same_draw_and_is_deterministic(faces):
    """Whole published policy (4 layers, compositions): the device result equals PIL applying the same op list;
    the same key gives the same result, other keys other results, and all frames of a clip get the same ops."""
    ra = R.DeviceRandAugment.from_string(PUBLISHED)
    video = np.concatenate([faces, faces[:, :1].repeat(2, axis=1)])  # clips 2, 3: one frame twice
    fn = _policy_fn(ra)
    host = T.RandAugment(PUBLISHED)
    diffs, applied, outs = [], 0, []
    for seed in range(3):
        key = jax.random.key(seed)
        draw = R.sample_ops(key, ra, video.shape[0])
        out = np.asarray(fn(jnp.asarray(video), key))
        outs.append(out)
        for c in range(video.shape[0]):
            ops = host_ops(draw, c, ra)
            applied += len(ops)
            ref = host.apply(video[c], ops)
            diffs.append(np.abs(out[c].astype(int) - ref.astype(int)).mean())
        assert (out[2:] == out[2:, :1]).all()  # identical frames stay identical: one op draw per clip
    assert applied >= 12  # ~2 per clip on average
    assert np.mean(diffs) < 0.05 and max(diffs) < 0.5, diffs
    assert np.array_equal(np.asarray(fn(jnp.asarray(video), jax.random.key(1))), outs[1])
    assert not np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[1], outs[2])


@functools.lru_cache(maxsize=None)
def _all_arguments(ra: R.DeviceRandAugment):
    return jax.jit(lambda m, neg: {name: R.op_argument(name, m, neg, ra) for name in ra.ops})


def test_sampling_distribution_matches_the_reference():
    """Op choice, how many ops apply, signs and each op's argument: device draws vs transforms.RandAugment.sample."""
    ra = R.DeviceRandAugment.from_string(PUBLISHED)
    n_clips = 6000
    draw = jax.device_get(R.sample_ops(jax.random.key(0), ra, n_clips))
    args = jax.device_get(_all_arguments(ra)(draw["magnitude"], draw["negate"]))

    def host_sample(policy):
        sampler = T.RandAugment(policy)
        return [sampler.sample(np.random.default_rng(s)) for s in range(n_clips)]

    host_draws = host_sample(PUBLISHED)
    # op choice: uniform over the 15 ops (all draws, applied or not)
    counts = np.bincount(draw["op"].reshape(-1), minlength=len(ra.ops))
    assert stats.chisquare(counts).pvalue > 1e-3
    # applied ops per clip: Binomial(4, 0.5), device vs host
    dev_applied = np.bincount(draw["applied"].sum(1), minlength=5)
    host_applied = np.bincount([len(d) for d in host_draws], minlength=5)
    assert stats.chi2_contingency(np.stack([dev_applied, host_applied])).pvalue > 1e-3
    assert stats.binomtest(int(draw["negate"].sum()), draw["negate"].size).pvalue > 1e-3

    def device_args(name):
        chosen = (draw["op"] == ra.ops.index(name)) & draw["applied"]
        return args[name][chosen]

    def reference_args(name, draws):
        return np.array([a[0] for d in draws for n, a in d if n == name], float)

    for name in ("Rotate", "ShearX", "TranslateYRel", "ColorIncreasing", "SharpnessIncreasing"):
        dev, ref = device_args(name), reference_args(name, host_draws)
        assert stats.ks_2samp(np.abs(dev), np.abs(ref)).pvalue > 1e-3, name  # magnitude
        assert stats.ks_2samp(dev, ref).pvalue > 1e-3, name  # with its sign
    for name in ("PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd"):  # discrete arguments
        dev, ref = device_args(name), reference_args(name, host_draws)
        values = np.union1d(dev, ref)
        table = np.stack([[np.sum(dev == v) for v in values], [np.sum(ref == v) for v in values]])
        assert stats.chi2_contingency(table + 1).pvalue > 1e-3, (name, table)

    # the same test rejects a policy that differs only in the magnitude noise (std 1 instead of 0.5)
    wrong = host_sample("rand-m7-n4-mstd1.0-inc1")
    assert stats.ks_2samp(np.abs(device_args("Rotate")), np.abs(reference_args("Rotate", wrong))).pvalue < 1e-4


def test_resized_crop_flip_matches_the_host_crop():
    rng = np.random.default_rng(0)
    clips = rng.integers(0, 256, (3, 2, 40, 40, 3), dtype=np.uint8)
    boxes = np.stack([T.random_resized_crop_box(rng, 40, 40) for _ in range(3)]).astype(np.int32)
    flip = np.array([False, True, False])
    crop_flip = jax.jit(augment.device_video_augment, static_argnums=(4, 5))  # rand_augment=None: crop + flip only
    out = np.asarray(crop_flip(clips, boxes, flip, jax.random.key(0), None, 40))
    for c in range(3):
        ref = T.resize_bilinear(T.crop_frames(clips[c], tuple(boxes[c])), 40, 40)  # uint8, rounded
        ref = ref[:, :, ::-1] if flip[c] else ref
        assert np.abs(out[c] - ref).max() <= 0.5 + 1e-3
    whole = np.asarray(crop_flip(clips, np.array([[0, 0, 40, 40]] * 3, np.int32), np.zeros(3, bool),
                                 jax.random.key(0), None, 40))  # fmt: skip
    assert np.array_equal(whole, clips.astype(np.float32))  # the full-frame box is the identity


def test_device_augment_in_the_finetune_step_depends_only_on_seed_and_step():
    """Resume exactness: the augmentation key comes from (seed, state step), so a restored state at step k sees the
    same augmented batch as the uninterrupted run, and the next step another one. A linear probe stands in for the
    model (the step only needs ``apply``): nothing else in this step is random, so the loss shows the input."""
    import optax
    from flax import linen as nn

    from facemae_jax import steps
    from facemae_jax.models.config import ModelConfig

    class Probe(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    cfg = ModelConfig(family="lgi", mode="finetune", num_frames=2, img_size=16, num_classes=3)
    model, tx = Probe(), optax.sgd(0.1)
    rng = np.random.default_rng(0)
    batch = {
        "video": rng.integers(0, 256, (4, 2, 16, 16, 3), dtype=np.uint8),
        "label": rng.integers(0, 3, 4).astype(np.int32),
        "erase_box": np.zeros((4, 4), np.int32),
        "crop_box": np.array([[0, 0, 16, 16], [2, 3, 10, 12], [0, 0, 16, 16], [5, 0, 11, 14]], np.int32),
        "flip": np.array([False, True, True, False]),
    }
    params = model.init(jax.random.key(0), jnp.zeros((1, 2, 16, 16, 3)))["params"]
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    ra = R.DeviceRandAugment.from_string("rand-m9-n2-mstd0.5-p1.0-inc1")
    step = jax.jit(steps.make_finetune_step(model, cfg, tx, 0, mixup=None, label_smoothing=0.0, rand_augment=ra))

    def loss_at(at_step):
        return float(step({**state, "step": jnp.asarray(at_step, jnp.int32)}, batch)[1]["loss"])

    assert loss_at(3) == loss_at(3)  # a resumed state at step 3 sees the same augmented batch
    assert loss_at(3) != loss_at(4)  # the only step-dependent randomness here is RandAugment's
