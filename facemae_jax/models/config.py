"""One frozen dataclass describes every model: configs are data, not code paths.

Defaults equal the *published* runs (QUIRKS Q16: self/cross attention, region classify token, region (2,5,10)).
Every quirk that changes a model's computation has a faithful default (needed for official weights) and a
corrected option with an explicit name:

=====================  ==========================================================================================
``lgi_raster_decoder_order``   Q2: permute LGI pre-train encoder output back to raster order before the decoder.
``svfap_reverse_ctx``  Q3/Q4: context of the reverse CS block in SVFAP pre-training — ``'full_embedding'``
                       (faithful, leaks masked tokens, bottleneck path dead) or ``'bottleneck'`` (as fine-tuning).
``svfap_upsample``     Q5: ``'as_coded'`` (scrambled) or ``'repeat'`` (proper temporal repeat) multi-scale fusion.
``drop_path_per_sample``  Q13: LGI steps 1/4 drop per sample instead of per (sample, region).
=====================  ==========================================================================================
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Family = Literal["vit", "lgi", "tpsbt"]
Mode = Literal["finetune", "pretrain"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: Family
    mode: Mode
    # geometry
    img_size: int = 160
    patch_size: int = 16
    num_frames: int = 16
    tubelet_size: int = 2
    in_chans: int = 3
    # encoder
    embed_dim: int = 512
    depth: int = 16  # vit / lgi (tpsbt: sum(stage_depths))
    num_heads: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    # LGI-Former (MAE-DFER)
    region_size: tuple[int, int, int] = (2, 5, 10)
    first_attn_type: Literal["self", "cross"] = "self"
    third_attn_type: Literal["self", "cross"] = "cross"
    share_first_third: bool = False
    share_all: bool = False
    no_second: bool = False
    no_third: bool = False
    classify_token_type: Literal["region", "org", "all"] = "region"
    drop_path_per_sample: bool = False  # Q13 corrected
    # TPSBT (SVFAP)
    stage_depths: tuple[int, ...] = (12, 6, 3)
    temporal_kernel: int = 2
    bottleneck_tokens: tuple[int, ...] = (8,)
    bottleneck_hidden: int = 128  # Q8: hard-coded 128 in the reference constructors
    # fine-tune head
    num_classes: int = 7
    init_scale: float = 0.001
    head_dropout: float = 0.0
    head_activation: Literal[None, "sigmoid", "relu", "tanh"] = None
    keep_temporal_dim: bool = False  # frame-level output, joint ViT only (Q14)
    # pre-training
    decoder_embed_dim: int = 384
    decoder_depth: int = 4
    decoder_num_heads: int = 6
    mask_kind: Literal["tube", "tube_window", "random"] = "tube"
    mask_ratio: float = 0.9
    lgi_raster_decoder_order: bool = False  # Q2 corrected
    svfap_reverse_ctx: Literal["full_embedding", "bottleneck"] = "full_embedding"  # Q3 (faithful default)
    svfap_upsample: Literal["as_coded", "repeat"] = "as_coded"  # Q5 (faithful default)
    # numerics and accelerator knobs (none changes the parameters; the defaults are the faithful numerics)
    dtype: str = "float32"  # compute dtype; params and optimiser state stay float32
    attention_impl: Literal["xla", "cudnn", "auto"] = "xla"  # layers.resolve_attention_impl
    remat: str = "none"  # none | full | a jax.checkpoint_policies name, per transformer block (layers.remat_policy)

    # ---- derived geometry --------------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (T', H', W')."""
        if self.num_frames % self.tubelet_size or self.img_size % self.patch_size:
            raise ValueError(
                f"frames {self.num_frames} / image {self.img_size} not divisible by tubelet {self.tubelet_size} / "
                f"patch {self.patch_size}"
            )
        g = self.img_size // self.patch_size
        return (self.num_frames // self.tubelet_size, g, g)

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def patch_dim(self) -> int:
        """Pixels per token x 3 = the decoder's output width (1536 for 2x16x16)."""
        return self.tubelet_size * self.patch_size * self.patch_size * self.in_chans

    @property
    def num_blocks(self) -> int:
        return sum(self.stage_depths) if self.family == "tpsbt" else self.depth

    @property
    def region_counts(self) -> tuple[int, int, int]:
        """Regions per axis (nt, nh, nw) for LGI."""
        t, h, w = self.grid
        rt, rh, rw = self.region_size
        if t % rt or h % rh or w % rw:
            raise ValueError(f"LGI region size {self.region_size} does not tile the token grid {self.grid}")
        return (t // rt, h // rh, w // rw)

    @property
    def num_regions(self) -> int:
        nt, nh, nw = self.region_counts
        return nt * nh * nw

    @property
    def stage_bottlenecks(self) -> tuple[int, ...]:
        """Bottleneck tokens per down-sampling stage (one value is repeated, as the reference does)."""
        n = len(self.stage_depths) - 1
        if len(self.bottleneck_tokens) == 1:
            return tuple(self.bottleneck_tokens) * n
        if len(self.bottleneck_tokens) != n:
            raise ValueError(f"bottleneck_tokens {self.bottleneck_tokens} must have 1 or {n} entries")
        return tuple(self.bottleneck_tokens)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {sorted(unknown)}")
        d = dict(d)
        for k in ("region_size", "stage_depths", "bottleneck_tokens"):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        return ModelConfig(**d)
