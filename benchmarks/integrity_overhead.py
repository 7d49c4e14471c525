"""What the integrity checks cost: the per-record split check and the checkpoint fingerprints.

    python -m benchmarks.integrity_overhead [--params 85000000] [--repeats 5] [--out results/integrity_cpu.json]

* Split check (runs in the input pipeline for every record read): median time of
  ``SplitContract.check`` per record, against ``records.decode_clip`` of the same record (a 16-frame 160x160 clip,
  ~100 KB of JPEG), which the pipeline does anyway - the ratio is what the check adds to reading a record.
* Checkpoint fingerprints (computed on every save and after every restore): median time of
  ``fingerprint.describe_tree`` over a train state of ``--params`` float32 parameters plus AdamW's two moments (the
  MAE-DFER base model is ~85 M parameters), against one jitted elementwise pass ``x * 2 + 1`` over the same state
  (the cost of touching every byte once) and against one synchronous orbax save of the same state to a temporary
  directory (what the fingerprint is added to) - machines are noisy, compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import integrity, records
from facemae_jax import fingerprint


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def split_check(repeats: int) -> dict:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (16, 160, 160, 3), dtype=np.uint8)
    data = records.encode_clip(records.make_record("c", frames, split="train", label=1))
    rec = records.decode_clip(data)
    contract = integrity.SplitContract.for_split("train", {"train": list(range(1000)), "test": list(range(1000, 1200))})
    n = 20000
    check = _median_time(lambda: [contract.check(rec, 5, "x") for _ in range(n)], repeats) / n
    m = 200
    decode = _median_time(lambda: [records.decode_clip(data) for _ in range(m)], repeats) / m
    return {"record_bytes": len(data), "check_us": check * 1e6, "decode_clip_us": decode * 1e6,
            "check_vs_decode": check / decode}


def fingerprints(num_params: int, repeats: int) -> dict:
    rows = 4096
    cols = num_params // rows
    keys = jax.random.split(jax.random.key(0), 3)
    state = {"params": jax.random.normal(keys[0], (rows, cols)), "mu": jax.random.normal(keys[1], (rows, cols)),
             "nu": jax.random.normal(keys[2], (rows, cols)) ** 2, "step": jnp.int32(7)}
    jax.block_until_ready(state)
    touch = jax.jit(lambda t: jax.tree_util.tree_map(lambda x: x * 2 + 1, t))
    jax.block_until_ready(touch(state))
    fingerprint.describe_tree(state)  # compile
    fp = _median_time(lambda: fingerprint.describe_tree(state), repeats)
    one_pass = _median_time(lambda: jax.block_until_ready(touch(state)), repeats)
    import tempfile

    import orbax.checkpoint as ocp

    with tempfile.TemporaryDirectory() as tmp:
        ckptr = ocp.StandardCheckpointer()
        t = time.perf_counter()
        ckptr.save(os.path.join(tmp, "state"), state)
        ckptr.wait_until_finished()
        save = time.perf_counter() - t
        ckptr.close()
    return {"state_floats": 3 * rows * cols, "state_mib": 3 * rows * cols * 4 / 2**20, "fingerprint_s": fp,
            "elementwise_pass_s": one_pass, "fingerprint_vs_pass": fp / one_pass, "orbax_save_s": save,
            "fingerprint_vs_save": fp / save}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=int, default=85_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    result = {"machine": f"{platform.node()} {os.cpu_count()} cpus, {jax.devices()[0].platform}",
              "load_average": os.getloadavg(), "split_check": split_check(args.repeats),
              "fingerprints": fingerprints(args.params, args.repeats)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
