"""DFEW, 5 folds, 7 classes, sampling rate 4; batch 96 (MAE-DFER, 3x32) or 64 (SVFAP, 4x16), lr 1e-3 per 256,
layer decay 0.75, drop path 0.1, RandAugment m7-n4, mixup 0.8 / cutmix 1.0, label smoothing 0.1, 100 epochs,
last-epoch 2x2-view test (FINETUNING §1-2).

    python launch.py --config=configs/finetune_dfew.py:lgi --workdir=runs/dfew --config.init_from=runs/pretrain
    --config.kfold=0 --config.data.train_split=fold1/train --config.data.eval_split=fold1/test   # one fold
"""

from configs.finetune_common import finetune_config


def get_config(encoder: str = "lgi"):
    return finetune_config(encoder or "lgi", data_dir="data/dfew", builder="dfew --annotations DFEW_SPLITS/",
                           num_classes=7, sampling_rate=4, batch_lgi=96, batch_svfap=64, kfold=5)
