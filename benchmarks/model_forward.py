"""Forward-pass cost of the published models: compile time, median step time, clips/s, parameter count.

    python -m benchmarks.model_forward [--models NAME ...] [--batch 1] [--repeats 5] [--out results.json]

Random weights, one 16x160x160 clip per batch element, jit-compiled, float32 (the CPU default; bf16 is slower on
these CPUs). Pre-train models are run with a valid 90% mask of their kind. Reports medians over ``--repeats``
timed calls after one warm-up call (machines are noisy: compare ratios, not absolute numbers).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import numpy as np

from facemae_jax.models import registry

DEFAULT = ("vit_base_dim512_no_depth_patch16_160", "svfap_base_patch16_160",
           "pretrain_videomae_base_dim512_no_depth_patch16_160", "pretrain_svfap_base_patch16_160")


def bench(name: str, batch: int, repeats: int) -> dict:
    cfg = registry.get_config(name)
    model = registry.create_model(cfg)
    params = registry.init_params(model, jax.random.key(0))
    inputs = registry.example_inputs(cfg, batch=batch)
    video = np.random.default_rng(0).normal(size=inputs[0].shape).astype(np.float32)
    args = (video,) + tuple(inputs[1:])
    fwd = jax.jit(lambda p, *xs: model.apply({"params": p}, *xs))
    t0 = time.perf_counter()
    out = fwd(params, *args)
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fwd(params, *args))
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"model": name, "params": registry.count_params(params), "batch": batch, "output_shape": list(out.shape),
            "first_call_s": round(compile_s, 2), "median_s": round(med, 4), "clips_per_s": round(batch / med, 2),
            "finite": bool(np.all(np.isfinite(np.asarray(out))))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(DEFAULT))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    for name in args.models:
        r = bench(name, args.batch, args.repeats)
        rows.append(r)
        print(f"{r['model']:<52} {r['params']:>12,} params  out {r['output_shape']}  "
              f"first call {r['first_call_s']:6.1f}s  median {r['median_s']:.3f}s  {r['clips_per_s']:.2f} clips/s",
              flush=True)
    meta = {"device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
            "cpu_count": __import__("os").cpu_count(), "machine": platform.machine(), "jax": jax.__version__}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
