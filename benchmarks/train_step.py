"""Cost of one training step of the published models: compile time, step time, clips/s, memory, FLOPs, MFU.

    python -m benchmarks.train_step --out results/train_step_cpu.json                # base models, CPU
    python -m benchmarks.train_step --cases lgi_finetune tpsbt_pretrain --batch 64 --dtype bfloat16 \\
        --attention_impl cudnn --remat full                                         # an accelerator
    python -m benchmarks.train_step --tiny --repeats 1                              # seconds: does it still run

The step is the trainer's own (``steps.make_*_step`` with the optimiser of the case's job config: parameter groups,
layer-wise lr decay, mixup/cutmix, erasing, targets), jit-compiled with donated state, as ``train.run`` runs it.
Per case: compile time (lower + compile), median step time over ``--repeats`` calls after a warm-up, clips/s,
XLA's memory analysis of the compiled step (arguments, outputs, temporaries = the peak device memory beyond the
state), FLOPs per step from XLA's cost analysis next to the analytic count (3 x forward; forward FLOPs from the
papers' GMACs per 16x160^2 view), and utilisation: against the device's bf16 dense peak where the device is in
``PEAK_FLOPS``, and on CPU against a 1024^2 float32 GEMM measured in the same run, before and after the cases
(this machine's practical peak; it drifts, so both are reported).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per chip (vendor figures, no sparsity).
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}
# Forward FLOPs per 16x160x160 view (2 x the published GMACs: MAE-DFER 49.7, SVFAP 43.6, ViT-B/VideoMAE 80.8;
# MAE-DFER pre-training's 28 GFLOP from the encoder on the visible 10% + the decoder).
FORWARD_GFLOPS = {"lgi_finetune": 99.4, "tpsbt_finetune": 87.2, "vit_finetune": 161.6, "lgi_pretrain": 28.0}

CASES = {  # case -> (model, job config module, job config argument)
    "lgi_finetune": ("vit_base_dim512_no_depth_patch16_160", "configs.finetune_dfew", "lgi"),
    "tpsbt_finetune": ("svfap_base_patch16_160", "configs.finetune_dfew", "svfap"),
    "vit_finetune": ("vit_base_patch16_160", "configs.finetune_dfew", "lgi"),
    "lgi_pretrain": ("pretrain_videomae_base_dim512_no_depth_patch16_160", "configs.pretrain_vox2", None),
    "tpsbt_pretrain": ("pretrain_svfap_base_patch16_160", "configs.pretrain_vox2_svfap", None),
    "vit_pretrain": ("pretrain_videomae_base_patch16_160", "configs.pretrain_vox2", None),
}
TINY = {"lgi_finetune": "lgi_tiny_finetune", "tpsbt_finetune": "tpsbt_tiny_finetune",
        "vit_finetune": "vit_tiny_finetune", "lgi_pretrain": "lgi_tiny_pretrain",
        "tpsbt_pretrain": "tpsbt_tiny_pretrain", "vit_pretrain": "vit_tiny_pretrain"}


def gemm_flops_per_s(n: int = 1024, repeats: int = 10) -> float:
    """Median FLOP/s of an n x n float32 matmul under jit: the calibration the step is compared with."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)).astype(np.float32))
    mm = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(mm(a, a))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(mm(a, a))
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def build_model_and_optimizer(case: str, batch: int, *, tiny: bool = False, dtype: str = "float32",
                              attention_impl: str = "xla", remat: str = "none", overrides: dict | None = None):
    """-> (model, model config, task, optimiser) of the case's job config, as the trainer builds them."""
    import importlib

    from facemae_jax import tasks, train
    from facemae_jax.models import registry

    model_name, module, arg = CASES[case]
    config = importlib.import_module(module).get_config(*([arg] if arg else []))
    config.batch_size = batch
    cfg = registry.get_config(TINY[case] if tiny else model_name, dtype=dtype, attention_impl=attention_impl,
                              remat=remat, **(overrides or {}))
    model = registry.create_model(cfg)
    task = tasks.for_config(config, cfg)
    tx, _, _, _ = train.schedule_and_optimizer(task, registry.abstract_params(model), 1000, batch)
    return model, cfg, task, tx


def build_step(case: str, batch: int, *, tiny: bool, dtype: str, attention_impl: str, remat: str,
               overrides: dict | None = None):
    """-> (jitted step, state, batch, model config, optimiser): the trainer's step for the case's job config."""
    from facemae_jax.models import registry

    model, cfg, task, tx = build_model_and_optimizer(case, batch, tiny=tiny, dtype=dtype,
                                                     attention_impl=attention_impl, remat=remat, overrides=overrides)
    params = registry.init_params(registry.create_model(cfg.replace(attention_impl="xla")), jax.random.key(0))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    rng = np.random.default_rng(0)
    inputs = registry.example_inputs(cfg, batch=batch)
    data = {"video": rng.integers(0, 256, inputs[0].shape, dtype=np.uint8)}
    if cfg.mode == "pretrain":
        data["mask"] = inputs[1]
    else:
        data["label"] = rng.integers(0, cfg.num_classes, (batch,), dtype=np.int32)
        data["erase_box"] = np.tile(np.array([[20, 30, 40, 50]], np.int32), (batch, 1))
    return jax.jit(task.train_step(model, tx), donate_argnums=0), state, data, cfg, tx


def time_steps(compiled, state, data, repeats: int) -> tuple[Any, dict, list[float]]:
    """One warm-up call, then ``repeats`` timed calls of the compiled (donating) step -> (state, metrics, seconds)."""
    state, m = compiled(state, data)
    jax.block_until_ready(m)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        state, m = compiled(state, data)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return state, m, times


def bench(case: str, batch: int, repeats: int, *, tiny: bool, dtype: str, attention_impl: str, remat: str,
          gemm: float | None, overrides: dict | None = None) -> dict:
    """One case's row. ``gemm`` (None = no utilisation figure): the run's GEMM FLOP/s; on CPU the row uses the mean
    of two GEMMs measured right before and after its own timed steps instead, and records both."""
    step, state, data, cfg, _ = build_step(case, batch, tiny=tiny, dtype=dtype, attention_impl=attention_impl,
                                           remat=remat, overrides=overrides)
    t0 = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    mem = compiled.memory_analysis()
    # A CPU host's GEMM drifts by 10-50% within minutes: calibrate right around this case's timed steps.
    per_case = gemm is not None and jax.default_backend() == "cpu"
    gemm_around = [gemm_flops_per_s()] if per_case else [gemm]
    state, m, times = time_steps(compiled, state, data, repeats)
    if per_case:
        gemm_around.append(gemm_flops_per_s())
        gemm = statistics.mean(gemm_around)
    med = statistics.median(times)
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), None)
    analytic = None if tiny or overrides or case not in FORWARD_GFLOPS else 3 * FORWARD_GFLOPS[case] * 1e9 * batch
    row = {
        "case": case, "model": cfg.family + "/" + cfg.mode, "tiny": tiny, "batch": batch, "dtype": dtype,
        "attention_impl": attention_impl, "remat": remat, "overrides": overrides or {},
        "num_blocks": cfg.num_blocks, "compile_s": round(compile_s, 2),
        "step_s_median": round(med, 4), "step_s_all": [round(t, 4) for t in times],
        "clips_per_s": round(batch / med, 2), "xla_flops_per_step": flops, "analytic_flops_per_step": analytic,
        "xla_flops_per_s": flops / med,
        "memory_bytes": None if mem is None else {
            "arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
            "temporaries": mem.temp_size_in_bytes, "generated_code": mem.generated_code_size_in_bytes},
        "loss_finite": bool(np.isfinite(float(m["loss"]))),
    }
    if peak:
        row["mfu"] = flops / med / peak
    if gemm:
        row["gemm_1024_flops_per_s"] = gemm_around
        row["fraction_of_gemm_flops"] = flops / med / gemm
    return row


def main(argv=None) -> int:
    from facemae_jax import convert, host_memory

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attention_impl", default="xla")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--tiny", action="store_true", help="tiny models (a check that the benchmark runs)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=JSON",
                    help="ModelConfig field to change (repeatable), e.g. depth=4 to measure compile time per block")
    ap.add_argument("--out", default=None)
    ap.add_argument("--host-malloc", default=None, choices=["auto", "keep", "default"],
                    help="host_memory.keep_freed_memory mode, as launch.py applies it (default: "
                         "$FACEMAE_HOST_MALLOC or auto = on CPU hosts)")
    args = ap.parse_args(argv)
    host_malloc_kept = host_memory.keep_freed_memory(args.host_malloc)  # before the backend starts its threads
    jax.config.update("jax_default_matmul_precision", "highest" if args.dtype == "float32" else "default")
    on_cpu = jax.default_backend() == "cpu"
    gemm_before = gemm_flops_per_s() if on_cpu else None
    rows = []
    for case in args.cases:
        r = bench(case, args.batch, args.repeats, tiny=args.tiny, dtype=args.dtype,
                  attention_impl=args.attention_impl, remat=args.remat, gemm=gemm_before,
                  overrides=convert.parse_overrides(args.override))
        rows.append(r)
        rel = f"  {100 * r['fraction_of_gemm_flops']:.0f}% of GEMM" if "fraction_of_gemm_flops" in r else ""
        mfu = f"  MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
        temp = r["memory_bytes"]["temporaries"] / 2**30 if r["memory_bytes"] else float("nan")
        print(f"{case:<15} batch {r['batch']:>3} {r['dtype']:<8} attn {r['attention_impl']:<5} remat {r['remat']:<5}"
              f" compile {r['compile_s']:6.1f}s  step {r['step_s_median']:.3f}s  {r['clips_per_s']:7.2f} clips/s"
              f"  {r['xla_flops_per_step'] / 1e9:8.1f} GFLOP (analytic "
              f"{(r['analytic_flops_per_step'] or 0) / 1e9:.1f})  temp {temp:.2f} GiB{rel}{mfu}", flush=True)
    gemm_after = gemm_flops_per_s() if on_cpu else None
    meta = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
            "device_count": jax.device_count(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "jax": jax.__version__, "gemm_1024_flops_per_s": [gemm_before, gemm_after],
            "load_average": os.getloadavg(), "host_malloc_kept": host_malloc_kept,
            "command": "python -m benchmarks.train_step " + " ".join(sys.argv[1:] if argv is None else argv)}
    if on_cpu:
        print(f"GEMM 1024^2 float32: {gemm_before / 1e9:.0f} GFLOP/s before, {gemm_after / 1e9:.0f} after", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
