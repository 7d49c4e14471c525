"""The published fine-tuning recipe (FINETUNING §1-2) for either encoder; the dataset files only set the data."""

from configs.base import base_config

ENCODERS = {
    # (model name, total batch) from the MAE-DFER logs / SVFAP scripts
    "lgi": "vit_base_dim512_no_depth_patch16_160",
    "svfap": "svfap_base_patch16_160",
}


def finetune_config(encoder: str, *, data_dir: str, builder: str, num_classes: int, sampling_rate: int,
                    batch_lgi: int, batch_svfap: int, kfold: int):
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {sorted(ENCODERS)} (configs/X.py:lgi or :svfap), got {encoder!r}")
    c = base_config()
    c.model.name = ENCODERS[encoder]
    c.model.overrides.num_classes = num_classes
    c.batch_size = batch_lgi if encoder == "lgi" else batch_svfap
    c.optim.skip_weight_decay = ("lg_region_tokens",) if encoder == "lgi" else ()
    c.data.dir = data_dir
    c.data.builder = builder
    c.data.sampling_rate = sampling_rate
    # data.worker_count: -1 (base default) = every spare core of this process (data_pipelines/worker_autotune.py)
    c.kfold = kfold
    if kfold:
        c.data.train_split, c.data.eval_split = "fold1/train", "fold1/test"
    c.eval.batch_size = 48
    c.checkpoint.every_steps = 500
    c.log_every_steps = 20
    return c
