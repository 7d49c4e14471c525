"""benchmarks.torch_reference_step needs torch and a reference checkout, which CI does not have: it must say so."""

import importlib.util

import pytest

from benchmarks import torch_reference_step


def test_missing_torch_is_one_clear_message(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(SystemExit, match="torch is needed for this benchmark"):
        torch_reference_step.main(["--reference-repo", str(tmp_path)])


def test_a_directory_without_the_reference_code_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # torch, timm, einops "present"
    (tmp_path / "README.md").write_text("not MAE-DFER")
    with pytest.raises(SystemExit, match=r"no modeling_finetune.py there.*sunlicai/MAE-DFER"):
        torch_reference_step.main(["--reference-repo", str(tmp_path)])
