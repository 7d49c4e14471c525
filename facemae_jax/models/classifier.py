"""Fine-tuning models: backbone + mean pooling + ``fc_norm`` + head (ARCHITECTURE §2.1, §3.3, §4.5, §6).

``__call__(video, train=False)`` returns logits ``[B, num_classes]`` (after the optional head activation used for
regression tasks). ``return_aux=True`` also returns ``{'features': final tokens, 'pooled': fc_norm output}`` —
the tensors the goldens store, and what feature extraction uses.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from facemae_jax.models.encoders import TPSBT, LGIFormer, ViT, _dtype
from facemae_jax.models.layers import _p, layer_norm, trunc_normal_abs

_ACTIVATIONS = {None: lambda x: x, "sigmoid": jax.nn.sigmoid, "relu": jax.nn.relu, "tanh": jnp.tanh}


class _Head:
    """fc_norm -> dropout -> head, with the reference's tiny head init (x init_scale)."""

    def setup_head(self):
        c = self.cfg
        if c.head_activation not in _ACTIVATIONS:
            raise ValueError(f"head_activation must be one of {list(_ACTIVATIONS)}, got {c.head_activation!r}")
        base = trunc_normal_abs(0.02)

        def head_init(key, shape, dtype=jnp.float32):
            return base(key, shape, dtype) * c.init_scale

        self.fc_norm = layer_norm("fc_norm", _dtype(c))
        self.head_drop = nn.Dropout(c.head_dropout)
        self.head = nn.Dense(
            c.num_classes,
            dtype=_dtype(c),
            kernel_init=_p(head_init, ("embed", "classes")),
            bias_init=_p(nn.initializers.zeros, ("classes",)),
        )

    def classify(self, tokens: jax.Array, train: bool, return_aux: bool):
        pooled = self.fc_norm(tokens.mean(axis=1))
        logits = self.head(self.head_drop(pooled, deterministic=not train))
        logits = _ACTIVATIONS[self.cfg.head_activation](logits).astype(jnp.float32)
        if return_aux:
            return logits, {"features": tokens, "pooled": pooled}
        return logits


class ViTClassifier(_Head, ViT):
    def setup(self):
        super().setup()
        self.setup_head()

    def __call__(self, video: jax.Array, train: bool = False, return_aux: bool = False):
        tokens = self.encode(video, train=train)
        if not self.cfg.keep_temporal_dim:
            return self.classify(tokens, train, return_aux)
        return self._frame_level(tokens, train, return_aux)

    def _frame_level(self, tokens: jax.Array, train: bool, return_aux: bool):
        """Frame-level output (``keep_temporal_dim``): spatial mean per temporal index, linear x`tubelet` upsampling
        in time (align_corners=False), fc_norm + head per frame -> ``[B, T*num_classes]``."""
        c = self.cfg
        t, h, w = c.grid
        b, _, ch = tokens.shape
        per_t = tokens.reshape(b, t, h * w, ch).mean(axis=2)
        per_f = jax.image.resize(per_t, (b, c.num_frames, ch), method="linear")
        pooled = self.fc_norm(per_f)
        logits = self.head(self.head_drop(pooled, deterministic=not train))
        logits = _ACTIVATIONS[c.head_activation](logits).astype(jnp.float32).reshape(b, -1)
        return (logits, {"features": tokens, "pooled": pooled}) if return_aux else logits


class LGIClassifier(_Head, LGIFormer):
    def setup(self):
        if self.cfg.keep_temporal_dim:
            raise ValueError("keep_temporal_dim is only valid for the joint ViT (QUIRKS Q14)")
        super().setup()
        self.setup_head()

    def __call__(self, video: jax.Array, train: bool = False, return_aux: bool = False):
        x = self.encode(video, train=train)  # [B, R, 1+L, C]
        kind = self.cfg.classify_token_type
        if kind == "region":
            tokens = x[:, :, 0]
        elif kind == "org":
            tokens = x[:, :, 1:].reshape(x.shape[0], -1, x.shape[-1])
        elif kind == "all":
            tokens = x.reshape(x.shape[0], -1, x.shape[-1])
        else:
            raise ValueError(f"classify_token_type must be region|org|all, got {kind!r}")
        return self.classify(tokens, train, return_aux)


class TPSBTClassifier(_Head, TPSBT):
    def setup(self):
        if self.cfg.keep_temporal_dim:
            raise ValueError("keep_temporal_dim is only valid for the joint ViT (QUIRKS Q14)")
        super().setup()
        self.setup_head()

    def __call__(self, video: jax.Array, train: bool = False, return_aux: bool = False):
        return self.classify(self.encode(video, train=train), train, return_aux)


CLASSIFIERS: dict[str, Any] = {"vit": ViTClassifier, "lgi": LGIClassifier, "tpsbt": TPSBTClassifier}
