"""Reconstruction targets and the pre-training loss (PRETRAINING.md §3, QUIRKS Q19).

Target per token = its pixels in [0, 1], normalised per token *and per colour channel* over the
``tubelet x patch x patch`` values (unbiased std + 1e-6), flattened ``(p0, p1, p2, c)`` with the channel fastest.
MAE-DFER additionally replaces the second frame of each tubelet by its difference to the first (after that
normalisation): the appearance + motion target. Everything runs on device under ``stop_gradient``.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def patchify(pixels: jax.Array, patch: int, tubelet: int) -> jax.Array:
    """``[B, T, H, W, C]`` -> ``[B, N, tubelet*patch*patch, C]``; pixel index q = (p0*patch + p1)*patch + p2."""
    return einops.rearrange(pixels, "b (t p0) (h p1) (w p2) c -> b (t h w) (p0 p1 p2) c", p0=tubelet, p1=patch,
                            p2=patch)


def normalized_patch_targets(pixels01: jax.Array, patch: int, tubelet: int, frame_diff: bool,
                             eps: float = 1e-6) -> jax.Array:
    """Targets for *all* tokens: ``pixels01 [B, T, H, W, C]`` in [0, 1] -> ``[B, N, tubelet*patch*patch*C]``."""
    p = patchify(pixels01.astype(jnp.float32), patch, tubelet)  # [B, N, Q, C]
    mu = p.mean(axis=2, keepdims=True)
    sd = jnp.sqrt(jnp.var(p, axis=2, ddof=1, keepdims=True))
    p = (p - mu) / (sd + eps)
    if frame_diff:
        # group == tubelet (Q19): keep frame 0 of each tubelet, later frames become differences to frame 0.
        b, n, q, c = p.shape
        g = p.reshape(b, n, tubelet, q // tubelet, c)
        g = jnp.concatenate([g[:, :, :1], g[:, :, 1:] - g[:, :, :1]], axis=2)
        p = g.reshape(b, n, q, c)
    b, n, q, c = p.shape
    return jax.lax.stop_gradient(p.reshape(b, n, q * c))


def reconstruction_targets(pixels01: jax.Array, mask_idx: jax.Array, *, patch: int, tubelet: int,
                           frame_diff: bool) -> jax.Array:
    """Targets of the masked tokens in ascending order: ``[B, Nm, D]`` (the decoder output order)."""
    t = normalized_patch_targets(pixels01, patch, tubelet, frame_diff)
    return jnp.take_along_axis(t, mask_idx[..., None], axis=1)


def reconstruction_loss(pred: jax.Array, target: jax.Array, diff_weight: float | None = None) -> jax.Array:
    """Plain MSE over all elements (published); with ``diff_weight`` w: (1-w)*MSE(appearance half) +
    w*MSE(motion half) — only meaningful for tubelet 2 (Q19)."""
    err = jnp.square(pred.astype(jnp.float32) - target)
    if diff_weight is None:
        return err.mean()
    half = err.shape[-1] // 2
    return (1.0 - diff_weight) * err[..., :half].mean() + diff_weight * err[..., half:].mean()


def normalize_video(pixels_uint8: jax.Array, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
    """uint8 ``[..., 3]`` -> ImageNet-normalised float32 (on device; differs from the host numpy formula in the
    last bit only, see golden/README)."""
    x = pixels_uint8.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def denormalize_video(x: jax.Array, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
    """Normalised video -> [0, 1] pixels, exactly as the reference target code (``x*std + mean``)."""
    return x * jnp.asarray(std, x.dtype) + jnp.asarray(mean, x.dtype)
