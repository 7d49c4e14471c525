"""MAE-DFER pretraining on VoxCeleb2, as the released checkpoint was actually trained (PRETRAINING §4, QUIRKS Q9).

    python -m data_pipelines.build voxceleb2 --root VOX2/dev/mp4 --out data/vox2 --workers 16
    python launch.py --config=configs/pretrain_vox2.py --workdir=runs/mae_dfer_pretrain

LGI-Former 512/16 (region 2x5x10) + decoder 384/4, tube-window mask 0.9, appearance + frame-difference target,
AdamW (0.9, 0.95), wd 0.05 (region tokens decayed, Q10), lr 3e-4 per 256 x total batch 160, warmup 5 epochs from 0,
cosine to 1e-5 x 160/256 over a 100-epoch schedule that was stopped after 50 epochs (checkpoint-49).
The converter already applies the fixed top-centre crop of the 224x224 frames (Q24), so the pipeline does not.
"""

from configs.base import base_config, pretrain_defaults


def get_config():
    c = pretrain_defaults(base_config())
    c.model.name = "pretrain_videomae_base_dim512_no_depth_patch16_160"
    c.data.dir = "data/vox2"
    c.data.builder = "voxceleb2 --root VOX2/dev/mp4"
    c.data.sampling_rate = 4
    # data.worker_count: -1 (base default) = every spare core of this process (data_pipelines/worker_autotune.py)
    c.batch_size = 160
    c.optim.epochs = 100
    c.optim.warmup_epochs = 5
    c.optim.stop_after_epochs = 50
    c.pretrain.frame_diff = True
    c.checkpoint.every_steps = 2000
    c.log_every_steps = 100
    c.eval_every_steps = 6823  # one epoch: reconstruction figure + eval loss
    return c
