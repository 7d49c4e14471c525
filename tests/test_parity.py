"""The parity tool on the goldens: passes on the real files, fails on a perturbed one, maps reference ctor kwargs."""

import json
import subprocess
import sys

import numpy as np
import pytest

from facemae_jax import parity


def test_parity_passes_on_all_goldens(golden_dir, capsys):
    files = sorted(str(p) for p in golden_dir.glob("*.npz"))  # includes input_seed0.npz, which must be skipped
    assert parity.main(files) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "PASS" in ln]
    assert len(lines) == 4, out
    assert "input_seed0" not in out


def test_parity_fails_on_a_perturbed_golden(golden_dir, tmp_path):
    src = golden_dir / "svfap_finetune_tiny_seed0.npz"
    z = dict(np.load(src))
    z["pooled"] = z["pooled"] + 1e-2 * np.abs(z["pooled"]).mean()
    (tmp_path / "input_seed0.npz").symlink_to(golden_dir / "input_seed0.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, **z)
    errs, _ = parity.check_file(str(bad))
    assert errs["output"] < 1e-4 and errs["pooled"] > 1e-3
    assert parity.main([str(bad)]) == 1


def test_cli_exit_status(golden_dir):
    r = subprocess.run([sys.executable, "-m", "facemae_jax.parity", str(golden_dir / "input_seed0.npz")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "no golden files checked" in r.stdout


@pytest.mark.parametrize(
    "ctor,family,width,heads",
    [
        ({"callable": "pretrain_svfap_base_patch16_160", "kind": "entrypoint", "kwargs": {}}, "svfap", 768, 12),
        ({"callable": "svfap_base_patch16_160", "kind": "entrypoint", "kwargs": {"num_classes": 11}}, "svfap", 512, 8),
        ({"callable": "vit_base_dim512_no_depth_patch16_160", "kind": "entrypoint",
          "kwargs": {"depth": 16, "attn_type": "local_global", "lg_region_size": [2, 5, 10],
                     "lg_classify_token_type": "region"}}, "mae_dfer", 512, 8),
    ],
)
def test_config_from_reference_entrypoints(ctor, family, width, heads):
    mode = "pretrain" if ctor["callable"].startswith("pretrain") else "finetune"
    cfg = parity.config_from_meta({"family": family, "mode": mode, "model_constructor": ctor,
                                   "mask": {"generator": "TubeMaskingGenerator", "args": {"mask_ratio": 0.9}}})
    assert (cfg.embed_dim, cfg.num_heads) == (width, heads)
    if "num_classes" in ctor["kwargs"]:
        assert cfg.num_classes == 11


def test_unknown_reference_kwarg_is_an_error():
    meta = {"family": "mae_dfer", "mode": "finetune",
            "model_constructor": {"callable": "VisionTransformer", "kind": "class",
                                  "kwargs": {"embed_dim": 64, "some_new_flag": True}}}
    with pytest.raises(ValueError, match="some_new_flag"):
        parity.config_from_meta(meta)
    meta["model_constructor"]["kwargs"] = {"init_values": 0.1}
    with pytest.raises(ValueError, match="init_values"):
        parity.config_from_meta(meta)


def test_golden_meta_maps_to_tiny_presets(golden_dir):
    from facemae_jax.models import get_config

    for name, preset in [("mae_dfer_finetune_tiny_seed0.npz", "lgi_tiny_finetune"),
                         ("svfap_pretrain_tiny_seed0.npz", "tpsbt_tiny_pretrain")]:
        meta = json.loads(str(np.load(golden_dir / name)["meta"]))
        got, want = parity.config_from_meta(meta).to_dict(), get_config(preset).to_dict()
        if want["mode"] == "finetune":  # decoder / mask fields do not exist for a classifier
            for d in (got, want):
                for k in [k for k in d if k.startswith(("decoder_", "mask_"))]:
                    del d[k]
        assert got == want
