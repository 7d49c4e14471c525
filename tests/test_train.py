"""Trainer: sharded steps equal single-device steps, optimiser groups on the real base models, exact resume after
SIGKILL, restore onto another mesh, NaN handling, config errors, and --mode=eval."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from configs.base import base_config
from facemae_jax import checkpoint as ckpt_lib
from facemae_jax import convert, optim, sharding, steps
from facemae_jax.models import abstract_params, create_model, get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_LGI = dict(num_frames=4, img_size=32, patch_size=8, embed_dim=32, num_heads=2, depth=2, region_size=(2, 2, 4),
                 decoder_embed_dim=16, decoder_num_heads=2, decoder_depth=1, mask_ratio=0.5)


def _state(model, cfg, tx, mesh, seed=0):
    from facemae_jax.train import create_state

    return create_state(model, cfg, tx, mesh, base_config().sharding_rules, seed, None)


def _batch(cfg, mode, n=8, seed=0):
    rng = np.random.default_rng(seed)
    video = rng.integers(0, 256, (n, cfg.num_frames, cfg.img_size, cfg.img_size, 3), dtype=np.uint8)
    if mode == "pretrain":
        from facemae_jax import masking

        gen = masking.MaskGenerator.for_model(cfg)
        return {"video": video, "mask": np.stack([gen(rng) for _ in range(n)])}
    return {"video": video, "label": rng.integers(0, cfg.num_classes, n).astype(np.int32),
            "erase_box": np.zeros((n, 4), np.int32)}


@pytest.mark.parametrize("mode", [pytest.param("pretrain", marks=pytest.mark.extended), "finetune"])
def test_sharded_step_matches_single_device(mode):
    cfg = get_config(f"lgi_tiny_{mode}", **SMALL_LGI)
    model = create_model(cfg)
    tx = optax.adamw(1e-3)
    make = steps.make_pretrain_step if mode == "pretrain" else steps.make_finetune_step
    kw = {"frame_diff": True} if mode == "pretrain" else {"mixup": None}
    step = jax.jit(make(model, cfg, tx, 0, **kw))
    batch = _batch(cfg, mode)
    results = {}
    for shape in [(1, 1), (8, 1), (4, 2)]:
        mesh = sharding.make_mesh(*shape, devices=jax.devices()[: shape[0] * shape[1]])
        state, _ = _state(model, cfg, tx, mesh)
        new, m = step(state, sharding.put_batch(batch, mesh))
        results[shape] = (float(m["loss"]), jax.device_get(new["params"]))
        if shape == (4, 2):  # params really are sharded over fsdp
            k = new["params"]["blocks_0" if mode == "finetune" else "encoder"]
            leaf = k["mlp"]["fc1"]["kernel"] if mode == "finetune" else k["blocks_0"]["mlp"]["fc1"]["kernel"]
            assert leaf.sharding.spec[0] == "fsdp"
    ref_loss, ref_params = results[(1, 1)]
    for shape, (loss, params) in results.items():
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), shape
        chex.assert_trees_all_close(params, ref_params, rtol=1e-4, atol=1e-6, custom_message=f"mesh {shape}")


def test_pretrain_step_reports_the_zero_prediction_baseline():
    """The step's zero_loss is the MSE of an all-zero prediction on the same masked targets (so the trainer's
    loss / zero_loss says whether pre-training beats the trivial guess); with diff_weight it uses the same weighting."""
    from facemae_jax import targets
    from facemae_jax.models.mae import num_visible_tokens, split_mask

    cfg = get_config("lgi_tiny_pretrain", **SMALL_LGI)
    model = create_model(cfg)
    tx = optax.adamw(1e-3)
    batch = _batch(cfg, "pretrain")
    _, mask_idx = split_mask(jnp.asarray(batch["mask"]), num_visible_tokens(cfg))
    tgt = targets.reconstruction_targets(jnp.asarray(batch["video"], jnp.float32) / 255.0, mask_idx,
                                         patch=cfg.patch_size, tubelet=cfg.tubelet_size, frame_diff=True)
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    for w in (None, 0.8):
        state, _ = _state(model, cfg, tx, mesh)
        _, m = jax.jit(steps.make_pretrain_step(model, cfg, tx, 0, frame_diff=True, diff_weight=w))(state, batch)
        half = tgt.shape[-1] // 2
        want = (float(jnp.mean(tgt ** 2)) if w is None
                else 0.2 * float(jnp.mean(tgt[..., :half] ** 2)) + 0.8 * float(jnp.mean(tgt[..., half:] ** 2)))
        assert float(m["zero_loss"]) == pytest.approx(want, rel=1e-5)
        assert 0.5 < float(m["loss"]) / float(m["zero_loss"]) < 2  # an untrained model is near the baseline
    assert float(steps.zero_prediction_loss(tgt)) > 0 and float(targets.reconstruction_loss(tgt, tgt)) == 0.0


def test_optimizer_groups_on_base_models_match_spec():
    """FINETUNING §5 on the real parameter trees of the published fine-tune models."""
    lgi = abstract_params(create_model(get_config("vit_base_dim512_no_depth_patch16_160")))
    _, rep = optim.build_optimizer(lgi, schedule=optax.constant_schedule(1.0), weight_decay=0.05,
                                   betas=(0.9, 0.999), eps=1e-8, layer_decay=0.75, num_layers=16,
                                   skip_weight_decay={"lg_region_tokens"})
    rules = {r.torch_name: r for r in rep.rules}
    expected = [0.0075169, 0.0100226, 0.0133635, 0.0178179, 0.0237573, 0.0316764, 0.0422351, 0.0563135,
                0.0750847, 0.1001129, 0.1334839, 0.1779785, 0.2373047, 0.3164063, 0.421875, 0.5625, 0.75, 1.0]
    assert rules["patch_embed.proj.weight"].lr_scale == pytest.approx(expected[0], abs=1e-7)
    for j in range(16):
        assert rules[f"blocks.{j}.mlp.fc1.weight"].lr_scale == pytest.approx(expected[j + 1], abs=1e-7)
    for name in ("head.weight", "fc_norm.weight", "lg_region_tokens"):
        assert rules[name].lr_scale == 1.0
    no_decay = {n for n, r in rules.items() if not r.decay}
    assert "lg_region_tokens" in no_decay and "blocks.3.first_attn.q_bias" in no_decay
    assert "blocks.3.norm2.weight" in no_decay and "head.bias" in no_decay
    decayed = {n for n, r in rules.items() if r.decay}
    assert all(n.endswith(".weight") and "norm" not in n for n in decayed)
    assert len(rules) == 519 - 0  # every reference key (no shared modules in the published model)

    svfap = abstract_params(create_model(get_config("pretrain_svfap_base_patch16_160")))
    _, rep = optim.build_optimizer(svfap, schedule=optax.constant_schedule(1.0), weight_decay=0.05,
                                   betas=(0.9, 0.95), eps=1e-8, skip_weight_decay={"mask_token"},
                                   frozen=lambda n: optim.svfap_pretrain_unused(n, (12, 6, 3)))
    assert sum(r.frozen for r in rep.rules) == 173  # ARCHITECTURE §4.6: tensors without gradient


@pytest.mark.extended  # > 30 s: .ci/run runs it after the default suite
def test_restore_onto_another_mesh(tmp_path):
    cfg = get_config("lgi_tiny_finetune", **SMALL_LGI)
    model = create_model(cfg)
    tx = optax.adamw(1e-3)
    mesh_a = sharding.make_mesh(8, 1)
    state, _ = _state(model, cfg, tx, mesh_a, seed=3)
    c = ckpt_lib.Checkpointer(str(tmp_path / "ck"))
    c.save(5, state, {"position": 5}, force=True)
    c.close()
    mesh_b = sharding.make_mesh(2, 4)
    fresh, _ = _state(model, cfg, tx, mesh_b, seed=99)
    target = ckpt_lib.abstract_with_shardings(jax.eval_shape(lambda: fresh),
                                              jax.tree_util.tree_map(lambda x: x.sharding, fresh))
    c2 = ckpt_lib.Checkpointer(str(tmp_path / "ck"))
    restored, data, step = c2.restore(target)
    c2.close()
    assert step == 5 and data == {"position": 5}
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    leaf = restored["params"]["blocks_0"]["mlp"]["fc1"]["kernel"]
    assert leaf.sharding.mesh.shape == {"data": 2, "fsdp": 4} and leaf.sharding.spec[0] == "fsdp"


def test_non_finite_update_is_skipped():
    cfg = get_config("lgi_tiny_finetune", **SMALL_LGI)
    model = create_model(cfg)
    tx = optax.sgd(1e38)  # the update overflows although the loss is finite
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    state, _ = _state(model, cfg, tx, mesh)
    before = jax.device_get(state["params"])
    new, m = jax.jit(steps.make_finetune_step(model, cfg, tx, 0, mixup=None))(state, _batch(cfg, "finetune"))
    assert np.isfinite(float(m["loss"])) and not bool(m["finite"])
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(new["params"])), jax.tree_util.tree_leaves(before)):
        np.testing.assert_array_equal(a, b)


def _adam_state():
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    tx = optax.adamw(1e-2, weight_decay=0.05)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    # one ordinary step first, so the moments are non-zero and a wrong update of them would show
    grads = jax.tree_util.tree_map(lambda p: 0.1 * p + 0.3, params)
    state, m = steps._finish(state, grads, jnp.float32(1.0), tx, {})
    assert bool(m["finite"])
    return state, tx, grads


@pytest.mark.parametrize("bad", ["loss", "gradient"])
def test_non_finite_loss_or_gradient_leaves_params_and_optimizer_state_unchanged(bad):
    state, tx, grads = _adam_state()
    loss = jnp.float32(jnp.nan if bad == "loss" else 1.0)
    if bad == "gradient":
        grads = {"w": grads["w"].at[0, 1].set(jnp.inf), "b": grads["b"]}
    new, m = jax.jit(lambda s, g, x: steps._finish(s, g, x, tx, {}))(state, grads, loss)
    assert not bool(m["finite"]) and int(new["step"]) == int(state["step"]) + 1
    chex.assert_trees_all_equal((new["params"], new["opt_state"]), (state["params"], state["opt_state"]))


def test_overflowing_adam_update_keeps_the_params_and_reports_it():
    state, _, grads = _adam_state()
    tx = optax.adamw(1e38, weight_decay=0.0)  # finite gradients, an update far beyond float32
    state["opt_state"] = tx.init(state["params"])
    new, m = steps._finish(state, grads, jnp.float32(1.0), tx, {})
    assert not bool(m["finite"]) and np.isfinite(float(m["grad_norm"]))
    chex.assert_trees_all_equal(new["params"], state["params"])
    # the moments of that step are kept (documented in steps.py): finite averages of finite gradients
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(new["opt_state"]))


# ---------------------------------------------------------------------------------------------------------------
# End-to-end through launch.py on a tiny synthetic dataset
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from data_pipelines import synthetic

    d = tmp_path_factory.mktemp("data") / "faces"
    synthetic.build_dataset(str(d), seed=0, num_pretrain=16, train_per_class=3, val_per_class=1, test_per_class=2,
                            frames=10, size=32, workers=1, clips_per_shard=16)
    return str(d)


def _config_file(tmp_path, data_dir, **extra) -> str:
    body = textwrap.dedent(f"""
        from ml_collections import ConfigDict
        from configs.base import base_config

        def get_config():
            c = base_config()
            c.model.name = "lgi_tiny_finetune"
            c.model.overrides = ConfigDict({dict(SMALL_LGI, num_classes=7)!r})
            c.data.dir = {data_dir!r}
            c.data.sampling_rate = 2
            c.data.rand_augment = "rand-m7-n2-mstd0.5-inc1"
            c.batch_size = 8
            c.optim.total_steps = 10
            c.optim.warmup_steps = 2
            c.checkpoint.every_steps = 2
            c.checkpoint.keep = 10
            c.log_every_steps = 2
            c.eval.batch_size = 8
            c.mesh.data = 2
            c.mesh.fsdp = 1
            return c
    """)
    p = tmp_path / "tiny_config.py"
    p.write_text(body)
    return str(p)


def _launch(config, workdir, *args, wait=True, env_extra=None):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO, **(env_extra or {}))
    cmd = [sys.executable, os.path.join(REPO, "launch.py"), f"--config={config}", f"--workdir={workdir}", *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _export_params(workdir):
    params, _, _ = convert.load_converted(os.path.join(workdir, "export"))
    return traverse_util.flatten_dict(params)


@pytest.mark.extended  # > 30 s: .ci/run runs it after the default suite
def test_kill_and_resume_is_bit_identical(tmp_path, tiny_data):
    config = _config_file(tmp_path, tiny_data)
    ref = _launch(config, str(tmp_path / "ref"), "--config.final_eval=False")
    assert ref.returncode == 0, ref.stdout + ref.stderr

    work = tmp_path / "killed"
    proc = _launch(config, str(work), "--config.final_eval=False", wait=False)
    deadline = time.time() + 300
    while not (work / "checkpoints" / "4").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run, somewhere after step 4 was saved
    proc.wait()
    saved = sorted(int(s) for s in os.listdir(work / "checkpoints") if s.isdigit())
    assert 10 not in saved, "the run finished before it was killed; nothing was tested"
    resumed = _launch(config, str(work), "--config.final_eval=False")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "[resume] restored step" in resumed.stdout + resumed.stderr
    a, b = _export_params(str(tmp_path / "ref")), _export_params(str(work))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_final_eval_outputs_and_eval_mode(tmp_path, tiny_data):
    config = _config_file(tmp_path, tiny_data)
    work = tmp_path / "run"
    r = _launch(config, str(work), "--config.optim.total_steps=4")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "UAR" in r.stdout and "WAR" in r.stdout
    res = json.load(open(work / "eval" / "final_metrics.json"))
    assert res["num_clips"] == 14 and 0 <= res["uar"] <= 1
    assert (work / "eval" / "final_confusion.png").exists() and (work / "config.json").exists()
    assert (work / "tb").is_dir() and (work / "metrics.jsonl").exists()
    logged = [json.loads(line) for line in open(work / "metrics.jsonl")]
    assert all(0 <= row["perf/input_wait_fraction"] <= 1 for row in logged if "train/loss" in row)
    from facemae_jax import loading  # the export is what predict / extract load

    loaded = loading.load_model(str(work))
    assert loaded.task == "classification" and loaded.sampling_rate == 2 and len(loaded.class_names) == 7
    e = _launch(config, str(tmp_path / "evalonly"), "--mode=eval", f"--checkpoint={work}")
    assert e.returncode == 0, e.stdout + e.stderr
    res2 = json.load(open(tmp_path / "evalonly" / "eval" / "eval_only_metrics.json"))
    assert res2["uar"] == res["uar"] and res2["war"] == res["war"]
    again = _launch(config, str(work), "--config.optim.total_steps=4")  # rerun of a finished job: resume at the end
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.load(open(work / "eval" / "final_metrics.json"))["uar"] == res["uar"]


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_data):
    config = _config_file(tmp_path, tiny_data)
    work = tmp_path / "nan"
    r = _launch(config, str(work), "--config.optim.base_lr=1e36", "--config.optim.warmup_steps=1",
                "--config.checkpoint.every_steps=1")
    assert r.returncode != 0
    assert "non-finite loss/gradient/update at step" in r.stdout + r.stderr
    assert "is intact" not in r.stdout + r.stderr and "Traceback" not in r.stderr  # says only what it checked
    c = ckpt_lib.Checkpointer(str(work / "checkpoints"))
    step = c.latest_step()
    assert step is not None
    restored, _ = c.restore_unsharded(step)
    c.close()
    leaves = jax.tree_util.tree_leaves(restored["params"])
    assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)


def test_unknown_config_key_and_missing_data_fail_loudly(tmp_path, tiny_data):
    config = _config_file(tmp_path, tiny_data)
    r = _launch(config, str(tmp_path / "w"), "--config.optim.base_lrr=1")
    assert r.returncode != 0 and "base_lrr" in r.stderr
    r = _launch(config, str(tmp_path / "w2"), f"--config.data.dir={tmp_path / 'nowhere'}")
    assert r.returncode != 0 and "has no dataset_info.json" in r.stderr + r.stdout


def test_bfloat16_compute_keeps_float32_params():
    cfg = get_config("lgi_tiny_finetune", **SMALL_LGI, dtype="bfloat16")
    model = create_model(cfg)
    tx = optax.adamw(1e-3)
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    state, _ = _state(model, cfg, tx, mesh)
    new, m = jax.jit(steps.make_finetune_step(model, cfg, tx, 0, mixup=None))(state, _batch(cfg, "finetune"))
    assert bool(m["finite"])
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(new["params"]))


def test_init_from_official_format_pth(tmp_path):
    """A finetune job can start from a reference-layout pretrain .pth (converted on the fly, FINETUNING §6)."""
    from configs.base import base_config
    from facemae_jax import torch_io
    from facemae_jax.models import init_params
    from facemae_jax.train import initial_params

    pcfg = get_config("lgi_tiny_pretrain", **SMALL_LGI)
    sd = convert.flax_to_torch(init_params(create_model(pcfg), jax.random.key(1)), pcfg)
    torch_io.save_state_dict(str(tmp_path / "checkpoint-49.pth"), sd, extra={"epoch": 49})
    c = base_config()
    c.model.name = "lgi_tiny_finetune"
    c.model.overrides = dict(SMALL_LGI, num_classes=5)
    c.init_from = str(tmp_path / "checkpoint-49.pth")
    params = initial_params(c, get_config("lgi_tiny_finetune", **SMALL_LGI, num_classes=5))
    ft = convert.flax_to_torch(params, get_config("lgi_tiny_finetune", **SMALL_LGI, num_classes=5))
    assert np.array_equal(ft["blocks.1.third_attn.kv.weight"], sd["encoder.blocks.1.third_attn.kv.weight"])
    assert ft["head.weight"].shape == (5, 32)


@pytest.mark.extended  # > 30 s: .ci/run runs it after the default suite
def test_kfold_driver_writes_per_fold_and_mean_table(tmp_path, tiny_data):
    """Two folds over a copy of the tiny dataset whose info gets fold splits; launch.run_kfold trains both."""
    import launch
    from configs.base import base_config

    d = tmp_path / "folds"
    d.mkdir()
    info = json.load(open(os.path.join(tiny_data, "dataset_info.json")))
    for s in info["shards"]:
        os.symlink(os.path.join(tiny_data, s), d / s)
    clips = info["splits"]["train"] + info["splits"]["test"]
    half = len(clips) // 2
    info["splits"].update({"fold1/train": clips[half:], "fold1/test": clips[:half],
                           "fold2/train": clips[:half], "fold2/test": clips[half:]})
    json.dump(info, open(d / "dataset_info.json", "w"))
    c = base_config()
    c.model.name = "lgi_tiny_finetune"
    c.model.overrides = dict(SMALL_LGI, num_classes=7)
    c.data.dir = str(d)
    c.data.sampling_rate = 2
    c.data.rand_augment = ""
    c.batch_size = 8
    c.optim.total_steps = 2
    c.optim.warmup_steps = 1
    c.eval.batch_size = 8
    c.kfold = 2
    table = launch.run_kfold(c, str(tmp_path / "kf"))
    saved = json.load(open(tmp_path / "kf" / "kfold.json"))
    assert [r["fold"] for r in saved["rows"]] == [1, 2]
    for k in (1, 2):
        assert (tmp_path / "kf" / f"fold{k}" / "eval" / "final_metrics.json").exists()
    folds = [json.load(open(tmp_path / "kf" / f"fold{k}" / "eval" / "final_metrics.json")) for k in (1, 2)]
    assert table["mean"]["uar"] == pytest.approx((folds[0]["uar"] + folds[1]["uar"]) / 2)


@pytest.mark.extended  # > 30 s: .ci/run runs it after the default suite
def test_staged_pretrain_then_finetune_on_frames_larger_than_the_model(tmp_path, tiny_data):
    """The demo / study shape end to end: masked pre-training (with its reconstruction report) then fine-tuning from
    it, on 32 px stored frames fed to a 16 px model (every pipeline, the report's included, must resize)."""
    geom = dict(num_frames=4, img_size=16, patch_size=4, embed_dim=32, num_heads=2, depth=2, region_size=(2, 2, 4))
    body = textwrap.dedent(f"""
        from ml_collections import ConfigDict
        from configs.study import common

        def get_config():
            pre = common.pretrain("lgi", {tiny_data!r}, steps=4, batch=8, overrides=dict(
                {geom!r}, decoder_embed_dim=16, decoder_num_heads=2, decoder_depth=1))
            ft = common.finetune("lgi", {tiny_data!r}, steps=4, batch=8, init_from="@pretrain", overrides={geom!r})
            for c in (pre, ft):
                c.eval.batch_size = 8
                c.mesh.data = 2
                c.mesh.fsdp = 1
                c.log_every_steps = 2
            c = ConfigDict()
            c.stage_order = ("pretrain", "finetune")
            c.stages = ConfigDict({{"pretrain": pre, "finetune": ft}})
            return c
    """)
    config = tmp_path / "staged.py"
    config.write_text(body)
    work = tmp_path / "staged"
    r = _launch(str(config), str(work))
    assert r.returncode == 0, r.stdout + r.stderr
    assert any(p.name.startswith("reconstruction_step") for p in (work / "pretrain" / "eval").iterdir())
    logged = [json.loads(line) for line in open(work / "pretrain" / "metrics.jsonl")]
    assert any(0 < m.get("train/loss_vs_zero", 0) for m in logged)
    res = json.load(open(work / "finetune" / "eval" / "final_metrics.json"))
    assert res["num_clips"] == 14
    assert json.load(open(work / "finetune" / "config.json"))["init_from"] == str(work / "pretrain")
