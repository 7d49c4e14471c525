"""Pure step functions (jit-compiled by the trainer): pre-train, fine-tune and eval.

State is a plain dict ``{"params", "opt_state", "step"}`` (orbax saves it as is). Each training step derives its
random key from ``(seed, step)``, so a resumed run draws exactly the keys an uninterrupted one would.

A non-finite loss, gradient or update does not corrupt the parameters: ``metrics["finite"]`` is False and the trainer
stops with a message at the next check, before anything is saved, so the last checkpoint and the parameters in memory
are the last good ones. A non-finite loss or gradient skips the whole update (``lax.cond``: params and optimiser
state stay as they were, no work is done). A finite gradient whose update overflows (far too high a learning rate)
keeps the params; the optimiser state of that step is kept (Adam's moments are averages of finite gradients, so
finite) - reverting it too would need a second copy of both moments and a pass over them, 0.15-0.2 s of a base
fine-tuning step on CPU, for a state that is never saved.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from facemae_jax import augment, targets
from facemae_jax.models.config import ModelConfig
from facemae_jax.models.mae import num_visible_tokens, split_mask


def _finish(state: dict, grads: Any, loss: jax.Array, tx: optax.GradientTransformation, extra: dict) -> tuple:
    grad_norm = optax.global_norm(grads)
    inputs_finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update():
        updates, new_opt = tx.update(grads, state["opt_state"], state["params"])
        # a finite gradient can still give an overflowing update (too high a learning rate): keep the params then.
        # The select fuses into the parameter update itself (the updates are materialised for their norm anyway).
        finite = jnp.isfinite(optax.global_norm(updates))
        new_params = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old),
                                            optax.apply_updates(state["params"], updates), state["params"])
        return new_params, new_opt, finite

    def skip():
        return state["params"], state["opt_state"], jnp.zeros((), bool)

    params, opt_state, finite = jax.lax.cond(inputs_finite, update, skip)
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, **extra}
    return new_state, metrics


def pretrain_inputs(batch: dict, cfg: ModelConfig, frame_diff: bool) -> tuple[jax.Array, jax.Array]:
    """batch {"video": uint8 [B,T,H,W,3], "mask": bool [B,N]} -> (normalised model input, reconstruction targets
    [B, Nm, patch_dim] of the masked tokens). Targets come from the uint8 pixels / 255 (the reference recovers the
    same values as x*std + mean, up to float rounding). Shared by the training and the evaluation step."""
    pixels = batch["video"]
    x = targets.normalize_video(pixels).astype(jnp.dtype(cfg.dtype))
    _, mask_idx = split_mask(batch["mask"], num_visible_tokens(cfg))
    tgt = targets.reconstruction_targets(pixels.astype(jnp.float32) / 255.0, mask_idx, patch=cfg.patch_size,
                                         tubelet=cfg.tubelet_size, frame_diff=frame_diff)
    return x, tgt


def make_pretrain_step(model, cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, *,
                       frame_diff: bool, diff_weight: float | None = None) -> Callable:
    """batch: {"video": uint8 [B,T,H,W,3], "mask": bool [B,N]} -> (state, metrics)."""

    def step(state, batch):
        rng = jax.random.fold_in(jax.random.key(seed), state["step"])
        x, tgt = pretrain_inputs(batch, cfg, frame_diff)

        def loss_fn(params):
            pred = model.apply({"params": params}, x, batch["mask"], train=True, rngs={"dropout": rng})
            return targets.reconstruction_loss(pred, tgt, diff_weight)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        return _finish(state, grads, loss, tx, {"zero_loss": zero_prediction_loss(tgt, diff_weight)})

    return step


def zero_prediction_loss(target: jax.Array, diff_weight: float | None = None) -> jax.Array:
    """The loss of predicting 0 for every masked token: the trivial baseline of per-patch-normalised targets.

    A pre-training loss that stays at this value means the model has learned nothing beyond the targets' mean
    (0 by construction); the trainer logs ``loss / zero_loss`` so that is visible at a glance."""
    return targets.reconstruction_loss(jnp.zeros_like(target), target, diff_weight)


def make_finetune_step(model, cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, *,
                       task: str = "classification", label_smoothing: float = 0.1, mixup: dict | None = None,
                       regression_loss: str = "mse", rand_augment=None) -> Callable:
    """batch: {"video": uint8, "label": int32 [B] | float32 [B,K], "erase_box": int32 [B,4]} -> (state, metrics).

    A batch with "crop_box" / "flip" (``data.rand_augment_on='device'``) is augmented here first: ``rand_augment``
    (a ``randaugment.DeviceRandAugment`` or None), random resized crop, flip (``augment.device_video_augment``)."""
    dtype = jnp.dtype(cfg.dtype)

    def step(state, batch):
        rng = jax.random.fold_in(jax.random.key(seed), state["step"])
        k_erase, k_mix, k_drop = jax.random.split(rng, 3)
        video = batch["video"]
        if "crop_box" in batch:  # its own key, so host-augmented runs keep their exact random streams
            video = augment.device_video_augment(video, batch["crop_box"], batch["flip"], jax.random.fold_in(rng, 3),
                                                 rand_augment, cfg.img_size)
        x = targets.normalize_video(video)
        if "erase_box" in batch:
            x = augment.random_erase(x, batch["erase_box"], k_erase)
        extra = {}
        if task == "classification":
            # timm's smoothing: off = eps / K, on = 1 - eps + eps / K (= optax.smooth_labels of the one-hot)
            y = optax.smooth_labels(jax.nn.one_hot(batch["label"], cfg.num_classes, dtype=jnp.float32),
                                    label_smoothing)
            if mixup:
                x, y, info = augment.mixup_cutmix(x, y, k_mix, **mixup)
                extra["mix_lambda"] = info["mix_lambda"]
        else:
            y = batch["label"].astype(jnp.float32)
        x = x.astype(dtype)

        def loss_fn(params):
            out = model.apply({"params": params}, x, train=True, rngs={"dropout": k_drop})
            if task == "classification":
                # soft-target cross entropy, mean over the batch (timm SoftTargetCrossEntropy)
                return jnp.mean(optax.softmax_cross_entropy(out.astype(jnp.float32), y))
            if regression_loss == "mse":
                return jnp.mean(jnp.square(out - y))
            if regression_loss == "l1":
                return jnp.mean(jnp.abs(out - y))
            raise ValueError(f"unknown regression_loss {regression_loss!r}")

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        return _finish(state, grads, loss, tx, extra)

    return step


def make_eval_step(model, cfg: ModelConfig) -> Callable:
    """(params, batch) -> per-view logits (classification; softmax + view averaging happen on the host) or
    predictions (regression)."""
    dtype = jnp.dtype(cfg.dtype)

    def step(params, batch):
        x = targets.normalize_video(batch["video"]).astype(dtype)
        return model.apply({"params": params}, x, train=False).astype(jnp.float32)

    return step


def make_pretrain_eval_step(model, cfg: ModelConfig, *, frame_diff: bool) -> Callable:
    """(params, batch) -> (loss, zero-prediction loss, predictions) without dropout, for the reconstruction
    figure and the eval loss."""

    def step(params, batch):
        x, tgt = pretrain_inputs(batch, cfg, frame_diff)
        pred = model.apply({"params": params}, x, batch["mask"], train=False)
        return targets.reconstruction_loss(pred, tgt), zero_prediction_loss(tgt), pred

    return step
