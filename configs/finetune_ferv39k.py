"""FERV39k (one official split), 7 classes, sampling rate 1; batch 120 (MAE-DFER) or 64 (SVFAP)."""

from configs.finetune_common import finetune_config


def get_config(encoder: str = "lgi"):
    return finetune_config(encoder or "lgi", data_dir="data/ferv39k", builder="ferv39k --annotations FERV39K_SPLITS/",
                           num_classes=7, sampling_rate=1, batch_lgi=120, batch_svfap=64, kfold=0)
