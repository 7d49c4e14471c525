"""Mesh from the config, parameter / optimiser-state shardings from logical-axis rules, and batch placement.

The mesh always has the axes ``('data', 'fsdp')`` (``jax.make_mesh``, Auto axis types: shardings propagate through
the step). Batches are split over both (every device gets a distinct slice of the global batch); parameters and
optimiser state are sharded over ``'fsdp'`` by the rules and replicated over ``'data'``. With ``fsdp = 1`` this is
plain data parallelism; with ``data = 1`` it is pure FSDP (ZeRO-3 style: XLA all-gathers each weight where it is
used and reduce-scatters its gradient).

Rules are data (``config.sharding_rules``): ``(logical axis, mesh axis | tuple of mesh axes | None)`` pairs,
resolved by flax's ``nn.logical_to_mesh_axes`` (priority order, a mesh axis used once per array). On top of that one
rule of this project: a dimension that its mesh axes do not divide is replicated instead, so tiny test models run on
any mesh; ``describe`` reports what was sharded. The optimiser state mirrors the parameters' shardings
(``optax.tree_map_params``); its counters are replicated.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over all devices; one of the sizes may be -1 (= the rest)."""
    n = len(devices) if devices is not None else jax.device_count()
    if data == -1 and fsdp == -1:
        raise ValueError("at most one of mesh.data / mesh.fsdp may be -1")
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n or data <= 0 or fsdp <= 0:
        raise ValueError(f"mesh ({data} data x {fsdp} fsdp) does not cover the {n} devices present")
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def _axis_size(mesh: Mesh, axis: str | tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis))


def spec_for(logical_spec: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules: Sequence[Sequence[Any]]) -> P:
    """Logical axis names -> mesh PartitionSpec (flax's rule resolution); dimensions their mesh axes do not divide
    are replicated."""
    rules = tuple((name, tuple(axis) if isinstance(axis, list) else axis) for name, axis in rules)
    mesh_axes = nn.logical_to_mesh_axes(tuple(logical_spec), rules)
    return P(*(axis if axis is not None and dim % _axis_size(mesh, axis) == 0 else None
               for dim, axis in zip(shape, mesh_axes)))


def param_shardings(logical: Any, abstract: Any, mesh: Mesh, rules: Sequence[Sequence[Any]]) -> Any:
    """Trees of logical PartitionSpecs and shapes -> tree of NamedShardings."""
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    return jax.tree_util.tree_map(
        lambda spec, leaf: NamedSharding(mesh, spec_for(tuple(spec), leaf.shape, mesh, rules)),
        logical,
        abstract,
        is_leaf=is_spec,
    )


def state_shardings(tx: optax.GradientTransformation, abstract_params: Any, param_sh: Any, mesh: Mesh) -> dict:
    """Shardings of the whole train state ``{"params", "opt_state", "step"}``: optimiser moments like their
    parameters, everything else (counters, schedules' state) replicated. Passed as ``out_shardings`` when the state
    is created, so nothing is left to propagation and no host ever holds the whole state."""
    replicated = NamedSharding(mesh, P())
    opt_abstract = jax.eval_shape(tx.init, abstract_params)
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731  (a group's placeholder for other params)
    opt_sh = optax.tree_map_params(tx, lambda leaf, sh: leaf if masked(leaf) else sh, opt_abstract, param_sh,
                                   transform_non_params=lambda _: replicated, is_leaf=masked)
    return {"params": param_sh, "opt_state": opt_sh, "step": replicated}


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch_divisor(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def local_batch_size(global_batch: int, mesh) -> int:
    div = global_batch_divisor(mesh)
    if global_batch % div:
        raise ValueError(f"batch size {global_batch} is not divisible by the {div} devices of the mesh's batch axes "
                         f"{dict(mesh.shape)}: change the batch size (batch_size / eval.batch_size) or config.mesh")
    if global_batch % jax.process_count():
        raise ValueError(f"global batch {global_batch} not divisible by {jax.process_count()} processes")
    return global_batch // jax.process_count()


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


def local_rows(x: jax.Array, mesh: Mesh) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in the order of its local batch (the inverse of
    ``put_batch``)."""
    from jax.experimental import multihost_utils

    spec = P(BATCH_AXES, *([None] * (x.ndim - 1)))
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, spec))


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
        if any(ax is not None and _axis_size(s.mesh, ax) > 1 for ax in s.spec):
            sharded += n
    return f"{sharded / max(total, 1):.1%} of {total:,} parameter values sharded"
