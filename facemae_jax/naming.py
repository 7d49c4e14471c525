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
