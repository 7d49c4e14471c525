"""A/B of the CPU host-memory setting (facemae_jax.host_memory): the trainer's step with glibc's default malloc vs
the freed-temporaries-kept one, in two worker processes called in turn.

    python -m benchmarks.host_malloc_ab --case lgi_finetune --rounds 5 --out results/host_malloc_ab_lgi_finetune.json

The setting has to be made before a process starts its threads, so the two variants cannot share a process; timed
minutes apart in separate runs, they would differ by this machine's drift (its GEMM moves by 10-50% within minutes).
Here each round times one step of each, so the drift hits both. Same batch, same compiled step (each worker
initialises the case's parameters with the same seed); also reported: each side's minor page faults and system CPU
time per step.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time

from benchmarks import torch_reference_step as trs
from benchmarks import train_step

MODES = ("default", "keep")


class _CountingJaxSide(trs._JaxSide):
    """The trainer's step, plus the process's minor faults and system time over each call."""

    def step(self):
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF)
        seconds, loss = super().step()
        after = resource.getrusage(resource.RUSAGE_SELF)
        return seconds, loss, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="lgi_finetune", choices=list(train_step.CASES))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import jax  # the version only: the steps run in the workers

    ctx = multiprocessing.get_context("spawn")
    workers = {}
    for mode in MODES:  # the child reads the mode from its environment at start; both init with the same seed
        os.environ["FACEMAE_HOST_MALLOC"] = mode
        workers[mode] = trs._Worker(ctx, _CountingJaxSide, (args.case, args.batch), f"host malloc {mode}")
    calls = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode, worker in workers.items():
            time.sleep(trs.PAUSE_S)
            calls[mode].append(worker("step"))
    for worker in workers.values():
        worker.stop()
    row = {"case": args.case, "batch": args.batch, "rounds": args.rounds}
    for mode in MODES:
        row[mode] = {"step_s": [c[0] for c in calls[mode]], "minor_faults": [c[2] for c in calls[mode]],
                     "system_s": [c[3] for c in calls[mode]],
                     "step_s_median": statistics.median(c[0] for c in calls[mode])}
    row["ratio_keep_over_default"] = row["keep"]["step_s_median"] / row["default"]["step_s_median"]
    row["ratio_per_round"] = [k[0] / d[0] for k, d in zip(calls["keep"], calls["default"])]
    print(f"{args.case}: default {row['default']['step_s_median']:.2f} s/step "
          f"({statistics.median(row['default']['minor_faults']):.0f} minor faults, "
          f"{statistics.median(row['default']['system_s']):.2f} s system), keep {row['keep']['step_s_median']:.2f} s "
          f"({statistics.median(row['keep']['minor_faults']):.0f}, {statistics.median(row['keep']['system_s']):.2f} s)"
          f"  ratio {row['ratio_keep_over_default']:.3f}", flush=True)
    meta = {"cpu_count": os.cpu_count(), "jax": jax.__version__, "load_average": os.getloadavg(),
            "command": "python -m benchmarks.host_malloc_ab " + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": [row]}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
