"""Token masks for masked video autoencoding, and the mask contract the LGI-Former encoder relies on.

Conventions (PRETRAINING §2): a mask is a flat boolean vector over the token grid ``(T', H', W')`` in raster
order, token ``n = t*H'*W' + h*W' + w``, and **True = masked** (hidden from the encoder). The published grid is
``(8, 10, 10)`` = 800 tokens (16 frames / tubelet 2, 160 px / patch 16).

Generators (all take an explicit ``np.random.Generator`` so the data pipeline's per-element RNG makes them
reproducible and independent of the worker count):

* :func:`tube_mask` (SVFAP ``--mask_type tube``): one spatial mask shared by all time steps.
* :func:`tube_window_mask` (MAE-DFER ``part_window``): the spatial grid is cut into full-width bands; every band
  gets exactly the same number of visible tokens; tiled over time. This is what makes LGI pre-training valid.
* :func:`random_mask`: unstructured masking over all tokens (the reference defines it but wires it to nothing).

Counts are computed with exact integer arithmetic (:func:`num_masked`, QUIRKS Q22): the reference's
``int(0.9 * 100)`` happens to be right, but ``int(0.29 * 100) == 28``.

:func:`check_lgi_mask` turns the silent assumption of the LGI pre-train encoder (QUIRKS Q1) into a hard error.

This module imports numpy only (no JAX): the data-loader worker processes import it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

Grid = tuple[int, int, int]

MASK_KINDS = ("tube", "tube_window", "random")
SYMMETRY_MODES = (None, "global", "local")


class MaskContractError(ValueError):
    """A mask breaks the structure an encoder needs (e.g. unequal visible counts per LGI region)."""


def _check_grid(grid: Sequence[int]) -> Grid:
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3 or min(grid) <= 0:
        raise ValueError(f"token grid must be three positive ints (T', H', W'), got {grid}")
    return grid  # type: ignore[return-value]


def num_masked(total: int, ratio: float) -> int:
    """Number of masked tokens among ``total`` at ``ratio``, exactly (QUIRKS Q22).

    ``total * ratio`` must be an integer up to floating-point noise (1e-9); truncating it, as the reference does,
    silently loses a token when the product lands just below an integer. A ratio that does not give a whole number
    is a configuration error, not something to round away.
    """
    if total < 0:
        raise ValueError(f"num_masked: total must be >= 0, got {total}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"num_masked: mask ratio must lie in [0, 1], got {ratio}")
    product = total * ratio
    count = round(product)
    if abs(product - count) > 1e-9:
        raise ValueError(
            f"mask ratio {ratio} of {total} tokens is {product!r}, not a whole number of tokens; "
            f"choose a ratio that is a multiple of 1/{total}"
        )
    return int(count)


def _mask_with_visible(rng: np.random.Generator, size: int, num_visible: int) -> np.ndarray:
    """bool [size]: exactly ``num_visible`` False entries at uniformly random positions, True elsewhere."""
    mask = np.ones(size, dtype=bool)
    mask[rng.permutation(size)[:num_visible]] = False
    return mask


def tube_mask(rng: np.random.Generator, grid: Sequence[int] = (8, 10, 10), mask_ratio: float = 0.9) -> np.ndarray:
    """Tube mask (SVFAP): the same random spatial mask at every time step. -> bool [T'*H'*W'].

    Per clip ``num_masked(H'*W', ratio)`` spatial positions are masked (90 of 100 published), tiled over the
    ``T'`` temporal positions (720 masked, 80 visible).
    """
    t, h, w = _check_grid(grid)
    spatial = h * w
    spatial_mask = _mask_with_visible(rng, spatial, spatial - num_masked(spatial, mask_ratio))
    return np.tile(spatial_mask, t)


def _check_window(grid: Grid, window: Sequence[int]) -> tuple[int, int]:
    if len(window) != 2:
        raise ValueError(
            f"window must be the spatial (height, width) of a mask window, got {tuple(window)}; "
            "pass part_win_size[1:] of the reference's (2, 5, 10)"
        )
    wh, ww = int(window[0]), int(window[1])
    _, gh, gw = grid
    if ww != gw:
        raise ValueError(f"tube-window mask: window width {ww} must equal the grid width {gw} (full-width bands)")
    if ww % 2:
        raise ValueError(f"tube-window mask: window width {ww} must be even (the symmetric variants split it in half)")
    if wh <= 0 or gh % wh:
        raise ValueError(f"tube-window mask: grid height {gh} is not divisible by window height {wh}")
    return wh, ww


def tube_window_mask(
    rng: np.random.Generator,
    grid: Sequence[int] = (8, 10, 10),
    window: Sequence[int] = (5, 10),
    mask_ratio: float = 0.9,
    symmetry: str | None = None,
) -> np.ndarray:
    """MAE-DFER "part_window" tube mask -> bool [T'*H'*W'] (PRETRAINING §2.2).

    The H' x W' grid is split into ``H'/window_h`` full-width bands; in every band exactly
    ``window_h*W' - num_masked(window_h*W', ratio)`` tokens are visible (5 of 50 published), shuffled independently
    per band; the spatial mask is tiled over time. Because bands span the full width, concatenating the windows
    equals raster order.

    ``symmetry`` (the reference's unused ``--part_apply_symmetry``): the visible tokens of a band are confined to
    its left or right half (``window_h x W'/2`` cells), the other half fully masked; the side is drawn once per
    clip (``'global'``) or once per band (``'local'``).
    """
    t, gh, gw = _check_grid(grid)
    if symmetry not in SYMMETRY_MODES:
        raise ValueError(f"tube-window mask: symmetry must be one of {SYMMETRY_MODES}, got {symmetry!r}")
    wh, ww = _check_window((t, gh, gw), window)
    window_size = wh * ww
    visible = window_size - num_masked(window_size, mask_ratio)
    half_width = ww // 2
    if symmetry is not None and visible > wh * half_width:
        raise ValueError(
            f"tube-window mask: {visible} visible tokens per window do not fit in a half window of "
            f"{wh * half_width} cells (symmetry={symmetry!r})"
        )
    num_bands = gh // wh
    global_side = int(rng.integers(2)) if symmetry == "global" else None
    bands = []
    for _ in range(num_bands):
        if symmetry is None:
            bands.append(_mask_with_visible(rng, window_size, visible).reshape(wh, ww))
            continue
        side = global_side if symmetry == "global" else int(rng.integers(2))
        band = np.ones((wh, ww), dtype=bool)
        half = _mask_with_visible(rng, wh * half_width, visible).reshape(wh, half_width)
        band[:, side * half_width : (side + 1) * half_width] = half
        bands.append(band)
    spatial_mask = np.concatenate(bands, axis=0).reshape(-1)
    return np.tile(spatial_mask, t)


def random_mask(rng: np.random.Generator, grid: Sequence[int] = (8, 10, 10), mask_ratio: float = 0.9) -> np.ndarray:
    """Unstructured mask: ``num_masked(N, ratio)`` tokens chosen uniformly among all N. -> bool [N]."""
    t, h, w = _check_grid(grid)
    total = t * h * w
    return _mask_with_visible(rng, total, total - num_masked(total, mask_ratio))


def num_visible(
    kind: str, grid: Sequence[int] = (8, 10, 10), mask_ratio: float = 0.9, window: Sequence[int] | None = None
) -> int:
    """Number of visible tokens per sample a generator of ``kind`` produces (the encoder's sequence length)."""
    t, h, w = _check_grid(grid)
    if kind == "tube":
        return t * (h * w - num_masked(h * w, mask_ratio))
    if kind == "tube_window":
        if window is None:
            raise ValueError("num_visible('tube_window', ...) needs the window (height, width)")
        wh, ww = _check_window((t, h, w), window)
        return t * (h // wh) * (wh * ww - num_masked(wh * ww, mask_ratio))
    if kind == "random":
        return t * h * w - num_masked(t * h * w, mask_ratio)
    raise ValueError(f"unknown mask kind {kind!r}; expected one of {MASK_KINDS}")


def check_lgi_mask(mask: np.ndarray, grid: Sequence[int] = (8, 10, 10), region_size: Sequence[int] = (2, 5, 10)) -> int:
    """Enforce the LGI-Former pre-training contract (QUIRKS Q1); returns k = visible tokens per (frame, band).

    mask: bool [B, N] or [N], True = masked. The LGI pre-train encoder regroups the visible tokens into regions by a
    plain reshape, which is only right when (a) regions are full-width bands (region width == grid width), and
    (b) every (frame, band) cell holds the same number k of visible tokens in every sample. A plain tube or random
    mask passes the reshape but mixes tokens of different regions silently; this check raises instead.
    """
    t, gh, gw = _check_grid(grid)
    if len(region_size) != 3:
        raise MaskContractError(f"LGI region size must be (rt, rh, rw), got {tuple(region_size)}")
    rt, rh, rw = (int(r) for r in region_size)
    if rw != gw:
        raise MaskContractError(f"LGI pre-training needs full-width regions: region width {rw} != grid width {gw}")
    if rt <= 0 or t % rt or rh <= 0 or gh % rh:
        raise MaskContractError(f"LGI region size {(rt, rh, rw)} does not tile the token grid {(t, gh, gw)}")
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise MaskContractError(f"mask must be boolean (True = masked), got dtype {mask.dtype}")
    if mask.ndim == 1:
        mask = mask[None]
    total = t * gh * gw
    if mask.ndim != 2 or mask.shape[1] != total:
        raise MaskContractError(f"mask must be [B, {total}] or [{total}] for grid {(t, gh, gw)}, got {mask.shape}")
    visible_per_sample = (~mask).sum(axis=1)
    if np.any(visible_per_sample != visible_per_sample[0]):
        bad = int(np.flatnonzero(visible_per_sample != visible_per_sample[0])[0])
        raise MaskContractError(
            f"samples hold different numbers of visible tokens: sample 0 has {int(visible_per_sample[0])}, "
            f"sample {bad} has {int(visible_per_sample[bad])}"
        )
    num_bands = gh // rh
    cells = num_bands * t
    visible = int(visible_per_sample[0])
    if visible % cells:
        raise MaskContractError(
            f"{visible} visible tokens per sample cannot be split equally over {t} frames x {num_bands} bands"
        )
    k = visible // cells
    counts = (~mask).reshape(mask.shape[0], t, num_bands, rh * gw).sum(axis=-1)  # [B, T', bands]
    wrong = np.argwhere(counts != k)
    if len(wrong):
        b, f, band = (int(i) for i in wrong[0])
        raise MaskContractError(
            f"LGI mask contract broken: sample {b}, frame {f}, band {band} (rows {band * rh}-{band * rh + rh - 1}) "
            f"holds {int(counts[b, f, band])} visible tokens, expected {k} in every (frame, band) cell "
            f"({len(wrong)} of {counts.size} cells differ; counts of that sample: {counts[b].tolist()}). "
            "Use the tube-window mask with the region's band height for LGI pre-training."
        )
    return k


@dataclasses.dataclass(frozen=True)
class MaskGenerator:
    """A configured mask generator: ``generator(rng) -> bool [N]``. Picklable (grain workers call it)."""

    kind: str
    grid: Grid = (8, 10, 10)
    mask_ratio: float = 0.9
    window: tuple[int, int] | None = None
    symmetry: str | None = None

    def __post_init__(self):
        if self.kind not in MASK_KINDS:
            raise ValueError(f"unknown mask kind {self.kind!r}; expected one of {MASK_KINDS}")
        if self.kind == "tube_window" and self.window is None:
            raise ValueError("mask kind 'tube_window' needs window=(height, width), e.g. (5, 10)")
        if self.kind != "tube_window" and (self.window is not None or self.symmetry is not None):
            raise ValueError(f"window/symmetry only apply to the 'tube_window' mask, not {self.kind!r}")
        num_visible(self.kind, self.grid, self.mask_ratio, self.window)  # validates the arithmetic once, here

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def num_visible(self) -> int:
        return num_visible(self.kind, self.grid, self.mask_ratio, self.window)

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "tube":
            return tube_mask(rng, self.grid, self.mask_ratio)
        if self.kind == "tube_window":
            return tube_window_mask(rng, self.grid, self.window, self.mask_ratio, self.symmetry)
        return random_mask(rng, self.grid, self.mask_ratio)

    @classmethod
    def for_model(cls, cfg) -> "MaskGenerator":
        """The mask a model config asks for: grid (T/tubelet, S/patch, S/patch), ``cfg.mask_kind``,
        ``cfg.mask_ratio``, and for 'tube_window' the LGI band window ``cfg.region_size[1:]``."""
        grid = (cfg.num_frames // cfg.tubelet_size, cfg.img_size // cfg.patch_size, cfg.img_size // cfg.patch_size)
        window = tuple(cfg.region_size[1:]) if cfg.mask_kind == "tube_window" else None
        return cls(kind=cfg.mask_kind, grid=grid, mask_ratio=cfg.mask_ratio, window=window)


def make_mask_generator(kind: str, **kwargs) -> Callable[[np.random.Generator], np.ndarray]:
    """``make_mask_generator('tube_window', grid=(8,10,10), window=(5,10), mask_ratio=0.9)`` -> rng -> bool [N].

    Accepted keywords: grid, mask_ratio, and for 'tube_window' also window and symmetry.
    """
    allowed = {"grid", "mask_ratio", "window", "symmetry"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise TypeError(
            f"make_mask_generator({kind!r}): unknown arguments {sorted(unknown)}; allowed {sorted(allowed)}"
        )
    if "grid" in kwargs:
        kwargs["grid"] = _check_grid(kwargs["grid"])
    if kwargs.get("window") is not None:
        kwargs["window"] = tuple(int(v) for v in kwargs["window"])
    return MaskGenerator(kind=kind, **kwargs)
