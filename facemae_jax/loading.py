"""One model loader for every checkpoint source: what the trainer's ``init_from``, ``--mode=eval`` and the inference
commands (predict, extract, visualize_mae) all read.

Sources:

* a converted directory (``model.json`` + orbax ``params/``, written by ``facemae_jax.convert`` or the trainer);
* a training workdir: its ``export/`` (the final model) or, while the run has not finished (preempted, still
  running), the newest verified checkpoint in ``checkpoints/``, with the model taken from the run's ``config.json``;
* an official PyTorch file (``.pth`` / ``.npz`` / ``.safetensors``); then the registered model name is needed
  (``--model``) because the file does not say which architecture it is. A pre-train file given with a fine-tune
  name keeps only the encoder (FINETUNING §6): the head is untrained, so it serves feature extraction only.

:func:`load_model` returns the model as stored (its own config); :func:`load_params_into` fits any source into
another config — a pre-trained encoder into a fine-tuning job (fresh ``fc_norm`` / head), or the same architecture
as is — which is what ``init_from`` needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import warnings
from typing import Any, Sequence

import numpy as np

from facemae_jax import convert
from facemae_jax.models import registry
from facemae_jax.models.config import ModelConfig

DEFAULT_SAMPLING_RATE = 4  # DFEW / MAFW / VoxCeleb2 (FINETUNING §2); FERV39k uses 1
EXPORT_DIR = "export"  # a training workdir keeps its exported model here
OFFICIAL_SUFFIXES = (".pth", ".pt", ".npz", ".safetensors")
RUN_CHECKPOINTS = "checkpoints"  # a training workdir's orbax checkpoints (facemae_jax.train)
RUN_CONFIG = "config.json"  # ... and its settings (launch.save_config)

# Class lists of FINETUNING §2 (label index = position), keyed by the reference's ``--data_set`` value.
DATASET_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "DFEW": ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear"),
    "FERV39K": ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear"),
    "MAFW": ("anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise", "contempt", "anxiety",
             "helplessness", "disappointment"),
}


class ModelLoadError(ValueError):
    """A checkpoint path that cannot be turned into a model; the message names the path and what is wrong."""





@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference.

    params: Flax parameter tree (numpy leaves). cfg: its ModelConfig (``mode`` 'finetune' or 'pretrain').
    class_names: one name per output class (empty for pre-train models). sampling_rate: source frames between two
    sampled frames (the rate the model was trained with). source: the path it was loaded from.
    head_trained: False when the classifier head is freshly initialised (a pre-train checkpoint loaded into a
    fine-tune model): its logits mean nothing, only the encoder features do.
    task: 'classification' or, for models the trainer exported from a regression dataset, 'regression' (then
    class_names are the target names and a softmax over them means nothing).
    """

    params: Any
    cfg: ModelConfig
    class_names: tuple[str, ...]
    sampling_rate: int
    source: str
    model_name: str | None = None
    head_trained: bool = True
    task: str = "classification"

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for output files."""
        c = self.cfg
        return {
            "source": self.source,
            "model_name": self.model_name,
            "family": c.family,
            "mode": c.mode,
            "num_frames": c.num_frames,
            "img_size": c.img_size,
            "sampling_rate": self.sampling_rate,
            "num_classes": c.num_classes if c.mode == "finetune" else None,
            "head_trained": self.head_trained,
            "task": self.task,
        }


def load_model(
    path: str | os.PathLike,
    *,
    model: str | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | str | None = None,
    sampling_rate: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> LoadedModel:
    """Load a converted directory, a training workdir (``export/``) or an official checkpoint file.

    model: registered name (see ``registry.MODELS``); required for official files, ignored otherwise.
    num_classes: class count of an official fine-tune file's head (default: read from its ``head.weight``); for a
        converted model it must agree with the stored config.
    class_names: list or comma-separated string; default from the checkpoint's metadata, else the dataset named in
        an official file's ``args.data_set``, else DFEW's 7 classes when there are 7, else ``class_0, ...`` (with a
        warning).
    sampling_rate: overrides the checkpoint's (metadata ``sampling_rate``, an official file's
        ``args.sampling_rate``; default 4).
    overrides: ModelConfig fields that differ from the registered model's (official files only, e.g. a model
        trained at another geometry); a converted model's stored config is complete and cannot be overridden.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        if overrides:
            raise ModelLoadError(f"{path}: a converted model stores its full config; config overrides "
                                 f"{sorted(overrides)} only apply to official checkpoint files")
        loaded = _load_directory(path, model, num_classes)
    else:
        loaded = _load_official(path, model, num_classes, dict(overrides or {}))
    params, cfg, meta, head_trained, name = loaded
    rate = sampling_rate if sampling_rate is not None else meta.get("sampling_rate", DEFAULT_SAMPLING_RATE)
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate < 1:
        raise ModelLoadError(f"{path}: sampling rate must be a positive int, got {rate!r}")
    task = str(meta.get("task") or "classification")
    if task == "regression" and class_names is None and meta.get("target_names"):
        meta = {**meta, "class_names": meta["target_names"]}
    names = _class_names(path, cfg, class_names, meta)
    return LoadedModel(params=params, cfg=cfg, class_names=names, sampling_rate=int(rate), source=os.path.abspath(path),
                       model_name=name, head_trained=head_trained, task=task)


def _load_directory(path: str, model: str | None, num_classes: int | None):
    model_dir = path
    if not os.path.exists(os.path.join(path, convert.MODEL_JSON)):
        export = os.path.join(path, EXPORT_DIR)
        if os.path.exists(os.path.join(export, convert.MODEL_JSON)):
            model_dir = export
        elif _has_checkpoints(path):
            return _load_run_checkpoint(path)
        else:
            listing = sorted(os.listdir(path))[:12]
            raise ModelLoadError(
                f"{path}: a directory, but neither a converted model (no {convert.MODEL_JSON}) nor a training "
                f"workdir with {EXPORT_DIR}/{convert.MODEL_JSON} (the trainer writes it when training ends; "
                f"{RUN_CHECKPOINTS}/ + {RUN_CONFIG} of an unfinished run also do; "
                f"python -m facemae_jax.convert turns official weights into one). It holds: {listing}"
            )
    try:
        params, cfg, meta = convert.load_converted(model_dir)
    except convert.ExportCorrupt as e:
        raise ModelLoadError(str(e)) from None
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{model_dir}: {convert.MODEL_JSON} is not a valid model description ({e})") from e
    except FileNotFoundError as e:
        raise ModelLoadError(f"{model_dir}: incomplete converted model ({e})") from e
    stored_name = meta.get("model_name")
    if model is not None and stored_name is not None and model != stored_name:
        warnings.warn(f"{model_dir} holds {stored_name!r}; --model {model!r} is ignored (the stored config wins)",
                      stacklevel=3)
    if num_classes is not None and cfg.mode == "finetune" and num_classes != cfg.num_classes:
        raise ModelLoadError(f"{model_dir}: the model has {cfg.num_classes} classes, not {num_classes}")
    return params, cfg, meta, bool(meta.get("head_trained", True)), stored_name


def _has_checkpoints(path: str) -> bool:
    ck = os.path.join(path, RUN_CHECKPOINTS)
    return os.path.isdir(ck) and os.path.exists(os.path.join(path, RUN_CONFIG)) and any(
        name.isdigit() for name in os.listdir(ck))


def _load_run_checkpoint(path: str):
    """An unfinished run's newest verified checkpoint: parameters from orbax, the model from its config.json."""
    from facemae_jax import checkpoint

    config_path = os.path.join(path, RUN_CONFIG)
    try:
        with open(config_path) as f:
            job = json.load(f)
        name = job["model"]["name"]
        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in (job["model"]["overrides"] or {}).items()}
        cfg = registry.get_config(name, **overrides)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{config_path}: cannot read the run's model (model.name / model.overrides): {e}") from e
    ckpt = checkpoint.Checkpointer(os.path.join(path, RUN_CHECKPOINTS), async_save=False)
    try:
        step = ckpt.latest_step()
        state, _ = ckpt.restore_unsharded(step)
    finally:
        ckpt.close()
    data = job.get("data") or {}
    meta: dict[str, Any] = {"model_name": name, "step": int(step), "sampling_rate": data.get("sampling_rate"),
                            "task": "pretrain" if job.get("task") == "pretrain" else data.get("task")}
    from data_pipelines import dataset_info

    data_dir = str(data.get("dir") or "")
    if data_dir and os.path.exists(dataset_info.path(data_dir)):  # the run's class names, as its export stores them
        info = dataset_info.load(data_dir)
        meta.update(class_names=info.get("class_names"), target_names=info.get("target_names"))
    params = _to_numpy(state["params"])
    print(f"[load] {path}: no export yet; parameters of checkpoint step {step}", flush=True)
    return params, cfg, meta, True, name


def _to_numpy(tree: Any) -> Any:
    import jax

    return jax.tree_util.tree_map(np.asarray, tree)


def read_state_dict(path: str) -> tuple[dict[str, np.ndarray], str]:
    """Any source -> (float32 state dict with the official torch names, where it came from). Directories and run
    dirs carry their own config; an official file is read as is (no model name is needed to read it)."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        loaded = load_model(path)
        return convert.flax_to_torch(loaded.params, loaded.cfg), loaded.source
    from facemae_jax import torch_io

    try:
        sd, _ = torch_io.load_state_dict(path)
    except torch_io.CheckpointFormatError as e:
        raise ModelLoadError(str(e)) from e
    return {k: np.asarray(v, np.float32) for k, v in sd.items()}, path


def load_params_into(path: str, cfg: ModelConfig, *, seed: int = 0) -> tuple[dict, str]:
    """``init_from``: parameters of any source fitted into ``cfg`` (the job's model). A fine-tuning job takes the
    encoder of a pre-train or fine-tune source (``fc_norm`` / head kept when they fit, else fresh from ``seed``); a
    pre-training job takes the source's tensors as they are. Returns (params, a one-line report)."""
    state_dict, source = read_state_dict(path)
    if cfg.mode == "finetune":
        params, report = convert.pretrain_to_finetune(state_dict, cfg, rng_seed=seed, source=source)
        return params, f"{path}: {len(report['dropped'])} keys dropped, initialised {report['initialised']}"
    params, _ = convert.torch_to_flax(state_dict, cfg, source=source)
    return params, f"{path}: all {len(state_dict)} tensors loaded"


def _load_official(path: str, model: str | None, num_classes: int | None, overrides: dict[str, Any]):
    from facemae_jax import torch_io

    if model is None:
        raise ModelLoadError(
            f"{path}: an official checkpoint file does not say which architecture it holds; pass the registered "
            f"model name (--model), one of {sorted(registry.MODELS)}"
        )
    if model not in registry.MODELS:
        raise ModelLoadError(f"{path}: unknown model {model!r}; known: {sorted(registry.MODELS)}")
    try:
        state_dict, info = torch_io.load_state_dict(path)
    except torch_io.CheckpointFormatError as e:
        raise ModelLoadError(str(e)) from e
    state_dict = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    args = info.get("args") if isinstance(info.get("args"), dict) else {}
    is_pretrain_dict = any(k.startswith(("encoder.", "decoder.")) for k in state_dict)
    try:
        base = registry.get_config(model, **overrides)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: config overrides {overrides} do not apply to {model!r} ({e})") from e
    if base.mode == "finetune":
        if num_classes is None and "head.weight" in state_dict and not is_pretrain_dict:
            num_classes = int(state_dict["head.weight"].shape[0])
        elif num_classes is None and isinstance(args.get("nb_classes"), int):
            num_classes = int(args["nb_classes"])
        if num_classes is not None:
            overrides["num_classes"] = num_classes
    cfg = registry.get_config(model, **overrides)
    try:
        if cfg.mode == "pretrain":
            if not is_pretrain_dict:
                raise ModelLoadError(
                    f"{path}: a fine-tune state dict (no encoder.* / decoder.* keys), but {model!r} is a pre-train "
                    f"model; name the matching fine-tune model instead"
                )
            params, _ = convert.torch_to_flax(state_dict, cfg, source=path)
            head_trained = True
        elif is_pretrain_dict:
            params, _ = convert.pretrain_to_finetune(state_dict, cfg, source=path)
            head_trained = False
        else:
            params, _ = convert.torch_to_flax(state_dict, cfg, source=path)
            head_trained = True
    except convert.ConversionError as e:
        raise ModelLoadError(f"{e}\n(model {model!r}; is it the right --model for this file?)") from e
    meta: dict[str, Any] = {}
    if isinstance(args.get("sampling_rate"), int):
        meta["sampling_rate"] = args["sampling_rate"]
    dataset = str(args.get("data_set", "")).upper()
    if dataset in DATASET_CLASS_NAMES and len(DATASET_CLASS_NAMES[dataset]) == cfg.num_classes:
        meta["class_names"] = list(DATASET_CLASS_NAMES[dataset])
    return params, cfg, meta, head_trained, model


def add_model_args(ap: argparse.ArgumentParser, *, pretrain: bool = False) -> None:
    """The model-loading flags shared by predict, extract and visualize_mae (``load_model``'s arguments)."""
    kind = "pre-train model: " if pretrain else ""
    ap.add_argument("--checkpoint", required=True, help=f"{kind}converted dir, training workdir, or official .pth/.npz")
    ap.add_argument("--model", default=None,
                    help=f"registered {'pre-train ' if pretrain else ''}model name (needed for official checkpoint "
                         "files)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=JSON",
                    help="ModelConfig field of an official checkpoint's model that differs from the registered "
                         "one (repeatable), as in facemae_jax.convert")
    ap.add_argument("--sampling_rate", type=int, default=None, help="override the checkpoint's sampling rate")


def _class_names(path: str, cfg: ModelConfig, given: Sequence[str] | str | None, meta: dict) -> tuple[str, ...]:
    if cfg.mode == "pretrain":
        return ()
    k = cfg.num_classes
    if isinstance(given, str):
        given = [n.strip() for n in given.split(",")]
    names = given if given is not None else meta.get("class_names")
    if names is not None:
        names = tuple(str(n) for n in names)
        if len(names) != k:
            where = "given" if given is not None else f"stored in {path}"
            raise ModelLoadError(f"{path}: {len(names)} class names {where} {list(names)}, but the model has {k} "
                                 f"classes")
        return names
    if k == len(DATASET_CLASS_NAMES["DFEW"]):
        return DATASET_CLASS_NAMES["DFEW"]
    warnings.warn(f"{path}: no class names stored for this {k}-class model; using class_0 .. class_{k - 1} "
                  f"(pass --class_names to name them)", stacklevel=3)
    return tuple(f"class_{i}" for i in range(k))


def as_backbone(loaded: LoadedModel) -> LoadedModel:
    """A fine-tune model for feature extraction: itself, or for a pre-train model its encoder in the fine-tune
    backbone (the reference's loading rule, FINETUNING §6: decoder and the encoder's final ``norm`` dropped,
    ``fc_norm`` fresh = a plain LayerNorm with unit scale and zero bias, head random and flagged untrained)."""
    if loaded.cfg.mode == "finetune":
        return loaded
    cfg = loaded.cfg.replace(mode="finetune")
    state_dict = convert.flax_to_torch(loaded.params, loaded.cfg)
    params, _ = convert.pretrain_to_finetune(state_dict, cfg, source=loaded.source)
    return dataclasses.replace(loaded, params=params, cfg=cfg, class_names=tuple(f"class_{i}" for i in
                                                                                   range(cfg.num_classes)),
                               head_trained=False)
