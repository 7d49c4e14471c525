"""Named model configs (the reference's registered names + tiny variants) and model construction.

``get_config(name, **overrides)`` returns a ``ModelConfig``; ``create_model(cfg_or_name)`` the Flax module;
``init_params`` real parameters, ``abstract_params`` shapes only (no FLOPs), ``count_params`` their size.

Reference names (ARCHITECTURE §7) with the published settings as defaults:

======================================================  ==================================================
``vit_base_dim512_no_depth_patch16_160``                MAE-DFER fine-tune: LGI 512/16, region (2,5,10)
``pretrain_videomae_base_dim512_no_depth_patch16_160``  MAE-DFER pre-train: LGI 512/16 + decoder 384/4
``vit_base_patch16_160``                                joint ViT 768/12 (VideoMAE baseline)
``pretrain_videomae_base_patch16_160``                  joint ViT 768/12 + decoder 384/4
``svfap_base_patch16_160``                              SVFAP fine-tune: TPSBT 512, stages 12/6/3
``pretrain_svfap_base_patch16_160``                     SVFAP pre-train, 512/8 (fine-tune compatible, Q7)
``pretrain_svfap_base_patch16_160_as_written``          SVFAP pre-train 768/12 as the reference constructor
======================================================  ==================================================
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np

from facemae_jax import masking
from facemae_jax.models.classifier import CLASSIFIERS
from facemae_jax.models.config import ModelConfig
from facemae_jax.models.layers import remat_policy, resolve_attention_impl
from facemae_jax.models.mae import MaskedVideoAutoencoder

_LGI = dict(family="lgi", embed_dim=512, depth=16, num_heads=8, region_size=(2, 5, 10))
_TPSBT = dict(family="tpsbt", embed_dim=512, num_heads=8, stage_depths=(12, 6, 3), bottleneck_tokens=(8,))
_TINY = dict(embed_dim=64, num_heads=2, decoder_embed_dim=32, decoder_num_heads=2, decoder_depth=2)

MODELS: dict[str, ModelConfig] = {
    # MAE-DFER
    "vit_base_dim512_no_depth_patch16_160": ModelConfig(mode="finetune", drop_path_rate=0.1, **_LGI),
    "pretrain_videomae_base_dim512_no_depth_patch16_160": ModelConfig(
        mode="pretrain", mask_kind="tube_window", **_LGI
    ),
    "vit_base_patch16_160": ModelConfig(family="vit", mode="finetune", embed_dim=768, depth=12, num_heads=12,
                                        drop_path_rate=0.1),
    "pretrain_videomae_base_patch16_160": ModelConfig(family="vit", mode="pretrain", embed_dim=768, depth=12,
                                                      num_heads=12, mask_kind="tube"),
    # SVFAP
    "svfap_base_patch16_160": ModelConfig(mode="finetune", drop_path_rate=0.1, **_TPSBT),
    "pretrain_svfap_base_patch16_160": ModelConfig(mode="pretrain", mask_kind="tube", **_TPSBT),
    "pretrain_svfap_base_patch16_160_as_written": ModelConfig(
        mode="pretrain", mask_kind="tube", **{**_TPSBT, "embed_dim": 768, "num_heads": 12}
    ),
    # tiny variants: the golden geometry (16x160x160, 8x10x10 tokens), reduced width/depth
    "lgi_tiny_finetune": ModelConfig(mode="finetune", drop_path_rate=0.1, **{**_LGI, **_TINY, "depth": 3}),
    "lgi_tiny_pretrain": ModelConfig(mode="pretrain", mask_kind="tube_window", **{**_LGI, **_TINY, "depth": 3}),
    "tpsbt_tiny_finetune": ModelConfig(mode="finetune", drop_path_rate=0.1,
                                       **{**_TPSBT, **_TINY, "stage_depths": (2, 2, 2)}),
    "tpsbt_tiny_pretrain": ModelConfig(mode="pretrain", mask_kind="tube",
                                       **{**_TPSBT, **_TINY, "stage_depths": (2, 2, 2)}),
    "vit_tiny_finetune": ModelConfig(family="vit", mode="finetune", drop_path_rate=0.1, depth=2, **_TINY),
    "vit_tiny_pretrain": ModelConfig(family="vit", mode="pretrain", depth=2, mask_kind="tube", **_TINY),
}


def get_config(name_or_cfg: str | ModelConfig, **overrides: Any) -> ModelConfig:
    if isinstance(name_or_cfg, ModelConfig):
        cfg = name_or_cfg
    else:
        if name_or_cfg not in MODELS:
            raise KeyError(f"unknown model {name_or_cfg!r}; known: {sorted(MODELS)}")
        cfg = MODELS[name_or_cfg]
    if not overrides:
        return cfg
    return ModelConfig.from_dict({**cfg.to_dict(), **overrides})


def create_model(name_or_cfg: str | ModelConfig, **overrides: Any) -> nn.Module:
    """The flax module. ``attention_impl='auto'`` is resolved here, for this process's backend, and said once."""
    cfg = get_config(name_or_cfg, **overrides)
    impl, why = resolve_attention_impl(cfg.attention_impl, cfg.dtype)
    remat_policy(cfg.remat)  # an unknown policy name fails here, not deep inside tracing
    if cfg.attention_impl == "auto":
        _say_once(f"[model] attention_impl {why}")
    cfg = cfg.replace(attention_impl=impl)
    if cfg.mode == "pretrain":
        return MaskedVideoAutoencoder(cfg)
    if cfg.family not in CLASSIFIERS:
        raise ValueError(f"unknown family {cfg.family!r}")
    return CLASSIFIERS[cfg.family](cfg)


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        print(message, flush=True)


def example_inputs(cfg: ModelConfig, batch: int = 1, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Inputs with the right shapes (zero video; a valid mask for pre-training) for init / tracing."""
    video = np.zeros((batch, cfg.num_frames, cfg.img_size, cfg.img_size, cfg.in_chans), np.float32)
    if cfg.mode != "pretrain":
        return (video,)
    gen = masking.MaskGenerator.for_model(cfg)
    rng = np.random.default_rng(seed)
    return video, np.stack([gen(rng) for _ in range(batch)])


def init_params(model: nn.Module, rng: jax.Array, batch: int = 1) -> dict:
    """Real (unboxed) parameters, initialised as the reference does."""
    init = jax.jit(lambda r, *xs: model.init({"params": r, "dropout": r}, *xs))
    return nn.meta.unbox(init(rng, *example_inputs(model.cfg, batch))["params"])


def abstract_variables(model: nn.Module) -> dict:
    """Boxed abstract variables (shapes + logical axes) without computing anything."""
    return jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)}, *example_inputs(model.cfg))
    )


def abstract_params(model: nn.Module) -> dict:
    return nn.meta.unbox(abstract_variables(model)["params"])


def logical_axes(model: nn.Module) -> dict:
    """Tree of logical axis-name tuples (PartitionSpec of logical names) matching ``abstract_params``."""
    return nn.get_partition_spec(abstract_variables(model))["params"]


def count_params(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def tied_modules(cfg: ModelConfig) -> dict[str, str]:
    """Reference state_dict prefixes that alias another module when attention weights are shared (the reference
    lists a shared module under both names; we keep one parameter). {alias prefix: source prefix}."""
    if cfg.family != "lgi" or not (cfg.share_all or cfg.share_first_third):
        return {}
    pre = "encoder." if cfg.mode == "pretrain" else ""
    out = {}
    for i in range(cfg.depth):
        names = ["third_attn"] if cfg.share_first_third else ["second_attn", "third_attn"]
        for n in names:
            out[f"{pre}blocks.{i}.{n}."] = f"{pre}blocks.{i}.first_attn."
    return out

