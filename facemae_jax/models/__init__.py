"""Flax (linen) models: joint ViT, LGI-Former, TPSBT encoders; classifiers; masked video autoencoder."""

from facemae_jax.models.config import ModelConfig
from facemae_jax.models.registry import (
    MODELS,
    abstract_params,
    count_params,
    create_model,
    get_config,
    init_params,
    logical_axes,
)

__all__ = [
    "MODELS",
    "ModelConfig",
    "abstract_params",
    "count_params",
    "create_model",
    "get_config",
    "init_params",
    "logical_axes",
]
