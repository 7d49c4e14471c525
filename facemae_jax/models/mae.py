"""Masked video autoencoder: pre-train encoders, decoder and the wrapper (ARCHITECTURE §2.2, §3.4, §4.6, §5).

``MaskedVideoAutoencoder(cfg)(video, mask)`` returns the pixel predictions for the masked tokens,
``[B, Nm, patch_dim]`` in ascending token order — the same order as ``targets.reconstruction_targets``.

The mask is ``bool [B, N]``, True = hidden. The number of visible tokens must be static under ``jit``; it comes
from the config (``mask_kind``, ``mask_ratio``), exactly as the reference's generators fix it. When the mask is
concrete (not traced) the wrapper checks the encoder's contract and raises ``MaskContractError`` with details;
under ``jit`` the input pipeline is responsible (it builds masks with the same generators and checks them).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from facemae_jax import masking
from facemae_jax.models.config import ModelConfig
from facemae_jax.models.encoders import TPSBT, LGIFormer, ViT, _dtype
from facemae_jax.models.layers import (
    Block,
    Inits,
    _p,
    dense,
    drop_path_rates,
    gather_tokens,
    layer_norm,
    remat_block,
    sinusoid_table,
    torch_default_uniform,
    trunc_normal_abs,
)


def num_visible_tokens(cfg: ModelConfig) -> int:
    return masking.MaskGenerator.for_model(cfg).num_visible


def check_mask(cfg: ModelConfig, mask: np.ndarray) -> None:
    """Host-side contract check of a concrete mask ``[B, N]`` for this model (raises MaskContractError)."""
    mask = np.asarray(mask, bool)
    if mask.ndim != 2 or mask.shape[1] != cfg.num_tokens:
        raise masking.MaskContractError(f"mask shape {mask.shape}, expected [B, {cfg.num_tokens}]")
    nv = num_visible_tokens(cfg)
    counts = (~mask).sum(axis=1)
    bad = np.nonzero(counts != nv)[0]
    if bad.size:
        raise masking.MaskContractError(
            f"sample {int(bad[0])} has {int(counts[bad[0]])} visible tokens; this model "
            f"(mask_kind={cfg.mask_kind!r}, mask_ratio={cfg.mask_ratio}) needs exactly {nv}"
        )
    if cfg.family == "lgi":
        masking.check_lgi_mask(mask, cfg.grid, cfg.region_size)
    elif cfg.family == "tpsbt":
        t, h, w = cfg.grid
        m = mask.reshape(mask.shape[0], t, h * w)
        diff = np.nonzero((m != m[:, :1]).any(axis=2))
        if diff[0].size:
            b, tt = int(diff[0][0]), int(diff[1][0])
            raise masking.MaskContractError(
                f"TPSBT pre-training needs a tube mask (the same visible positions in every frame): sample {b}, "
                f"frame {tt} differs from frame 0"
            )


def split_mask(mask: jax.Array, num_visible: int) -> tuple[jax.Array, jax.Array]:
    """bool ``[B, N]`` -> (visible ids ``[B, Nv]``, masked ids ``[B, N-Nv]``), both ascending (raster order)."""
    ids = jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True)
    return ids[:, :num_visible], ids[:, num_visible:]


class ViTPretrainEncoder(ViT):
    def setup(self):
        super().setup()
        self.norm = layer_norm("norm", _dtype(self.cfg))

    def __call__(self, video, vis_idx, train: bool = False):
        return self.norm(self.encode(video, vis_idx, train))


class LGIPretrainEncoder(LGIFormer):
    """Output ``[B, Nv, C]`` in region-major order (faithful, Q2) or raster order (``lgi_raster_decoder_order``)."""

    def setup(self):
        super().setup()
        self.norm = layer_norm("norm", _dtype(self.cfg))

    def __call__(self, video, vis_idx, train: bool = False):
        x = self.encode(video, vis_idx, train)  # [B, R, 1+L, C]
        b, r, s, ch = x.shape
        x = x[:, :, 1:].reshape(b, r * (s - 1), ch)
        if self.cfg.lgi_raster_decoder_order:
            x = self.region_major_to_raster(x)
        return self.norm(x)


class TPSBTPretrainEncoder(TPSBT):
    """SVFAP pre-train encoder with multi-scale fusion (ARCHITECTURE §4.6). Faithful by default: the reverse block
    reads the full 800-token embedding (Q3, which leaves the bottleneck path without gradient, Q4) and the
    up-sampling uses the reference's scrambled index map (Q5)."""

    def setup(self):
        super().setup()
        self.norm = layer_norm("norm", _dtype(self.cfg))

    def upsample(self, x: jax.Array, s: int, frames_before: int, frames_after: int) -> jax.Array:
        """Stage-s output ``[B, T_s*P, C]`` -> ``[B, T0*P, C]``."""
        c = self.cfg
        rep = c.temporal_kernel**s
        b, n, ch = x.shape
        if c.svfap_upsample == "as_coded":  # reshape with the pre-down-sampling length T_{s-1} (Q5)
            y = x.reshape(b, frames_before, n // frames_before, ch)
        elif c.svfap_upsample == "repeat":
            y = x.reshape(b, frames_after, n // frames_after, ch)
        else:
            raise ValueError(f"svfap_upsample must be as_coded|repeat, got {c.svfap_upsample!r}")
        return jnp.repeat(y, rep, axis=1).reshape(b, -1, ch)

    def __call__(self, video, vis_idx, train: bool = False):
        c = self.cfg
        x_all = self.embed(video)
        if c.svfap_reverse_ctx == "full_embedding":
            context = x_all  # Q3: the reverse blocks read the unmasked embedding
        elif c.svfap_reverse_ctx == "bottleneck":
            context = None  # as fine-tuning: the stage's own bottleneck tokens
        else:
            raise ValueError(f"svfap_reverse_ctx must be full_embedding|bottleneck, got {c.svfap_reverse_ctx!r}")
        outputs = self.run_stages(gather_tokens(x_all, vis_idx), not train, context)
        fused = outputs[0]
        frames = (c.grid[0],) + self.stage_frames  # T_s before each down-sampling
        for s in range(1, len(outputs)):
            fused = fused + self.upsample(outputs[s], s, frames[s - 1], frames[s])
        return self.norm(fused)


PRETRAIN_ENCODERS = {"vit": ViTPretrainEncoder, "lgi": LGIPretrainEncoder, "tpsbt": TPSBTPretrainEncoder}


class Decoder(nn.Module):
    """``decoder_depth`` plain blocks at width Cd, LayerNorm and the pixel head on the last Nm tokens."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, num_masked: int, train: bool = False) -> jax.Array:
        c = self.cfg
        dt = _dtype(c)
        init = Inits.for_mode("pretrain").dense
        rates = drop_path_rates(c.drop_path_rate, c.decoder_depth)
        block = remat_block(Block, c.remat, (2,))
        for i in range(c.decoder_depth):
            x = block(c.decoder_embed_dim, c.decoder_num_heads, c.mlp_ratio, init, rates[i], c.qkv_bias, dt,
                      c.attention_impl, name=f"blocks_{i}")(x, not train)
        x = layer_norm("norm", dt)(x[:, -num_masked:])
        return dense(c.patch_dim, name="head", init=init, axes=("embed", "classes"), dtype=dt)(x)


class MaskedVideoAutoencoder(nn.Module):
    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        if c.mode != "pretrain":
            raise ValueError(f"MaskedVideoAutoencoder needs a pretrain config, got mode={c.mode!r}")
        self.encoder = PRETRAIN_ENCODERS[c.family](c)
        # Q17c: encoder_to_decoder keeps PyTorch's default Linear init (it escapes the xavier hook).
        self.encoder_to_decoder = nn.Dense(
            c.decoder_embed_dim,
            use_bias=False,
            dtype=_dtype(c),
            kernel_init=_p(torch_default_uniform(c.embed_dim), ("hidden", "embed")),
        )
        self.mask_token = self.param(
            "mask_token", _p(trunc_normal_abs(0.02, 0.02), (None, None, "embed")), (1, 1, c.decoder_embed_dim)
        )
        self.decoder = Decoder(c)

    def __call__(self, video: jax.Array, mask: jax.Array, train: bool = False, return_aux: bool = False):
        c = self.cfg
        if not isinstance(mask, jax.core.Tracer):
            check_mask(c, np.asarray(mask))
        nv = num_visible_tokens(c)
        vis_idx, mask_idx = split_mask(jnp.asarray(mask), nv)
        enc = self.encoder(video, vis_idx, train)
        y = self.encoder_to_decoder(enc)
        pos = jnp.asarray(sinusoid_table(c.num_tokens, c.decoder_embed_dim), y.dtype)[0]
        b = y.shape[0]
        pos_vis = pos[vis_idx]
        pos_mask = pos[mask_idx]
        tok = jnp.broadcast_to(self.mask_token.astype(y.dtype), (b, mask_idx.shape[1], c.decoder_embed_dim))
        z = jnp.concatenate([y + pos_vis, tok + pos_mask], axis=1)
        pred = self.decoder(z, mask_idx.shape[1], train).astype(jnp.float32)
        if return_aux:
            return pred, {"features": enc, "vis_idx": vis_idx, "mask_idx": mask_idx}
        return pred
