"""Converter: bit-exact round trips, strict key checking, pre-train -> fine-tune, official .pth via the CLI."""

import json

import chex
import jax
import numpy as np
import pytest
from flax import traverse_util

from facemae_jax import convert, parity, torch_io
from facemae_jax.models import create_model, get_config, init_params

GOLDENS = [
    "mae_dfer_finetune_tiny_seed0.npz",
    "mae_dfer_pretrain_tiny_seed0.npz",
    "svfap_finetune_tiny_seed0.npz",
    "svfap_pretrain_tiny_seed0.npz",
]


def golden_state(golden_dir, name):
    z = np.load(golden_dir / name)
    meta = json.loads(str(z["meta"]))
    sd = {k[len("param/"):]: z[k].astype(np.float32) for k in z.files if k.startswith("param/")}
    return sd, parity.config_from_meta(meta), z


@pytest.mark.parametrize("name", GOLDENS)
def test_round_trip_is_bit_exact(golden_dir, name):
    sd, cfg, _ = golden_state(golden_dir, name)
    params, _ = convert.torch_to_flax(sd, cfg)
    back = convert.flax_to_torch(params, cfg)
    assert back.keys() == sd.keys()
    for k in sd:
        assert back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape, k
        assert np.array_equal(back[k], sd[k]), k
    # layouts really are transposed on the Flax side
    flat = traverse_util.flatten_dict(params)
    pre = ("encoder",) if cfg.mode == "pretrain" else ()
    conv = flat[pre + ("patch_embed", "proj", "kernel")]
    assert conv.shape == (2, 16, 16, 3, 64)


def test_shared_attention_is_tied_both_ways():
    cfg = get_config("lgi_tiny_finetune", num_frames=4, img_size=64, region_size=(2, 2, 4), share_first_third=True)
    params = init_params(create_model(cfg), jax.random.key(0))
    sd = convert.flax_to_torch(params, cfg)
    assert np.array_equal(sd["blocks.0.third_attn.q.weight"], sd["blocks.0.first_attn.q.weight"])
    assert set(sd) == set(convert.expected_torch_keys(cfg))
    params2, _ = convert.torch_to_flax(sd, cfg)
    assert "third_attn" not in params2["blocks_0"]
    sd["blocks.1.third_attn.proj.bias"] = sd["blocks.1.third_attn.proj.bias"] + 1
    with pytest.raises(convert.ConversionError, match="blocks.1.third_attn.proj.bias differs"):
        convert.torch_to_flax(sd, cfg)


def test_mismatches_are_listed_not_ignored(golden_dir):
    sd, cfg, _ = golden_state(golden_dir, "mae_dfer_finetune_tiny_seed0.npz")
    sd = dict(sd)
    del sd["blocks.1.mlp.fc1.bias"]
    sd["blocks.0.extra.weight"] = np.zeros(3, np.float32)
    sd["head.weight"] = np.zeros((11, 64), np.float32)
    with pytest.raises(convert.ConversionError) as e:
        convert.torch_to_flax(sd, cfg)
    msg = str(e.value)
    assert "missing in checkpoint (1)" in msg and "blocks.1.mlp.fc1.bias" in msg
    assert "unexpected in checkpoint (1)" in msg and "blocks.0.extra.weight" in msg
    assert "shape mismatch (1)" in msg and "head.weight" in msg


def test_wider_pretrain_checkpoint_fails_loudly_q7():
    """QUIRKS Q7: a 768-wide SVFAP pre-train state must not 'load' into a 512-wide fine-tune model."""
    small = dict(num_frames=8, img_size=64, stage_depths=(1, 1, 1), mask_ratio=0.5)
    wide = get_config("tpsbt_tiny_pretrain", **small, embed_dim=96, num_heads=3)
    sd = convert.flax_to_torch(init_params(create_model(wide), jax.random.key(0)), wide)
    with pytest.raises(convert.ConversionError, match="shape mismatch"):
        convert.pretrain_to_finetune(sd, get_config("tpsbt_tiny_finetune", **small))


def test_pretrain_to_finetune_follows_reference_loader(golden_dir):
    sd, pcfg, _ = golden_state(golden_dir, "mae_dfer_pretrain_tiny_seed0.npz")
    fcfg = get_config("lgi_tiny_finetune", num_classes=5)
    params, report = convert.pretrain_to_finetune(sd, fcfg)
    assert report["initialised"] == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert "mask_token" in report["dropped"] and "norm.weight" in report["dropped"]
    assert "encoder_to_decoder.weight" in report["dropped"]
    assert any(k.startswith("decoder.blocks.") for k in report["dropped"])
    ft = convert.flax_to_torch(params, fcfg)
    for k, v in ft.items():
        if not k.startswith(("fc_norm", "head")):
            assert np.array_equal(v, sd["encoder." + k]), k
    assert np.all(ft["fc_norm.weight"] == 1) and ft["head.weight"].shape == (5, 64)
    # the converted model runs
    out = create_model(fcfg).apply({"params": params}, np.zeros((1, 16, 160, 160, 3), np.float32))
    assert out.shape == (1, 5)


def test_official_pth_via_cli_reproduces_golden_logits(golden_dir, tmp_path):
    """The real torch.save file -> `python -m facemae_jax.convert` -> orbax dir -> same logits as the reference."""
    out = tmp_path / "converted"
    rc = convert.main(["--checkpoint", str(golden_dir / "mae_dfer_finetune_tiny_seed0.pth"),
                       "--model", "lgi_tiny_finetune", "--out", str(out), "--class_names",
                       "happy,sad,neutral,angry,surprise,disgust,fear"])
    assert rc == 0
    params, cfg, meta = convert.load_converted(str(out))
    assert meta["class_names"][0] == "happy" and meta["source_epoch"] == 9
    z = np.load(golden_dir / "mae_dfer_finetune_tiny_seed0.npz")
    x, _, _ = parity.load_input(str(golden_dir / "mae_dfer_finetune_tiny_seed0.npz"), z,
                                json.loads(str(z["meta"])))
    jax.config.update("jax_default_matmul_precision", "highest")
    logits = jax.jit(create_model(cfg).apply)({"params": params}, x.transpose(0, 2, 3, 4, 1))
    assert parity.rel(logits, z["output"]) < 1e-5


def test_export_round_trips_through_pth(tmp_path):
    cfg = get_config("tpsbt_tiny_finetune", num_frames=8, img_size=64, stage_depths=(1, 1, 1))
    params = init_params(create_model(cfg), jax.random.key(3))
    path = tmp_path / "exported.pth"
    torch_io.save_state_dict(str(path), convert.flax_to_torch(params, cfg))
    sd, _ = torch_io.load_state_dict(str(path))
    back, _ = convert.torch_to_flax(sd, cfg)
    chex.assert_trees_all_equal(jax.tree_util.tree_map(np.asarray, params), back)


def test_converted_model_with_a_damaged_array_is_refused(tmp_path):
    """model.json holds a fingerprint per array (orbax's chunks carry no checksum of the values): a stored model whose
    bytes changed is refused with the array named, whatever path loads it."""
    import glob

    from facemae_jax import loading

    cfg = get_config("tpsbt_tiny_finetune", num_frames=8, img_size=64, stage_depths=(1, 1, 1))
    params = init_params(create_model(cfg), jax.random.key(5))
    out = tmp_path / "model"
    convert.save_converted(str(out), params, cfg, {"model_name": "tpsbt_tiny_finetune"})
    back, _, meta = convert.load_converted(str(out))  # intact: loads, and the checksums stay out of the metadata
    assert "checksums" not in meta and len(json.loads((out / convert.MODEL_JSON).read_text())["checksums"]["arrays"])
    chex.assert_trees_all_equal(jax.tree_util.tree_map(np.asarray, params), back)
    # rewrite one array in place with other values (what a flipped bit in a stored chunk restores as)
    meta_json = json.loads((out / convert.MODEL_JSON).read_text())
    changed = jax.tree_util.tree_map(np.asarray, params)
    changed["head"]["bias"] = changed["head"]["bias"] + 1.0
    convert.save_converted(str(out), changed, cfg, {"model_name": "tpsbt_tiny_finetune"})
    (out / convert.MODEL_JSON).write_text(json.dumps(meta_json))  # the old checksums stay
    assert glob.glob(str(out / "params" / "*"))
    with pytest.raises(convert.ExportCorrupt, match=r"1 of \d+ arrays differ .*head/bias"):
        convert.load_converted(str(out))
    with pytest.raises(loading.ModelLoadError, match="head/bias.*damaged"):
        loading.load_model(str(out))
