"""Figures: MAE reconstructions (for ``visualize_mae`` and the trainer's periodic snapshots) and class-probability
timelines (for ``predict``).

Everything takes numpy arrays and draws with matplotlib's object API (``Figure`` + Agg canvas, never ``pyplot``):
no global backend switch, no figure registry that leaks memory in a long training run, safe from a thread.

The reconstruction figure is one mosaic image with one ``imshow`` rather than a grid of axes per frame: building
80 axes costs about a second, one mosaic a few tens of milliseconds, and the trainer draws it every eval interval.

How a reconstruction is made (PRETRAINING §3): the decoder predicts, for each masked token, its pixels normalised
per token and colour channel (mean and unbiased std over the ``tubelet x patch x patch`` values). To show them
they are de-normalised with the true token's own mean and std, as the MAE papers' figures do (the model cannot
know them, so the figure shows structure, not absolute brightness). With the frame-difference target (MAE-DFER)
the later frames of a tubelet are predicted as differences to its first frame, so they are rebuilt as first frame
+ difference before de-normalising. Visible tokens are copied from the input.
"""

from __future__ import annotations

import os
import textwrap
from typing import Sequence

import numpy as np

from facemae_jax.models.config import ModelConfig

GREY = 0.5  # fill of hidden patches in the "masked input" row
EPS = 1e-6  # the target normalisation's epsilon on the std (PRETRAINING §3 step 3)
GUTTER = 2  # pixels between tiles


# ---------------------------------------------------------------------------------------------------------------
# Patches (numpy twins of targets.patchify, for host-side figures)
# ---------------------------------------------------------------------------------------------------------------


def patchify(video: np.ndarray, patch: int, tubelet: int) -> np.ndarray:
    """[T, H, W, C] -> [N, tubelet*patch*patch, C], token and pixel order as ``targets.patchify``."""
    t, h, w, c = video.shape
    x = video.reshape(t // tubelet, tubelet, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 2, 4, 1, 3, 5, 6).reshape(-1, tubelet * patch * patch, c)


def unpatchify(patches: np.ndarray, grid: tuple[int, int, int], patch: int, tubelet: int) -> np.ndarray:
    """Inverse of :func:`patchify`: [N, Q, C] -> [T, H, W, C]."""
    gt, gh, gw = grid
    c = patches.shape[-1]
    x = patches.reshape(gt, gh, gw, tubelet, patch, patch, c).transpose(0, 3, 1, 4, 2, 5, 6)
    return x.reshape(gt * tubelet, gh * patch, gw * patch, c)


def _check_inputs(video: np.ndarray, mask: np.ndarray, pred: np.ndarray | None, cfg: ModelConfig) -> None:
    expected = (cfg.num_frames, cfg.img_size, cfg.img_size, 3)
    if not isinstance(video, np.ndarray) or video.dtype != np.uint8 or video.shape != expected:
        desc = f"{video.dtype} {video.shape}" if isinstance(video, np.ndarray) else type(video).__name__
        raise ValueError(f"reconstruction: video must be uint8 {expected}, got {desc}")
    if mask.dtype != bool or mask.shape != (cfg.num_tokens,):
        raise ValueError(f"reconstruction: mask must be bool [{cfg.num_tokens}] (True = hidden), got "
                         f"{mask.dtype} {mask.shape}")
    if pred is not None:
        want = (int(mask.sum()), cfg.patch_dim)
        if pred.shape != want:
            raise ValueError(f"reconstruction: pred must be [{want[0]} masked tokens, {want[1]}] for this mask, got "
                             f"{pred.shape}")


def masked_input(video_uint8: np.ndarray, mask: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """The encoder's view: float32 [T, H, W, 3] in [0, 1] with hidden patches grey."""
    mask = np.asarray(mask, bool)
    _check_inputs(video_uint8, mask, None, cfg)
    patches = patchify(video_uint8.astype(np.float32) / 255.0, cfg.patch_size, cfg.tubelet_size)
    patches[mask] = GREY
    return unpatchify(patches, cfg.grid, cfg.patch_size, cfg.tubelet_size)


def reconstruct_video(video_uint8: np.ndarray, mask: np.ndarray, pred: np.ndarray, cfg: ModelConfig,
                      frame_diff: bool) -> np.ndarray:
    """Visible patches from the input, hidden ones from the prediction -> float32 [T, H, W, 3] in [0, 1].

    video_uint8: [T, H, W, 3]. mask: bool [N], True = hidden. pred: [Nm, patch_dim], hidden tokens in ascending
    order, features ``(p0, p1, p2, c)`` with the channel fastest. frame_diff: the prediction's later tubelet frames
    are differences to the first (MAE-DFER's target).
    """
    mask = np.asarray(mask, bool)
    pred = np.asarray(pred, np.float32)
    _check_inputs(video_uint8, mask, pred, cfg)
    tb = cfg.tubelet_size
    patches = patchify(video_uint8.astype(np.float32) / 255.0, cfg.patch_size, tb)  # [N, Q, C]
    hidden = patches[mask]
    mean = hidden.mean(axis=1, keepdims=True)
    std = hidden.std(axis=1, ddof=1, keepdims=True)
    normalised = pred.reshape(hidden.shape)
    if frame_diff:
        per_frame = normalised.reshape(len(hidden), tb, -1, 3)
        per_frame = np.concatenate([per_frame[:, :1], per_frame[:, :1] + per_frame[:, 1:]], axis=1)
        normalised = per_frame.reshape(hidden.shape)
    patches[mask] = normalised * (std + EPS) + mean
    return np.clip(unpatchify(patches, cfg.grid, cfg.patch_size, tb), 0.0, 1.0)


def frame_differences(video01: np.ndarray) -> np.ndarray:
    """Consecutive differences, channel mean: [T, H, W, 3] -> float32 [T, H, W]; frame 0 has none (zeros)."""
    grey = np.asarray(video01, np.float32).mean(axis=-1)
    return np.concatenate([np.zeros_like(grey[:1]), grey[1:] - grey[:-1]])


# ---------------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------------


def _mosaic(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Rows of [T, H, W, 3] float images in [0, 1] -> one [R*(H+g)-g, T*(W+g)-g, 3] image, white gutters."""
    t, h, w, _ = rows[0].shape
    out = np.ones((len(rows) * (h + GUTTER) - GUTTER, t * (w + GUTTER) - GUTTER, 3), np.float32)
    for r, row in enumerate(rows):
        for f in range(t):
            y, x = r * (h + GUTTER), f * (w + GUTTER)
            out[y : y + h, x : x + w] = row[f]
    return out


def _diverging(values: np.ndarray, limit: float) -> np.ndarray:
    """Signed values -> RGB [..., 3] in [0, 1]: blue negative, white zero, red positive, saturating at +-limit."""
    from matplotlib import colormaps

    return colormaps["RdBu_r"](np.clip(values / (2 * limit) + 0.5, 0.0, 1.0))[..., :3].astype(np.float32)


def _save(fig, path: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, pil_kwargs={"compress_level": 1})
    return path


def reconstruction_figure(video_uint8: np.ndarray, mask: np.ndarray, pred: np.ndarray, cfg: ModelConfig,
                          frame_diff: bool, path: str, *, title: str | None = None) -> str:
    """Write a PNG with one column per frame and rows: original / masked input / reconstruction / true frame
    difference / reconstructed frame difference. Returns ``path``.

    video_uint8: uint8 [T, H, W, 3] (T = cfg.num_frames, H = W = cfg.img_size). mask: bool [N], True = hidden.
    pred: [Nm, patch_dim] the decoder output for this clip. frame_diff: True for MAE-DFER's appearance + motion
    target (family 'lgi'). Differences are consecutive (frame f minus f-1, channel mean), drawn blue-white-red on
    one scale set by the true video's 99th percentile; frame 0 has no predecessor and stays white.
    """
    from matplotlib.figure import Figure

    mask = np.asarray(mask, bool)
    original = video_uint8.astype(np.float32) / 255.0
    recon = reconstruct_video(video_uint8, mask, pred, cfg, frame_diff)
    true_diff, recon_diff = frame_differences(original), frame_differences(recon)
    limit = max(float(np.percentile(np.abs(true_diff[1:]), 99)) if len(true_diff) > 1 else 0.0, 4 / 255)
    rows = [original, masked_input(video_uint8, mask, cfg), recon, _diverging(true_diff, limit),
            _diverging(recon_diff, limit)]
    labels = ["original", "masked input", "reconstruction", "true diff", "recon diff"]
    image = (_mosaic(rows) * 255.0).round().astype(np.uint8)  # uint8: cheaper for matplotlib to resample
    dpi = 100
    height, width = image.shape[:2]
    margin_left = 1.1
    fig_width = width / dpi + margin_left + 0.1
    # at font size 9 a character is at most ~7.5 px wide
    title_lines = textwrap.wrap(title, max(20, int(fig_width * dpi / 7.5))) if title else []
    margin_top = 0.3 + 0.16 * len(title_lines)  # frame numbers, then the title
    fig = Figure(figsize=(fig_width, height / dpi + margin_top + 0.1), dpi=dpi)
    fig_w, fig_h = fig.get_size_inches()
    ax = fig.add_axes((margin_left / fig_w, 0.1 / fig_h, (width / dpi) / fig_w, (height / dpi) / fig_h))
    ax.imshow(image, interpolation="nearest")
    tile = cfg.img_size + GUTTER
    ax.set_yticks([r * tile + cfg.img_size / 2 for r in range(len(rows))], labels)
    ax.set_xticks([f * tile + cfg.img_size / 2 for f in range(cfg.num_frames)], [str(f) for f in
                                                                                   range(cfg.num_frames)])
    ax.tick_params(length=0, labelsize=8, labeltop=True, labelbottom=False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title_lines:
        fig.suptitle("\n".join(title_lines), fontsize=9, y=1 - 0.03 / fig_h, va="top")
    return _save(fig, path)


def class_colors(num_classes: int) -> np.ndarray:
    """Distinct colours per class, uint8 [K, 3] RGB (tab10, then tab20 beyond ten classes)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if num_classes <= 10 else "tab20"]
    return (np.asarray([cmap(i % cmap.N)[:3] for i in range(num_classes)]) * 255).round().astype(np.uint8)


def probability_timeline(times: np.ndarray, probs: np.ndarray, class_names: Sequence[str], path: str, *,
                         spans: np.ndarray | None = None, title: str | None = None,
                         xlabel: str = "time (s)") -> str:
    """Class probabilities over a video: one line per class at each window's centre. Returns ``path``.

    times: [W] window centres. probs: [W, K]. spans: optional [W, 2] (start, end) of each window, drawn as a bar
    of the top class's colour under the plot so the windows' extent is visible.
    """
    from matplotlib.figure import Figure

    times = np.asarray(times, np.float64)
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape != (len(times), len(class_names)):
        raise ValueError(f"timeline: probs must be [{len(times)} windows, {len(class_names)} classes], got "
                         f"{probs.shape}")
    colors = class_colors(len(class_names)) / 255.0
    fig = Figure(figsize=(9, 3.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for k, name in enumerate(class_names):
        ax.plot(times, probs[:, k], marker="o", markersize=3, linewidth=1.5, color=colors[k], label=name)
    if spans is not None:
        for (start, end), top in zip(np.asarray(spans, np.float64), probs.argmax(axis=1)):
            ax.plot([start, end], [-0.04, -0.04], color=colors[top], linewidth=4, solid_capstyle="butt", alpha=0.7)
    ax.set_ylim(-0.08, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("probability")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
