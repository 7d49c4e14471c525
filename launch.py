"""The one way to pretrain, finetune and evaluate, from one CPU to a pod.

    python launch.py --config=configs/pretrain_vox2.py --workdir=DIR [--config.key=value ...]
    python launch.py --config=configs/finetune_dfew.py:svfap --workdir=DIR --config.init_from=PRETRAIN_DIR
    python launch.py --config=configs/finetune_dfew.py --mode=eval --checkpoint=DIR_OR_PTH --workdir=DIR
    python launch.py --config=configs/demo.py                      # the README's main command

Unknown config keys fail (ml_collections). The resolved config is saved as ``workdir/config.json``. Rerunning
the same command resumes from the last checkpoint in the workdir. A config with ``stages`` (the demo, the
synthetic study) runs its sub-jobs in order, each in ``workdir/<stage>``; ``init_from: '@<stage>'`` refers to an
earlier stage's workdir. ``kfold: k`` runs folds 1..k and writes the per-fold and mean UAR/WAR table.

Multi-host (TPU pods, multi-node GPU): run the same command on every host. ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`` (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) join the
processes; without them ``--distributed=auto`` lets JAX detect TPU pods, SLURM and Open MPI. On one machine,
``python -m facemae_jax.local_cluster --processes 2 -- launch.py ...`` starts the processes (README "Rehearse a
pod on one machine"). SIGTERM saves a checkpoint at the next step and exits 0 (facemae_jax.distributed).
"""

from __future__ import annotations

import copy
import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "job config file (configs/*.py[:arg])", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (default: workdirs/<config name>)")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (resumes if a checkpoint exists) or eval")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "eval: workdir, converted dir or official .pth")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "true", "false"],
                                 "call jax.distributed.initialize() (auto: if the environment has several processes)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-process: HOST:PORT of process 0's "
                                   "coordination service (default: $JAX_COORDINATOR_ADDRESS or auto-detected)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-process: number of processes "
                                      "(default: $JAX_NUM_PROCESSES or auto-detected)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-process: this process's id, 0..N-1 "
                                   "(default: $JAX_PROCESS_ID or auto-detected)")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer("heartbeat_timeout_s", 100, "multi-process: a process silent this long "
                                          "counts as dead and all others abort (bounds the wait on a dead peer)")
_INIT_TIMEOUT = flags.DEFINE_integer("initialization_timeout_s", 300, "multi-process: how long to wait for all "
                                     "processes to join")
_SHUTDOWN_TIMEOUT = flags.DEFINE_integer("shutdown_timeout_s", 300, "multi-process: how long a finished process "
                                         "waits at exit for the others (also ends a process stuck without them)")


def default_workdir(config_path: str) -> str:
    name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
    arg = config_path.split(":")[1] if ":" in config_path else ""
    return os.path.join("workdirs", name + (f"_{arg}" if arg else ""))


def save_config(config, workdir: str) -> None:
    """``workdir/config.json``, replaced atomically and only once the config has loaded: a run's record of its
    settings is never truncated by a command that fails (e.g. a mistyped --config for an existing workdir)."""
    import tempfile

    text = config.to_json_best_effort(indent=2, sort_keys=True)  # a config that failed to load raises here
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):  # a rerun with other settings: the earlier record is kept beside it, not replaced
        with open(path) as f:
            previous = f.read()
        if previous != text:
            import time

            with open(os.path.join(workdir, time.strftime("config.%Y%m%dT%H%M%S.json", time.gmtime())), "w") as f:
                f.write(previous)
    with tempfile.NamedTemporaryFile("w", dir=workdir, prefix=".config.json.", delete=False) as f:
        f.write(text)
    os.replace(f.name, path)


def run_job(config, workdir: str, mode: str, checkpoint: str | None):
    """One job, a staged job (config.stages) or a k-fold job (config.kfold)."""
    from facemae_jax import train

    save_config(config, workdir)
    if "stages" in config:
        results = {}
        for name in config.stage_order:
            stage = copy.deepcopy(config.stages[name])
            if stage.init_from.startswith("@"):
                with stage.unlocked():
                    stage.init_from = os.path.join(workdir, stage.init_from[1:])
            print(f"===== stage {name} =====", flush=True)
            results[name] = run_job(stage, os.path.join(workdir, name), mode, checkpoint)
        return results
    if config.kfold and mode == "train":
        return run_kfold(config, workdir)
    return train.run(config, workdir, mode=mode, checkpoint=checkpoint)


def run_kfold(config, workdir: str):
    """Train + test every fold (its own workdir) and write the per-fold and mean table (FINETUNING §4.3)."""
    from facemae_jax import metrics, train

    rows = []
    for k in range(1, config.kfold + 1):
        fold = copy.deepcopy(config)
        with fold.unlocked():
            fold.kfold = 0
            fold.data.train_split = f"fold{k}/train"
            fold.data.eval_split = f"fold{k}/test"
        print(f"===== fold {k}/{config.kfold} =====", flush=True)
        res = train.run(fold, os.path.join(workdir, f"fold{k}"))
        rows.append({"uar": res["uar"], "war": res["war"]})
    table = metrics.kfold_table(rows)
    with open(os.path.join(workdir, "kfold.json"), "w") as f:
        json.dump(table, f, indent=2, default=float)
    print(json.dumps(table, indent=2, default=float), flush=True)
    return table


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required")
    try:  # ml_collections defers a failed load of --config (missing file, syntax error) to the first access
        config.get("stages")
    except IOError as e:
        print(f"launch.py: error: {e}", file=sys.stderr)
        return 2
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; keep the console readable
        from absl import logging

        logging.set_verbosity(logging.WARNING)
    from facemae_jax import distributed

    explicit = distributed.explicit_args(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    dist = _DISTRIBUTED.value
    if dist != "false" and (dist == "true" or any(v is not None for v in explicit)
                            or distributed.cluster_environment()):
        distributed.initialize(*explicit, heartbeat_timeout_s=_HEARTBEAT_TIMEOUT.value,
                               initialization_timeout_s=_INIT_TIMEOUT.value,
                               shutdown_timeout_s=_SHUTDOWN_TIMEOUT.value)
    workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
    from facemae_jax import faults

    try:
        with faults.one_message("launch.py"):
            run_job(config, os.path.abspath(workdir), _MODE.value, _CHECKPOINT.value)
    except distributed.Preempted as e:
        print(f"[preemption] {e}", flush=True)
        return 0
    except BaseException as e:  # which host failed, first (each host's console is separate on a pod)
        if not isinstance(e, (KeyboardInterrupt, SystemExit)):
            print(f"[{distributed.describe_process()}] {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from facemae_jax import host_memory

    # Before jax, numpy or grain start a thread (glibc fixes each thread's malloc arena at its first allocation);
    # as a script only, so that importing this module (tests) leaves the importing process's malloc alone.
    host_memory.keep_freed_memory()
    app.run(main)
