"""The README's main command: synthetic face-expression videos -> tiny LGI-Former pre-training -> fine-tuning
-> multi-view test (UAR/WAR), on CPU in about ten minutes.

    python launch.py --config=configs/demo.py [--workdir=workdirs/demo]

The dataset (data.dir) is generated on first use. Geometry is reduced so that 2 CPU cores suffice: 8 frames of
64x64, patch 8, tubelet 2 -> a 4x8x8 token grid; LGI regions of 2x4x8 tokens (2 bands); tube-window mask 75%.
Everything else (targets with frame difference, optimiser, augmentation, the 2x2-view test protocol) is the
published recipe at smaller scale.
"""

import copy

from ml_collections import ConfigDict

from configs.base import base_config, pretrain_defaults

DATA_DIR = "data/synthetic_faces_demo"
MODEL = dict(num_frames=8, img_size=64, patch_size=8, embed_dim=64, num_heads=2, depth=3,
             region_size=(2, 4, 8), decoder_embed_dim=32, decoder_num_heads=2, decoder_depth=1)


def _data(c: ConfigDict) -> None:
    c.data.dir = DATA_DIR
    c.data.sampling_rate = 2
    c.data.synthetic = ConfigDict(dict(seed=0, num_pretrain=480, train_per_class=24, val_per_class=4,
                                       test_per_class=10, frames=24, size=64, workers=2, clips_per_shard=64))
    c.eval.batch_size = 32
    c.log_every_steps = 10


def get_config() -> ConfigDict:
    pre = pretrain_defaults(base_config())
    _data(pre)
    pre.model.name = "lgi_tiny_pretrain"
    pre.model.overrides = ConfigDict(dict(MODEL, mask_ratio=0.75))
    pre.batch_size = 32
    pre.optim.base_lr = 1.5e-3
    pre.optim.total_steps = 240
    pre.optim.warmup_steps = 20
    pre.checkpoint.every_steps = 100

    ft = base_config()
    _data(ft)
    ft.model.name = "lgi_tiny_finetune"
    ft.model.overrides = ConfigDict(dict(MODEL, drop_path_rate=0.1))
    ft.init_from = "@pretrain"
    ft.batch_size = 32
    ft.optim.base_lr = 2e-3
    ft.optim.total_steps = 160
    ft.optim.warmup_steps = 15
    ft.optim.layer_decay = 0.75
    ft.data.rand_augment = "rand-m7-n4-mstd0.5-inc1"
    ft.data.crop_scale = (0.5, 1.0)
    ft.checkpoint.every_steps = 100

    c = ConfigDict()
    c.stage_order = ("pretrain", "finetune")
    c.stages = ConfigDict({"pretrain": pre, "finetune": ft})
    return c
