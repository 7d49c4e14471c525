"""AdamW as the reference trains it: schedules, parameter groups, layer-wise lr decay, weight-decay mask.

The two reference repos build their optimiser with the BEiT/VideoMAE ``optim_factory``: every parameter is put in
a PyTorch param group named ``layer_<id>_<decay|no_decay>`` (or just ``decay`` / ``no_decay`` without layer-wise
decay); each step the trainer sets ``group.lr = lr_table[step] * group.lr_scale`` and runs ``torch.optim.AdamW``.
This module reproduces that literally with optax: one chain per PyTorch group, routed by
``optax.multi_transform``, so the per-group behaviour (and the printed group summary) can be compared with the
reference one to one. All rules are written on the PyTorch names (``facemae_jax.naming``) because that is how
the reference writes them — including its name-matching accidents (QUIRKS Q10, Q11).

PyTorch AdamW per group, per step (PRETRAINING §4.1):
    p <- p - lr*s*wd*p - lr*s * m_hat / (sqrt(v_hat) + eps)
which is optax ``scale_by_adam`` (eps outside the sqrt, eps_root 0) -> ``scale_by_learning_rate(lr*s)`` ->
``decoupled_weight_decay_as_torch`` (the decay with PyTorch's float32 multiplier). Parameters the reference never
updates (frozen, or the SVFAP pre-train dead path whose gradient is None, Q4) go to ``optax.set_to_zero``: no update,
no decay, no optimiser state.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from facemae_jax.naming import flax_path_to_torch

# Learning rates are quoted per 256 samples in both papers.
LR_REFERENCE_BATCH = 256
FROZEN_GROUP = "frozen"


# ---------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Linear lr scaling rule of the reference: ``base_lr * global_batch / 256`` (also used for min lr)."""
    if global_batch <= 0:
        raise ValueError(f"global_batch must be positive, got {global_batch}")
    return base_lr * global_batch / LR_REFERENCE_BATCH


def warmup_cosine_table(peak: float, min_lr: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """Per-step lr table of the reference ``cosine_scheduler`` (PRETRAINING §4.1, QUIRKS Q12).

    Warmup is ``linspace(0, peak, W)`` with both endpoints, so step W-1 already has the peak and step W starts the
    cosine at the peak again; the cosine runs over the remaining ``S - W`` steps and never quite reaches
    ``min_lr`` (its last value is ``min + (peak-min)/2 * (1 + cos(pi (S-W-1)/(S-W)))``). Float64, like numpy in the
    reference, so a table built here equals the reference table bit for bit.
    """
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps, got {warmup_steps}, {total_steps}")
    warmup = np.linspace(0.0, peak, warmup_steps, dtype=np.float64)
    decay_steps = total_steps - warmup_steps
    j = np.arange(decay_steps, dtype=np.float64)
    cosine = min_lr + 0.5 * (peak - min_lr) * (1.0 + np.cos(np.pi * j / max(decay_steps, 1)))
    return np.concatenate([warmup, cosine])


def weight_decay_table(weight_decay: float, weight_decay_end: float | None, total_steps: int) -> np.ndarray:
    """Per-step weight-decay table of the reference: a cosine from start to end with no warmup.

    Every published run leaves ``weight_decay_end`` unset (= start), which makes it the constant table; the cosine
    form is kept only so that a config with a different end value means the same thing as in the reference.
    """
    end = weight_decay if weight_decay_end is None else weight_decay_end
    return warmup_cosine_table(weight_decay, end, 0, total_steps)


def schedule_from_table(table: np.ndarray) -> optax.Schedule:
    """An optax schedule that looks the step up in a precomputed table, clipped to the last entry.

    Lookup (not a closed-form re-derivation) keeps the values identical to the reference table; clipping makes a
    step counter that runs past the end (e.g. an extra eval step) harmless instead of an out-of-range gather.
    The table becomes a constant of the compiled step (682,300 floats = 2.7 MB for the longest pre-training run).
    """
    table = np.asarray(table)
    if table.ndim != 1 or table.size == 0:
        raise ValueError(f"schedule table must be a non-empty 1-D array, got shape {table.shape}")
    values = jnp.asarray(table)
    last = table.size - 1

    def schedule(step):
        return values[jnp.clip(jnp.asarray(step), 0, last)]

    return schedule


def warmup_cosine_schedule(peak: float, min_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """``schedule_from_table(warmup_cosine_table(...))``: the lr schedule both repos use."""
    return schedule_from_table(warmup_cosine_table(peak, min_lr, warmup_steps, total_steps))


def constant_weight_decay_schedule(weight_decay: float) -> optax.Schedule:
    """The weight-decay schedule of every published run (start = end), without materialising a table."""
    return optax.constant_schedule(weight_decay)


# ---------------------------------------------------------------------------------------------------------------
# Per-parameter rules (all on PyTorch names)
# ---------------------------------------------------------------------------------------------------------------


def no_weight_decay(
    torch_name: str, shape: Sequence[int], skip: Iterable[str] = (), *, match_nested_names: bool = False
) -> bool:
    """True if the reference puts this tensor in a ``no_decay`` group.

    Reference rule: ``len(shape) == 1 or name.endswith(".bias") or name in skip``. The skip set holds bare names
    (``mask_token``, ``lg_region_tokens``) and is compared with the *full* name, so in the pre-train model
    ``encoder.lg_region_tokens`` does not match and is decayed (Q10). ``match_nested_names=True`` is the corrected
    option: a skip name also matches as the last component of a dotted name.
    """
    skip = set(skip)
    if len(tuple(shape)) == 1 or torch_name.endswith(".bias") or torch_name in skip:
        return True
    return match_nested_names and torch_name.rsplit(".", 1)[-1] in skip


def _stage_first_blocks(stage_depths: Sequence[int]) -> list[int]:
    """Index of the first block of each stage, e.g. (12, 6, 3) -> [0, 12, 18]."""
    return [int(x) for x in np.cumsum([0, *stage_depths[:-1]])]


def layer_id(
    torch_name: str,
    num_layers: int,
    *,
    corrected_downsamplers: bool = False,
    stage_depths: Sequence[int] | None = None,
) -> int:
    """Layer-wise lr-decay id of a parameter (FINETUNING §5; BEiT's ``get_num_layer_for_vit``).

    ``patch_embed.*`` (and the token-like names ``cls_token``/``mask_token``/``pos_embed``, which no fine-tune
    model here has) -> 0; ``blocks.j.*`` -> j+1; everything else -> num_layers+1 (full lr). The last rule puts
    TPSBT's ``temporal_downsamples``/``spatial_downsamples`` at the top although they sit mid-network (Q11).
    ``corrected_downsamplers=True`` gives the stage-s down-samplers (list index s-1) the id of the first block of
    stage s instead, which needs ``stage_depths``.
    """
    if torch_name in ("cls_token", "mask_token", "pos_embed") or torch_name.startswith("patch_embed"):
        return 0
    if torch_name.startswith("blocks"):
        return int(torch_name.split(".")[1]) + 1
    if corrected_downsamplers and torch_name.startswith(("temporal_downsamples.", "spatial_downsamples.")):
        if stage_depths is None:
            raise ValueError("corrected_downsamplers needs stage_depths, e.g. (12, 6, 3)")
        stage = int(torch_name.split(".")[1]) + 1
        firsts = _stage_first_blocks(stage_depths)
        if stage >= len(firsts):
            raise ValueError(f"{torch_name}: no stage {stage} in stage_depths {tuple(stage_depths)}")
        return firsts[stage] + 1
    return num_layers + 1


def layer_scales(num_layers: int, decay: float) -> list[float]:
    """lr scale per layer id: ``decay ** (num_layers + 1 - i)`` for i = 0 .. num_layers+1 (top layer = 1.0)."""
    return [decay ** (num_layers + 1 - i) for i in range(num_layers + 2)]


def svfap_pretrain_unused(torch_name: str, stage_depths: Sequence[int] = (12, 6, 3)) -> bool:
    """True for the SVFAP pre-train parameters that get no gradient in the faithful model (Q4).

    Because the reverse CS block reads the full patch embeddings (Q3), the spatial bottlenecks and every CS block
    of stages >= 1 except the stage's last one never influence the loss: base (12, 6, 3) -> blocks 12-16, 18-19
    and ``spatial_downsamples.{0,1}`` (173 tensors). PyTorch leaves their grad None and AdamW skips them entirely
    (no update, no weight decay); pass this as ``frozen`` to ``build_optimizer`` to get the same.
    Only names inside the pre-train ``encoder`` match; the fine-tune model has no dead path.
    """
    parts = torch_name.split(".")
    if len(parts) < 3 or parts[0] != "encoder":
        return False
    if parts[1] == "spatial_downsamples":
        return True
    if parts[1] != "blocks":
        return False
    j = int(parts[2])
    firsts = _stage_first_blocks(stage_depths)
    for s in range(1, len(stage_depths)):
        last = firsts[s] + stage_depths[s] - 1
        if firsts[s] <= j < last:
            return True
    return False


@dataclasses.dataclass(frozen=True)
class ParamRule:
    """What the optimiser does with one parameter tensor.

    ``decay`` and ``lr_scale`` are the *effective* values: a frozen tensor is reported with ``decay=False`` and
    ``lr_scale=0.0`` because it is never touched; ``layer_id`` keeps the reference id for inspection.
    """

    torch_name: str
    path: tuple[str, ...]
    shape: tuple[int, ...]
    layer_id: int | None
    lr_scale: float
    decay: bool
    frozen: bool
    group: str


@dataclasses.dataclass(frozen=True)
class OptimizerReport:
    """Every parameter's rule, in tree order, plus the summaries the trainer prints."""

    rules: tuple[ParamRule, ...]
    weight_decay: float | str

    def by_name(self) -> dict[str, ParamRule]:
        return {r.torch_name: r for r in self.rules}

    def param_groups(self) -> dict[str, dict[str, Any]]:
        """The reference's printed ``Param groups`` dict: group -> weight_decay, lr_scale, params (names)."""
        groups: dict[str, dict[str, Any]] = {}
        for r in self.rules:
            g = groups.setdefault(
                r.group,
                {"weight_decay": self.weight_decay if r.decay else 0.0, "lr_scale": r.lr_scale, "params": []},
            )
            g["params"].append(r.torch_name)
        return groups

    def summary(self) -> str:
        """One line per group (by layer id, frozen last): name, tensors, values, lr scale, weight decay."""
        counts = Counter(r.group for r in self.rules)
        sizes: Counter[str] = Counter()
        for r in self.rules:
            sizes[r.group] += math.prod(r.shape)
        lines = [f"{'group':<22}{'tensors':>8}{'values':>14}{'lr_scale':>12}{'wd':>8}"]
        first_rule = {}
        for r in self.rules:
            first_rule.setdefault(r.group, r)
        order = sorted(first_rule, key=lambda n: (first_rule[n].frozen, first_rule[n].layer_id or 0, n))
        groups = self.param_groups()
        for name in order:
            g = groups[name]
            wd = g["weight_decay"]
            wd_text = f"{wd:g}" if isinstance(wd, (int, float)) else str(wd)
            lines.append(f"{name:<22}{counts[name]:>8}{sizes[name]:>14,}{g['lr_scale']:>12.7g}{wd_text:>8}")
        total = sum(sizes.values())
        frozen = sum(math.prod(r.shape) for r in self.rules if r.frozen)
        lines.append(f"total {len(self.rules)} tensors, {total:,} values ({frozen:,} frozen)")
        return "\n".join(lines)


def _path_strings(keypath) -> tuple[str, ...]:
    """A jax key path of a nested dict -> tuple of key strings (the naming module's path format)."""
    out = []
    for k in keypath:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            out.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(str(k.idx))
        else:
            raise TypeError(f"unsupported key {k!r} in parameter path {keypath!r}")
    return tuple(out)


def _torch_name_of(keypath) -> str:
    return flax_path_to_torch(_path_strings(keypath))


def parameter_rules(
    params: Any,
    *,
    layer_decay: float | None = None,
    num_layers: int | None = None,
    skip_weight_decay: Iterable[str] = (),
    frozen: Callable[[str], bool] | None = None,
    corrected_region_token_decay: bool = False,
    corrected_downsampler_layer_ids: bool = False,
    stage_depths: Sequence[int] | None = None,
    weight_decay_label: float | str = 0.0,
) -> OptimizerReport:
    """Apply the reference grouping rules to every leaf of ``params`` (arrays or ShapeDtypeStructs).

    Layer-wise decay is on only for ``layer_decay < 1`` (the reference builds no layer assigner at 1.0), and then
    group names carry the layer id exactly as the reference prints them.
    """
    use_layers = layer_decay is not None and layer_decay < 1.0
    if layer_decay is not None and layer_decay <= 0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if use_layers and num_layers is None:
        raise ValueError("layer_decay needs num_layers (number of blocks: 16 for LGI, 21 for TPSBT)")
    scales = layer_scales(num_layers, layer_decay) if use_layers else None
    skip = set(skip_weight_decay)

    rules = []
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = _path_strings(keypath)
        name = flax_path_to_torch(path)
        shape = tuple(int(d) for d in np.shape(leaf))
        is_frozen = bool(frozen(name)) if frozen is not None else False
        decay = not no_weight_decay(name, shape, skip, match_nested_names=corrected_region_token_decay)
        if use_layers:
            lid = layer_id(
                name,
                num_layers,
                corrected_downsamplers=corrected_downsampler_layer_ids,
                stage_depths=stage_depths,
            )
            scale = scales[lid]
            group = f"layer_{lid}_{'decay' if decay else 'no_decay'}"
        else:
            lid, scale, group = None, 1.0, ("decay" if decay else "no_decay")
        if is_frozen:
            decay, scale, group = False, 0.0, FROZEN_GROUP
        rules.append(ParamRule(name, path, shape, lid, scale, decay, is_frozen, group))

    names = [r.torch_name for r in rules]
    if len(set(names)) != len(names):
        dup = sorted(n for n, c in Counter(names).items() if c > 1)
        raise ValueError(f"two parameter paths map to the same PyTorch name: {dup[:5]}")
    return OptimizerReport(tuple(rules), weight_decay_label)


# ---------------------------------------------------------------------------------------------------------------
# The optimiser
# ---------------------------------------------------------------------------------------------------------------


def _group_chain(
    schedule: optax.Schedule,
    lr_scale: float,
    weight_decay: float | optax.Schedule | None,
    b1: float,
    b2: float,
    eps: float,
) -> optax.GradientTransformation:
    """PyTorch AdamW for one param group: -(lr[step] * lr_scale) * adam direction, then the decoupled decay."""
    group_lr = lambda count: schedule(count) * lr_scale  # noqa: E731
    steps = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=0.0), optax.scale_by_learning_rate(group_lr)]
    if weight_decay is not None:
        steps.append(decoupled_weight_decay_as_torch(group_lr, weight_decay))
    return optax.chain(*steps)


def decoupled_weight_decay_as_torch(group_lr: optax.Schedule,
                                    weight_decay: float | optax.Schedule) -> optax.GradientTransformation:
    """Adds the decoupled decay exactly as ``torch.optim.AdamW`` applies it: ``p.mul_(1 - lr * wd)``.

    PyTorch rounds the multiplier ``1 - lr*wd`` to float32 before multiplying, so the decay it applies is off the
    intended ``lr*wd*p`` by up to half a float32 ulp of 1 (3e-8) — 0.4% of the decay itself at lr*wd = 8e-6. On a
    tensor that only decays (zero gradient, e.g. the last LGI block's global-to-local attention under region
    pooling) that is the whole weight change, and optax's ``add_decayed_weights`` (the exact ``lr*wd*p``) missed
    the reference there by 6e-4 relative (steps golden; now bit-identical). Here the update is
    ``p*float32(1 - lr*wd) - p``, which is exact in float32 (Sterbenz: ``p*c`` is within a factor 2 of ``p``), so
    ``p + update`` is the reference's multiplied weight before the adam part is added.
    """

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("decoupled weight decay needs the parameters (tx.update(grads, state, params))")
        wd = weight_decay(state.count) if callable(weight_decay) else weight_decay
        keep = jnp.asarray(1.0 - group_lr(state.count) * wd)  # rounded to each tensor's dtype below, as torch does
        updates = jax.tree_util.tree_map(lambda u, p: u + (p * keep.astype(p.dtype) - p), updates, params)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def build_optimizer(
    params: Any,
    *,
    schedule: optax.Schedule,
    weight_decay: float | optax.Schedule,
    betas: tuple[float, float],
    eps: float,
    layer_decay: float | None = None,
    num_layers: int | None = None,
    skip_weight_decay: Iterable[str] = (),
    frozen: Callable[[str], bool] | None = None,
    grad_clip: float | None = None,
    corrected_region_token_decay: bool = False,
    corrected_downsampler_layer_ids: bool = False,
    stage_depths: Sequence[int] | None = None,
) -> tuple[optax.GradientTransformation, OptimizerReport]:
    """AdamW with the reference's param groups; returns the transformation and the per-parameter report.

    Args:
      params: the parameter tree (nested dicts; arrays or ``jax.ShapeDtypeStruct``, only shapes are read).
      schedule: lr per step (e.g. ``warmup_cosine_schedule``); the count is the number of updates applied so far,
        as the reference's ``it = epoch * steps_per_epoch + step``.
      weight_decay: constant (0.05 in every published run) or a schedule.
      layer_decay / num_layers: layer-wise lr decay (fine-tuning: 0.75 with 16 or 21 blocks); None = off.
      skip_weight_decay: the model's bare-name skip set (e.g. ``{"mask_token", "lg_region_tokens"}``).
      frozen: predicate on the PyTorch name; matching tensors get no update, no decay and no optimiser state
        (use ``svfap_pretrain_unused`` for the faithful SVFAP pre-training, Q4).
      grad_clip: global-norm clipping over the non-frozen gradients (off in the reference).
      corrected_region_token_decay: Q10 fix (never decay ``*.lg_region_tokens``).
      corrected_downsampler_layer_ids / stage_depths: Q11 fix for TPSBT layer ids.

    Only elementwise ops and one global norm: works under ``jax.jit`` with sharded params, and the state is a
    pytree of arrays (orbax-saveable). Unlike the reference, ``weight_decay=0`` keeps layer-wise lr scales (the
    reference silently drops its param groups then; no published run does this).
    """
    b1, b2 = betas
    report = parameter_rules(
        params,
        layer_decay=layer_decay,
        num_layers=num_layers,
        skip_weight_decay=skip_weight_decay,
        frozen=frozen,
        corrected_region_token_decay=corrected_region_token_decay,
        corrected_downsampler_layer_ids=corrected_downsampler_layer_ids,
        stage_depths=stage_depths,
        weight_decay_label=weight_decay if isinstance(weight_decay, (int, float)) else "schedule",
    )
    group_of = {r.torch_name: r.group for r in report.rules}

    transforms: dict[str, optax.GradientTransformation] = {}
    for r in report.rules:
        if r.group in transforms:
            continue
        if r.frozen:
            transforms[r.group] = optax.set_to_zero()
        else:
            transforms[r.group] = _group_chain(schedule, r.lr_scale, weight_decay if r.decay else None, b1, b2, eps)

    def labels(tree):
        def label(keypath, _):
            name = _torch_name_of(keypath)
            if name not in group_of:
                raise KeyError(f"parameter {name!r} was not in the tree the optimiser was built for")
            return group_of[name]

        return jax.tree_util.tree_map_with_path(label, tree)

    tx: optax.GradientTransformation = optax.multi_transform(transforms, labels)
    if grad_clip is not None:
        # Clip first, on trainable gradients only (frozen ones would inflate the norm; PyTorch never sees them).
        def trainable(tree):
            return jax.tree_util.tree_map_with_path(lambda kp, _: group_of[_torch_name_of(kp)] != FROZEN_GROUP, tree)

        tx = optax.chain(optax.masked(optax.clip_by_global_norm(grad_clip), trainable), tx)
    return tx, report
