"""Model zoo: shapes in both modes, reference parameter counts, mask contracts, and every quirk option."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from facemae_jax import masking, naming
from facemae_jax.convert import expected_torch_keys
from facemae_jax.models import (
    count_params,
    create_model,
    get_config,
    init_params,
    logical_axes,
)
from facemae_jax.models.layers import DropPath
from facemae_jax.models.mae import check_mask

# Small geometry for speed: 4 frames of 64x64 -> token grid (2, 4, 4); LGI regions (2, 2, 4) -> 2 regions.
SMALL = dict(num_frames=4, img_size=64, embed_dim=32, num_heads=2, decoder_embed_dim=16, decoder_num_heads=2,
             decoder_depth=1)
SMALL_LGI = dict(SMALL, depth=2, region_size=(2, 2, 4), mask_ratio=0.5)
SMALL_TPSBT = dict(SMALL, stage_depths=(1, 2, 2), mask_ratio=0.5, num_frames=8)  # grid (4,4,4): 4 -> 2 -> 1 frames
SMALL_VIT = dict(SMALL, depth=2, mask_ratio=0.5)


def small(family, mode, **kw):
    base = {"lgi": SMALL_LGI, "tpsbt": SMALL_TPSBT, "vit": SMALL_VIT}[family]
    name = f"{family}_tiny_{mode}"
    return get_config(name, **{**base, **kw})


def video_for(cfg, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, cfg.num_frames, cfg.img_size, cfg.img_size, 3)).astype(np.float32)


def mask_for(cfg, batch=2, seed=0, kind=None):
    kind = kind or cfg.mask_kind
    kw = dict(grid=cfg.grid, mask_ratio=cfg.mask_ratio)
    if kind == "tube_window":
        kw["window"] = cfg.region_size[1:]
    gen = masking.make_mask_generator(kind, **kw)
    rng = np.random.default_rng(seed)
    return np.stack([gen(rng) for _ in range(batch)])


def build(cfg, seed=0):
    model = create_model(cfg)
    return model, init_params(model, jax.random.key(seed), batch=2)


@pytest.mark.parametrize("family", ["vit", "lgi", "tpsbt"])
def test_finetune_forward_shapes(family):
    cfg = small(family, "finetune", num_classes=5)
    model, params = build(cfg)
    x = video_for(cfg)
    logits, aux = jax.jit(lambda p, v: model.apply({"params": p}, v, return_aux=True))(params, x)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    assert aux["pooled"].shape == (2, cfg.embed_dim)
    assert np.all(np.isfinite(logits))
    # train mode with drop path runs and is stochastic
    train = jax.jit(lambda p, v, r: model.apply({"params": p}, v, train=True, rngs={"dropout": r}))
    out1 = train(params, x, jax.random.key(1))
    out2 = train(params, x, jax.random.key(2))
    assert out1.shape == (2, 5) and not np.allclose(out1, out2)


@pytest.mark.parametrize("family", ["vit", "lgi", "tpsbt"])
def test_pretrain_forward_shapes(family):
    cfg = small(family, "pretrain")
    model, params = build(cfg)
    mask = mask_for(cfg)
    pred, aux = jax.jit(lambda p, v, m: model.apply({"params": p}, v, m, return_aux=True))(params, video_for(cfg), mask)
    nm = int(mask[0].sum())
    assert pred.shape == (2, nm, cfg.patch_dim)
    assert aux["features"].shape == (2, cfg.num_tokens - nm, cfg.embed_dim)
    # masked ids are ascending and exactly the True positions
    np.testing.assert_array_equal(np.asarray(aux["mask_idx"][0]), np.nonzero(mask[0])[0])


def test_pretrain_jit_with_traced_mask():
    cfg = small("lgi", "pretrain")
    model, params = build(cfg)
    f = jax.jit(lambda p, v, m: model.apply({"params": p}, v, m))
    out = f(params, video_for(cfg), mask_for(cfg))
    assert out.shape[0] == 2 and np.all(np.isfinite(out))


BASE_COUNTS = {
    "pretrain_videomae_base_dim512_no_depth_patch16_160": (92_760_192, 575),
    "vit_base_dim512_no_depth_patch16_160": (84_878_343, 519),
    "vit_base_patch16_160": (86_232_583, 162),
    "pretrain_videomae_base_patch16_160": (94_210_944, 218),
    "svfap_base_patch16_160": (77_635_351, 385),
    "pretrain_svfap_base_patch16_160_as_written": (181_839_760, 441),
    "pretrain_svfap_base_patch16_160": (85_517_200, 441),
}


@pytest.mark.parametrize("name", sorted(BASE_COUNTS))
def test_base_parameter_counts_equal_reference(name):
    n_params, n_keys = BASE_COUNTS[name]
    cfg = get_config(name)
    keys = expected_torch_keys(cfg)
    assert len(keys) == n_keys
    from facemae_jax.models import abstract_params

    assert count_params(abstract_params(create_model(cfg))) == n_params


@pytest.mark.parametrize(
    "overrides,count,keys",
    [
        (dict(num_classes=11), 84_880_395, 519),  # MAFW
        (dict(share_first_third=True), 68_076_551, 519),
        (dict(share_all=True), 51_274_759, 519),
        (dict(no_second=True), 68_060_167, 391),
        (dict(no_third=True), 68_043_783, 359),
        (dict(family="vit"), 51_221_511, None),  # joint ViT 512/16
    ],
)
def test_lgi_variant_counts(overrides, count, keys):
    from facemae_jax.models import abstract_params

    cfg = get_config("vit_base_dim512_no_depth_patch16_160", **overrides)
    assert count_params(abstract_params(create_model(cfg))) == count
    if keys is not None:
        assert len(expected_torch_keys(cfg)) == keys


def test_every_param_has_logical_axes():
    """Each parameter carries logical axis names of its rank (the sharding rules map them to mesh axes)."""
    from facemae_jax.models import abstract_params

    model = create_model(small("lgi", "pretrain"))
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    specs = {tuple(k.key for k in p): v
             for p, v in jax.tree_util.tree_flatten_with_path(logical_axes(model), is_leaf=is_spec)[0]}
    shapes = traverse_util.flatten_dict(abstract_params(model))
    assert specs.keys() == shapes.keys()
    for path, leaf in shapes.items():
        assert len(specs[path]) == len(leaf.shape), (path, specs[path], leaf.shape)
    assert specs[("encoder", "blocks_0", "mlp", "fc1", "kernel")] == jax.sharding.PartitionSpec("embed", "hidden")


# ---------------------------------------------------------------------------------------------------------------
# Mask contracts (QUIRKS Q1)
# ---------------------------------------------------------------------------------------------------------------


def test_lgi_rejects_plain_tube_mask():
    cfg = small("lgi", "pretrain")
    model, params = build(cfg)
    bad = mask_for(cfg, kind="tube")  # right count, but not balanced over the bands
    # make sure this particular tube mask really is unbalanced
    with pytest.raises(masking.MaskContractError):
        check_mask(cfg, bad if not _balanced(cfg, bad) else _unbalance(cfg, bad))
    with pytest.raises(masking.MaskContractError, match="sample|frame|band"):
        model.apply({"params": params}, video_for(cfg), _unbalance(cfg, bad))


def _balanced(cfg, mask):
    try:
        masking.check_lgi_mask(mask, cfg.grid, cfg.region_size)
        return True
    except masking.MaskContractError:
        return False


def _unbalance(cfg, mask):
    """Move all visible tokens of frame 0 into the upper band (same count per frame, broken per band)."""
    t, h, w = cfg.grid
    m = np.ones((mask.shape[0], t, h, w), bool)
    nv = int((~mask[0]).sum()) // t
    m.reshape(mask.shape[0], t, h * w)[:, :, :nv] = False
    return m.reshape(mask.shape[0], -1)


def test_wrong_visible_count_is_rejected():
    cfg = small("tpsbt", "pretrain")
    model, params = build(cfg)
    m = mask_for(cfg)
    m[0, np.nonzero(m[0])[0][0]] = False  # one more visible token in sample 0
    with pytest.raises(masking.MaskContractError, match="sample 0"):
        model.apply({"params": params}, video_for(cfg), m)


def test_tpsbt_rejects_non_tube_mask():
    cfg = small("tpsbt", "pretrain")
    m = mask_for(cfg, kind="random")
    with pytest.raises(masking.MaskContractError, match="tube"):
        check_mask(cfg, m)


# ---------------------------------------------------------------------------------------------------------------
# Quirk options
# ---------------------------------------------------------------------------------------------------------------


def test_q2_lgi_raster_decoder_order():
    cfg = small("lgi", "pretrain")
    model, params = build(cfg)
    fixed_model = create_model(cfg.replace(lgi_raster_decoder_order=True))
    x, m = video_for(cfg), mask_for(cfg)
    pred_a, aux_a = model.apply({"params": params}, x, m, return_aux=True)
    pred_b, aux_b = fixed_model.apply({"params": params}, x, m, return_aux=True)
    # the corrected encoder output is the faithful one permuted from region-major to raster order
    t = cfg.grid[0]
    k = aux_a["features"].shape[1] // (t * 2)  # visible per (frame, band)
    fa = np.asarray(aux_a["features"]).reshape(2, t // 2, 2, 2, k, -1)  # (it, band, a, j)
    raster = fa.transpose(0, 1, 3, 2, 4, 5).reshape(2, -1, fa.shape[-1])
    np.testing.assert_allclose(np.asarray(aux_b["features"]), raster, rtol=1e-6, atol=1e-6)
    # ... so the decoder sees different position pairings and predicts differently
    assert np.abs(np.asarray(pred_a) - np.asarray(pred_b)).max() > 1e-4


def test_q3_svfap_faithful_pretrain_leaks_masked_pixels_and_corrected_does_not():
    cfg = small("tpsbt", "pretrain")
    x, m = video_for(cfg), mask_for(cfg)
    # change only pixels of masked tokens
    t, h, w = cfg.grid
    x2 = x.copy()
    p, tb = cfg.patch_size, cfg.tubelet_size
    masked = m[0].reshape(t, h, w)
    for tt, hh, ww in zip(*np.nonzero(masked)):
        x2[0, tt * tb:(tt + 1) * tb, hh * p:(hh + 1) * p, ww * p:(ww + 1) * p] += 1.0
    for ctx, leaks in (("full_embedding", True), ("bottleneck", False)):
        c = cfg.replace(svfap_reverse_ctx=ctx)
        model, params = build(c)
        _, a = model.apply({"params": params}, x, m, return_aux=True)
        _, b = model.apply({"params": params}, x2, m, return_aux=True)
        diff = float(np.abs(np.asarray(a["features"][0]) - np.asarray(b["features"][0])).max())
        assert (diff > 1e-3) == leaks, (ctx, diff)


def test_q4_svfap_faithful_bottleneck_path_gets_no_gradient():
    cfg = small("tpsbt", "pretrain")
    x, m = video_for(cfg), mask_for(cfg)
    for ctx, dead in (("full_embedding", True), ("bottleneck", False)):
        c = cfg.replace(svfap_reverse_ctx=ctx)
        model, params = build(c)
        g = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, x, m) ** 2)))(params)  # noqa: B023
        flat = {naming.flax_path_to_torch(p): float(np.abs(np.asarray(v)).max())
                for p, v in traverse_util.flatten_dict(g).items()}
        # stage depths (1, 2, 2): blocks 1 and 3 are the non-reverse CS blocks; 2 and 4 the reverse ones
        dead_keys = [k for k in flat if k.startswith(("encoder.spatial_downsamples.", "encoder.blocks.1.",
                                                       "encoder.blocks.3."))]
        assert len(dead_keys) == 2 * 6 + 2 * 23
        zero = [k for k in dead_keys if flat[k] == 0.0]
        assert (len(zero) == len(dead_keys)) == dead, (ctx, len(zero))
        assert flat["encoder.blocks.2.cross_attn.q.weight"] > 0  # the reverse block always trains


@pytest.mark.parametrize("stage", [1, 2])
def test_q5_upsample_index_maps(stage):
    """ARCHITECTURE §4.6: as coded out[p] = X[floor(floor(p/G)/k^s)*G + p mod G] with G = P/k; repeat uses P."""
    from facemae_jax.models.mae import TPSBTPretrainEncoder

    cfg = get_config("tpsbt_tiny_pretrain")  # 8 frames, P = 10 visible per frame, k = 2
    k, p_vis, t0 = 2, 10, 8
    t_before, t_after = t0 // k ** (stage - 1), t0 // k**stage
    n = t_after * p_vis
    x = jnp.arange(n, dtype=jnp.float32).reshape(1, n, 1)
    for mode, g in (("as_coded", p_vis // k), ("repeat", p_vis)):
        enc = TPSBTPretrainEncoder(cfg.replace(svfap_upsample=mode))
        out = np.asarray(enc.upsample(x, stage, t_before, t_after)).ravel()
        expect = [(pp // g) // k**stage * g + pp % g for pp in range(t0 * p_vis)]
        np.testing.assert_array_equal(out, expect)
    # as coded and repeat disagree on exactly 40 of 80 slots (verified in the reference)
    a = TPSBTPretrainEncoder(cfg).upsample(x, stage, t_before, t_after)
    b = TPSBTPretrainEncoder(cfg.replace(svfap_upsample="repeat")).upsample(x, stage, t_before, t_after)
    assert int((np.asarray(a) != np.asarray(b)).sum()) == 40


def test_q13_drop_path_groups():
    x = jnp.ones((6, 3, 4))  # B=2 samples x R=3 regions
    dp = DropPath(0.5)
    per_row = dp.apply({}, x, False, 1, rngs={"dropout": jax.random.key(0)})
    per_sample = dp.apply({}, x, False, 3, rngs={"dropout": jax.random.key(0)})
    kept_s = np.asarray(per_sample[:, 0, 0] > 0).reshape(2, 3)
    assert np.all(kept_s == kept_s[:, :1])  # one decision per sample
    assert set(np.unique(np.asarray(per_row))) <= {0.0, 2.0}
    # over many draws per-row masks vary within a sample
    rows = [np.asarray(dp.apply({}, x, False, 1, rngs={"dropout": jax.random.key(s)})[:3, 0, 0] > 0)
            for s in range(20)]
    assert any(len(set(r.tolist())) > 1 for r in rows)


def test_head_activation_and_frame_level_output():
    cfg = small("vit", "finetune", num_classes=3, head_activation="sigmoid", keep_temporal_dim=True)
    model, params = build(cfg)
    out = model.apply({"params": params}, video_for(cfg))
    assert out.shape == (2, cfg.num_frames * 3)
    assert np.all((out > 0) & (out < 1))
    with pytest.raises(ValueError, match="Q14"):
        build(small("lgi", "finetune", keep_temporal_dim=True))


def test_pretrain_init_follows_reference_initialisers():
    """Q17: xavier on fused qkv, truncated +-0.02 region/mask tokens, head scaled by 1e-3 in fine-tuning."""
    cfg = get_config("lgi_tiny_pretrain")
    _, params = build(cfg)
    enc = params["encoder"]
    qkv = np.asarray(params["decoder"]["blocks_0"]["attn"]["qkv"]["kernel"])  # (32, 96)
    assert np.abs(qkv).max() <= np.sqrt(6 / (32 + 96)) + 1e-7
    assert np.abs(np.asarray(enc["lg_region_tokens"])).max() <= 0.02 + 1e-7
    assert np.abs(np.asarray(params["mask_token"])).max() <= 0.02 + 1e-7
    e2d = np.asarray(params["encoder_to_decoder"]["kernel"])
    # PyTorch default U(+-1/sqrt(64)) = +-0.125, not xavier's +-0.25
    assert 0.11 < np.abs(e2d).max() <= 1 / np.sqrt(64) + 1e-7
    ft = init_params(create_model(get_config("lgi_tiny_finetune")), jax.random.key(0))
    assert np.abs(np.asarray(ft["head"]["kernel"])).max() < 0.02 * 5 * 1e-3
    assert np.all(np.asarray(ft["head"]["bias"]) == 0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_base_dim512_no_depth_patch16_160", "svfap_base_patch16_160"])
def test_base_finetune_models_run_jit_on_one_clip(name):
    """Issue requirement: the published fine-tune models compile and run on one 16x160x160 clip on CPU.
    Slow (~1 min each); run with ``pytest -m slow``. Timings: benchmarks/model_forward.py."""
    from benchmarks.model_forward import bench

    r = bench(name, batch=1, repeats=1)
    assert r["output_shape"] == [1, 7] and r["finite"]
