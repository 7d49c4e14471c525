"""Iterating a pipeline's batches with a resumable position: host loader options, the grain iterator chain with
its worker processes, and an iterator whose state is how far it got.

A pipeline (:class:`~data_pipelines.pipeline.Pipeline`) is an index-based ``grain.MapDataset`` of batches, so the
state of an iterator over it is one number, the batch it is at, saved as a small JSON dict; restoring slices the
dataset there and rebuilds the grain iterator. That is what lets a job resume with another ``worker_count``
(grain's own multi-process state cannot: its layout depends on the worker count), and for training pipelines with
another process count or batch size (the position is also counted in clips of the one global stream).

No JAX here: worker processes import this module.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
import numpy as np


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
    """How batches are produced on this host. None of these change the batch contents.

    shard_index / shard_count: this process's share (e.g. ``jax.process_index()`` / ``jax.process_count()``,
    supplied by the caller). worker_count: grain worker processes (0 = the calling process, in background
    threads). read_threads: threads per process computing batches; prefetch_batches: batches buffered per process.
    """

    shard_index: int = 0
    shard_count: int = 1
    worker_count: int = 0
    read_threads: int = 1
    prefetch_batches: int = 2
    worker_buffer_size: int = 1

    def __post_init__(self):
        if self.shard_count <= 0 or not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"shard_index {self.shard_index} must be in [0, shard_count={self.shard_count})")
        if self.worker_count < 0 or self.read_threads < 0 or self.prefetch_batches < 0:
            raise ValueError(f"worker_count, read_threads and prefetch_batches must be >= 0: {self}")


class ResumableIterator(grain.DatasetIterator):
    """Iterator over a pipeline's batches whose state is a position, not grain's internal worker bookkeeping.

    get_state() -> ``{"pipeline": {...identity...}, "batches": k, "global_clips": k * clips per global step}``
    (JSON). set_state() rebuilds the grain iterator from batch k (``batches[k:]`` of the index-based dataset), so
    a restored job continues with identical batches for **any** worker_count / read_threads. Training pipelines
    can even resume with a different number of processes or batch size: the state counts clips consumed from the
    one global stream, and process p's batch j is always block p of global batch j (when the new clips per global step
    divide the count). The identity (kind, split, split size, seed, geometry) must match, otherwise set_state
    raises: restoring a position into a different pipeline would silently train on other data.

    The trainer saves ``get_state()`` as the ``data/`` item of its orbax checkpoint (``ocp.args.JsonSave``, see
    :mod:`facemae_jax.checkpoint`) and hands it back to ``set_state`` on resume; grain's checkpoint handler is not
    used there (as a grain ``DatasetIterator`` subclass the iterator also works with
    ``grain.checkpoint.CheckpointHandler``, which tests/test_pipeline.py checks, for users who want it). Worker
    processes start on the first ``next()`` (or ``start_prefetch()``), after a possible ``set_state``.
    """

    def __init__(
        self,
        batches: grain.MapDataset,
        options: LoaderOptions,
        identity: dict[str, Any],
        global_clips_per_batch: int | None,
    ):
        super().__init__()
        self._batches = batches
        self._options = options
        self._identity = identity
        self._global_clips_per_batch = global_clips_per_batch  # None: position tied to batch size and sharding
        self._position = 0
        self._inner: grain.DatasetIterator | None = None

    def _started(self) -> grain.DatasetIterator:
        if self._inner is None:
            self._inner = iter(_to_iter_dataset(self._batches[self._position :], self._options))
        return self._inner

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        batch = next(self._started())
        self._position += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"pipeline": dict(self._identity), "batches": self._position}
        if self._global_clips_per_batch is not None:
            state["global_clips"] = self._position * self._global_clips_per_batch
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("pipeline", {})
        keys = list(self._identity) + [k for k in saved if k not in self._identity]  # also keys only the save has
        differences = {k: (saved.get(k), self._identity.get(k)) for k in keys if saved.get(k) != self._identity.get(k)}
        if differences:
            listed = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differences.items())
            raise ValueError(f"iterator state belongs to a different pipeline ({listed})")
        if self._global_clips_per_batch is not None:
            clips = int(state["global_clips"])
            if clips % self._global_clips_per_batch:
                raise ValueError(
                    f"iterator state is at global clip {clips}, which is not a whole number of steps of "
                    f"{self._global_clips_per_batch} clips (batch size x process count); resume with a batch "
                    "size / process count whose product divides it"
                )
            position = clips // self._global_clips_per_batch
        else:
            position = int(state["batches"])
        if self._inner is not None:
            self._inner.close()
            self._inner = None
        self._position = position

    def start_prefetch(self) -> None:
        self._started().start_prefetch()

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None
        super().close()

    def __str__(self) -> str:
        return f"ResumableIterator({self._identity.get('kind')}, batch {self._position})"


def _to_iter_dataset(ds: grain.MapDataset, options: LoaderOptions) -> grain.IterDataset:
    """MapDataset of batches -> IterDataset with background threads and (optionally) worker processes."""
    if options.worker_count > 0:
        from absl import flags  # grain's workers read absl flags; an unparsed FLAGS object makes them fail

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    iter_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=options.read_threads, prefetch_buffer_size=options.prefetch_batches)
    )
    if options.worker_count > 0:
        iter_ds = iter_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=options.worker_count, per_worker_buffer_size=options.worker_buffer_size
            ),
            worker_init_fn=_worker_init,
        )
    return iter_ds


def _worker_init(worker_index: int, worker_count: int) -> None:
    """Keep any accidental JAX import in a worker off the accelerator (workers spawn a fresh interpreter)."""
    del worker_index, worker_count
    os.environ["JAX_PLATFORMS"] = "cpu"
