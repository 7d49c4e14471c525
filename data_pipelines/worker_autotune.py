"""How many grain worker processes and buffered batches a training process gets, from the machine it runs on.

grain 0.2.18 offers ``grain.experimental.pick_performance_config``, but it only bounds the worker count by RAM
(``ram_budget_mb / element size``, capped at ``cpu_count()``) and measures the element size by pulling five
batches through the pipeline in the calling process. Here the batch size is known from its shape, and the
constraint that matters for video is CPU, so the rule is:

* cores = the CPUs this process may run on (``os.sched_getaffinity``), divided among the training processes of
  this host (``LOCAL_WORLD_SIZE`` / ``SLURM_NTASKS_PER_NODE`` / ``OMPI_COMM_WORLD_LOCAL_SIZE`` when a launcher
  sets one; otherwise one process per host is assumed);
* one core stays with the training loop (JAX dispatch, host->device copies); the rest become workers, but only
  when at least two are left: one worker on a spare core only adds inter-process copies (measured on 2 cores:
  pretrain 63 clips/s in-process vs 57 with one worker, results/data_pipeline_cpu.json);
* grain's RAM rule on top: workers x (buffer + 1) batches must fit in a quarter of the available memory;
* buffers: 2 batches per worker (one being filled, one ready), 2 batches prefetched by the training process.

Values set in the config (>= 0) are used as given; -1 means "choose". The choice and its reasons are returned as
a line for the log.
"""

from __future__ import annotations

import dataclasses
import os

AUTO = -1
_LOCAL_SIZE_VARIABLES = ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE")


@dataclasses.dataclass(frozen=True)
class Machine:
    cores: int  # CPUs this process may use
    processes_per_host: int
    available_ram_bytes: int | None

    @classmethod
    def detect(cls) -> "Machine":
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        local = 1
        for name in _LOCAL_SIZE_VARIABLES:
            value = os.environ.get(name, "")
            if value.split("(")[0].isdigit():  # SLURM may write e.g. "8(x2)"
                local = max(1, int(value.split("(")[0]))
                break
        try:
            ram = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            ram = None
        return cls(cores=cores, processes_per_host=local, available_ram_bytes=ram)


@dataclasses.dataclass(frozen=True)
class WorkerChoice:
    worker_count: int
    worker_buffer_size: int
    prefetch_batches: int
    reason: str

    def describe(self) -> str:
        return (f"[data] {self.worker_count} worker process(es), {self.worker_buffer_size} batch(es) buffered per "
                f"worker, {self.prefetch_batches} prefetched ({self.reason})")  # fmt: skip


def choose(
    worker_count: int = AUTO,
    prefetch_batches: int = AUTO,
    worker_buffer_size: int = AUTO,
    *,
    batch_bytes: int | None = None,
    machine: Machine | None = None,
) -> WorkerChoice:
    """Resolve AUTO (-1) values from ``machine`` (default: this one); ``batch_bytes``: one batch's size."""
    for name, value in (("worker_count", worker_count), ("prefetch_batches", prefetch_batches),
                        ("worker_buffer_size", worker_buffer_size)):  # fmt: skip
        if value < AUTO:
            raise ValueError(f"data.{name} must be -1 (choose automatically) or >= 0, got {value}")
    machine = machine or Machine.detect()
    per_process = max(1, machine.cores // machine.processes_per_host)
    reasons = []
    if worker_count == AUTO:
        spare = per_process - 1
        workers = spare if spare >= 2 else 0
        reasons.append(
            f"{machine.cores} cores / {machine.processes_per_host} process(es) on this host -> {per_process} per "
            f"process, one kept for the training loop"
        )
        buffers = (worker_buffer_size if worker_buffer_size != AUTO else 2) + 1
        if workers and batch_bytes and machine.available_ram_bytes:
            budget = machine.available_ram_bytes // 4 // machine.processes_per_host
            ram_cap = max(0, budget // (batch_bytes * buffers))
            if ram_cap < workers:
                reasons.append(f"RAM caps workers at {ram_cap} ({budget / 2**30:.1f} GiB budget)")
                workers = ram_cap
        worker_count = workers
    else:
        reasons.append("worker_count set in the config")
    if worker_buffer_size == AUTO:
        worker_buffer_size = 2 if worker_count > 0 else 1
    if prefetch_batches == AUTO:
        prefetch_batches = 2
    return WorkerChoice(worker_count, worker_buffer_size, prefetch_batches, "; ".join(reasons))
