"""Official PyTorch weights in and out (CHECKPOINTS.md §3-4, FINETUNING.md §6).

* ``torch_to_flax(state_dict, cfg)``: reference state_dict -> Flax parameter tree. Unknown, missing and
  shape-mismatched keys are an error that lists them all (the reference silently ignores mismatches, QUIRKS Q7).
* ``flax_to_torch(params, cfg)``: the inverse (PyTorch names and layouts), so a model trained here can be used
  by the reference code; the round trip is bit-exact.
* ``pretrain_to_finetune(state_dict, cfg)``: a pre-train checkpoint into a fine-tune model, following the
  reference loader (strip ``encoder.``, drop decoder / ``encoder_to_decoder`` / ``mask_token`` / the encoder's final
  ``norm``, fresh ``fc_norm`` + ``head``) — but strict about everything else.
* ``save_converted`` / ``load_converted``: the on-disk format the trainer and ``predict`` read (orbax params +
  ``model.json``).

CLI::

    python -m facemae_jax.convert --checkpoint X.pth --model NAME --out DIR [--num_classes K] [--class_names a,b]
        [--overwrite]

An existing, non-empty ``--out`` (e.g. a trained export and its class names) is refused unless ``--overwrite``.

Layout rules: Linear ``(out, in)`` <-> Dense ``(in, out)``; Conv3d ``(out, in, t, h, w)`` <-> ``(t, h, w, in, out)``;
Conv1d ``(out, in, k)`` <-> ``(k, in, out)``; LayerNorm weight <-> scale; everything else is copied.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np
from flax import traverse_util

from facemae_jax import naming
from facemae_jax.models.config import ModelConfig


class ConversionError(ValueError):
    """The state_dict does not fit the model; the message lists every offending key."""


_TO_FLAX = {2: (1, 0), 3: (2, 1, 0), 5: (2, 3, 4, 1, 0)}
_TO_TORCH = {2: (1, 0), 3: (2, 1, 0), 5: (4, 3, 0, 1, 2)}


def _abstract(cfg: ModelConfig) -> dict:
    from facemae_jax.models import registry

    return registry.abstract_params(registry.create_model(cfg))


def _tied(cfg: ModelConfig) -> dict[str, str]:
    from facemae_jax.models import registry

    return registry.tied_modules(cfg)


def expected_torch_keys(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{reference key: reference shape} of the model's full state_dict, shared modules listed under both names."""
    out: dict[str, tuple[int, ...]] = {}
    for path, leaf in traverse_util.flatten_dict(_abstract(cfg)).items():
        shape = tuple(leaf.shape)
        if path[-1] == "kernel" and len(shape) in _TO_TORCH:
            shape = tuple(shape[i] for i in _TO_TORCH[len(shape)])
        out[naming.flax_path_to_torch(path)] = shape
    for alias, src in _tied(cfg).items():
        for k in [k for k in out if k.startswith(src)]:
            out[alias + k[len(src):]] = out[k]
    return out


def _fmt(title: str, keys: list[str], limit: int = 30) -> str:
    shown = "\n    ".join(keys[:limit])
    more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"  {title} ({len(keys)}):\n    {shown}{more}"


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    cfg: ModelConfig,
    *,
    allow_missing: tuple[str, ...] = (),
    source: str = "state_dict",
) -> tuple[dict, list[str]]:
    """-> (params, missing keys that matched ``allow_missing`` prefixes). Raises ConversionError otherwise."""
    abstract = _abstract(cfg)
    flat = traverse_util.flatten_dict(abstract)
    expected = {naming.flax_path_to_torch(p): (p, leaf.shape) for p, leaf in flat.items()}
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    problems: list[str] = []

    # Shared attention modules are listed twice by the reference; keep one copy, check they agree.
    tie_errors = []
    for alias, src in _tied(cfg).items():
        for k in [k for k in sd if k.startswith(alias)]:
            s = src + k[len(alias):]
            if s not in sd:
                tie_errors.append(f"{k} (its tied source {s} is missing)")
            elif not np.array_equal(sd[k], sd[s]):
                tie_errors.append(f"{k} differs from tied {s}")
            del sd[k]
    if tie_errors:
        problems.append(_fmt("tied (shared) tensors inconsistent", tie_errors))

    missing = sorted(set(expected) - set(sd))
    allowed = [k for k in missing if k.startswith(allow_missing)] if allow_missing else []
    missing = [k for k in missing if k not in allowed]
    unexpected = sorted(set(sd) - set(expected))
    flat: dict[tuple[str, ...], np.ndarray] = {}
    mismatched = []
    for key in sorted(set(sd) & set(expected)):
        path, shape = expected[key]
        arr = sd[key]
        if path[-1] == "kernel" and arr.ndim in _TO_FLAX:
            arr = arr.transpose(_TO_FLAX[arr.ndim])
        if tuple(arr.shape) != tuple(shape):
            mismatched.append(f"{key}: checkpoint {tuple(sd[key].shape)} -> {tuple(arr.shape)}, model {tuple(shape)}")
            continue
        flat[path] = np.ascontiguousarray(arr)
    if missing:
        problems.append(_fmt("missing in checkpoint", missing))
    if unexpected:
        problems.append(_fmt("unexpected in checkpoint", unexpected))
    if mismatched:
        problems.append(_fmt("shape mismatch", mismatched))
    if problems:
        raise ConversionError(f"{source} does not fit model (family={cfg.family}, mode={cfg.mode}, "
                              f"embed_dim={cfg.embed_dim}):\n" + "\n".join(problems))
    return traverse_util.unflatten_dict(flat), allowed


def flax_to_torch(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Flax params -> reference state_dict (names, layouts, and duplicated entries of shared modules)."""
    out: dict[str, np.ndarray] = {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        arr = np.asarray(leaf)
        if path[-1] == "kernel" and arr.ndim in _TO_TORCH:
            arr = arr.transpose(_TO_TORCH[arr.ndim])
        out[naming.flax_path_to_torch(path)] = np.ascontiguousarray(arr)
    for alias, src in _tied(cfg).items():
        for k in [k for k in out if k.startswith(src)]:
            out[alias + k[len(src):]] = out[k]
    return out


def _fresh_head(cfg: ModelConfig, key) -> dict:
    """A new ``fc_norm`` (unit scale, zero bias) and ``head`` (trunc-normal 0.02 x init_scale, zero bias), as the
    reference initialises them — without compiling the whole model's initialiser."""
    from facemae_jax.models.layers import trunc_normal_abs

    c = cfg.embed_dim
    kernel = np.asarray(trunc_normal_abs(0.02)(key, (c, cfg.num_classes))) * np.float32(cfg.init_scale)
    return {
        "fc_norm": {"scale": np.ones((c,), np.float32), "bias": np.zeros((c,), np.float32)},
        "head": {"kernel": kernel.astype(np.float32), "bias": np.zeros((cfg.num_classes,), np.float32)},
    }


# Keys of a pre-train checkpoint that the fine-tune model does not use (FINETUNING §6).
_PRETRAIN_ONLY = ("decoder.", "encoder_to_decoder.", "mask_token", "norm.")


def pretrain_to_finetune(
    state_dict: Mapping[str, np.ndarray], cfg: ModelConfig, *, rng_seed: int = 0, source: str = "checkpoint"
) -> tuple[dict, dict[str, list[str]]]:
    """Pre-train (or fine-tune) state_dict -> fine-tune params; ``fc_norm``/``head`` freshly initialised when
    absent or of another class count. Returns (params, report) with the dropped / initialised keys."""
    import jax

    if cfg.mode != "finetune":
        raise ValueError("pretrain_to_finetune needs a fine-tune config")
    sd: dict[str, np.ndarray] = {}
    for k, v in state_dict.items():
        for prefix in ("encoder.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        sd[k] = np.asarray(v)
    dropped = sorted(k for k in sd if k.startswith(_PRETRAIN_ONLY))
    for k in dropped:
        del sd[k]
    fresh = _fresh_head(cfg, jax.random.key(rng_seed))
    head_shape = tuple(np.shape(fresh["head"]["kernel"]))[::-1]
    if "head.weight" in sd and tuple(sd["head.weight"].shape) != head_shape:
        dropped += ["head.weight", "head.bias"]
        sd.pop("head.weight")
        sd.pop("head.bias", None)
    params, initialised = torch_to_flax(sd, cfg, allow_missing=("fc_norm.", "head."), source=source)
    flat = traverse_util.flatten_dict(params)
    wanted = set(initialised)
    for path, leaf in traverse_util.flatten_dict(fresh).items():
        if naming.flax_path_to_torch(path) in wanted:
            flat[path] = np.asarray(leaf)
    params = traverse_util.unflatten_dict(flat)
    return params, {"dropped": dropped, "initialised": sorted(initialised)}


# ------------------------------------------------------------------------------------------------------------
# On-disk format of converted / exported models
# ------------------------------------------------------------------------------------------------------------

def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``['num_frames=8', 'region_size=[2,2,4]']`` (CLI ``--override KEY=JSON``) -> {'num_frames': 8, ...}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--override expects KEY=VALUE with a JSON value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a bare word such as tube_window is meant as a string
    return out


MODEL_JSON = "model.json"


class ExportCorrupt(ValueError):
    """A converted / exported model whose stored arrays differ from the checksums in its model.json."""


def save_converted(out_dir: str, params: Mapping[str, Any], cfg: ModelConfig, meta: dict | None = None) -> None:
    """Write ``out_dir/params`` (orbax) and ``out_dir/model.json`` (config + metadata such as class names + a
    fingerprint per array, checked by ``load_converted``: orbax's stored chunks carry no checksum of the values, see
    :mod:`facemae_jax.fingerprint`).

    In a multi-process job every process calls this (orbax's save and the fingerprints are collective; process 0
    writes the files)."""
    import jax
    import orbax.checkpoint as ocp

    from facemae_jax import fingerprint

    checksums = {"algorithm": fingerprint.ALGORITHM,
                 "arrays": {k: v["fingerprint"] for k, v in fingerprint.describe_tree(params).items()}}
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(out_dir, "params"), params, force=True)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:  # every process saves the arrays (collective); one writes model.json
        tmp = os.path.join(out_dir, MODEL_JSON + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"config": cfg.to_dict(), **(meta or {}), "checksums": checksums}, f, indent=2)
        os.replace(tmp, os.path.join(out_dir, MODEL_JSON))  # never a half-written model.json


def load_converted(path: str) -> tuple[dict, ModelConfig, dict]:
    """Read what ``save_converted`` wrote -> (params as numpy, config, metadata); arrays are checked against the
    stored checksums (``ExportCorrupt`` names the damaged ones)."""
    import orbax.checkpoint as ocp

    from facemae_jax import fingerprint

    path = os.path.abspath(path)
    mj = os.path.join(path, MODEL_JSON)
    if not os.path.exists(mj):
        raise FileNotFoundError(f"{mj} not found: {path!r} is not a converted model directory")
    with open(mj) as f:
        meta = json.load(f)
    cfg = ModelConfig.from_dict(meta.pop("config"))
    checksums = meta.pop("checksums", None)  # models converted before checksums were stored have none
    params = ocp.StandardCheckpointer().restore(os.path.join(path, "params"))
    if checksums and checksums.get("algorithm") == fingerprint.ALGORITHM:
        found = {k: v["fingerprint"] for k, v in fingerprint.describe_tree(params).items()}
        saved = checksums["arrays"]
        bad = sorted(k for k in set(saved) | set(found) if found.get(k) != saved.get(k))
        if bad:
            raise ExportCorrupt(
                f"{os.path.join(path, 'params')}: {len(bad)} of {len(saved)} arrays differ from the checksums in "
                f"{mj} ({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}): the stored model is damaged; "
                "export or convert it again")
    return params, cfg, meta



def existing_output(path: str) -> str | None:
    """Why writing to ``path`` would replace earlier results (None: it is new or an empty directory)."""
    if os.path.isfile(path):
        return f"--out {path!r} is an existing file"
    if os.path.isdir(path) and os.listdir(path):
        what = "a converted model" if os.path.exists(os.path.join(path, MODEL_JSON)) else "files"
        return f"--out {path!r} already holds {what} ({', '.join(sorted(os.listdir(path))[:4])})"
    return None


def main(argv: list[str] | None = None) -> int:
    from facemae_jax import torch_io
    from facemae_jax.models import registry

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help=".pth / .npz / .safetensors with a reference state_dict")
    ap.add_argument("--model", required=True, help=f"registered name, one of {sorted(registry.MODELS)}")
    ap.add_argument("--out", required=True, help="output directory (orbax params + model.json)")
    ap.add_argument("--num_classes", type=int, default=None)
    ap.add_argument("--class_names", default=None, help="comma-separated class names stored as metadata")
    ap.add_argument("--override", action="append", default=[], help="ModelConfig override key=value (JSON value)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: refuse)")
    args = ap.parse_args(argv)
    refusal = existing_output(args.out) if not args.overwrite else None
    if refusal:
        print(f"facemae_jax.convert: error: {refusal}; pass --overwrite to replace it, or choose another --out",
              file=sys.stderr)
        return 2

    overrides = parse_overrides(args.override)
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    cfg = registry.get_config(args.model, **overrides)
    sd, info = torch_io.load_state_dict(args.checkpoint)
    sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    if cfg.mode == "finetune" and any(k.startswith(("encoder.", "decoder.")) for k in sd):
        params, report = pretrain_to_finetune(sd, cfg, source=args.checkpoint)
        head_trained = not any(k.startswith("head.") for k in report["initialised"])
        print(f"pre-train -> fine-tune: dropped {len(report['dropped'])} keys, initialised {report['initialised']}")
    else:
        params, _ = torch_to_flax(sd, cfg, source=args.checkpoint)
        head_trained = True
    meta: dict[str, Any] = {"model_name": args.model, "source": os.path.abspath(args.checkpoint)}
    if cfg.mode == "finetune":
        meta["head_trained"] = head_trained  # False: encoder only, the classifier head is freshly initialised
    if "epoch" in info:
        meta["source_epoch"] = info["epoch"]
    if args.class_names:
        meta["class_names"] = args.class_names.split(",")
    save_converted(args.out, params, cfg, meta)
    print(f"wrote {args.out}: {registry.count_params(params):,} parameters ({args.model})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
