"""Mesh from the config, parameter shardings from logical-axis rules, and batch placement.

The mesh always has the axes ``('data', 'fsdp')``. Batches are split over both (every device gets a distinct
slice of the global batch); parameters and optimiser state are sharded over ``'fsdp'`` by the rules below and
replicated over ``'data'``. With ``fsdp = 1`` this is plain data parallelism; with ``data = 1`` it is pure FSDP
(ZeRO-3 style: XLA all-gathers each weight where it is used and reduce-scatters its gradient).

Rules are data (``config.sharding_rules``): a list of ``(logical axis, mesh axis or None)`` pairs, first match
wins, unknown logical axes are replicated. A dimension that the mesh axis does not divide is replicated instead
(so tiny test models run on any mesh); ``describe`` reports what was sharded.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"),
    ("hidden", None),
    ("classes", None),
    ("norm", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over all devices; one of the sizes may be -1 (= the rest)."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("at most one of mesh.data / mesh.fsdp may be -1")
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n or data <= 0 or fsdp <= 0:
        raise ValueError(f"mesh ({data} data x {fsdp} fsdp) does not cover the {n} devices present")
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh((data, fsdp), devices=devices)
    except Exception:  # non-TPU topologies without a known physical layout
        arr = np.asarray(devices).reshape(data, fsdp)
    return Mesh(arr, MESH_AXES)


def _mesh_axis_for(logical: str | None, rules: Sequence[Sequence[Any]]) -> str | None:
    if logical is None:
        return None
    for name, axis in rules:
        if name == logical:
            return axis
    return None


def spec_for(logical_spec: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules: Sequence[Sequence[Any]]) -> P:
    """Logical PartitionSpec -> mesh PartitionSpec; undividable dims and reused mesh axes are replicated."""
    out: list[str | None] = []
    used: set[str] = set()
    for dim, logical in zip(shape, logical_spec):
        axis = _mesh_axis_for(logical, rules)
        if axis is not None and (axis in used or dim % mesh.shape[axis] != 0):
            axis = None
        if axis is not None:
            used.add(axis)
        out.append(axis)
    return P(*out)


def param_shardings(logical: Any, abstract: Any, mesh: Mesh, rules: Sequence[Sequence[Any]] = DEFAULT_RULES) -> Any:
    """Trees of logical PartitionSpecs and shapes -> tree of NamedShardings."""
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    return jax.tree_util.tree_map(
        lambda spec, leaf: NamedSharding(mesh, spec_for(tuple(spec), leaf.shape, mesh, rules)),
        logical,
        abstract,
        is_leaf=is_spec,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch_divisor(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def process_batch_block(mesh: Mesh) -> int:
    """Which of the ``process_count`` equal row blocks of every global batch this process's devices hold.

    ``put_batch`` places a process's rows where its devices sit in the mesh; feeding each process the block of
    the global stream at that position makes a global batch the same rows in the same order whatever the number
    of processes (so losses, mixup pairs and resumed batches match a 1-process run). On CPU and GPU process p
    holds block p; a TPU device mesh may order hosts differently."""
    n = global_batch_divisor(mesh)
    starts = sorted(idx[0].start or 0 for idx in batch_sharding(mesh).addressable_devices_indices_map((n,)).values())
    per = n // jax.process_count()
    if len(starts) != per or starts != list(range(starts[0], starts[0] + per)) or starts[0] % per:
        raise ValueError(f"process {jax.process_index()}'s devices hold rows {starts} of a {n}-row global batch, not "
                         "one contiguous block: use a mesh whose batch axes keep each host's devices together")
    return starts[0] // per


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over ('data', 'fsdp'). Works on one host and on many (each
    process passes its own slice; ``jax.make_array_from_process_local_data`` assembles the global array)."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
    return out


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in the order of its local batch (replicas of a row
    block on several local devices, e.g. over 'fsdp' when an output is not sharded that way, count once)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    blocks = {}
    for shard in x.addressable_shards:
        blocks.setdefault(shard.index[0].start or 0, shard)
    return np.concatenate([np.asarray(blocks[start].data) for start in sorted(blocks)])


def to_host(tree: Any) -> Any:
    """Global arrays -> numpy, whole (an array spread over several processes is all-gathered: every process must
    call this, as for any collective)."""
    def one(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(one, tree)


def describe(shardings: Any, abstract: Any) -> str:
    """One line: how many parameter values are sharded vs replicated."""
    sharded = total = 0
    for s, a in zip(jax.tree_util.tree_leaves(shardings), jax.tree_util.tree_leaves(abstract)):
        n = int(np.prod(a.shape))
        total += n
        if any(ax is not None and s.mesh.shape[ax] > 1 for ax in s.spec):
            sharded += n
    return f"{sharded / max(total, 1):.1%} of {total:,} parameter values sharded over 'fsdp'"
