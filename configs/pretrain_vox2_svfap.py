"""SVFAP pretraining on VoxCeleb2 (PRETRAINING §4): TPSBT 512/8 (fine-tune compatible, QUIRKS Q7), tube mask 0.9,
appearance target, batch 256 (4 GPUs x 64), 100 epochs.

The encoder is faithful by default (reverse block reads the full embedding, Q3; dead bottleneck path frozen, Q4;
scrambled up-sampling, Q5). The corrected encoder is a different objective:
    --config.model.overrides.svfap_reverse_ctx=bottleneck --config.model.overrides.svfap_upsample=repeat
"""

from configs.base import base_config, pretrain_defaults


def get_config():
    c = pretrain_defaults(base_config())
    c.model.name = "pretrain_svfap_base_patch16_160"
    c.data.dir = "data/vox2"
    c.data.builder = "voxceleb2 --root VOX2/dev/mp4"
    c.data.sampling_rate = 4
    # data.worker_count: -1 (base default) = every spare core of this process (data_pipelines/worker_autotune.py)
    c.batch_size = 256
    c.optim.epochs = 100
    c.optim.warmup_epochs = 5
    c.optim.skip_weight_decay = ("mask_token",)
    c.pretrain.frame_diff = False
    c.checkpoint.every_steps = 2000
    c.log_every_steps = 100
    c.eval_every_steps = 4264
    return c
