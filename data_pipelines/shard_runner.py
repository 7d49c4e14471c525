"""Resumable, parallel shard writing: the one runner behind every dataset converter and the synthetic generator.

A dataset is written as a deterministic plan of shards (:class:`ShardJob`: file name, the work that decides its
bytes, and a fingerprint of that work). :func:`run` writes each shard through ``records.ShardWriter`` (``.tmp`` then
rename, so a shard file that exists is complete) and leaves a small sidecar ``_build/<shard>.json`` holding the
fingerprint, what the writer reports about the shard (clip ids, counts, skipped inputs ...) and the seconds it took.

Why sidecars and fingerprints: on a re-run, a shard whose file and a sidecar with the same fingerprint both exist
is not touched, and the caller rebuilds ``dataset_info.json`` from all sidecars; so an interrupted build (a killed
job, a full disk) continues where it stopped and still ends with the complete index, and a shard planned from other
inputs or options is rebuilt rather than silently reused. While any shard is (re)written, ``dataset_info.json`` is
removed first, so a folder in that state never looks like a finished dataset. Two runs must not write one folder
at once.

Parallelism: ``workers > 1`` spawns (never forks: a parent with JAX threads must not be forked) a pool of JAX-free
processes, each writing whole shards; worker processes report finished clips through a shared counter so that one
progress bar (``data_pipelines.progress``: tqdm on a terminal, plain lines in logs) counts clips across all of them.
A worker's exception (disk full, a bug) is re-raised in the parent as it happens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from typing import Any, Callable, Sequence

from data_pipelines import dataset_info, records
from data_pipelines.progress import bar as progress_bar

SIDECAR_DIR = dataset_info.SIDECAR_DIR

# write_shard(job, writer, count) -> the sidecar's content (JSON-able dict): writes the records of ``job`` to the
# open ShardWriter and calls count(n) after every n finished inputs. Must be a module-level function (pickled to
# worker processes).
WriteShard = Callable[["ShardJob", records.ShardWriter, Callable[[int], None]], dict]


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """One planned shard. ``work`` is whatever the writer needs (picklable); ``size`` its units for the progress
    bar (clips); ``fingerprint`` a hash of everything that decides the shard's bytes (see :func:`fingerprint`)."""

    out_dir: str
    shard_name: str
    fingerprint: str
    size: int
    work: Any


@dataclasses.dataclass(frozen=True)
class RunResult:
    sidecars: list[dict]  # one per job, in job order (reused or fresh)
    written: tuple[int, ...]  # indices of the jobs whose shards this run wrote (the others were kept)
    seconds: float  # wall time of this run's writing

    @property
    def built(self) -> int:
        return len(self.written)

    @property
    def reused(self) -> int:
        return len(self.sidecars) - len(self.written)


def fingerprint(payload: Any) -> str:
    """sha256 of a JSON-able description of a shard's inputs and options (keys sorted, so dict order is irrelevant)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def sidecar_path(out_dir: str, shard_name: str) -> str:
    return os.path.join(out_dir, SIDECAR_DIR, shard_name + ".json")


def finished_sidecar(job: ShardJob) -> dict[str, Any] | None:
    """The sidecar of a shard finished by an earlier run with the same fingerprint, else None (must be written)."""
    if not os.path.exists(os.path.join(job.out_dir, job.shard_name)):
        return None
    try:
        with open(sidecar_path(job.out_dir, job.shard_name)) as f:
            sidecar = json.load(f)
    except (OSError, ValueError):
        return None
    return sidecar if isinstance(sidecar, dict) and sidecar.get("fingerprint") == job.fingerprint else None


def stray_shards(out_dir: str, shard_names: Sequence[str], prefix: str = "") -> list[str]:
    """``*.array_record`` files in ``out_dir`` (starting with ``prefix``) that the plan does not make: shards of an
    earlier plan, which a sorted glob of the folder would pick up as well."""
    if not os.path.isdir(out_dir):
        return []
    planned = set(shard_names)
    return sorted(n for n in os.listdir(out_dir)
                  if n.endswith(".array_record") and n.startswith(prefix) and n not in planned)


def remove_shard(out_dir: str, shard_name: str) -> None:
    """Delete a shard and its sidecar (for callers that replace an earlier plan's shards)."""
    for p in (os.path.join(out_dir, shard_name), sidecar_path(out_dir, shard_name)):
        if os.path.exists(p):
            os.remove(p)


def write_one(job: ShardJob, write_shard: WriteShard, count: Callable[[int], None] = lambda n: None) -> dict:
    """Write one shard and its sidecar (in this process); returns the sidecar."""
    start = time.monotonic()
    os.makedirs(job.out_dir, exist_ok=True)
    with records.ShardWriter(os.path.join(job.out_dir, job.shard_name)) as writer:
        report = write_shard(job, writer, count)
    sidecar = {"shard": job.shard_name, "fingerprint": job.fingerprint, **report,
               "seconds": round(time.monotonic() - start, 3)}
    dataset_info.write_json_atomic(sidecar_path(job.out_dir, job.shard_name), sidecar)
    return sidecar


def run(jobs: Sequence[ShardJob], write_shard: WriteShard, *, workers: int = 1, progress: bool = True,
        desc: str = "writing shards", unit: str = "clip", worker_init: Callable[[], None] | None = None) -> RunResult:
    """Write the shards of ``jobs`` that are not finished yet (file + sidecar with the same fingerprint); returns
    every job's sidecar in job order. ``workers > 1``: a spawn pool of that many processes (at most one per shard
    to write), each first calling ``worker_init`` (module-level, e.g. to cap a library's threads)."""
    sidecars: list[dict | None] = [finished_sidecar(j) for j in jobs]
    todo = [i for i, s in enumerate(sidecars) if s is None]
    if todo:
        for out_dir in {jobs[i].out_dir for i in todo}:  # while shards change, no folder may look finished
            info_path = dataset_info.path(out_dir)
            if os.path.exists(info_path):
                os.remove(info_path)
    start = time.monotonic()
    bar = progress_bar(total=sum(j.size for j in jobs), initial=sum(j.size for j, s in zip(jobs, sidecars) if s),
                       unit=unit, desc=desc, disable=not progress, file=sys.stderr, dynamic_ncols=True,
                       mininterval=1.0)
    try:
        if workers <= 1 or len(todo) <= 1:  # in this process (worker_init is for pool processes only)
            for i in todo:
                sidecars[i] = write_one(jobs[i], write_shard, bar.update)
        else:
            for i, sidecar in zip(todo, _run_pool([jobs[i] for i in todo], write_shard, workers, worker_init, bar)):
                sidecars[i] = sidecar
    finally:
        bar.close()
    return RunResult(sidecars=sidecars, written=tuple(todo), seconds=time.monotonic() - start)


_worker_counter = None


def _init_worker(counter, worker_init) -> None:
    global _worker_counter
    _worker_counter = counter
    if worker_init is not None:
        worker_init()


def _count(n: int) -> None:
    with _worker_counter.get_lock():
        _worker_counter.value += n


def _write_in_worker(job: ShardJob, write_shard: WriteShard) -> dict:
    return write_one(job, write_shard, _count)


def _run_pool(jobs: Sequence[ShardJob], write_shard: WriteShard, workers: int, worker_init, bar) -> list[dict]:
    ctx = mp.get_context("spawn")  # fork is unsafe once a parent has threads (e.g. JAX in the same process)
    counter = ctx.Value("q", 0)
    with ctx.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(counter, worker_init)) as pool:
        pending = [pool.apply_async(_write_in_worker, (job, write_shard)) for job in jobs]
        results: list[dict | None] = [None] * len(jobs)
        shown = 0
        while any(r is None for r in results):
            time.sleep(0.2)
            for i, r in enumerate(pending):
                if results[i] is None and r.ready():
                    results[i] = r.get()  # re-raises a worker's crash (disk full, ...) here
            bar.update(counter.value - shown)
            shown = counter.value
        return results
