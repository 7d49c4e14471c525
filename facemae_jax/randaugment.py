"""RandAugment (timm ``rand-...`` policies) and the random resized crop + flip, on device, batched over clips.

Why: the PIL RandAugment of ``data_pipelines.transforms`` costs ~28 ms per 16-frame clip on one host core, about
3x what a core can spend per clip to keep a GPU fed (README "Input pipeline"). Here the same ops run inside the
jit-compiled train step on uint8 clips ``[B, T, H, W, 3]``:

* **sampling** (:func:`sample_ops`) follows timm's ``RandAugment.__call__``: ``n`` ops drawn uniformly with
  replacement, each applied with probability ``p``, magnitude ``clip(N(m, mstd), 0, mmax)`` and a sign per op
  call; one draw per clip, the same op arguments for every frame of the clip (the video reference's rule). The
  randomness is a JAX key (the train step derives it from ``(seed, step)``), so a resumed run draws exactly what
  an uninterrupted one would.
* **ops** reproduce PIL's integer semantics, grouped by how they touch pixels, so every layer costs three passes
  instead of fifteen branches (each clip takes exactly one op per layer; the other two passes are the identity for
  it, and a pass no clip of the batch needs is skipped with ``lax.cond``):

  - 256-entry lookup tables per frame and channel: AutoContrast, Equalize (per-frame histograms, as PIL computes
    them per image), Invert, Posterize, Solarize, SolarizeAdd, Brightness (PIL's blend with black);
  - PIL ``Image.blend(degenerate, image, factor)`` (float32, truncated): Color (degenerate = ITU-R 601 grey with
    PIL's fixed-point weights), Contrast (the rounded mean grey level of the frame), Sharpness (PIL's SMOOTH
    3x3 filter, borders kept);
  - one affine resample with PIL's transform conventions (pixel centres, bicubic with a = -1 or bilinear / nearest,
    edge-clamped taps, fill (128, 128, 128) where the source point lies outside the frame): Rotate, ShearX/Y,
    TranslateX/YRel. The identity matrix samples pixel centres exactly, so clips without a geometric op pass
    unchanged.

  Measured against PIL on synthetic face frames (tests/test_randaugment.py, fixed magnitude): the lookup-table and
  blend ops agree exactly or within a few thousandths of a grey level on average (float32 vs C rounding at
  integer boundaries); the geometric ops differ by well under one grey level on average (float32 vs double
  coordinates). The per-op numbers are in the test's table.

* :func:`resized_crop_flip` is FINETUNING §3 steps 6-7 (torch bilinear, ``align_corners=False``, no antialias, then
  a horizontal flip) for host-sampled boxes. It runs *after* RandAugment, as in the reference, and returns float
  pixels: the reference resizes normalised float tensors, so no rounding happens here either.

No host-side PIL fidelity is lost: ``data.rand_augment_on = 'host'`` keeps the PIL path (the default).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from data_pipelines import transforms

FILL = 128.0  # timm's fill colour (128, 128, 128) for geometric ops
_LUT_OPS = ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd", "Brightness")
_BLEND_OPS = ("Color", "Contrast", "Sharpness")
_AFFINE_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@dataclasses.dataclass(frozen=True)
class DeviceRandAugment:
    """A parsed policy plus the geometric-op settings of :class:`data_pipelines.transforms.RandAugment`."""

    policy: transforms.RandAugmentConfig
    interpolation: str = "bicubic"
    translate_pct: float = 0.45

    @classmethod
    def from_string(cls, config: str, interpolation: str = "bicubic", translate_pct: float = 0.45):
        if interpolation not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"RandAugment interpolation must be bicubic, bilinear or nearest, got {interpolation!r}")
        return cls(transforms.parse_rand_augment(config), interpolation, float(translate_pct))

    @property
    def ops(self) -> tuple[str, ...]:
        return self.policy.ops

    def __call__(self, video: jax.Array, key: jax.Array) -> jax.Array:
        return apply_ops(video, sample_ops(key, self, video.shape[0]), self)


# ---------------------------------------------------------------------------------------------------------------
# Sampling (timm RandAugment.__call__ / AugmentOp.__call__ / _LEVEL_TO_ARG, one draw per clip)
# ---------------------------------------------------------------------------------------------------------------


def sample_ops(key: jax.Array, ra: DeviceRandAugment, batch: int) -> dict[str, jax.Array]:
    """-> {"op": int32 [B, n] index into ``ra.ops``, "applied": bool [B, n], "magnitude": float32 [B, n],
    "negate": bool [B, n]}. ``magnitude`` is already clipped to ``[0, mmax]``."""
    cfg = ra.policy
    # one uniform draw per decision (a single RNG call: XLA compiles threefry once, not four times)
    u = jax.random.uniform(key, (4, batch, cfg.num_layers), jnp.float32)
    op = jnp.minimum(jnp.floor(u[0] * len(cfg.ops)), len(cfg.ops) - 1).astype(jnp.int32)  # uniform, with replacement
    # timm skips an op when random() > prob, i.e. applies it with probability prob
    applied = u[1] <= cfg.prob if cfg.prob < 1.0 else jnp.ones(u[1].shape, bool)
    magnitude = jnp.full(u[2].shape, cfg.magnitude, jnp.float32)
    if cfg.magnitude_std > 0:  # Gaussian by inverse CDF; u is in [0, 1), so keep it off 0
        normal = jnp.sqrt(2.0) * jax.lax.erf_inv(2.0 * jnp.maximum(u[2], 1e-7) - 1.0)
        magnitude = magnitude + cfg.magnitude_std * normal
    magnitude = jnp.clip(magnitude, 0.0, cfg.magnitude_max)
    negate = u[3] > 0.5  # timm _randomly_negate: -v if random() > 0.5
    return {"op": op, "applied": applied, "magnitude": magnitude, "negate": negate}


def op_argument(name: str, magnitude: jax.Array, negate: jax.Array, ra: DeviceRandAugment) -> jax.Array:
    """The op's argument for ``magnitude`` (FINETUNING §3.1 table), elementwise; 0 for ops without one."""
    level = magnitude / transforms.MAX_LEVEL
    sign = jnp.where(negate, -1.0, 1.0)
    base = name.removesuffix("Increasing")
    increasing = name.endswith("Increasing")
    if name in ("AutoContrast", "Equalize", "Invert"):
        return jnp.zeros_like(magnitude)
    if name == "Rotate":
        return sign * level * 30.0
    if base == "Posterize":  # bits kept
        bits = jnp.floor(level * 4)
        return 4 - bits if increasing else bits
    if base == "Solarize":  # threshold
        t = jnp.floor(level * 256)
        return 256 - t if increasing else t
    if name == "SolarizeAdd":
        return jnp.floor(level * 110)
    if name in ("ShearX", "ShearY"):
        return sign * level * 0.3
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * level * ra.translate_pct
    if base in ("Color", "Contrast", "Brightness", "Sharpness"):  # enhancement factor
        return 1.0 + sign * level * 0.9 if increasing else level * 1.8 + 0.1
    raise ValueError(f"unknown RandAugment op {name!r}")


def layer_arguments(draw: dict[str, jax.Array], layer: int, ra: DeviceRandAugment) -> tuple[jax.Array, jax.Array]:
    """(op index or -1 when not applied, argument) per clip for one layer -> (int32 [B], float32 [B])."""
    op = draw["op"][:, layer]
    m, neg = draw["magnitude"][:, layer], draw["negate"][:, layer]
    args = jnp.stack([op_argument(name, m, neg, ra) for name in ra.ops], axis=-1)  # [B, num_ops]
    arg = jnp.take_along_axis(args, op[:, None], axis=-1)[:, 0]
    return jnp.where(draw["applied"][:, layer], op, -1), arg


def _is(op: jax.Array, ra: DeviceRandAugment, *bases: str) -> jax.Array:
    """bool [B]: the clip's op (index into ra.ops) is one of ``bases`` (suffix 'Increasing' ignored)."""
    hits = [i for i, name in enumerate(ra.ops) if name.removesuffix("Increasing") in bases]
    if not hits:
        return jnp.zeros(op.shape, bool)
    return jnp.isin(op, jnp.asarray(hits, jnp.int32))


# ---------------------------------------------------------------------------------------------------------------
# Pass 1: lookup tables (per frame and channel)
# ---------------------------------------------------------------------------------------------------------------


def _histograms(video: jax.Array) -> jax.Array:
    """uint8 [B, T, H, W, 3] -> int32 [B, T, 3, 256] (PIL ``Image.histogram`` of each frame)."""
    b, t, h, w, c = video.shape
    flat = jnp.moveaxis(video, -1, 2).reshape(b * t * c, h * w).astype(jnp.int32)
    counts = jax.vmap(lambda v: jnp.zeros(256, jnp.int32).at[v].add(1))(flat)
    return counts.reshape(b, t, c, 256)


def _equalize_tables(hist: jax.Array) -> jax.Array:
    """PIL ``ImageOps.equalize``: step = (n - count of the last non-empty bin) // 255 (Pillow >= 10; older
    releases divided by 256); lut[i] = (step // 2 +
    cumsum before i) // step; identity when step is 0 (one colour or too few pixels)."""
    levels = jnp.arange(256)
    last = jnp.max(jnp.where(hist > 0, levels, -1), axis=-1, keepdims=True)
    last_count = jnp.take_along_axis(hist, jnp.maximum(last, 0), axis=-1)
    step = (jnp.sum(hist, axis=-1, keepdims=True) - last_count) // 255
    before = jnp.cumsum(hist, axis=-1) - hist
    lut = (step // 2 + before) // jnp.maximum(step, 1)
    return jnp.where(step > 0, jnp.clip(lut, 0, 255), levels)


def _autocontrast_tables(video: jax.Array) -> jax.Array:
    """PIL ``ImageOps.autocontrast`` (cutoff 0): per frame and channel, [lo, hi] -> [0, 255]; int(i * scale +
    offset) in exact integer arithmetic; identity when hi <= lo."""
    lo = jnp.min(video, axis=(2, 3)).astype(jnp.int32)[..., None]  # [B, T, 3, 1]
    hi = jnp.max(video, axis=(2, 3)).astype(jnp.int32)[..., None]
    levels = jnp.arange(256, dtype=jnp.int32)
    lut = jnp.clip(((levels - lo) * 255) // jnp.maximum(hi - lo, 1), 0, 255)
    return jnp.where(hi > lo, lut, levels)


def _pointwise_tables(op: jax.Array, arg: jax.Array, ra: DeviceRandAugment) -> jax.Array:
    """Tables of the ops that do not look at image statistics -> int32 [B, 256] (identity for other ops)."""
    i = jnp.arange(256, dtype=jnp.int32)[None, :]
    a = arg[:, None]
    bits = a.astype(jnp.int32)
    posterize = jnp.where(bits >= 8, i, i & ~((1 << jnp.clip(8 - bits, 0, 8)) - 1))
    solarize = jnp.where(i < a.astype(jnp.int32), i, 255 - i)
    solarize_add = jnp.where(i < 128, jnp.minimum(255, i + a.astype(jnp.int32)), i)
    brightness = _blend(jnp.zeros((), jnp.float32), i.astype(jnp.float32), a).astype(jnp.int32)
    table = i
    for bases, t in ((("Invert",), 255 - i), (("Posterize",), posterize), (("Solarize",), solarize),
                     (("SolarizeAdd",), solarize_add), (("Brightness",), brightness)):  # fmt: skip
        table = jnp.where(_is(op, ra, *bases)[:, None], t, table)
    return jnp.broadcast_to(table, (op.shape[0], 256))


def _apply_tables(video: jax.Array, tables: jax.Array) -> jax.Array:
    """uint8 [B, T, H, W, 3], int tables [B, T, 3, 256] -> uint8 [B, T, H, W, 3]."""
    b, t, _, _, c = video.shape
    offset = (jnp.arange(b * t * c, dtype=jnp.int32) * 256).reshape(b, t, 1, 1, c)
    return jnp.take(tables.astype(jnp.uint8).reshape(-1), video.astype(jnp.int32) + offset, mode="clip")


def lut_pass(video: jax.Array, op: jax.Array, arg: jax.Array, ra: DeviceRandAugment) -> jax.Array:
    b, t = video.shape[:2]
    tables = jnp.broadcast_to(_pointwise_tables(op, arg, ra)[:, None, None, :], (b, t, 3, 256))
    is_auto = _is(op, ra, "AutoContrast")[:, None, None, None]
    tables = jnp.where(is_auto, _autocontrast_tables(video), tables)
    is_eq = _is(op, ra, "Equalize")
    tables = jax.lax.cond(
        jnp.any(is_eq),
        lambda: jnp.where(is_eq[:, None, None, None], _equalize_tables(_histograms(video)), tables),
        lambda: tables,
    )
    return _apply_tables(video, tables)


# ---------------------------------------------------------------------------------------------------------------
# Pass 2: PIL Image.blend(degenerate, image, factor)
# ---------------------------------------------------------------------------------------------------------------


def _blend(degenerate: jax.Array, image: jax.Array, factor: jax.Array) -> jax.Array:
    """PIL ``ImagingBlend``: ``in1 + alpha * (in2 - in1)`` in float32, clipped to [0, 255], truncated."""
    return jnp.floor(jnp.clip(degenerate + factor * (image - degenerate), 0.0, 255.0))


def _grey(video_int: jax.Array) -> jax.Array:
    """PIL RGB -> L: (19595 R + 38470 G + 7471 B + 0x8000) >> 16 -> int32 [..., 1]."""
    r, g, b = video_int[..., 0], video_int[..., 1], video_int[..., 2]
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16)[..., None]


def _smooth(video: jax.Array) -> jax.Array:
    """PIL ``ImageFilter.SMOOTH`` (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1, / 13, rounded) with the one-pixel border
    copied from the input, on float32 [B, T, H, W, 3]."""
    padded = jnp.pad(video, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = video.shape[2:4]
    total = sum(padded[:, :, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) + 4 * video
    smoothed = jnp.clip(jnp.floor(total / 13.0 + 0.5), 0, 255)
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]
    inside = ((rows > 0) & (rows < h - 1) & (cols > 0) & (cols < w - 1))[None, None, :, :, None]
    return jnp.where(inside, smoothed, video)


def blend_pass(video: jax.Array, op: jax.Array, arg: jax.Array, ra: DeviceRandAugment) -> jax.Array:
    x = video.astype(jnp.int32)
    grey = _grey(x)  # [B, T, H, W, 1]
    h, w = video.shape[2:4]
    # ImageEnhance.Contrast: int(mean of the L image + 0.5)
    mean = jnp.floor(jnp.sum(grey, axis=(2, 3, 4), keepdims=True).astype(jnp.float32) / (h * w) + 0.5)
    xf = x.astype(jnp.float32)
    is_color = _is(op, ra, "Color")[:, None, None, None, None]
    is_contrast = _is(op, ra, "Contrast")[:, None, None, None, None]
    is_sharp = _is(op, ra, "Sharpness")
    degenerate = jnp.where(is_color, grey.astype(jnp.float32), jnp.where(is_contrast, mean, xf))
    degenerate = jax.lax.cond(
        jnp.any(is_sharp),
        lambda: jnp.where(is_sharp[:, None, None, None, None], _smooth(xf), degenerate),
        lambda: degenerate,
    )
    uses = _is(op, ra, *_BLEND_OPS)
    factor = jnp.where(uses, arg, 1.0)[:, None, None, None, None]
    return _blend(degenerate, xf, factor).astype(jnp.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Pass 3: affine resample with PIL's conventions
# ---------------------------------------------------------------------------------------------------------------


def _affine_matrices(op: jax.Array, arg: jax.Array, ra: DeviceRandAugment, h: int, w: int) -> jax.Array:
    """PIL's inverse affine coefficients (a, b, c, d, e, f): output pixel centre (x, y) samples the input at
    (a x + b y + c, d x + e y + f) -> float32 [B, 6]; identity for clips without a geometric op."""
    one, zero = jnp.ones_like(arg), jnp.zeros_like(arg)
    identity = jnp.stack([one, zero, zero, zero, one, zero], axis=-1)
    # Image.rotate(angle): matrix of -angle about the centre (w/2, h/2), PIL rounds cos/sin to 15 digits
    theta = -jnp.deg2rad(arg)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    cx, cy = w / 2.0, h / 2.0
    rotate = jnp.stack([cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy], axis=-1)
    shear_x = jnp.stack([one, arg, zero, zero, one, zero], axis=-1)
    shear_y = jnp.stack([one, zero, zero, arg, one, zero], axis=-1)
    translate_x = jnp.stack([one, zero, arg * w, zero, one, zero], axis=-1)
    translate_y = jnp.stack([one, zero, zero, zero, one, arg * h], axis=-1)
    m = identity
    for name, mat in (("Rotate", rotate), ("ShearX", shear_x), ("ShearY", shear_y), ("TranslateXRel", translate_x),
                      ("TranslateYRel", translate_y)):  # fmt: skip
        m = jnp.where(_is(op, ra, name)[:, None], mat, m)
    return m


def _cubic_weights(d: jax.Array) -> list[jax.Array]:
    """PIL Geometry.c BICUBIC (a = -1): weights of the taps at -1, 0, +1, +2 for fractional offset d."""
    return [-d + 2 * d**2 - d**3, 1 - 2 * d**2 + d**3, d + d**2 - d**3, -(d**2) + d**3]


def affine_pass(video: jax.Array, matrices: jax.Array, interpolation: str = "bicubic") -> jax.Array:
    """uint8 [B, T, H, W, 3], float32 [B, 6] -> uint8 (PIL ``Image.transform(AFFINE, resample, fillcolor=128)``)."""
    b, t, h, w, c = video.shape
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) + 0.5, jnp.arange(w, dtype=jnp.float32) + 0.5,
                          indexing="ij")  # fmt: skip
    m = matrices[:, :, None, None]
    sx = m[:, 0] * xs + m[:, 1] * ys + m[:, 2]  # [B, H, W]
    sy = m[:, 3] * xs + m[:, 4] * ys + m[:, 5]
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    flat = video.reshape(b, t, h * w, c)

    def tap(iy, ix):  # int32 [B, H, W] each -> float32 [B, T, H, W, C], edge-clamped
        idx = (jnp.clip(iy, 0, h - 1) * w + jnp.clip(ix, 0, w - 1)).reshape(b, 1, h * w, 1)
        return jnp.take_along_axis(flat, idx, axis=2).reshape(b, t, h, w, c).astype(jnp.float32)

    if interpolation == "nearest":  # PIL: FLOOR(xin), FLOOR(yin)
        out = tap(jnp.floor(sy).astype(jnp.int32), jnp.floor(sx).astype(jnp.int32))
    else:
        fx, fy = sx - 0.5, sy - 0.5
        x0, y0 = jnp.floor(fx), jnp.floor(fy)
        dx, dy = (fx - x0)[:, None, :, :, None], (fy - y0)[:, None, :, :, None]
        x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
        if interpolation == "bilinear":
            offsets, wx, wy = (0, 1), [1 - dx, dx], [1 - dy, dy]
        else:
            offsets, wx, wy = (-1, 0, 1, 2), _cubic_weights(dx), _cubic_weights(dy)
        out = 0.0
        for j, oy in enumerate(offsets):
            row = sum(wx[i] * tap(y0 + oy, x0 + ox) for i, ox in enumerate(offsets))
            out = out + wy[j] * row
        out = jnp.floor(jnp.clip(out, 0.0, 255.0))
    out = jnp.where(inside[:, None, :, :, None], out, FILL)
    return jnp.clip(out, 0, 255).astype(jnp.uint8)


# ---------------------------------------------------------------------------------------------------------------
# The whole augmentation
# ---------------------------------------------------------------------------------------------------------------


def apply_layer(video: jax.Array, op: jax.Array, arg: jax.Array, ra: DeviceRandAugment) -> jax.Array:
    """One RandAugment layer: clip i gets op ``ra.ops[op[i]]`` with argument ``arg[i]`` (op -1 = none)."""
    h, w = video.shape[2:4]
    uses_lut, uses_blend, uses_affine = (_is(op, ra, *g) for g in (_LUT_OPS, _BLEND_OPS, _AFFINE_OPS))
    video = jax.lax.cond(jnp.any(uses_lut), lambda v: lut_pass(v, op, arg, ra), lambda v: v, video)
    video = jax.lax.cond(jnp.any(uses_blend), lambda v: blend_pass(v, op, arg, ra), lambda v: v, video)
    matrices = _affine_matrices(op, arg, ra, h, w)
    return jax.lax.cond(jnp.any(uses_affine), lambda v: affine_pass(v, matrices, ra.interpolation), lambda v: v,
                        video)  # fmt: skip


def apply_ops(video: jax.Array, draw: dict[str, jax.Array], ra: DeviceRandAugment) -> jax.Array:
    """uint8 [B, T, H, W, 3] + a draw of :func:`sample_ops` -> uint8 [B, T, H, W, 3]."""
    if video.dtype != jnp.uint8 or video.ndim != 5 or video.shape[-1] != 3:
        raise ValueError(f"device RandAugment: expected uint8 [B, T, H, W, 3], got {video.dtype} {video.shape}")
    layers = [layer_arguments(draw, layer, ra) for layer in range(ra.policy.num_layers)]
    ops = jnp.stack([op for op, _ in layers])  # [n, B]
    args = jnp.stack([arg for _, arg in layers])

    def one_layer(v, layer):  # scanned: the layer is compiled once, not n times
        return apply_layer(v, layer[0], layer[1], ra), None

    return jax.lax.scan(one_layer, video, (ops, args))[0]


def resized_crop_flip(video: jax.Array, boxes: jax.Array, flip: jax.Array, size: int) -> jax.Array:
    """Random resized crop + horizontal flip for host-sampled boxes (FINETUNING §3 steps 6-7).

    ``video: uint8 [B, T, H, W, 3]``, ``boxes: int32 [B, 4]`` (top, left, height, width), ``flip: bool [B]`` ->
    float32 [B, T, size, size, 3] in 0..255 (not rounded: the reference interpolates floats). Bilinear as torch
    ``interpolate(align_corners=False)``: source ``(dst + 0.5) * in/out - 0.5``, clamped at 0, upper tap clamped to
    the crop's last pixel.
    """
    b, t, h, w, c = video.shape
    top, left, bh, bw = (boxes[:, i].astype(jnp.float32) for i in range(4))

    def taps(start, extent, out_size):  # -> (lower index, upper index, weight of upper) each [B, out]
        dst = jnp.arange(out_size, dtype=jnp.float32)[None, :]
        src = jnp.maximum((dst + 0.5) * (extent[:, None] / out_size) - 0.5, 0.0)
        i0 = jnp.floor(src)
        lam = src - i0
        i1 = jnp.minimum(i0 + 1, extent[:, None] - 1)
        return (i0 + start[:, None]).astype(jnp.int32), (i1 + start[:, None]).astype(jnp.int32), lam

    y0, y1, ly = taps(top, bh, size)
    x0, x1, lx = taps(left, bw, size)
    x0, x1, lx = (jnp.where(flip[:, None], v[:, ::-1], v) for v in (x0, x1, lx))
    v = video.astype(jnp.float32)
    take_rows = jax.vmap(lambda img, i: jnp.take(img, i, axis=1))  # img [T, H, W, C], i [S]
    take_cols = jax.vmap(lambda img, i: jnp.take(img, i, axis=2))
    ly_, lx_ = ly[:, None, :, None, None], lx[:, None, None, :, None]
    rows = take_rows(v, y0) * (1 - ly_) + take_rows(v, y1) * ly_  # [B, T, S, W, C]
    return take_cols(rows, x0) * (1 - lx_) + take_cols(rows, x1) * lx_
