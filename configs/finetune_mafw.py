"""MAFW (single-labelled), 5 folds, 11 classes, sampling rate 4; batch 96 (MAE-DFER) or 64 (SVFAP)."""

from configs.finetune_common import finetune_config


def get_config(encoder: str = "lgi"):
    return finetune_config(encoder or "lgi", data_dir="data/mafw", builder="mafw --annotations MAFW_SPLITS/",
                           num_classes=11, sampling_rate=4, batch_lgi=96, batch_svfap=64, kfold=5)
