"""Identities of the synthetic faces: everything that stays fixed for one person, and the seed streams that keep
the people of different splits apart.

Why a module of its own: identity is the main nuisance an expression classifier must ignore. Val/test people are
never seen in pretrain/train because every split draws its people from its own ``numpy.random.SeedSequence``
stream (``SPLIT_CODE``), and clip streams never share an entropy tuple with identity streams.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Seed-stream tags. Clip streams and identity streams never share an entropy tuple, and each split / identity
# pool has its own code, so val/test people cannot coincide with train/pretrain people.
CLIP_STREAM, IDENTITY_STREAM = 0, 1
SPLIT_CODE = {"pretrain": 11, "train": 12, "val": 13, "test": 14, "adhoc": 15}

# ---------------------------------------------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------------------------------------------

_IRIS_COLOURS = np.array(
    [(70, 45, 30), (45, 30, 22), (95, 65, 35), (80, 110, 150), (70, 120, 170), (85, 120, 80), (110, 95, 55),
     (110, 120, 125)], np.float32)
_HAIR_COLOURS = np.array(
    [(28, 24, 22), (55, 38, 28), (95, 65, 42), (130, 62, 35), (190, 150, 95), (215, 185, 130), (150, 148, 145),
     (205, 200, 192)], np.float32)
_SKIN_LIGHT = np.array((238, 206, 182), np.float32)
_SKIN_DARK = np.array((88, 58, 42), np.float32)
_HAIR_STYLES = ("short", "long", "buzz", "curly", "fringe", "bald")


@dataclasses.dataclass(frozen=True)
class FaceIdentity:
    """Everything that stays fixed for one person. Lengths in face units (1 = half face width)."""

    name: str
    aspect: float  # face half-height / half-width
    jaw_taper: float  # how much narrower the lower face is
    skin: tuple[float, float, float]
    eye_y: float
    eye_sep: float  # eye centre distance from the midline
    eye_w: float  # eye half-width
    eye_open: float  # upper lid height / eye half-width
    eye_lower: float  # lower lid depth / eye half-width
    eye_tilt: float  # outer corner raise
    iris_ratio: float
    iris: tuple[float, float, float]
    brow_gap: float
    brow_thick: float
    brow_arch: float
    brow_colour: tuple[float, float, float]
    nose_y: float
    nose_w: float
    mouth_y: float
    mouth_w: float  # half-width
    lip_upper: float
    lip_lower: float
    lip_colour: tuple[float, float, float]
    hair_style: str
    hair_colour: tuple[float, float, float]
    hairline_y: float
    hair_volume: float
    hair_side: float  # how far down (face units / aspect) the hair reaches at the sides
    glasses: bool
    glasses_colour: tuple[float, float, float]
    blush: float


def sample_identity(rng: np.random.Generator, name: str = "adhoc") -> FaceIdentity:
    """Draw one person. ``name`` is the identity id stored with every clip of that person."""
    u = rng.uniform
    tone = u(0, 1) ** 1.3
    skin = (1 - tone) * _SKIN_LIGHT + tone * _SKIN_DARK + rng.normal(0, 5, 3) + np.array((4, 0, -4)) * u(-1, 1)
    skin = np.sort(skin)[::-1]  # skin is always R >= G >= B; jitter must not turn it green or blue
    hair = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] * u(0.85, 1.15)
    brow = np.minimum(hair * u(0.55, 0.8), skin * 0.5)
    eye_y = u(-0.24, -0.12)
    brow_gap = u(0.25, 0.32)
    brow_arch = u(0.02, 0.07)
    style = _HAIR_STYLES[rng.choice(len(_HAIR_STYLES), p=[0.27, 0.25, 0.1, 0.13, 0.17, 0.08])]
    # the hairline must leave room for raised brows and forehead wrinkles
    hairline = min(u(-1.0, -0.78), eye_y - brow_gap - brow_arch - 0.5)
    lip_mix = u(0.3, 0.6)
    lip = (1 - lip_mix) * skin + lip_mix * np.array((175, 75, 80)) * (0.6 + 0.4 * (1 - tone))
    return FaceIdentity(
        name=name,
        aspect=u(1.2, 1.42),
        jaw_taper=u(0.06, 0.3),
        skin=tuple(np.clip(skin, 30, 250).tolist()),
        eye_y=eye_y,
        eye_sep=u(0.37, 0.44),
        eye_w=u(0.17, 0.21),
        eye_open=u(0.45, 0.62),
        eye_lower=u(0.28, 0.4),
        eye_tilt=u(-0.02, 0.05),
        iris_ratio=u(0.42, 0.5),
        iris=tuple((_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))] * u(0.85, 1.1)).tolist()),
        brow_gap=brow_gap,
        brow_thick=u(0.06, 0.1),
        brow_arch=brow_arch,
        brow_colour=tuple(brow.tolist()),
        nose_y=u(0.22, 0.32),
        nose_w=u(0.13, 0.18),
        mouth_y=u(0.58, 0.66),
        mouth_w=u(0.31, 0.39),
        lip_upper=u(0.05, 0.08),
        lip_lower=u(0.07, 0.11),
        lip_colour=tuple(np.clip(lip, 20, 240).tolist()),
        hair_style=style,
        hair_colour=tuple(np.clip(hair, 10, 240).tolist()),
        hairline_y=hairline,
        hair_volume=u(0.04, 0.2),
        hair_side=u(-0.45, 0.15),
        glasses=bool(u(0, 1) < 0.15),
        glasses_colour=tuple((rng.uniform(10, 120) * np.ones(3) + rng.normal(0, 15, 3)).clip(0, 255).tolist()),
        blush=u(0.0, 0.25),
    )


def split_identity(seed: int, split: str, identity_index: int) -> FaceIdentity:
    """Person ``identity_index`` of the pool of ``split``. Pools are disjoint by construction (own seed stream)."""
    rng = np.random.default_rng(
        np.random.SeedSequence([int(seed), IDENTITY_STREAM, SPLIT_CODE[split], int(identity_index)]))
    return sample_identity(rng, name=f"{split}-{identity_index:05d}")
