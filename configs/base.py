"""Every config key with its default. Job configs start from ``base_config()`` and change what differs, so a
misspelt key on the command line (``--config.optim.base_lrr=1``) fails loudly instead of being ignored.

Defaults = the published fine-tuning recipe (FINETUNING.md §1); pre-training configs override the optimiser.

This file is the single source of defaults: the code reads ``config.x`` (never ``config.get("x", default)``), and the
pipelines' option objects take no defaults for anything set here. "Off" is the empty value of a key's type, so it can
be written on the command line: ``""`` for a string (``--config.data.rand_augment=``), ``()`` for a tuple
(``--config.data.crop_scale='()'``), ``0`` for a count or interval; keys that hold an optional number are
placeholders whose default ``None`` is off. The one place that turns these into the pipelines' ``None`` is
``facemae_jax/tasks.py``.
"""

from ml_collections import ConfigDict, config_dict


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.task = "finetune"  # pretrain | finetune
    c.seed = 0
    c.model = ConfigDict({"name": "", "overrides": ConfigDict()})  # registry name + ModelConfig overrides
    c.init_from = ""  # finetune: our pretrain workdir / converted dir, or an official .pth (converted on the fly)
    c.batch_size = 96  # global batch (all processes)
    c.mesh = ConfigDict({"data": -1, "fsdp": 1})  # -1 = the remaining devices
    c.sharding_rules = (("embed", "fsdp"), ("hidden", None), ("classes", None), ("norm", None))
    c.data = ConfigDict({
        "dir": "",  # dataset directory (shards + dataset_info.json)
        "builder": "",  # how to build it (shown in the error message when it is missing)
        "task": "classification",  # classification | regression
        "train_split": "train",
        "eval_split": "test",
        "sampling_rate": 4,
        "worker_count": -1,  # grain worker processes; -1 = chosen from the machine (data_pipelines/worker_autotune.py)
        "read_threads": 1,
        "prefetch_batches": -1,  # batches buffered by the training process; -1 = chosen (2)
        # fine-tune augmentation (FINETUNING §3)
        "rand_augment": "rand-m7-n4-mstd0.5-inc1",
        "crop_scale": (0.08, 1.0),  # Q23: the reference uses 0.08 although 0.8 was intended
        "flip_probability": 0.5,
        "erase_probability": 0.25,
        # pre-training augmentation (PRETRAINING §1)
        "num_samples": 1,
        "fixed_crop_size": config_dict.placeholder(int),
        "multiscale_scales": (1.0, 0.875, 0.75, 0.66),
        "multiscale_resize": "fast",  # fast (OpenCV uint8, ~0.2 grey levels from PIL) | cv2 | pil (faithful)
        "synthetic": config_dict.placeholder(ConfigDict),  # build the synthetic dataset here if missing
        # input-pipeline throughput (README "Input pipeline")
        "rand_augment_on": "host",  # host (PIL, faithful) | device (JAX in the train step, with the crop and flip)
        "worker_buffer_size": -1,  # batches buffered per worker process; -1 = chosen (2 with workers)
        "jpeg_dct_downscale": True,  # frames stored >= 2x the model size: reduced-scale JPEG decode (~1 level off)
    })
    c.optim = ConfigDict({
        "base_lr": 1e-3,  # per 256 samples
        "min_lr": 1e-6,  # per 256 samples
        "warmup_epochs": 5,
        "warmup_steps": 0,  # > 0 overrides warmup_epochs
        "epochs": 100,
        "total_steps": 0,  # > 0 overrides epochs (schedule length)
        "stop_after_epochs": 0,  # > 0: stop early, schedule unchanged (MAE-DFER pretraining stops at 50/100, Q9)
        "stop_after_steps": 0,
        "weight_decay": 0.05,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "layer_decay": config_dict.placeholder(float),
        "grad_clip": config_dict.placeholder(float),
        "skip_weight_decay": ("lg_region_tokens",),
        "corrected_region_token_decay": False,  # Q10 fix
        "corrected_downsampler_layer_ids": False,  # Q11 fix
        "trainable": (),  # torch-name prefixes that train, e.g. ("fc_norm.", "head.") = linear probe; () = all
    })
    c.optim.layer_decay = 0.75
    c.pretrain = ConfigDict({"frame_diff": True, "diff_weight": config_dict.placeholder(float)})
    c.finetune = ConfigDict({
        "label_smoothing": 0.1,
        "mixup_alpha": 0.8,
        "cutmix_alpha": 1.0,
        "mixup_prob": 1.0,
        "switch_prob": 0.5,
        "regression_loss": "mse",
    })
    c.eval = ConfigDict({"num_segments": 2, "num_crops": 2, "batch_size": 48})
    c.checkpoint = ConfigDict({"every_steps": 1000, "keep": 3, "async_save": True})
    c.log_every_steps = 50
    c.eval_every_steps = 0
    c.final_eval = True
    c.kfold = 0  # > 0: run folds 1..k (splits fold{k}/train, fold{k}/test), one workdir each, and a mean table
    c.compilation_cache_dir = "~/.cache/facemae_jax/jax_cache"  # persistent XLA cache (restarts skip compiling); "" off
    # multi-process audit (tests/test_multiprocess.py): each process logs the split positions of its training clips
    c.log_clip_positions = False
    return c


def pretrain_defaults(c: ConfigDict) -> ConfigDict:
    """The shared pre-training optimisation (PRETRAINING §4)."""
    c.task = "pretrain"
    c.optim.base_lr = 3e-4
    c.optim.min_lr = 1e-5
    c.optim.betas = (0.9, 0.95)
    c.optim.layer_decay = None
    c.optim.skip_weight_decay = ("mask_token", "lg_region_tokens")  # bare names, as the reference (Q10)
    c.data.train_split = "pretrain"
    c.data.eval_split = "pretrain"
    c.final_eval = True
    return c
