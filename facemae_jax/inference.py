"""What the inference commands share: cutting videos into windows and a batched, jit-compiled forward pass
(models are loaded by :mod:`facemae_jax.loading`, the one loader for every checkpoint source).

``predict`` (class probabilities over time), ``extract`` (embeddings) and ``visualize_mae`` (reconstructions) all
start from a path the user hands over and a video or a shard directory. Keeping the shared steps here means the
commands agree on which frames a window holds and how pixels are normalised.

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

import dataclasses
import functools
import time
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from facemae_jax import targets
from facemae_jax.loading import LoadedModel
from facemae_jax.models import registry
from facemae_jax.models.config import ModelConfig

FORWARD_OUTPUTS = ("probs", "logits", "pooled", "tokens")


class VideoTooShort(ValueError):
    """A video with fewer frames than the model's clip length."""


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
