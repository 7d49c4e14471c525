"""The quickest end-to-end check of an install, and the config of the pod rehearsal and multi-process tests.

    python launch.py --config=configs/smoke.py --workdir=workdirs/smoke                # pretraining, 20 steps
    python launch.py --config=configs/smoke.py:finetune --workdir=workdirs/smoke_ft    # fine-tuning + test
    python -m facemae_jax.local_cluster --processes 2 --devices_per_process 4 -- \\
        launch.py --config=configs/smoke.py --workdir=workdirs/smoke_2proc            # the same as 2 "hosts"

A tiny LGI-Former (8 frames at 32 px, patch 8, 2 blocks of width 32) on a small synthetic face-expression dataset
(``data/smoke``: 64 unlabelled + 7 x 4 train + 7 x 3 test clips of 16 frames at 32 px, built on first use by
process 0 while the others wait; about 5 s). Global batch 8 (divisible by the 8 devices of a 2 x 4 rehearsal),
metrics every step in ``WORKDIR/metrics.jsonl`` (step, loss, num_processes, ...), a checkpoint every 5 steps.
Fine-tuning starts from random init (no pretraining needed) with no mixup or augmentation so that it is
deterministic given the seed, and ends with the 2 segments x 2 crops test (21 clips: the last global eval batch
is padded, QUIRKS Q28). It checks that things run, not that they learn.
"""

from ml_collections import ConfigDict

from configs.base import base_config, pretrain_defaults

DATA_DIR = "data/smoke"
DATA = dict(seed=0, num_pretrain=64, train_per_class=4, val_per_class=1, test_per_class=3, frames=16, size=32,
            workers=1, clips_per_shard=64, scenario="posed")
MODEL = dict(num_frames=8, img_size=32, patch_size=8, embed_dim=32, num_heads=2, depth=2, region_size=(2, 2, 4))
DECODER = dict(decoder_embed_dim=16, decoder_num_heads=2, decoder_depth=1)
STEPS = 20


def get_config(job: str = "pretrain") -> ConfigDict:
    if job not in ("pretrain", "finetune"):
        raise ValueError(f"configs/smoke.py:{job}: expected :pretrain or :finetune")
    c = base_config()
    if job == "pretrain":
        pretrain_defaults(c)
        c.model.name = "lgi_tiny_pretrain"
        c.model.overrides = ConfigDict(dict(MODEL, **DECODER, mask_ratio=0.75))
        c.data.multiscale_scales = (1.0,)
        c.optim.base_lr = 1e-2
    else:
        c.model.name = "lgi_tiny_finetune"
        c.model.overrides = ConfigDict(dict(MODEL, drop_path_rate=0.1))
        c.optim.base_lr = 1e-2
        c.optim.layer_decay = None
        c.data.rand_augment = ""
        c.data.crop_scale = (1.0, 1.0)
        c.data.erase_probability = 0.0
        c.finetune.mixup_alpha = 0.0
        c.finetune.cutmix_alpha = 0.0
    c.data.dir = DATA_DIR
    c.data.synthetic = ConfigDict(DATA)
    c.data.sampling_rate = 2
    c.batch_size = 8
    c.optim.total_steps = STEPS
    c.optim.warmup_steps = 2
    c.optim.min_lr = c.optim.base_lr / 100
    c.eval.batch_size = 8
    c.log_every_steps = 1
    c.checkpoint.every_steps = 5
    c.checkpoint.keep = 10
    return c
