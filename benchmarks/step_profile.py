"""Where the time of one training step goes: a per-operation profile of the compiled step.

    python -m benchmarks.step_profile --case lgi_finetune --out results/step_profile_lgi_finetune_cpu.json
    python -m benchmarks.step_profile --case lgi_pretrain --override depth=4       # quicker, same per-block picture
    python -m benchmarks.step_profile --case lgi_finetune --tiny                   # seconds: does it still run

The step is the one ``benchmarks.train_step`` times (the trainer's own, with the job config's optimiser). It is run
once under ``jax.profiler``; XLA's CPU runtime records one event per executed operation (a *thunk*, named after
its HLO instruction), which this script joins with the compiled HLO text:

* every thunk that contains a ``dot`` or ``convolution`` gets its FLOPs (output size x contracted size x 2), so
  its achieved GFLOP/s can be set against a 1024^2 float32 GEMM measured in the same run — the question "are the
  matmuls slow, or is it everything around them?" gets a number;
* every other thunk is attributed to the model scope it came from (``op_name`` metadata, block index folded,
  forward / backward / step-level), so elementwise, transpose, normalisation and optimiser costs add up per
  source line of the model rather than per fusion name.

Why a separate script: ``train_step`` reports what a step costs, this one says why. On an accelerator the event
names differ (kernels, not thunks); the FLOP attribution is CPU-only and the script says so rather than guess.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time

import jax

from benchmarks import train_step

_SHAPE = re.compile(r"%([\w.\-]+) = [a-z0-9]+\[([\d,]*)\]")
_PARAM = re.compile(r"([\w.\-]+): [a-z0-9]+\[([\d,]*)\]")
_INSTR = re.compile(r"^  (?:ROOT )?%([\w.\-]+) = (.*)$", re.M)
_COMPUTATION = re.compile(r"^%([\w.\-]+) \(.*?\n}", re.S | re.M)
_DOT = re.compile(r"= [a-z0-9]+\[([\d,]*)\][^ ]* (dot|convolution)\(%([\w.\-]+), %([\w.\-]+)\)(.*)")


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


class HloIndex:
    """Shapes, entry instructions and fused computations of a compiled HLO module's text."""

    def __init__(self, text: str):
        self.shape = {m.group(1): _dims(m.group(2)) for m in _SHAPE.finditer(text)}
        for m in _PARAM.finditer(text):
            self.shape.setdefault(m.group(1), _dims(m.group(2)))
        self.instr: dict[str, str] = {}
        for m in _INSTR.finditer(text):
            self.instr.setdefault(m.group(1), m.group(2))
        self.computation = {m.group(1): m.group(0) for m in _COMPUTATION.finditer(text)}
        entry = re.search(r"^ENTRY %.*?\n}", text, re.S | re.M)
        self.entry = [m.group(1) for m in _INSTR.finditer(entry.group(0))] if entry else []

    def _matmul_flops(self, text: str) -> int:
        total = 0
        for m in _DOT.finditer(text):
            out, kind, lhs, rhs, rest = _dims(m.group(1)), m.group(2), m.group(3), m.group(4), m.group(5)
            if kind == "dot":
                contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
                if contract and lhs in self.shape:
                    total += 2 * math.prod(out) * math.prod(self.shape[lhs][int(i)] for i in _dims(contract.group(1)))
            elif rhs in self.shape:  # convolution: each output element contracts the kernel's window x input feature
                window = re.search(r"dim_labels=\w+_(\w+)->", rest)
                kernel = self.shape[rhs]
                if window:  # kernel labels, e.g. 012io: every dim but 'o' is contracted
                    o = window.group(1).index("o")
                    total += 2 * math.prod(out) * math.prod(d for i, d in enumerate(kernel) if i != o)
        return total

    def flops(self, name: str) -> int:
        """FLOPs of the matmuls an entry instruction (= a thunk, ``self.entry``) executes (0 for everything else)."""
        line = self.instr.get(name, "")
        called = re.search(r"calls=%([\w.\-]+)", line)
        if called and called.group(1) in self.computation:
            return self._matmul_flops(self.computation[called.group(1)])
        return self._matmul_flops("= " + line) if line else 0

    def scope(self, name: str) -> str:
        """The model scope of an instruction: its ``op_name`` with block indices folded, marked fwd / bwd / step."""
        m = re.search(r'op_name="([^"]+)"', self.instr.get(name, ""))
        if not m:
            return "(no metadata)"
        op = m.group(1).split(";")[0]
        phase = "bwd" if "transpose(jvp(" in op else "fwd" if "jvp(" in op else "step"
        op = re.sub(r"_\d+(?=/|$)", "_*", re.sub(r"^jit\([^)]*\)/", "", op))  # blocks_3 -> blocks_*, not fc1
        op = re.sub(r"(transpose\()?jvp\([^)]*\)\)?/?", "", op)
        parts = [p for p in op.split("/") if p and not p.startswith(("jit(", "vmap(", "while", "body", "closed_call"))]
        return f"{phase}: " + "/".join(parts[-3:])


def thunk_times(trace_dir: str) -> collections.Counter:
    """Total nanoseconds per executed HLO instruction in the newest trace under ``trace_dir``."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not files:
        raise FileNotFoundError(f"jax.profiler wrote no .xplane.pb under {trace_dir}")
    data = jax.profiler.ProfileData.from_file(files[-1])
    times: collections.Counter = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith(("tf_XLAEigen", "tf_XLAPjRt")):
                continue
            for ev in line.events:
                if ev.name.startswith("ThunkExecutor") or "ThreadPool" in ev.name:
                    continue
                times[ev.name] += ev.duration_ns
    return times


def profile(case: str, *, tiny: bool, batch: int, overrides: dict, repeats: int, top: int) -> dict:
    step, state, data, _, _ = train_step.build_step(case, batch, tiny=tiny, dtype="float32", attention_impl="xla",
                                                    remat="none", overrides=overrides)
    compiled = step.lower(state, data).compile()
    hlo = HloIndex(compiled.as_text())
    gemm = [train_step.gemm_flops_per_s()]
    state, _, walls = train_step.time_steps(compiled, state, data, repeats)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        t = time.perf_counter()
        state, m = compiled(state, data)
        jax.block_until_ready(m)
        traced_wall = time.perf_counter() - t
        jax.profiler.stop_trace()
        times = thunk_times(trace_dir)
    gemm.append(train_step.gemm_flops_per_s())
    gemm_rate = statistics.median(gemm)

    dots, other = collections.defaultdict(lambda: [0, 0, 0]), collections.defaultdict(lambda: [0, 0])
    for name, ns in times.items():
        fl = hlo.flops(name)
        key = hlo.scope(name)
        if fl:
            shape = (hlo.instr.get(name, "").split(" ") or [""])[0]
            row = dots[(key, shape)]
            row[0] += ns
            row[1] += fl
            row[2] += 1
        else:
            other[key][0] += ns
            other[key][1] += 1
    dot_ns = sum(v[0] for v in dots.values())
    dot_flops = sum(v[1] for v in dots.values())
    other_ns = sum(v[0] for v in other.values())
    xla_flops = float(compiled.cost_analysis()["flops"])
    step_s = statistics.median(walls) if walls else traced_wall
    return {
        "case": case, "tiny": tiny, "batch": batch, "overrides": overrides, "platform": jax.default_backend(),
        "step_s_median": step_s, "step_s_all": walls, "traced_step_s": traced_wall,
        "xla_flops_per_step": xla_flops, "gemm_1024_flops_per_s": gemm,
        "fraction_of_gemm_flops": xla_flops / step_s / gemm_rate,
        "thunk_s": (dot_ns + other_ns) / 1e9, "matmul_thunk_s": dot_ns / 1e9, "other_thunk_s": other_ns / 1e9,
        "matmul_flops": dot_flops,
        "matmul_fraction_of_gemm_flops": dot_flops / (dot_ns / 1e9) / gemm_rate if dot_ns else None,
        "matmuls": [{"scope": k[0], "shape": k[1], "ms": v[0] / 1e6, "gflop": v[1] / 1e9, "count": v[2],
                     "fraction_of_gemm_flops": v[1] / (v[0] / 1e9) / gemm_rate}
                    for k, v in sorted(dots.items(), key=lambda kv: -kv[1][0])[:top]],
        "other": [{"scope": k, "ms": v[0] / 1e6, "count": v[1]}
                  for k, v in sorted(other.items(), key=lambda kv: -kv[1][0])[:top]],
    }


def main(argv=None) -> int:
    from facemae_jax import convert, host_memory

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="lgi_finetune", choices=list(train_step.CASES))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps before the traced one")
    ap.add_argument("--top", type=int, default=25, help="rows per table")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=JSON")
    ap.add_argument("--out", default=None)
    ap.add_argument("--host-malloc", default=None, choices=["auto", "keep", "default"],
                    help="host_memory.keep_freed_memory mode, as launch.py applies it (default: "
                         "$FACEMAE_HOST_MALLOC or auto = on CPU hosts)")
    args = ap.parse_args(argv)
    host_malloc_kept = host_memory.keep_freed_memory(args.host_malloc)  # before the backend starts its threads
    jax.config.update("jax_default_matmul_precision", "highest")
    if jax.default_backend() != "cpu":
        print("step_profile attributes XLA:CPU thunks; on this backend use jax.profiler with TensorBoard/XProf",
              file=sys.stderr)
        return 2
    r = profile(args.case, tiny=args.tiny, batch=args.batch, overrides=convert.parse_overrides(args.override),
                repeats=args.repeats, top=args.top)
    g = statistics.median(r["gemm_1024_flops_per_s"])
    print(f"{args.case}: step {r['step_s_median']:.3f} s, {r['xla_flops_per_step'] / 1e9:.1f} GFLOP, "
          f"{100 * r['fraction_of_gemm_flops']:.0f}% of a 1024^2 GEMM ({g / 1e9:.0f} GFLOP/s)")
    mm = r["matmul_fraction_of_gemm_flops"]
    print(f"  matmul thunks {r['matmul_thunk_s']:.3f} s ({r['matmul_flops'] / 1e9:.1f} GFLOP, "
          f"{100 * mm if mm else 0:.0f}% of GEMM)   everything else {r['other_thunk_s']:.3f} s")
    print("  slowest matmuls:")
    for row in r["matmuls"][:args.top]:
        print(f"    {row['ms']:8.1f} ms x{row['count']:<3} {100 * row['fraction_of_gemm_flops']:4.0f}%  "
              f"{row['shape'][:24]:<24} {row['scope']}")
    print("  everything else, by model scope:")
    for row in r["other"][:args.top]:
        print(f"    {row['ms']:8.1f} ms x{row['count']:<4} {row['scope']}")
    r["meta"] = {"jax": jax.__version__, "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
                 "host_malloc_kept": host_malloc_kept,
                 "command": "python -m benchmarks.step_profile " + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
