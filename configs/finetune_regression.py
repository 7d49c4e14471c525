"""Regression fine-tuning (dimensional emotion / personality, as in the SVFAP paper): TPSBT with a K-output head,
MSE loss, CCC/PCC/MAE metrics, mean over the 2x2 views. No mixup/label smoothing (they are for classes).

    python -m data_pipelines.build csv --annotations MY_SPLITS/ --out data/my_regression   # float label columns
    python launch.py --config=configs/finetune_regression.py --config.model.overrides.num_classes=2 \\
        --config.init_from=runs/svfap_pretrain
"""

from configs.finetune_common import finetune_config


def get_config(encoder: str = "svfap"):
    c = finetune_config(encoder or "svfap", data_dir="data/my_regression", builder="csv --annotations MY_SPLITS/",
                        num_classes=2, sampling_rate=4, batch_lgi=96, batch_svfap=64, kfold=0)
    c.data.task = "regression"
    c.model.overrides.head_activation = "sigmoid"  # targets scaled to [0, 1]; None for unbounded targets
    c.finetune.mixup_alpha = 0.0
    c.finetune.cutmix_alpha = 0.0
    c.finetune.label_smoothing = 0.0
    c.finetune.regression_loss = "mse"
    return c
