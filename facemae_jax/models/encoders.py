"""The three encoder backbones: joint ViT (VideoMAE), LGI-Former (MAE-DFER) and TPSBT (SVFAP).

A backbone maps a video to its final token tensor, for all tokens (fine-tuning) or for the visible tokens only
(pre-training, ``vis_idx`` given). The classifier and the pre-training wrapper subclass these, so the fine-tune
parameters sit at the top level of the tree (``patch_embed``, ``blocks_3``, ...) exactly as in the reference
state_dict, and the pre-train ones under ``encoder/``.

Token order everywhere is the raster order ``n = t*H'*W' + h*W' + w`` unless a docstring says otherwise.
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from facemae_jax.models.config import ModelConfig
from facemae_jax.models.layers import (
    Attention,
    Block,
    CrossAttention,
    DropPath,
    Inits,
    Mlp,
    PatchEmbed,
    _p,
    drop_path_rates,
    gather_tokens,
    layer_norm,
    remat_block,
    sinusoid_table,
    torch_default_uniform,
    trunc_normal_abs,
)


def _dtype(cfg: ModelConfig) -> Any:
    return jnp.dtype(cfg.dtype)


class Backbone(nn.Module):
    """Patch embedding + fixed position table shared by all backbones."""

    cfg: ModelConfig

    @property
    def inits(self) -> Inits:
        return Inits.for_mode(self.cfg.mode)

    def setup(self):
        c = self.cfg
        self.patch_embed = PatchEmbed(c.embed_dim, c.patch_size, c.tubelet_size, c.in_chans, _dtype(c))

    def embed(self, video: jax.Array) -> jax.Array:
        """``[B, T, H, W, 3]`` -> ``[B, N, C]`` patch tokens + position table."""
        c = self.cfg
        if video.shape[1:] != (c.num_frames, c.img_size, c.img_size, c.in_chans):
            raise ValueError(
                f"video shape {video.shape[1:]} != model input (T, H, W, C) = "
                f"{(c.num_frames, c.img_size, c.img_size, c.in_chans)} (channels-last)"
            )
        x = self.patch_embed(video.astype(_dtype(c)))
        return x + jnp.asarray(sinusoid_table(c.num_tokens, c.embed_dim), x.dtype)


# ------------------------------------------------------------------------------------------------------------
# Joint ViT (ARCHITECTURE §2)
# ------------------------------------------------------------------------------------------------------------


class ViT(Backbone):
    def setup(self):
        super().setup()
        c = self.cfg
        rates = drop_path_rates(c.drop_path_rate, c.depth)
        self.blocks = [
            remat_block(Block, c.remat, (2,))(c.embed_dim, c.num_heads, c.mlp_ratio, self.inits.dense, rates[i],
                                              c.qkv_bias, _dtype(c), c.attention_impl)
            for i in range(c.depth)
        ]

    def encode(self, video: jax.Array, vis_idx: jax.Array | None = None, train: bool = False) -> jax.Array:
        """-> ``[B, N or Nv, C]`` raster order."""
        x = self.embed(video)
        if vis_idx is not None:
            x = gather_tokens(x, vis_idx)
        for blk in self.blocks:
            x = blk(x, not train)  # positional: static under remat
        return x


# ------------------------------------------------------------------------------------------------------------
# LGI-Former (ARCHITECTURE §3)
# ------------------------------------------------------------------------------------------------------------


class LGBlock(nn.Module):
    """Local-global block on ``x: [B*R, S, C]`` (region token at position 0 of each region).

    Steps (published flags, ARCHITECTURE §3.2): 1 intra-region self-attention; 2 self-attention among the R region
    tokens of a sample; 3 every local token cross-attends to its sample's R (updated) region tokens; 4 MLP.
    Updates are functional (QUIRKS Q15). DropPath: per (sample, region) in steps 1/4 and per sample in 2/3 as the
    reference (Q13), or per sample everywhere with ``drop_path_per_sample``.
    """

    cfg: ModelConfig
    drop_path: float
    init: Any

    @nn.compact
    def __call__(self, x: jax.Array, batch: int, deterministic: bool = True) -> jax.Array:
        c = self.cfg
        dt = _dtype(c)
        r = x.shape[0] // batch
        group14 = r if c.drop_path_per_sample else 1
        dp = DropPath(self.drop_path)

        def attn(name):
            return CrossAttention(c.embed_dim, c.num_heads, self.init, c.qkv_bias, dt, c.attention_impl, name=name)

        first = attn("first_attn")
        if c.share_all:
            second = third = first
        else:
            second = None if c.no_second else attn("second_attn")
            third = None if c.no_third else (first if c.share_first_third else attn("third_attn"))

        # step 1
        if c.first_attn_type == "self":
            x = x + dp(first(layer_norm("first_attn_norm0", dt)(x)), deterministic, group14)
        else:  # only the region token reads its local tokens
            q = layer_norm("first_attn_norm0", dt)(x[:, :1])
            kv = layer_norm("first_attn_norm1", dt)(x[:, 1:])
            x = jnp.concatenate([x[:, :1] + dp(first(q, kv), deterministic, group14), x[:, 1:]], axis=1)
        # step 2
        if not c.no_second:
            m = x[:, 0].reshape(batch, r, -1)
            m = m + dp(second(layer_norm("second_attn_norm0", dt)(m)), deterministic)
            x = jnp.concatenate([m.reshape(batch * r, 1, -1), x[:, 1:]], axis=1)
        # step 3
        if not c.no_third:
            if c.third_attn_type == "cross":
                s = x.shape[1]
                z = x[:, 1:].reshape(batch, r * (s - 1), -1)
                m = x[:, 0].reshape(batch, r, -1)
                upd = third(layer_norm("third_attn_norm0", dt)(z), layer_norm("third_attn_norm1", dt)(m))
                z = z + dp(upd, deterministic)
                x = jnp.concatenate([x[:, :1], z.reshape(batch * r, s - 1, -1)], axis=1)
            else:
                x = x + dp(third(layer_norm("third_attn_norm0", dt)(x)), deterministic, group14)
        # step 4
        mlp = Mlp(int(c.embed_dim * c.mlp_ratio), c.embed_dim, self.init, dt, name="mlp")
        return x + dp(mlp(layer_norm("norm2", dt)(x)), deterministic, group14)


class LGIFormer(Backbone):
    def setup(self):
        super().setup()
        c = self.cfg
        if c.share_all and c.share_first_third:
            raise ValueError("share_all and share_first_third are exclusive")
        tok_init = trunc_normal_abs(0.02, 0.02) if c.mode == "pretrain" else trunc_normal_abs(0.02)  # Q17a
        self.lg_region_tokens = self.param(
            "lg_region_tokens", _p(tok_init, (None, "embed")), (c.num_regions, c.embed_dim)
        )
        rates = drop_path_rates(c.drop_path_rate, c.depth)
        block = remat_block(LGBlock, c.remat, (2, 3))
        self.blocks = [block(c, rates[i], self.inits.dense) for i in range(c.depth)]

    def regions_all(self, x: jax.Array) -> jax.Array:
        """``[B, N, C]`` raster -> ``[B, R, L, C]`` (region r = (it*nh+ih)*nw+iw, local l = (a*rh+b)*rw+c)."""
        c = self.cfg
        nt, nh, nw = c.region_counts
        rt, rh, rw = c.region_size
        return einops.rearrange(x, "b (nt rt nh rh nw rw) c -> b (nt nh nw) (rt rh rw) c", nt=nt, rt=rt, nh=nh, rh=rh,
                                nw=nw, rw=rw)

    def regions_visible(self, xv: jax.Array) -> jax.Array:
        """Visible tokens ``[B, Nv, C]`` (raster order, tube-window mask) -> ``[B, R, rt*k, C]``.

        Pure reshape as the reference (ARCHITECTURE §3.4): valid only if every (frame, band) holds exactly k
        visible tokens and bands span the full width; ``check_lgi_mask`` enforces that on the host (Q1).
        """
        c = self.cfg
        nt, nh, nw = c.region_counts
        rt = c.region_size[0]
        if nw != 1:
            raise ValueError(f"LGI pre-training needs full-width regions; region size {c.region_size} grid {c.grid}")
        b, nv, ch = xv.shape
        k = nv // (nt * rt * nh)
        if k * nt * rt * nh != nv:
            raise ValueError(f"{nv} visible tokens cannot be split evenly over {nt * rt} frames x {nh} bands")
        return einops.rearrange(xv, "b (nt rt nh k) c -> b (nt nh) (rt k) c", nt=nt, rt=rt, nh=nh, k=k)

    def run_blocks(self, regions: jax.Array, train: bool) -> jax.Array:
        """``[B, R, L, C]`` -> ``[B, R, 1+L, C]`` after prepending region tokens and all LG blocks."""
        b, r, local, ch = regions.shape
        tok = jnp.broadcast_to(self.lg_region_tokens.astype(regions.dtype)[None, :, None, :], (b, r, 1, ch))
        x = jnp.concatenate([tok, regions], axis=2).reshape(b * r, 1 + local, ch)
        for blk in self.blocks:
            x = blk(x, b, not train)  # positional: static under remat
        return x.reshape(b, r, 1 + local, ch)

    def encode(self, video: jax.Array, vis_idx: jax.Array | None = None, train: bool = False) -> jax.Array:
        x = self.embed(video)
        if vis_idx is None:
            return self.run_blocks(self.regions_all(x), train)
        return self.run_blocks(self.regions_visible(gather_tokens(x, vis_idx)), train)

    def region_major_to_raster(self, x: jax.Array) -> jax.Array:
        """Pre-train output ``[B, Nv, C]`` in region-major order (it, band, a, j) -> raster (it, a, band, j) (Q2)."""
        c = self.cfg
        nt, nh, _ = c.region_counts
        rt = c.region_size[0]
        return einops.rearrange(x, "b (nt nh rt k) c -> b (nt rt nh k) c", nt=nt, nh=nh, rt=rt)


# ------------------------------------------------------------------------------------------------------------
# TPSBT (ARCHITECTURE §4)
# ------------------------------------------------------------------------------------------------------------


class SpatialBottleneck(nn.Module):
    """Soft assignment of the P tokens of each frame to K bottleneck tokens (reference ``SpatialAttention``)."""

    dim: int
    num_tokens: int
    hidden: int
    frames: int
    init: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x: [B, T*P, C]`` -> ``[B, T*K, C]`` (index t*K + k)."""
        b, tp, ch = x.shape
        t = self.frames
        p = tp // t
        a = Mlp(self.hidden, self.num_tokens, self.init, self.dtype, out_axis=None, name="mlp")(
            layer_norm("norm", self.dtype)(x)
        )
        a = a.reshape(b * t, p, self.num_tokens).transpose(0, 2, 1)
        a = jax.nn.softmax(a, axis=-1)
        z = jnp.einsum("nkp,npc->nkc", a, x.reshape(b * t, p, ch))
        return z.reshape(b, t * self.num_tokens, ch)


class CSBlock(nn.Module):
    """Cross-self block (ARCHITECTURE §4.4): cross-attention to ``ctx``, self-attention, MLP."""

    dim: int
    num_heads: int
    mlp_ratio: float
    init: Any
    drop_path: float = 0.0
    qkv_bias: bool = True
    dtype: Any = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, ctx: jax.Array, deterministic: bool = True) -> jax.Array:
        dt = self.dtype
        dp = DropPath(self.drop_path)
        impl = self.attention_impl
        cross = CrossAttention(self.dim, self.num_heads, self.init, self.qkv_bias, dt, impl, name="cross_attn")
        x = x + dp(cross(layer_norm("cross_norm1", dt)(x), layer_norm("cross_norm2", dt)(ctx)), deterministic)
        x = x + dp(Attention(self.dim, self.num_heads, self.init, self.qkv_bias, dt, impl, name="attn")(
            layer_norm("norm1", dt)(x)), deterministic)
        mlp = Mlp(int(self.dim * self.mlp_ratio), self.dim, self.init, dt, name="mlp")
        return x + dp(mlp(layer_norm("norm2", dt)(x)), deterministic)


class TPSBT(Backbone):
    """Temporal pyramid + spatial bottleneck transformer. Stage 0 = plain blocks; each later stage = temporal
    conv (kernel = stride = k), spatial bottleneck, (depth-1) CS blocks on bottleneck tokens reading the
    full-resolution tokens, and one *reverse* CS block where the full-resolution tokens read the bottleneck."""

    def setup(self):
        super().setup()
        c = self.cfg
        dt = _dtype(c)
        init = self.inits.dense
        rates = drop_path_rates(c.drop_path_rate, c.num_blocks)
        d0 = c.stage_depths[0]
        plain, cross_self = remat_block(Block, c.remat, (2,)), remat_block(CSBlock, c.remat, (3,))
        impl = c.attention_impl
        blocks = [plain(c.embed_dim, c.num_heads, c.mlp_ratio, init, rates[i], c.qkv_bias, dt, impl) for i in range(d0)]
        blocks += [
            cross_self(c.embed_dim, c.num_heads, c.mlp_ratio, init, rates[i], c.qkv_bias, dt, impl)
            for i in range(d0, c.num_blocks)
        ]
        self.blocks = blocks
        k = c.temporal_kernel
        fan_in = c.embed_dim * k
        self.temporal_downsamples = [
            nn.Conv(
                c.embed_dim,
                kernel_size=(k,),
                strides=(k,),
                padding="VALID",
                dtype=dt,
                kernel_init=_p(torch_default_uniform(fan_in), (None, "embed", None)),
                bias_init=_p(torch_default_uniform(fan_in), ("embed",)),
            )
            for _ in range(len(c.stage_depths) - 1)
        ]
        t = c.grid[0]
        frames = []
        for _ in range(len(c.stage_depths) - 1):
            if t % k:
                raise ValueError(f"temporal length {t} not divisible by temporal kernel {k}")
            t //= k
            frames.append(t)
        self.stage_frames = tuple(frames)
        self.spatial_downsamples = [
            SpatialBottleneck(c.embed_dim, kk, c.bottleneck_hidden, frames[s], init, dt)
            for s, kk in enumerate(c.stage_bottlenecks)
        ]

    def stage_ranges(self) -> list[range]:
        out, start = [], 0
        for d in self.cfg.stage_depths:
            out.append(range(start, start + d))
            start += d
        return out

    def temporal_conv(self, s: int, x: jax.Array, frames: int) -> jax.Array:
        """``[B, T*P, C]`` (index t*P+p) -> ``[B, (T/k)*P, C]``: one temporal sequence per spatial position."""
        b = x.shape[0]
        y = einops.rearrange(x, "b (t p) c -> (b p) t c", t=frames)
        y = self.temporal_downsamples[s](y)  # [B*P, T/k, C]
        return einops.rearrange(y, "(b p) t c -> b (t p) c", b=b)

    def run_stages(self, x: jax.Array, det: bool, reverse_context: jax.Array | None = None) -> list[jax.Array]:
        """The stage loop, shared by fine-tuning and pre-training: tokens ``[B, T0*P, C]`` -> the output of every
        stage, ``[B, T_s*P, C]`` for s = 0..S-1 (T_s = T0 / k**s).

        Each later stage: temporal conv, spatial bottleneck, (depth-1) CS blocks on the bottleneck tokens reading the
        full-resolution ones, and the reverse CS block, whose context is the bottleneck tokens — or
        ``reverse_context`` when given (the faithful SVFAP pre-train encoder passes the unmasked embedding, Q3; the z
        path is then computed and unused, and XLA removes it under jit)."""
        stages = self.stage_ranges()
        for i in stages[0]:
            x = self.blocks[i](x, det)  # deterministic positional: static under remat
        outputs = [x]
        frames = self.cfg.grid[0]
        for s, rng in enumerate(stages[1:]):
            u = self.temporal_conv(s, x, frames)
            frames = self.stage_frames[s]
            z = self.spatial_downsamples[s](u)
            for i in list(rng)[:-1]:
                z = self.blocks[i](z, u, det)
            x = self.blocks[rng[-1]](u, z if reverse_context is None else reverse_context, det)
            outputs.append(x)
        return outputs

    def encode(self, video: jax.Array, train: bool = False) -> jax.Array:
        """Fine-tune forward (ARCHITECTURE §4.5) -> final full-resolution tokens ``[B, T_last*P, C]``."""
        return self.run_stages(self.embed(video), not train)[-1]
