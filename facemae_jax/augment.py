"""Batch-level augmentation that runs on device inside the train step (FINETUNING.md §3 step 8, §3.2).

Why on device: the input pipeline ships uint8 clips (4x less host->device traffic, no float work in workers), so
everything that needs normalised floats or pairs of samples happens here, under ``jit``:

* ``random_erase``: fills the host-sampled box (``erase_box``: top, left, height, width; zeros = none) with fresh
  N(0, 1) values per pixel, channel and frame, in normalised space — the reference's "pixel" mode.
* ``mixup_cutmix``: timm "batch" mode with the reference's settings. Difference from the reference (QUIRKS Q30):
  the partner of sample i is sample B-1-i of the *global* batch, not of each GPU's local batch; the statistics are
  the same, the exact pairs differ, and results no longer depend on the per-device batch size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def random_erase(x: jax.Array, boxes: jax.Array, rng: jax.Array) -> jax.Array:
    """``x: [B, T, H, W, C]`` normalised, ``boxes: int32 [B, 4]`` -> x with boxes filled by N(0, 1) noise."""
    b, t, h, w, c = x.shape
    top, left, bh, bw = (boxes[:, i][:, None] for i in range(4))
    rows = jnp.arange(h)[None, :]
    cols = jnp.arange(w)[None, :]
    in_r = (rows >= top) & (rows < top + bh)  # [B, H]
    in_c = (cols >= left) & (cols < left + bw)  # [B, W]
    region = (in_r[:, :, None] & in_c[:, None, :])[:, None, :, :, None]  # [B, 1, H, W, 1]
    noise = jax.random.normal(rng, x.shape, x.dtype)
    return jnp.where(region, noise, x)


def mixup_cutmix(
    x: jax.Array,
    targets: jax.Array,
    rng: jax.Array,
    *,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Mix the whole batch with its reverse. ``x: [B, T, H, W, C]``, ``targets: [B, K]`` soft targets.

    With probability ``prob`` the batch is mixed; then CutMix (lambda ~ Beta(cutmix_alpha)) with probability
    ``switch_prob``, else Mixup (lambda ~ Beta(mixup_alpha)). CutMix box: side ``int(H*sqrt(1-lam))``, centre
    uniform, clipped; lambda is then corrected to the kept area. Returns (x, targets, info).
    """
    b, t, h, w, c = x.shape
    k_apply, k_switch, k_mix, k_cut, k_cy, k_cx = jax.random.split(rng, 6)
    use_cutmix = jax.random.uniform(k_switch) < switch_prob if cutmix_alpha > 0 and mixup_alpha > 0 else (
        jnp.asarray(cutmix_alpha > 0))
    lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1.0)
    lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1.0)
    apply = jax.random.uniform(k_apply) < prob

    # CutMix box (timm rand_bbox): cut ratio sqrt(1 - lam), integer box size, uniform centre, clipped
    ratio = jnp.sqrt(1.0 - lam_cut)
    ch = (h * ratio).astype(jnp.int32)
    cw = (w * ratio).astype(jnp.int32)
    cy = jax.random.randint(k_cy, (), 0, h)
    cx = jax.random.randint(k_cx, (), 0, w)
    y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
    x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
    lam_cut_corrected = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w)

    flipped = x[::-1]
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]
    box = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))[None, None, :, :, None]
    x_cut = jnp.where(box, flipped, x)
    x_mix = lam_mix.astype(x.dtype) * x + (1.0 - lam_mix).astype(x.dtype) * flipped

    lam = jnp.where(use_cutmix, lam_cut_corrected, lam_mix)
    lam = jnp.where(apply, lam, 1.0)
    x_out = jnp.where(apply, jnp.where(use_cutmix, x_cut, x_mix), x)
    t_out = lam * targets + (1.0 - lam) * targets[::-1]
    return x_out, t_out, {"mix_lambda": lam, "cutmix": use_cutmix & apply}


def device_video_augment(
    video: jax.Array, crop_box: jax.Array, flip: jax.Array, key: jax.Array, rand_augment, size: int
) -> jax.Array:
    """FINETUNING §3 steps 4, 6, 7 on device (``data.rand_augment_on = 'device'``), in the reference's order.

    ``video: uint8 [B, T, H, W, 3]`` as resized on the host (step 3), ``crop_box: int32 [B, 4]`` and ``flip: bool
    [B]`` sampled on the host -> float32 pixels [B, T, size, size, 3] in 0..255: RandAugment
    (:class:`facemae_jax.randaugment.DeviceRandAugment`, or None to skip it) with randomness from ``key``, then
    the random resized crop and the flip. Normalise, erase and mix afterwards as for host-augmented clips.
    """
    from facemae_jax import randaugment

    if rand_augment is not None:
        video = rand_augment(video, key)
    return randaugment.resized_crop_flip(video, crop_box, flip, size)
