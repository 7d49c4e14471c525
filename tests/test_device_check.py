"""benchmarks/device_check.py in its reduced form: the script that runs on a lent accelerator must not rot while
none is lent (it is run by .ci/run after the default suite: ~3 min on 2 cores)."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.extended
def test_reduced_device_check_runs_every_part(golden_dir, tmp_path):
    out = tmp_path / "device_cpu.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "TQDM_DISABLE": "1"}
    r = subprocess.run([sys.executable, "-m", "benchmarks.device_check", "--reduced", "--golden", str(golden_dir),
                        "--out", str(out)], capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert all(res[k]["ok"] for k in ("parity", "step", "train")), {k: res[k].get("error") for k in res}
    assert len([ln for ln in res["parity"]["result"]["lines"] if ln.endswith("PASS")]) == 4
    steps = res["step"]["result"]
    assert {(r["case"], r["remat"]) for r in steps} == {(c, m) for c in ("lgi_finetune", "tpsbt_pretrain")
                                                        for m in ("none", "full")}
    assert all(r["loss_finite"] and r["step_s_median"] > 0 and r["xla_flops_per_step"] > 0 for r in steps)
    train = res["train"]["result"]
    assert train["steps"] == 4 and train["clips_per_s_last_window"] > 0
