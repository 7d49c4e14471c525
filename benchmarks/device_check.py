"""The check to run whenever a machine with an accelerator is at hand: parity, step speed, and one real training run.

    python -m benchmarks.device_check --golden GOLDEN_DIR --out results/device_<kind>.json    # <= 8 min on a GPU
    python -m benchmarks.device_check --reduced --golden ../shared/golden --out /tmp/dc.json  # CPU, CI (rot check)

Three parts, each recorded even when another fails (a lease is too short to lose everything to one error):

1. **parity** on the device: every golden in ``--golden`` (forward; ``steps/`` and ``views/`` too where present)
   through ``facemae_jax.parity``, float32 with the highest matmul precision, as on the CPU.
2. **step**: ``benchmarks.train_step`` for LGI-Former / TPSBT fine-tuning and pre-training at a realistic batch
   per device, bf16 compute, attention ``xla`` vs ``cudnn`` and remat ``none`` vs ``full`` (compile time, step
   time, clips/s, XLA's peak temporaries, FLOPs, MFU).
3. **train**: one end-to-end fine-tuning run through ``train.run`` on generated 160 px face videos with the real
   grain pipeline and ``--workers`` worker processes, so clips/s and ``input_wait_fraction`` show whether the
   input or the step bounds the throughput.

``--reduced`` runs the same code on tiny models, batch 2, a few steps and no workers: minutes on a CPU, so a test
keeps the script from rotting while no accelerator is lent. The GPU machine lacks grain, array-record, av,
simplejpeg, ml-collections and tensorboardX: carry them as wheels (README "Device check").
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import tempfile
import time
import traceback
from contextlib import redirect_stdout
from typing import Any, Callable

import jax


def _section(results: dict, name: str, fn: Callable[[], Any]) -> None:
    t0 = time.perf_counter()
    try:
        results[name] = {"ok": True, "result": fn()}
    except Exception as e:  # recorded, and the next part still runs
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    results[name]["seconds"] = round(time.perf_counter() - t0, 1)
    status = "ok" if results[name]["ok"] else "FAILED: " + results[name]["error"]
    print(f"[device_check] {name}: {status} ({results[name]['seconds']} s)", flush=True)


def parity_part(golden: str, reduced: bool) -> dict:
    from facemae_jax import parity

    files = sorted(glob.glob(os.path.join(golden, "*.npz")))
    if not reduced:  # the default test suite already runs these on the CPU
        files += sorted(glob.glob(os.path.join(golden, "steps", "*.npz")))
        files += sorted(glob.glob(os.path.join(golden, "views", "*.npz")))
    if not files:
        raise FileNotFoundError(f"no golden *.npz under {golden!r}")
    buf = io.StringIO()
    with redirect_stdout(buf):
        status = parity.main(files)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    print("\n".join(lines), flush=True)
    if status != 0:
        raise AssertionError("parity failed on the device: " + "; ".join(ln for ln in lines if "PASS" not in ln))
    return {"lines": lines}


def step_part(reduced: bool, batch: int) -> list[dict]:
    from benchmarks import train_step

    cases = ["lgi_finetune", "tpsbt_pretrain"] if reduced else ["lgi_finetune", "tpsbt_finetune", "lgi_pretrain",
                                                                  "tpsbt_pretrain"]
    on_gpu = jax.default_backend() == "gpu"
    dtype = "bfloat16" if on_gpu else "float32"
    variants = [("xla", "none"), ("xla", "full")] + ([("cudnn", "none"), ("cudnn", "full")] if on_gpu else [])
    rows = []
    for case in cases:
        for attention_impl, remat in variants:
            try:
                r = train_step.bench(case, 2 if reduced else batch, 1 if reduced else 5, tiny=reduced, dtype=dtype,
                                     attention_impl=attention_impl, remat=remat, gemm=None)
            except Exception as e:  # e.g. a shape cuDNN does not take: recorded, the others still run
                r = {"case": case, "attention_impl": attention_impl, "remat": remat,
                     "error": f"{type(e).__name__}: {e}"}
            rows.append(r)
            keys = ("case", "attention_impl", "remat", "step_s_median", "clips_per_s", "mfu", "error")
            print(f"  {json.dumps({k: r.get(k) for k in keys})}", flush=True)
    return rows


def train_part(reduced: bool, workers: int, workdir: str) -> dict:
    """Fine-tuning on generated face videos through the real trainer and grain pipeline."""
    from configs.study import common
    from facemae_jax import train

    data_dir = os.path.join(workdir, "data")
    synth = dict(seed=0, num_pretrain=0, train_per_class=4 if reduced else 40, val_per_class=1, test_per_class=1,
                 frames=32, size=64 if reduced else 160, workers=1 if reduced else max(1, workers),
                 clips_per_shard=64, scenario="wild")
    c = common.finetune("lgi", data_dir, steps=4 if reduced else 60, synth=synth, batch=4 if reduced else 32 *
                        jax.device_count())
    if not reduced:  # the published model, recipe and augmentation at the published geometry
        c.model.name = "vit_base_dim512_no_depth_patch16_160"
        c.model.overrides = {"dtype": "bfloat16" if jax.default_backend() == "gpu" else "float32"}
        c.data.rand_augment = "rand-m7-n4-mstd0.5-inc1"
        c.data.crop_scale = (0.08, 1.0)
        c.data.erase_probability = 0.25
        c.finetune.mixup_alpha, c.finetune.cutmix_alpha = 0.8, 1.0
        c.data.sampling_rate = 2
    c.data.worker_count = 0 if reduced else workers
    c.log_every_steps = 2 if reduced else 10
    c.final_eval = False
    c.compilation_cache_dir = ""
    t0 = time.perf_counter()
    train.run(c, os.path.join(workdir, "run"))
    wall = time.perf_counter() - t0
    with open(os.path.join(workdir, "run", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train_rows = [r for r in rows if "train/loss" in r]
    last = train_rows[-1]
    return {"wall_s": round(wall, 1), "steps": last["step"], "batch": c.batch_size, "workers": c.data.worker_count,
            "clips_per_s_last_window": last.get("perf/clips_per_s"),
            "input_wait_fraction_last_window": last.get("perf/input_wait_fraction", last.get("input_wait_fraction")),
            "metrics": train_rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--golden", default=os.path.join("..", "shared", "golden"))
    ap.add_argument("--out", default=None, help="JSON path (default results/device_<kind>.json)")
    ap.add_argument("--reduced", action="store_true", help="tiny models, a few steps: the CPU / CI variant")
    ap.add_argument("--batch", type=int, default=32, help="step part: batch per device")
    ap.add_argument("--workers", type=int, default=12, help="train part: grain worker processes")
    ap.add_argument("--skip", nargs="*", default=[], choices=["parity", "step", "train"])
    args = ap.parse_args(argv)
    kind = jax.devices()[0].device_kind.replace(" ", "_").lower()
    out = args.out or os.path.join("results", f"device_{kind}.json")
    results: dict[str, Any] = {"meta": {
        "device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "devices": jax.device_count(),
        "jax": jax.__version__, "reduced": args.reduced, "command": "python -m benchmarks.device_check " +
        " ".join(sys.argv[1:] if argv is None else argv), "date": time.strftime("%Y-%m-%d %H:%M:%S")}}
    t0 = time.perf_counter()
    if "parity" not in args.skip:
        jax.config.update("jax_default_matmul_precision", "highest")
        _section(results, "parity", lambda: parity_part(args.golden, args.reduced))
        jax.config.update("jax_default_matmul_precision", "default")
    if "step" not in args.skip:
        _section(results, "step", lambda: step_part(args.reduced, args.batch * jax.device_count()))
    if "train" not in args.skip:
        with tempfile.TemporaryDirectory(prefix="device_check_") as tmp:
            _section(results, "train", lambda: train_part(args.reduced, args.workers, tmp))
    results["meta"]["total_s"] = round(time.perf_counter() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2, default=str)
    failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("ok") is False]
    print(f"[device_check] {out}: {'all parts ok' if not failed else 'FAILED: ' + ', '.join(failed)} "
          f"in {results['meta']['total_s']} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
