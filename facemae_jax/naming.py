"""Parameter names: Flax tree paths <-> PyTorch state_dict keys.

The Flax modules are named so that a parameter path maps to its reference PyTorch key by two rules only:

* a list element ``blocks_3`` is ``blocks.3`` (likewise ``temporal_downsamples_0``, ``spatial_downsamples_1``);
* the leaf ``kernel`` (Dense/Conv) and ``scale`` (LayerNorm) are ``weight``; every other leaf keeps its name
  (``bias``, ``q_bias``, ``v_bias``, ``lg_region_tokens``, ``mask_token``).

Example: ``('encoder', 'blocks_3', 'attn', 'qkv', 'kernel')`` <-> ``'encoder.blocks.3.attn.qkv.weight'``.

Keeping the reference names makes the converter a layout transform, and lets the optimizer rules of the
reference (no-weight-decay set, layer-wise lr decay ids — FINETUNING.md §5) be written on the same names the
spec uses.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Mapping

_LIST_ITEM = re.compile(r"^(.+)_(\d+)$")
_WEIGHT_LEAVES = ("kernel", "scale")


def flax_path_to_torch(path: tuple[str, ...]) -> str:
    """('blocks_3', 'attn', 'qkv', 'kernel') -> 'blocks.3.attn.qkv.weight'."""
    parts = []
    for comp in path[:-1]:
        m = _LIST_ITEM.match(comp)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m else comp)
    leaf = path[-1]
    parts.append("weight" if leaf in _WEIGHT_LEAVES else leaf)
    return ".".join(parts)


def torch_module_path(key: str) -> tuple[tuple[str, ...], str]:
    """'blocks.3.attn.qkv.weight' -> (('blocks_3', 'attn', 'qkv'), 'weight')."""
    comps = key.split(".")
    out: list[str] = []
    for c in comps[:-1]:
        if c.isdigit():
            if not out:
                raise ValueError(f"cannot map key {key!r}: index without a list name")
            out[-1] = f"{out[-1]}_{c}"
        else:
            out.append(c)
    return tuple(out), comps[-1]


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Yield (path, leaf) for a nested dict of parameters, in sorted key order."""
    for k in sorted(tree):
        v = tree[k]
        if isinstance(v, Mapping):
            yield from flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def unflatten(items: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, v in items.items():
        d = out
        for c in path[:-1]:
            d = d.setdefault(c, {})
        d[path[-1]] = v
    return out


def torch_names(tree: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """{torch key: flax path} for every leaf of a parameter tree."""
    return {flax_path_to_torch(p): p for p, _ in flatten(tree)}
