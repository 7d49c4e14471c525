"""Optimizer: schedules, param groups on the reference key lists, Q4/Q10/Q11, and equality with PyTorch AdamW."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from facemae_jax import optim
from facemae_jax.naming import flax_path_to_torch, torch_module_path

# ---------------------------------------------------------------------------------------------------------------
# Parameter trees built from the PyTorch key lists of CHECKPOINTS.md §2 (names and torch shapes)
# ---------------------------------------------------------------------------------------------------------------


def _linear(name, out_dim, in_dim, bias=True):
    keys = [(f"{name}.weight", (out_dim, in_dim))]
    return keys + [(f"{name}.bias", (out_dim,))] if bias else keys


def _norm(name, c):
    return [(f"{name}.weight", (c,)), (f"{name}.bias", (c,))]


def _general_attn(name, c):
    """GeneralAttention: q_bias, v_bias, q, kv (no bias), proj."""
    return (
        [(f"{name}.q_bias", (c,)), (f"{name}.v_bias", (c,))]
        + _linear(f"{name}.q", c, c, bias=False)
        + _linear(f"{name}.kv", 2 * c, c, bias=False)
        + _linear(f"{name}.proj", c, c)
    )


def _plain_block(p, c, hidden):
    """Plain pre-norm block (13 keys)."""
    return (
        _norm(f"{p}.norm1", c)
        + [(f"{p}.attn.q_bias", (c,)), (f"{p}.attn.v_bias", (c,))]
        + _linear(f"{p}.attn.qkv", 3 * c, c, bias=False)
        + _linear(f"{p}.attn.proj", c, c)
        + _norm(f"{p}.norm2", c)
        + _linear(f"{p}.mlp.fc1", hidden, c)
        + _linear(f"{p}.mlp.fc2", c, hidden)
    )


def _lgi_block(p, c, hidden):
    """LGI block, first=self / third=cross (32 keys)."""
    return (
        _norm(f"{p}.first_attn_norm0", c)
        + _general_attn(f"{p}.first_attn", c)
        + _norm(f"{p}.second_attn_norm0", c)
        + _general_attn(f"{p}.second_attn", c)
        + _norm(f"{p}.third_attn_norm0", c)
        + _norm(f"{p}.third_attn_norm1", c)
        + _general_attn(f"{p}.third_attn", c)
        + _norm(f"{p}.norm2", c)
        + _linear(f"{p}.mlp.fc1", hidden, c)
        + _linear(f"{p}.mlp.fc2", c, hidden)
    )


def _cs_block(p, c, hidden):
    """Cross-self block (23 keys)."""
    return _plain_block(p, c, hidden) + _general_attn(f"{p}.cross_attn", c) + _norm(f"{p}.cross_norm1", c) + _norm(
        f"{p}.cross_norm2", c
    )


def _patch_embed(c, patch=16):
    return [("patch_embed.proj.weight", (c, 3, 2, patch, patch)), ("patch_embed.proj.bias", (c,))]


def lgi_encoder_keys(c=512, depth=16, patch=16):
    keys = [("lg_region_tokens", (8, c))] + _patch_embed(c, patch)
    for j in range(depth):
        keys += _lgi_block(f"blocks.{j}", c, 4 * c)
    return keys


def tpsbt_encoder_keys(c=512, stage_depths=(12, 6, 3), bottleneck=8, hidden=128, patch=16):
    keys = _patch_embed(c, patch)
    for j in range(sum(stage_depths)):
        block = _plain_block if j < stage_depths[0] else _cs_block
        keys += block(f"blocks.{j}", c, 4 * c)
    for i in range(len(stage_depths) - 1):
        keys += [(f"temporal_downsamples.{i}.weight", (c, c, 2)), (f"temporal_downsamples.{i}.bias", (c,))]
        keys += _norm(f"spatial_downsamples.{i}.norm", c)
        keys += _linear(f"spatial_downsamples.{i}.mlp.fc1", hidden, c)
        keys += _linear(f"spatial_downsamples.{i}.mlp.fc2", bottleneck, hidden)
    return keys


def pretrain_keys(encoder, c, cd=384, decoder_out=1536, decoder_depth=4):
    keys = [("mask_token", (1, 1, cd))] + [(f"encoder.{k}", s) for k, s in encoder] + _norm("encoder.norm", c)
    for j in range(decoder_depth):
        keys += _plain_block(f"decoder.blocks.{j}", cd, 4 * cd)
    keys += _norm("decoder.norm", cd) + _linear("decoder.head", decoder_out, cd)
    return keys + _linear("encoder_to_decoder", cd, c, bias=False)


def finetune_keys(encoder, c, num_classes=7):
    return encoder + _norm("fc_norm", c) + _linear("head", num_classes, c)


def flax_shape(torch_name, torch_shape):
    """Flax layout of a reference tensor (CHECKPOINTS §3): only rank and size matter to the optimizer."""
    module, leaf = torch_module_path(torch_name)
    if leaf != "weight" or "norm" in module[-1]:
        return tuple(torch_shape)
    if len(torch_shape) == 2:  # Linear (out, in) -> (in, out)
        return tuple(torch_shape[::-1])
    if len(torch_shape) == 5:  # Conv3d (out, in, kT, kH, kW) -> (kT, kH, kW, in, out)
        return tuple(torch_shape[i] for i in (2, 3, 4, 1, 0))
    if len(torch_shape) == 3:  # Conv1d (out, in, k) -> (k, in, out)
        return tuple(torch_shape[::-1])
    raise AssertionError(f"unexpected weight {torch_name} {torch_shape}")


def build_tree(keys, make_leaf):
    """Nested Flax param dict for a key list; every path must map back to its torch name."""
    items = {}
    for name, torch_shape in keys:
        module, leaf = torch_module_path(name)
        if leaf == "weight":
            leaf = "scale" if "norm" in module[-1] else "kernel"
        path = module + (leaf,)
        assert flax_path_to_torch(path) == name
        items[path] = make_leaf(name, flax_shape(name, torch_shape))
    assert len(items) == len(keys), "duplicate keys in the key list"
    return unflatten_dict(items)


def abstract_tree(keys):
    return build_tree(keys, lambda _, shape: jax.ShapeDtypeStruct(shape, jnp.float32))


def random_tree(keys, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return build_tree(keys, lambda _, shape: jnp.asarray(rng.normal(size=shape).astype(dtype)))


MAE_DFER_PRETRAIN = pretrain_keys(lgi_encoder_keys(), 512)
MAE_DFER_FINETUNE = finetune_keys(lgi_encoder_keys(), 512)
SVFAP_PRETRAIN = pretrain_keys(tpsbt_encoder_keys(768), 768)
SVFAP_FINETUNE = finetune_keys(tpsbt_encoder_keys(512), 512)

# Tiny widths and depths with the same names and ranks: for tests that actually step the optimizer (compile
# time grows with the number of tensors, and these tests must stay fast on a busy CPU).
TINY_STAGES = (1, 2, 2)  # dead path: CS blocks 1 and 3, both spatial bottlenecks
TINY_SVFAP_PRETRAIN = pretrain_keys(
    tpsbt_encoder_keys(8, stage_depths=TINY_STAGES, hidden=4, patch=2), 8, cd=4, decoder_out=6, decoder_depth=1
)
TINY_LGI_FINETUNE = finetune_keys(lgi_encoder_keys(8, depth=2, patch=2), 8, num_classes=3)


def _numel(keys):
    return sum(math.prod(s) for _, s in keys)


def test_key_lists_reproduce_the_checkpoint_spec_counts():
    assert (len(MAE_DFER_PRETRAIN), _numel(MAE_DFER_PRETRAIN)) == (575, 92_760_192)
    assert (len(MAE_DFER_FINETUNE), _numel(MAE_DFER_FINETUNE)) == (519, 84_878_343)
    assert (len(SVFAP_PRETRAIN), _numel(SVFAP_PRETRAIN)) == (441, 181_839_760)
    assert (len(SVFAP_FINETUNE), _numel(SVFAP_FINETUNE)) == (385, 77_635_351)
    assert _numel(pretrain_keys(tpsbt_encoder_keys(512), 512)) == 85_517_200


# ---------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------


def test_warmup_cosine_table_shape_and_endpoints():
    peak, min_lr, w, s = 1e-3, 1e-6, 10, 50
    t = optim.warmup_cosine_table(peak, min_lr, w, s)
    assert t.dtype == np.float64 and t.shape == (s,)
    assert t[0] == 0.0
    assert t[1] == pytest.approx(peak / (w - 1), rel=1e-15)
    assert t[w - 1] == peak  # linspace includes the end point ...
    assert t[w] == peak  # ... and the cosine starts at the peak again (Q12)
    assert np.all(np.diff(t[:w]) > 0) and np.all(np.diff(t[w:]) < 0)
    last = min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * (s - w - 1) / (s - w)))
    assert t[-1] == pytest.approx(last, rel=1e-12)
    assert t[-1] > min_lr
    # the midpoint of the cosine is exactly the mean of peak and min
    assert t[w + (s - w) // 2] == pytest.approx((peak + min_lr) / 2, rel=1e-12)
    # no warmup: the cosine starts at step 0
    assert optim.warmup_cosine_table(peak, min_lr, 0, s)[0] == peak


def test_schedule_matches_the_mae_dfer_pretraining_log():
    """Epoch-mean lr of PRETRAINING §5 (batch 160, 6,823 steps/epoch, 5 warmup epochs, 100 epochs)."""
    steps = 6823
    peak, min_lr = optim.scaled_lr(3e-4, 160), optim.scaled_lr(1e-5, 160)
    # same float expression as the reference (lr * batch / 256), so not exactly the decimal 1.875e-4
    assert peak == 3e-4 * 160 / 256 and peak == pytest.approx(1.875e-4, rel=1e-15)
    assert min_lr == pytest.approx(6.25e-6, rel=1e-15)
    table = optim.warmup_cosine_table(peak, min_lr, 5 * steps, 100 * steps)
    logged = {0: 1.875e-5, 1: 5.625e-5, 2: 9.375e-5, 4: 1.688e-4, 5: 1.875e-4, 9: 1.865e-4, 19: 1.773e-4,
              29: 1.593e-4, 39: 1.346e-4, 49: 1.059e-4}
    for epoch, value in logged.items():
        mean = table[epoch * steps:(epoch + 1) * steps].mean()
        assert f"{mean:.3e}" == f"{value:.3e}", (epoch, mean, value)


def test_schedule_function_is_the_table_under_jit_and_clips_past_the_end():
    table = optim.warmup_cosine_table(2e-3, 1e-5, 4, 20)
    sched = jax.jit(optim.schedule_from_table(table))
    got = np.array([sched(jnp.int32(i)) for i in range(20)])
    np.testing.assert_allclose(got, table, rtol=1e-7)
    assert float(sched(jnp.int32(25))) == pytest.approx(table[-1], rel=1e-7)
    assert float(sched(jnp.int32(-1))) == 0.0


def test_scaled_lr_for_the_published_runs():
    assert optim.scaled_lr(1e-3, 96) == pytest.approx(3.75e-4)  # DFEW / MAFW (MAE-DFER)
    assert optim.scaled_lr(1e-3, 120) == pytest.approx(4.6875e-4)  # FERV39k
    assert optim.scaled_lr(1e-3, 64) == pytest.approx(2.5e-4)  # SVFAP fine-tuning
    assert optim.scaled_lr(3e-4, 256) == pytest.approx(3e-4)  # SVFAP pre-training
    with pytest.raises(ValueError):
        optim.scaled_lr(1e-3, 0)


def test_weight_decay_schedule_is_constant():
    table = optim.weight_decay_table(0.05, None, 1000)
    assert table.shape == (1000,) and np.all(table == 0.05)
    assert float(optim.constant_weight_decay_schedule(0.05)(123)) == pytest.approx(0.05)
    # a different end value follows a cosine from start to end, as in the reference
    decaying = optim.weight_decay_table(0.05, 0.01, 100)
    assert decaying[0] == 0.05 and 0.01 < decaying[-1] < decaying[50] < 0.05


# ---------------------------------------------------------------------------------------------------------------
# Layer-wise lr decay
# ---------------------------------------------------------------------------------------------------------------

LGI_SCALES_FROM_LOG = [0.0075169, 0.0100226, 0.0133635, 0.0178179, 0.0237573, 0.0316764, 0.0422351, 0.0563135,
                       0.0750847, 0.1001129, 0.1334839, 0.1779785, 0.2373047, 0.3164063, 0.421875, 0.5625, 0.75,
                       1.0]


def test_lgi_layer_scales_equal_the_logged_values():
    scales = optim.layer_scales(16, 0.75)
    assert len(scales) == 18
    np.testing.assert_allclose(scales, LGI_SCALES_FROM_LOG, rtol=0, atol=6e-8)  # log prints 7 decimals


def test_tpsbt_layer_scales():
    scales = optim.layer_scales(21, 0.75)
    assert len(scales) == 23
    assert round(scales[0], 7) == 0.0017838  # patch embed = 0.75^22
    for j in range(21):
        assert scales[j + 1] == pytest.approx(0.75 ** (21 - j), rel=1e-15)
    assert scales[-1] == 1.0


def _spec_layer_id(name, num_layers):
    """FINETUNING §5 written independently of the module under test."""
    if name.startswith("patch_embed."):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else num_layers + 1


def _spec_decayed(name, torch_shape, skip):
    return not (len(torch_shape) == 1 or name.endswith(".bias") or name in skip)


def test_lgi_finetune_groups_follow_the_spec():
    report = optim.parameter_rules(
        abstract_tree(MAE_DFER_FINETUNE), layer_decay=0.75, num_layers=16, skip_weight_decay={"lg_region_tokens"}
    )
    rules = report.by_name()
    assert set(rules) == {n for n, _ in MAE_DFER_FINETUNE}
    scales = optim.layer_scales(16, 0.75)
    for name, torch_shape in MAE_DFER_FINETUNE:
        r = rules[name]
        assert r.layer_id == _spec_layer_id(name, 16), name
        assert r.lr_scale == scales[r.layer_id]
        assert r.decay == _spec_decayed(name, torch_shape, {"lg_region_tokens"}), name
        assert not r.frozen
        assert r.group == f"layer_{r.layer_id}_{'decay' if r.decay else 'no_decay'}"
    # what decays: the patch-embed conv, 11 matrices per LGI block, the head weight
    decayed = [r.torch_name for r in report.rules if r.decay]
    assert len(decayed) == 1 + 16 * 11 + 1
    assert all(n.endswith(".weight") and "norm" not in n for n in decayed)
    region = rules["lg_region_tokens"]
    assert (region.decay, region.layer_id, region.lr_scale) == (False, 17, 1.0)  # skip set matches; Q11 scale 1.0
    assert rules["blocks.0.first_attn.q_bias"].decay is False  # 1-D
    assert rules["head.weight"].lr_scale == 1.0 and rules["head.weight"].decay
    assert rules["patch_embed.proj.weight"].lr_scale == pytest.approx(0.75**17)
    groups = report.param_groups()
    assert len(groups) == 2 * 18  # every layer id has both a decayed and a non-decayed tensor
    assert groups["layer_17_decay"]["params"] == ["head.weight"]
    assert "layer_3_decay" in report.summary()


def test_svfap_finetune_downsampler_layer_ids_faithful_and_corrected():
    tree = abstract_tree(SVFAP_FINETUNE)
    faithful = optim.parameter_rules(tree, layer_decay=0.75, num_layers=21).by_name()
    corrected = optim.parameter_rules(
        tree, layer_decay=0.75, num_layers=21, corrected_downsampler_layer_ids=True, stage_depths=(12, 6, 3)
    ).by_name()
    for name, torch_shape in SVFAP_FINETUNE:
        assert faithful[name].layer_id == _spec_layer_id(name, 21), name
        assert faithful[name].decay == _spec_decayed(name, torch_shape, set()), name
        if "downsamples" not in name:
            assert corrected[name] == faithful[name]
    downsamplers = [n for n, _ in SVFAP_FINETUNE if "downsamples" in n]
    assert len(downsamplers) == 2 * (2 + 6)
    for name in downsamplers:
        stage = int(name.split(".")[1]) + 1
        assert faithful[name].layer_id == 22 and faithful[name].lr_scale == 1.0, name  # Q11: top layer
        assert corrected[name].layer_id == {1: 13, 2: 19}[stage], name  # first block of stage: 12 / 18
        assert corrected[name].lr_scale == pytest.approx(0.75 ** {1: 9, 2: 3}[stage]), name
        assert corrected[name].decay == faithful[name].decay
    assert faithful["temporal_downsamples.0.weight"].decay  # conv kernel (3-D) decays
    assert not faithful["spatial_downsamples.1.norm.weight"].decay
    with pytest.raises(ValueError, match="stage_depths"):
        optim.layer_id("temporal_downsamples.0.weight", 21, corrected_downsamplers=True)


def test_pretrain_no_decay_and_q10_region_tokens():
    tree = abstract_tree(MAE_DFER_PRETRAIN)
    skip = {"mask_token", "lg_region_tokens"}
    faithful = optim.parameter_rules(tree, skip_weight_decay=skip)
    corrected = optim.parameter_rules(tree, skip_weight_decay=skip, corrected_region_token_decay=True)
    f, c = faithful.by_name(), corrected.by_name()
    for name, torch_shape in MAE_DFER_PRETRAIN:
        assert f[name].decay == _spec_decayed(name, torch_shape, skip), name
        assert f[name].lr_scale == 1.0 and f[name].layer_id is None
        assert f[name].group == ("decay" if f[name].decay else "no_decay")
        if name != "encoder.lg_region_tokens":
            assert c[name] == f[name]
    assert f["encoder.lg_region_tokens"].decay is True  # Q10: bare-name skip does not match the nested name
    assert c["encoder.lg_region_tokens"].decay is False
    assert f["mask_token"].decay is False and f["encoder_to_decoder.weight"].decay is True
    assert set(faithful.param_groups()) == {"decay", "no_decay"}
    # the fine-tune model's region tokens are skipped either way
    assert optim.no_weight_decay("lg_region_tokens", (8, 512), skip)


# ---------------------------------------------------------------------------------------------------------------
# SVFAP dead path (Q4)
# ---------------------------------------------------------------------------------------------------------------


def test_svfap_dead_set_is_exactly_the_173_unused_tensors():
    dead = {n for n, _ in SVFAP_PRETRAIN if optim.svfap_pretrain_unused(n, (12, 6, 3))}
    assert len(dead) == 173
    expected = {
        n for n, _ in SVFAP_PRETRAIN
        if n.startswith("encoder.spatial_downsamples.")
        or (m := re.match(r"encoder\.blocks\.(\d+)\.", n)) and int(m.group(1)) in {12, 13, 14, 15, 16, 18, 19}
    }
    assert dead == expected
    assert not any(optim.svfap_pretrain_unused(n) for n, _ in SVFAP_FINETUNE)
    report = optim.parameter_rules(
        abstract_tree(SVFAP_PRETRAIN), skip_weight_decay={"mask_token"}, frozen=optim.svfap_pretrain_unused
    )
    frozen = {r.torch_name for r in report.rules if r.frozen}
    assert frozen == dead
    assert all(not r.decay and r.lr_scale == 0.0 and r.group == "frozen" for r in report.rules if r.frozen)


def _step_fn(tx):
    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def test_dead_parameters_stay_bit_identical_and_hold_no_state():
    params = random_tree(TINY_SVFAP_PRETRAIN, seed=1)
    tx, report = optim.build_optimizer(
        params,
        schedule=optim.warmup_cosine_schedule(1e-2, 1e-4, 0, 10),
        weight_decay=0.05,
        betas=(0.9, 0.95),
        eps=1e-8,
        skip_weight_decay={"mask_token"},
        frozen=lambda name: optim.svfap_pretrain_unused(name, TINY_STAGES),
    )
    frozen = {r.torch_name for r in report.rules if r.frozen}
    assert len(frozen) == 2 * 23 + 2 * 6
    assert {n.split(".")[2] for n in frozen if n.startswith("encoder.blocks.")} == {"1", "3"}
    state = tx.init(params)
    step = _step_fn(tx)
    new = params
    for i in range(3):
        grads = random_tree(TINY_SVFAP_PRETRAIN, seed=10 + i)  # non-zero everywhere, dead tensors included
        new, state = step(new, state, grads)
    before, after = flatten_dict(params), flatten_dict(new)
    for r in report.rules:
        a, b = np.asarray(before[r.path]), np.asarray(after[r.path])
        if r.frozen:
            assert np.array_equal(a, b), r.torch_name
        else:
            assert np.all(a != b), r.torch_name
    # Adam moments exist only for the trainable tensors (first and second moment each).
    trainable = sum(math.prod(r.shape) for r in report.rules if not r.frozen)
    state_values = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    assert state_values == 2 * trainable


# ---------------------------------------------------------------------------------------------------------------
# Equality with PyTorch AdamW (numpy transcription of torch.optim.AdamW, single-tensor path)
# ---------------------------------------------------------------------------------------------------------------


def torch_adamw_reference(params, grads_per_step, lr_table, groups, betas, eps):
    """``groups[name] = (lr_scale, weight_decay)`` or None for a tensor whose grad is None (skipped)."""
    b1, b2 = betas
    params = {k: v.astype(np.float64).copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    for it, grads in enumerate(grads_per_step):
        for name, p in params.items():
            if groups[name] is None:
                continue
            scale, wd = groups[name]
            lr = lr_table[it] * scale  # param_group["lr"] = lr_schedule_values[it] * lr_scale
            g = grads[name]
            p *= 1 - lr * wd  # decoupled decay first
            m[name] += (g - m[name]) * (1 - b1)  # exp_avg.lerp_(grad, 1 - beta1)
            v[name] = v[name] * b2 + (1 - b2) * g * g
            step = it + 1
            bias_correction1 = 1 - b1**step
            bias_correction2 = 1 - b2**step
            denom = np.sqrt(v[name]) / math.sqrt(bias_correction2) + eps
            p -= (lr / bias_correction1) * m[name] / denom
    return params


def test_matches_pytorch_adamw_with_layer_scales_decay_mask_and_frozen():
    keys = TINY_LGI_FINETUNE
    num_layers, decay, wd, betas, eps = 2, 0.75, 0.05, (0.9, 0.999), 1e-8
    lr_table = optim.warmup_cosine_table(0.05, 1e-3, 3, 12)
    skip = {"lg_region_tokens"}
    frozen = lambda name: name.startswith("patch_embed.")  # noqa: E731
    steps = 6
    with jax.enable_x64(True):
        params = random_tree(keys, seed=3, dtype=np.float64)
        grads = [random_tree(keys, seed=100 + i, dtype=np.float64) for i in range(steps)]
        tx, report = optim.build_optimizer(
            params,
            schedule=optim.schedule_from_table(lr_table),
            weight_decay=wd,
            betas=betas,
            eps=eps,
            layer_decay=decay,
            num_layers=num_layers,
            skip_weight_decay=skip,
            frozen=frozen,
        )
        state = tx.init(params)
        step = _step_fn(tx)
        new = params
        for g in grads:
            new, state = step(new, state, g)
        got = {flax_path_to_torch(p): np.asarray(x) for p, x in flatten_dict(new).items()}

    def by_name(tree):
        return {flax_path_to_torch(p): np.asarray(x) for p, x in flatten_dict(tree).items()}

    scales = [decay ** (num_layers + 1 - i) for i in range(num_layers + 2)]
    groups = {
        name: None if frozen(name) else (scales[_spec_layer_id(name, num_layers)],
                                         wd if _spec_decayed(name, shape, skip) else 0.0)
        for name, shape in keys
    }
    p0 = by_name(params)
    want = torch_adamw_reference(p0, [by_name(g) for g in grads], lr_table, groups, betas, eps)
    assert lr_table[0] == 0.0  # the first step only fills the moments
    for name in want:
        assert got[name].dtype == np.float64
        np.testing.assert_allclose(got[name] - p0[name], want[name] - p0[name], rtol=1e-6, atol=1e-12,
                                   err_msg=name)
        if groups[name] is None:
            assert np.array_equal(got[name], p0[name])
        else:
            assert np.all(got[name] != p0[name])
    # the decoupled decay is really applied where (and only where) the spec says so
    assert report.by_name()["head.weight"].decay and not report.by_name()["head.bias"].decay


def test_grad_clip_uses_the_norm_of_trainable_gradients_only():
    params = {"a": {"kernel": jnp.ones((3, 4))}, "b": {"kernel": jnp.ones((2, 2))}}
    grads = {"a": {"kernel": jnp.full((3, 4), 2.0)}, "b": {"kernel": jnp.full((2, 2), 1e6)}}
    common = dict(schedule=optax.constant_schedule(0.1), weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    clipped, _ = optim.build_optimizer(params, frozen=lambda n: n.startswith("b."), grad_clip=1.0, **common)
    plain, _ = optim.build_optimizer(params, frozen=lambda n: n.startswith("b."), **common)
    norm_a = math.sqrt(12 * 4.0)  # frozen b's huge gradient must not enter the norm
    pre_clipped = {"a": {"kernel": grads["a"]["kernel"] / norm_a}, "b": grads["b"]}
    # compare second-step updates (Adam's first step is scale-free, so it cannot see clipping)
    def two_steps(tx, g1, g2):
        s = tx.init(params)
        _, s = tx.update(g1, s, params)
        u, _ = tx.update(g2, s, params)
        return u

    g2 = {"a": {"kernel": jnp.full((3, 4), 0.1)}, "b": grads["b"]}
    u_clip = two_steps(clipped, grads, g2)
    u_ref = two_steps(plain, pre_clipped, g2)
    np.testing.assert_allclose(u_clip["a"]["kernel"], u_ref["a"]["kernel"], rtol=1e-5)
    assert np.all(np.asarray(u_clip["b"]["kernel"]) == 0)
    u_unclipped = two_steps(plain, grads, g2)
    assert not np.allclose(u_unclipped["a"]["kernel"], u_clip["a"]["kernel"], rtol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Sharding and checkpointing
# ---------------------------------------------------------------------------------------------------------------


def test_works_with_params_sharded_over_a_mesh_and_state_round_trips_through_orbax(tmp_path):
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = np.array(jax.devices())
    assert devices.size == 8
    mesh = Mesh(devices.reshape(8), ("fsdp",))
    # one tensor of each kind: sharded decayed kernel, replicated bias, no-decay token, frozen conv, top-layer head
    keys = (
        [("lg_region_tokens", (8, 16))]
        + [("patch_embed.proj.weight", (16, 3, 2, 2, 2)), ("patch_embed.proj.bias", (16,))]
        + _linear("blocks.0.mlp.fc1", 32, 16)
        + _norm("blocks.1.norm2", 16)
        + _linear("head", 3, 16)
    )
    params = random_tree(keys, seed=5)
    grads = random_tree(keys, seed=6)

    def shard(x):
        spec = P("fsdp") if x.ndim >= 2 and x.shape[0] % 8 == 0 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    tx, report = optim.build_optimizer(
        params, schedule=optim.warmup_cosine_schedule(1e-2, 1e-5, 2, 10), weight_decay=0.05, betas=(0.9, 0.999),
        eps=1e-8, layer_decay=0.75, num_layers=2, skip_weight_decay={"lg_region_tokens"},
        frozen=lambda n: n.startswith("patch_embed."), grad_clip=1.0,
    )
    assert len(report.param_groups()) == 6  # frozen, layer 1 (decay, no_decay), layer 2, layer 3 (decay, no_decay)
    step = _step_fn(tx)
    ref_params, ref_state = params, tx.init(params)
    sh_params = jax.tree.map(shard, params)
    sh_state = tx.init(sh_params)
    sh_grads = jax.tree.map(shard, grads)
    for _ in range(3):
        ref_params, ref_state = step(ref_params, ref_state, grads)
        sh_params, sh_state = step(sh_params, sh_state, sh_grads)
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(sh_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert sh_params["blocks_0"]["mlp"]["fc1"]["kernel"].sharding.spec == P("fsdp")
    assert sh_params["lg_region_tokens"].sharding.spec == P("fsdp")

    ocp = pytest.importorskip("orbax.checkpoint")
    path = tmp_path / "opt_state"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, sh_state)
        ckptr.wait_until_finished()
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), sh_state)
        restored = ckptr.restore(path, target)
    assert jax.tree.structure(restored) == jax.tree.structure(sh_state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(sh_state)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_zero_gradient_tensor_decays_with_torchs_float32_multiplier():
    """A tensor with a zero (not absent) gradient only decays; torch does ``p.mul_(1 - lr*wd)`` with the
    multiplier rounded to float32, and the steps golden showed the exact-decay form off by 6e-4 relative there."""
    lr, wd = 7.5e-4 * 0.75, 0.05
    p = np.random.default_rng(0).normal(0, 0.05, (64, 64)).astype(np.float32)
    params = {"blocks_0": {"fc": {"kernel": jnp.asarray(p)}}}
    tx, _ = optim.build_optimizer(params, schedule=optax.constant_schedule(lr), weight_decay=wd,
                                  betas=(0.9, 0.999), eps=1e-8)
    state = tx.init(params)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    got = np.asarray(optax.apply_updates(params, updates)["blocks_0"]["fc"]["kernel"])
    torch_like = p * np.float32(1 - lr * wd)  # float64 scalar rounded to the tensor's dtype, one rounding
    assert np.array_equal(got, torch_like)
    exact = (p.astype(np.float64) * (1 - lr * wd)).astype(np.float32)
    assert not np.array_equal(got, exact)  # the float32 multiplier is visible at this lr * wd
