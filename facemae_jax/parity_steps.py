"""Parity of optimiser steps with the reference recipe (training-step goldens, ``meta.kind == "train_steps"``).

A training-step golden holds fixed weights, one batch, and what K AdamW steps of the reference recipe made of them
(per-step losses, the weights after K steps; format in shared/golden/README.md). This check runs the *project's*
training code on it, not a transcription of the recipe: the job config of the golden's (family, mode) — the same
file ``launch.py`` would run — with the recipe's numbers written into its keys, then the trainer's own
``train.schedule_and_optimizer`` (param groups, layer-wise lr decay, no-decay set, Q4 frozen tensors) and the
step functions of ``facemae_jax.steps`` (loss, targets, label smoothing) with mixup off and drop path 0.

Compared: the lr table with ``train/lr``; each step's loss (relative error <= 1e-5); each tensor's change
‖ΔW_ours − ΔW_ref‖ / ‖ΔW_ref‖ (<= 1e-3; the reference differs from itself by up to 1.5e-5 between thread counts),
and tensors the reference leaves unchanged must stay bit-identical; every tensor's lr scale / weight decay /
layer id against ``meta.param_groups`` (trainable tensors; the reference lists the frozen ones in groups too).
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import numpy as np

LOSS_TOLERANCE = 1e-5
DELTA_TOLERANCE = 1e-3

# The job config each (family, mode) of the reference is trained with in this project.
JOB_CONFIGS = {
    ("mae_dfer", "finetune"): ("configs.finetune_dfew", "lgi"),
    ("svfap", "finetune"): ("configs.finetune_dfew", "svfap"),
    ("mae_dfer", "pretrain"): ("configs.pretrain_vox2", None),
    ("svfap", "pretrain"): ("configs.pretrain_vox2_svfap", None),
}


def model_config(meta: dict[str, Any]):
    """The ModelConfig of the golden's reference constructor (the forward-golden mapping of ``parity``)."""
    from facemae_jax import parity

    kwargs = dict(meta["kwargs"])
    if "drop_path" in meta.get("recipe", {}):  # the steps were run with this rate, whatever the constructor says
        kwargs["drop_path_rate"] = float(meta["recipe"]["drop_path"] or 0.0)
    return parity.config_from_meta({
        "family": meta["family"], "mode": meta["mode"],
        "model_constructor": {"kind": "class", "callable": meta["constructor"], "kwargs": kwargs},
        "mask": meta.get("mask", {}),
    })


def job_config(meta: dict[str, Any]):
    """The project's job config for this golden, with ``meta.recipe`` written into its keys.

    Raises ValueError for recipe parts the project's trainer does not have (a different weight-decay end value,
    mixup, which is stochastic and not in the golden's definition anyway)."""
    key = (meta["family"], meta["mode"])
    if key not in JOB_CONFIGS:
        raise ValueError(f"no job config for family {key[0]!r}, mode {key[1]!r} (known: {sorted(JOB_CONFIGS)})")
    module, arg = JOB_CONFIGS[key]
    get = importlib.import_module(module).get_config
    config = get(arg) if arg else get()
    r = meta["recipe"]
    if r.get("optimizer", "adamw") != "adamw":
        raise ValueError(f"recipe optimizer {r['optimizer']!r}: the trainer is AdamW only")
    if r.get("weight_decay_end") not in (None, r["weight_decay"]):
        raise ValueError("recipe weight_decay_end != weight_decay: the trainer's weight decay is constant")
    if r.get("mixup"):
        raise ValueError("recipe with mixup: training-step goldens are defined with mixup off")
    batch = int(r["batch"])
    config.batch_size = batch
    o = config.optim
    # the recipe's lr is absolute; the config's is per 256 samples (optim.scaled_lr multiplies back)
    o.base_lr = r["lr"] * 256 / batch
    o.min_lr = r["min_lr"] * 256 / batch
    o.epochs = int(r["epochs"])
    o.total_steps = 0
    o.warmup_epochs = int(r["warmup_epochs"])
    o.warmup_steps = max(int(r.get("warmup_steps", -1)), 0)
    o.stop_after_epochs = 0
    o.stop_after_steps = 0
    o.weight_decay = float(r["weight_decay"])
    o.betas = tuple(r["betas"])
    o.eps = float(r["eps"])
    o.layer_decay = r.get("layer_decay")
    o.grad_clip = r.get("clip_grad")
    if meta["mode"] == "finetune":
        config.finetune.mixup_alpha = 0.0
        config.finetune.cutmix_alpha = 0.0
        config.finetune.label_smoothing = float(r.get("smoothing") or 0.0)
    elif "use_frame_diff_as_target" in meta.get("loss_settings", {}):
        config.pretrain.frame_diff = bool(meta["loss_settings"]["use_frame_diff_as_target"])
    return config


def _input_video(path: str, meta: dict[str, Any]) -> np.ndarray:
    zi = np.load(os.path.join(os.path.dirname(os.path.abspath(path)), meta["input"]["file"]))
    return np.ascontiguousarray(zi["pixels"].transpose(0, 2, 3, 4, 1))  # B,C,T,H,W -> B,T,H,W,C uint8


def _group_mismatches(report, meta: dict[str, Any]) -> list[str]:
    """One line per trainable tensor whose lr scale / weight decay / layer id differs from the reference's."""
    out = []
    for name, want in meta.get("param_groups", {}).items():
        rule = report.by_name().get(name)
        if rule is None:
            out.append(f"{name}: not a parameter of the model")
            continue
        if rule.frozen:
            continue
        got = {"lr_scale": rule.lr_scale, "weight_decay": float(meta["recipe"]["weight_decay"]) if rule.decay else 0.0}
        if "layer_id" in want:
            got["layer_id"] = rule.layer_id
        bad = [f"{k} {v} (reference {want[k]})" for k, v in got.items()
               if k in want and not np.isclose(v, want[k], rtol=1e-12, atol=0)]
        if bad:
            out.append(f"{name}: " + ", ".join(bad))
    return out


def run_train_steps(path: str) -> dict[str, Any]:
    """Run the golden's K steps with the project's trainer pieces -> {"losses", "after" (torch names), "lr_table",
    "report"}."""
    import jax
    import jax.numpy as jnp

    from facemae_jax import convert, tasks, train
    from facemae_jax.models import registry

    jax.config.update("jax_default_matmul_precision", "highest")
    z = np.load(path)
    meta = json.loads(str(z["meta"]))
    cfg = model_config(meta)
    config = job_config(meta)
    r = meta["recipe"]
    before = {k[len("param/"):]: z[k].astype(np.float32) for k in z.files if k.startswith("param/")}
    params, _ = convert.torch_to_flax(before, cfg, source=path)
    model = registry.create_model(cfg)
    task = tasks.for_config(config, cfg)
    tx, report, lr_table, _ = train.schedule_and_optimizer(
        task, registry.abstract_params(model), int(r["steps_per_epoch"]), config.batch_size)
    video = _input_video(path, meta)
    if cfg.mode == "finetune":
        batch = {"video": video, "label": z["label"].astype(np.int32)}
    else:
        batch = {"video": video, "mask": z["mask"].astype(bool)}
    step = jax.jit(task.train_step(model, tx))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    losses = []
    for _ in range(int(r["steps"])):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    after = convert.flax_to_torch(jax.device_get(state["params"]), cfg)
    return {"losses": losses, "after": after, "lr_table": lr_table, "report": report}


def compare(golden: Any, run: dict[str, Any]) -> tuple[dict[str, Any], bool, str]:
    """A golden (``np.load`` result or dict of its arrays) vs ``run_train_steps`` -> (results, passed, summary)."""
    meta = json.loads(str(golden["meta"]))
    files = list(golden.keys()) if isinstance(golden, dict) else golden.files
    before = {k[len("param/"):]: golden[k].astype(np.float32) for k in files if k.startswith("param/")}
    losses, after = np.asarray(run["losses"], np.float64), run["after"]
    num_steps = len(losses)
    ref_loss = golden["train/loss"].astype(np.float64)
    loss_err = np.abs(losses - ref_loss) / np.abs(ref_loss)
    ref_lr = golden["train/lr"]
    lr_err = float(np.max(np.abs(run["lr_table"][:num_steps] - ref_lr) / np.maximum(np.abs(ref_lr), 1e-30)))
    deltas: dict[str, float] = {}
    unchanged_ok = unchanged = 0
    for name, w0 in before.items():
        ref_after = golden[f"train/param_after/{name}"]
        ours = after[name]
        if np.array_equal(ref_after, w0):  # the reference left it alone: so must we, bit for bit
            unchanged += 1
            unchanged_ok += int(np.array_equal(ours, w0))
            deltas[name] = 0.0 if np.array_equal(ours, w0) else float("inf")
            continue
        d_ref = ref_after.astype(np.float64) - w0
        d_ours = ours.astype(np.float64) - w0
        deltas[name] = float(np.linalg.norm(d_ours - d_ref) / np.linalg.norm(d_ref))
    worst = max(deltas, key=deltas.get)
    groups = _group_mismatches(run["report"], meta)
    n_groups = len(meta.get("param_groups", {}))
    passed = (float(loss_err.max()) <= LOSS_TOLERANCE and deltas[worst] <= DELTA_TOLERANCE and lr_err <= 1e-6
              and not groups and unchanged_ok == unchanged)
    summary = (f"loss (max of {num_steps}) {loss_err.max():.2e}  dW max {deltas[worst]:.2e} ({worst})  "
               f"unchanged {unchanged_ok}/{unchanged} bit-identical  lr {lr_err:.1e}  "
               f"groups {n_groups - len(groups)}/{n_groups}")
    for g in groups[:10]:
        summary += f"\n    param group mismatch: {g}"
    results = {"loss": loss_err.tolist(), "delta": deltas, "worst": worst, "lr": lr_err, "groups": groups,
               "unchanged": (unchanged_ok, unchanged)}
    return results, passed, summary


def check_train_steps(path: str) -> tuple[dict[str, Any], bool, str]:
    """-> (results, passed, one-line summary)."""
    return compare(np.load(path), run_train_steps(path))
