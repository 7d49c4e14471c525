"""What the inference commands share: loading a model from any checkpoint form, cutting videos into windows, and a
batched, jit-compiled forward pass.

``predict`` (class probabilities over time), ``extract`` (embeddings) and ``visualize_mae`` (reconstructions) all
start from a path the user hands over and a video or a shard directory. Keeping the three steps here means the
commands agree on what a checkpoint is, which frames a window holds and how pixels are normalised.

**Checkpoints** (:func:`load_model`) come in three forms:

* a converted directory (``model.json`` + orbax ``params/``, written by ``facemae_jax.convert`` or the trainer);
* a training workdir whose ``export/`` holds such a directory (the trainer exports its final model there);
* an official PyTorch file (``.pth`` / ``.npz`` / ``.safetensors``); then the registered model name is needed
  (``--model``) because the file does not say which architecture it is. A pre-train file given with a fine-tune
  name keeps only the encoder (FINETUNING §6): the head is untrained, so it serves feature extraction only.

**Windows** (:func:`plan_windows`): a window is ``num_frames`` frames taken every ``sampling_rate`` frames, so it
spans ``num_frames * sampling_rate`` source frames (64 for DFEW). Windows start every ``stride`` frames; the last
one is aligned to the end of the video so that every frame lies in some window. A video shorter than one span but
with at least ``num_frames`` frames gets one window built like the reference test sampler (every
``sampling_rate``-th frame, the last one repeated up to ``num_frames``, FINETUNING §4.2); fewer frames than that
is :class:`VideoTooShort`. Videos are decoded, face-tracked, cropped and windowed as a stream by
:mod:`facemae_jax.video_stream` (its windows are exactly these).

**Forward** (:class:`ClipForward`): clips ``uint8 [T, S, S, 3]`` are normalised on the host with the reference's
float32 operation order ``(x / 255 - mean) / std`` (bit-identical to the PyTorch loaders, unlike the fused device
version), grouped into batches of a fixed size (the last one padded) so that XLA compiles the model once per
configuration, and run with the parameters placed on the device once.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
import warnings
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from facemae_jax import convert, targets
from facemae_jax.convert import parse_overrides  # noqa: F401  (re-exported for the CLIs)
from facemae_jax.models import registry
from facemae_jax.models.config import ModelConfig

DEFAULT_SAMPLING_RATE = 4  # DFEW / MAFW / VoxCeleb2 (FINETUNING §2); FERV39k uses 1
EXPORT_DIR = "export"  # a training workdir keeps its exported model here
OFFICIAL_SUFFIXES = (".pth", ".pt", ".npz", ".safetensors")

# Class lists of FINETUNING §2 (label index = position), keyed by the reference's ``--data_set`` value.
DATASET_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "DFEW": ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear"),
    "FERV39K": ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear"),
    "MAFW": ("anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise", "contempt", "anxiety",
             "helplessness", "disappointment"),
}
FORWARD_OUTPUTS = ("probs", "logits", "pooled", "tokens")


class ModelLoadError(ValueError):
    """A checkpoint path that cannot be turned into a model; the message names the path and what is wrong."""


class VideoTooShort(ValueError):
    """A video with fewer frames than the model's clip length."""


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


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
        else:
            listing = sorted(os.listdir(path))[:12]
            raise ModelLoadError(
                f"{path}: a directory, but neither a converted model (no {convert.MODEL_JSON}) nor a training "
                f"workdir with {EXPORT_DIR}/{convert.MODEL_JSON} (the trainer writes it when training ends; "
                f"python -m facemae_jax.convert turns official weights into one). It holds: {listing}"
            )
    try:
        params, cfg, meta = convert.load_converted(model_dir)
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
                    help=f"registered {'pre-train ' if pretrain else ''}model name (needed for official checkpoint files)")
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


# ---------------------------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Window:
    """One clip of a video.

    start_frame / end_frame: first and last source frame of the window's span (inclusive).
    frame_indices: int64 [num_frames] source frames the model sees.
    padded: True when the last frame is repeated to reach num_frames (video shorter than one span).
    """

    index: int
    start_frame: int
    end_frame: int
    frame_indices: np.ndarray
    padded: bool = False

    def times(self, fps: float | None) -> tuple[float | None, float | None]:
        """(start, end) in seconds: from the start of the first frame to the end of the last frame of the span."""
        if not fps:
            return None, None
        return self.start_frame / fps, (self.end_frame + 1) / fps


def plan_windows(num_video_frames: int, clip_len: int, sampling_rate: int, stride: int | None = None) -> list[Window]:
    """Windows covering frames ``0 .. num_video_frames-1``.

    Span = ``clip_len * sampling_rate`` frames; windows start at 0, stride, 2*stride, ... (default stride: half a
    span) as long as they fit, plus one ending at the last frame if the regular ones stop short of it. A video
    shorter than one span gets the reference test sampler's single window (every ``sampling_rate``-th frame, the
    last one repeated). Raises VideoTooShort below ``clip_len`` frames.
    """
    if clip_len < 1 or sampling_rate < 1:
        raise ValueError(f"clip_len ({clip_len}) and sampling_rate ({sampling_rate}) must be >= 1")
    span = clip_len * sampling_rate
    stride = max(1, span // 2) if stride is None else stride
    if stride < 1:
        raise ValueError(f"window stride must be >= 1 frame, got {stride}")
    if num_video_frames < clip_len:
        raise VideoTooShort(f"{num_video_frames} frames: too short, the model needs at least {clip_len} frames")
    if num_video_frames < span:
        strided = np.arange(0, num_video_frames, sampling_rate, dtype=np.int64)
        padding = clip_len - len(strided)
        indices = np.concatenate([strided, np.full(max(padding, 0), strided[-1], np.int64)])[:clip_len]
        return [Window(0, 0, num_video_frames - 1, indices, padded=padding > 0)]
    starts = list(range(0, num_video_frames - span + 1, stride))
    if starts[-1] + span < num_video_frames:
        starts.append(num_video_frames - span)
    offsets = np.arange(clip_len, dtype=np.int64) * sampling_rate
    return [Window(i, s, s + span - 1, s + offsets) for i, s in enumerate(starts)]


def shortness_note(window: Window, num_video_frames: int, clip_len: int, sampling_rate: int) -> str | None:
    """A sentence for the output files when a window repeats frames, else None."""
    if not window.padded:
        return None
    distinct = len(np.unique(window.frame_indices))
    return (f"video of {num_video_frames} frames is shorter than one window span ({clip_len * sampling_rate} "
            f"frames): one window sampling every {sampling_rate} frames, the last frame repeated "
            f"{clip_len - distinct} times (as the reference test sampler does)")


# ---------------------------------------------------------------------------------------------------------------
# Forward pass
# ---------------------------------------------------------------------------------------------------------------


def normalize_clips(clips_uint8: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 ImageNet-normalised, in the reference's op order ``(x / 255 - mean) / std``."""
    if clips_uint8.dtype != np.uint8 or clips_uint8.shape[-1] != 3:
        raise ValueError(f"expected uint8 pixels [..., 3], got {clips_uint8.dtype} {clips_uint8.shape}")
    x = clips_uint8.astype(np.float32) / np.float32(255.0)
    return (x - np.asarray(targets.IMAGENET_MEAN, np.float32)) / np.asarray(targets.IMAGENET_STD, np.float32)


@functools.lru_cache(maxsize=16)
def _compiled_classifier(cfg: ModelConfig):
    """One jitted function per config, returning every output: reused across videos, loads and commands, so XLA
    compiles once per batch shape. The outputs nobody asks for are never copied to the host."""
    module = registry.create_model(cfg)

    def forward(params, video):
        logits, aux = module.apply({"params": params}, video, return_aux=True)
        logits = logits.astype(jnp.float32)
        return {"probs": jax.nn.softmax(logits, axis=-1), "logits": logits,
                "pooled": aux["pooled"].astype(jnp.float32), "tokens": aux["features"].astype(jnp.float32)}

    return jax.jit(forward)


class ClipForward:
    """Batched inference of a fine-tune model on uint8 clips.

    ``forward(clips)`` with an iterable of uint8 [T, S, S, 3] clips returns {output: float32 [N, ...]}:
    'probs' [N, K] (softmax), 'logits' [N, K], 'pooled' [N, C] (fc_norm output), 'tokens' [N, L, C] (the tokens
    that are mean-pooled: all patch tokens, or the region tokens of LGI's 'region' classify type).
    """

    def __init__(self, loaded: LoadedModel, *, batch_size: int = 8, outputs: Sequence[str] = ("probs",)):
        cfg = loaded.cfg
        if cfg.mode != "finetune":
            raise ValueError(f"{loaded.source}: a pre-train model has no classifier; use as_backbone() for features")
        unknown = set(outputs) - set(FORWARD_OUTPUTS)
        if unknown or not outputs:
            raise ValueError(f"outputs must be a non-empty subset of {FORWARD_OUTPUTS}, got {list(outputs)}")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.cfg = cfg
        self.batch_size = batch_size
        self.outputs = tuple(sorted(outputs))
        self.clip_shape = (cfg.num_frames, cfg.img_size, cfg.img_size, 3)
        self._fn = _compiled_classifier(cfg)
        self._params = jax.device_put(loaded.params)
        self.busy_seconds = 0.0  # time spent normalising and running batches (windows/s of the model itself)

    def _run(self, batch: list[np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        n = len(batch)
        stacked = np.stack(batch + [batch[-1]] * (self.batch_size - n))  # pad: one shape, one compilation
        out = self._fn(self._params, normalize_clips(stacked))
        result = {k: np.asarray(out[k])[:n] for k in self.outputs}
        self.busy_seconds += time.perf_counter() - started
        return result

    def __call__(self, clips: Iterable[np.ndarray], *, total: int | None = None,
                 desc: str | None = None) -> dict[str, np.ndarray]:
        from data_pipelines import progress

        parts: list[dict[str, np.ndarray]] = []
        batch: list[np.ndarray] = []
        with progress.bar(total=total, desc=desc, unit="clip", leave=False, disable=desc is None) as bar:
            for clip in clips:
                clip = np.asarray(clip)
                if clip.shape != self.clip_shape or clip.dtype != np.uint8:
                    raise ValueError(f"clip must be uint8 {list(self.clip_shape)}, got {clip.dtype} "
                                     f"{list(clip.shape)}")
                batch.append(clip)
                if len(batch) == self.batch_size:
                    parts.append(self._run(batch))
                    bar.update(len(batch))
                    batch = []
            if batch:
                parts.append(self._run(batch))
                bar.update(len(batch))
        if not parts:
            raise ValueError("no clips to run")
        return {k: np.concatenate([p[k] for p in parts]) for k in self.outputs}


@functools.lru_cache(maxsize=4)
def _compiled_autoencoder(cfg: ModelConfig):
    module = registry.create_model(cfg)
    return jax.jit(lambda params, video, mask: module.apply({"params": params}, video, mask))


def make_mask(cfg: ModelConfig, seed: int = 0) -> np.ndarray:
    """A mask from the model's own generator (mask_kind, mask_ratio, LGI band window) -> bool [N], True = hidden."""
    from facemae_jax import masking

    return masking.MaskGenerator.for_model(cfg)(np.random.default_rng(seed))


def predict_masked_patches(loaded: LoadedModel, clip: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Pre-train model on one clip: uint8 [T, S, S, 3] + bool [N] -> predictions float32 [Nm, patch_dim] for the
    masked tokens in ascending token order (normalised-patch targets, PRETRAINING §3)."""
    from facemae_jax.models import mae

    cfg = loaded.cfg
    if cfg.mode != "pretrain":
        raise ValueError(f"{loaded.source}: a fine-tune model has no decoder; pass a pre-train checkpoint")
    mask = np.asarray(mask, bool)[None]
    mae.check_mask(cfg, mask)  # under jit the model cannot check the concrete mask itself
    pred = _compiled_autoencoder(cfg)(loaded.params, normalize_clips(np.asarray(clip)[None]), mask)
    return np.asarray(pred)[0]
