"""Shared builders for the synthetic pretraining study (benchmarks/synthetic_study.py) and the demo.

Small-scale recipe: the published structure (tube-window / tube masking, appearance + frame-difference target,
AdamW + warmup-cosine, layer decay, 2 segments x 2 crops test), with the augmentations that only pay off at
scale (RandAugment, mixup/cutmix, crop scale 0.08) switched off or weakened: at ~170 labelled clips and a few
hundred steps they keep a tiny model at chance.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from configs.base import base_config, pretrain_defaults

# Dataset: 32-frame clips (synthetic default: one expression event per clip), 64 px.
DATA = dict(seed=0, num_pretrain=960, train_per_class=48, val_per_class=2, test_per_class=16, frames=32, size=64,
            workers=2, clips_per_shard=128)

# Geometry shared by both families: 16 frames (sampling rate 2 -> the whole 32-frame clip), 64 px, patch 16
# -> token grid 8 x 4 x 4.
GEOM = dict(num_frames=16, img_size=64, patch_size=16)
LGI = dict(GEOM, embed_dim=64, num_heads=2, depth=3, region_size=(2, 4, 4),
           decoder_embed_dim=64, decoder_num_heads=2, decoder_depth=1)
TPSBT = dict(GEOM, embed_dim=64, num_heads=2, stage_depths=(1, 1, 1), bottleneck_tokens=(4,),
             decoder_embed_dim=64, decoder_num_heads=2, decoder_depth=1)


def data(c: ConfigDict, data_dir: str, synth: dict | None = None, sampling_rate: int = 2) -> ConfigDict:
    c.data.dir = data_dir
    c.data.sampling_rate = sampling_rate
    c.data.synthetic = ConfigDict(dict(synth or DATA))
    c.eval.batch_size = 32
    c.log_every_steps = 25
    c.checkpoint.every_steps = 100000  # only the final checkpoint
    c.checkpoint.keep = 1
    return c


def pretrain(family: str, data_dir: str, *, steps: int, seed: int = 0, mask_ratio: float = 0.75,
             frame_diff: bool = True, lr: float = 1.2e-2, batch: int = 32, overrides: dict | None = None,
             synth: dict | None = None) -> ConfigDict:
    pre = pretrain_defaults(base_config())
    data(pre, data_dir, synth)
    pre.seed = seed
    pre.model.name = f"{family}_tiny_pretrain"
    geom = LGI if family == "lgi" else TPSBT
    pre.model.overrides = ConfigDict(dict(geom, mask_ratio=mask_ratio, **(overrides or {})))
    pre.pretrain.frame_diff = frame_diff
    pre.batch_size = batch
    pre.optim.base_lr = lr  # per 256 clips: peak = lr * batch / 256
    pre.optim.min_lr = lr / 100
    pre.optim.total_steps = steps
    pre.optim.warmup_steps = max(1, steps // 10)
    pre.data.multiscale_scales = (1.0, 0.875)
    return pre


def finetune(family: str, data_dir: str, *, steps: int, init_from: str = "", seed: int = 0, lr: float = 2.4e-2,
             batch: int = 32, layer_decay: float | None = 0.75, probe: bool = False, overrides: dict | None = None,
             synth: dict | None = None, drop_path: float = 0.0) -> ConfigDict:
    ft = base_config()
    data(ft, data_dir, synth)
    ft.seed = seed
    ft.model.name = f"{family}_tiny_finetune"
    geom = LGI if family == "lgi" else TPSBT
    geom = {k: v for k, v in geom.items() if not k.startswith("decoder_")}
    ft.model.overrides = ConfigDict(dict(geom, drop_path_rate=drop_path, **(overrides or {})))
    ft.init_from = init_from
    ft.batch_size = batch
    ft.optim.base_lr = lr
    ft.optim.min_lr = lr / 100
    ft.optim.total_steps = steps
    ft.optim.warmup_steps = max(1, steps // 10)
    ft.optim.layer_decay = layer_decay
    if probe:
        ft.optim.trainable = ("fc_norm.", "head.")
        ft.optim.layer_decay = None
        ft.optim.weight_decay = 0.0
    ft.data.rand_augment = ""
    ft.data.crop_scale = (0.8, 1.0)
    ft.data.erase_probability = 0.0
    ft.finetune.mixup_alpha = 0.0
    ft.finetune.cutmix_alpha = 0.0
    ft.finetune.label_smoothing = 0.1
    return ft
