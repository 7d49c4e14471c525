"""Multi-controller JAX: joining the process group, failure timeouts, and stopping cleanly on SIGTERM.

One process per host (TPU pod, multi-node GPU) or several on one machine (``facemae_jax.local_cluster``). Every
process runs the same program; ``jax.distributed.initialize`` connects them through a coordination service that
process 0 hosts at ``coordinator_address``.

Failure detection (what a hang looks like, and why there is none): every process sends heartbeats to the
coordination service. When a process dies (kill -9, OOM, a crashed host), the service marks it unhealthy after
``heartbeat_timeout_s`` without a heartbeat and every other process aborts with the line ``Terminating process
because the JAX distributed service detected fatal errors ... The following tasks are unhealthy (stopped sending
heartbeats): <ids>`` (exit status 134), also when it is blocked inside a collective: a cross-process all-reduce
over gloo does not notice a dead peer by itself and would otherwise wait forever. If process 0 dies, the service
dies with it and the others abort the same way after the same timeout. So a dead peer costs at most
``heartbeat_timeout_s`` plus a few seconds; ``initialization_timeout_s`` bounds the wait for all processes to join
(a wrong address or a missing host), ``shutdown_timeout_s`` the wait for the others at exit.

Preemption (TPU maintenance events, SLURM preemption, ``kill -TERM``): SIGTERM must not stop the processes at
different steps (a process that leaves the loop early would leave the others waiting in the next collective). With
several processes, JAX's preemption sync manager (started by ``jax.distributed.initialize``) catches SIGTERM on
any process, agrees with the others on the next safe step through the coordination service, and
``multihost_utils.reached_preemption_sync_point(step)`` returns True on every process at that same step. With one
process a plain signal handler does the same. The trainer saves a checkpoint at that step and exits with status 0;
rerunning the same command resumes from it.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Sequence

#: Environment variables read when the command line does not give the value (same names as JAX's own).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

DEFAULT_HEARTBEAT_TIMEOUT_S = 100  # JAX's default; local_cluster and the tests use 10
DEFAULT_INITIALIZATION_TIMEOUT_S = 300
DEFAULT_SHUTDOWN_TIMEOUT_S = 300


def explicit_args(coordinator_address: str | None, num_processes: int | None,
                  process_id: int | None) -> tuple[str | None, int | None, int | None]:
    """Command-line values, else the environment variables; None where neither gives one."""
    env = os.environ
    coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
    if num_processes is None and env.get(ENV_NUM_PROCESSES):
        num_processes = int(env[ENV_NUM_PROCESSES])
    if process_id is None and env.get(ENV_PROCESS_ID):
        process_id = int(env[ENV_PROCESS_ID])
    return coordinator_address, num_processes, process_id


def cluster_environment() -> bool:
    """Whether the environment describes several processes that JAX can detect by itself (TPU pod, SLURM, MPI)."""
    env = os.environ
    if env.get("COORDINATOR_ADDRESS"):
        return True
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return True
    return int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
               initialization_timeout_s: int = DEFAULT_INITIALIZATION_TIMEOUT_S,
               shutdown_timeout_s: int = DEFAULT_SHUTDOWN_TIMEOUT_S) -> None:
    """``jax.distributed.initialize`` with the given (or environment, or auto-detected) arguments.

    Values left None are auto-detected by JAX (TPU pods, SLURM, Open MPI). On CPU, cross-process collectives run
    over gloo (the CPU backend has no other implementation that works between processes)."""
    import jax

    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given) and not cluster_environment():
        raise ValueError(
            "multi-process run: give all of --coordinator_address, --num_processes and --process_id (or "
            f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); got coordinator_address="
            f"{coordinator_address!r}, num_processes={num_processes!r}, process_id={process_id!r}"
        )
    if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address, num_processes, process_id, initialization_timeout=initialization_timeout_s,
        heartbeat_timeout_seconds=heartbeat_timeout_s, shutdown_timeout_seconds=shutdown_timeout_s,
    )


class Preempted(Exception):
    """Raised by the trainer after the preemption checkpoint is written (launch.py exits 0 on it)."""


class PreemptionWatch:
    """``reached(step)``: True on every process at the same step once any process got SIGTERM (see module doc).

    Create it before the training loop and call ``reached`` after every step, on every process."""

    def __init__(self):
        import jax

        self.multi_process = jax.process_count() > 1
        self._flag = False
        self._previous = None
        if not self.multi_process:  # several processes: JAX's preemption notifier owns SIGTERM
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        self._flag = True
        print("[preemption] SIGTERM received: saving a checkpoint after the current step, then exiting",
              file=sys.stderr, flush=True)

    def reached(self, step: int) -> bool:
        if self.multi_process:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self._flag

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def describe_process() -> str:
    """'process 1 of 2' (for error messages: which host failed)."""
    import jax

    return f"process {jax.process_index()} of {jax.process_count()}"


def local_device_flags(devices_per_process: int, flags: Sequence[str] = ()) -> str:
    """XLA_FLAGS value that gives a CPU process ``devices_per_process`` devices (other flags kept)."""
    kept = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={devices_per_process}"])
