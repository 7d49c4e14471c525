"""Every job config loads, resolves to a registered model, and carries the published recipe values."""

import importlib

import pytest

from facemae_jax.train import model_config

CONFIGS = [("demo", None), ("pretrain_vox2", None), ("pretrain_vox2_svfap", None), ("finetune_dfew", "lgi"),
           ("finetune_dfew", "svfap"), ("finetune_ferv39k", "lgi"), ("finetune_ferv39k", "svfap"),
           ("finetune_mafw", "lgi"), ("finetune_mafw", "svfap"), ("finetune_regression", None)]


def load(name, arg):
    mod = importlib.import_module(f"configs.{name}")
    return mod.get_config(arg) if arg else mod.get_config()


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_config_resolves(name, arg):
    c = load(name, arg)
    jobs = [c.stages[s] for s in c.stage_order] if "stages" in c else [c]
    for job in jobs:
        cfg = model_config(job)
        assert cfg.mode == job.task


def test_published_values():
    pre = load("pretrain_vox2", None)
    assert (pre.batch_size, pre.optim.base_lr, pre.optim.epochs, pre.optim.stop_after_epochs) == (160, 3e-4, 100, 50)
    assert tuple(pre.optim.betas) == (0.9, 0.95) and model_config(pre).mask_kind == "tube_window"
    assert pre.pretrain.frame_diff and "lg_region_tokens" in pre.optim.skip_weight_decay  # bare name: Q10
    sv = load("pretrain_vox2_svfap", None)
    assert sv.batch_size == 256 and not sv.pretrain.frame_diff and model_config(sv).embed_dim == 512  # Q7
    assert load("finetune_dfew", "lgi").batch_size == 96 and load("finetune_dfew", "svfap").batch_size == 64
    assert load("finetune_ferv39k", "lgi").data.sampling_rate == 1 and load("finetune_ferv39k", "lgi").batch_size == 120
    mafw = load("finetune_mafw", "svfap")
    assert model_config(mafw).num_classes == 11 and mafw.kfold == 5 and mafw.optim.layer_decay == 0.75
    with pytest.raises(ValueError, match="lgi"):
        load("finetune_dfew", "resnet")
