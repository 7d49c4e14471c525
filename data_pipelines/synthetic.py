"""Procedurally drawn talking faces with seven *dynamic* facial expressions: the embedded default dataset.

Real affect datasets (VoxCeleb2, DFEW, FERV39k, MAFW) cannot be downloaded here, yet the library must show, end to
end, that masked-video pretraining helps dynamic facial expression recognition. This module draws a stand-in that
keeps the properties that make the real task a *video* task:

* identity nuisance: face shape, skin tone, eyes, brows, nose, lips, hair, glasses differ per person; val/test
  people are never seen in pretrain/train (identity parameters come from their own seed streams);
* scene nuisance: backgrounds (gradients, blurred noise, clutter), directional lighting and tint, smooth head motion
  (translation, roll, scale, a little yaw), blur, sensor noise, JPEG;
* expressions built from facial action units (FACS AUs: brow raise/lower, lid raise/tighten, cheek raise, nose
  wrinkle, upper-lip raise, lip-corner pull/depress, chin raise, lip stretch/press, lips part, jaw drop) whose
  class prototypes follow the classic EMFACS combinations, e.g. happy = AU6+12, surprise = AU1+2+5+26,
  fear = AU1+2+4+5+20+25 — so fear/surprise and angry/disgust differ in details;
* dynamics: each expression has an onset -> apex -> offset time course at a random time, speed and intensity
  (surprise is fast and brief, sadness slow), per-AU latencies, and every clip — "neutral" included — has
  talking-like mouth motion, blinks, gaze shifts and small idiosyncratic AU fluctuations. A single frame is
  therefore ambiguous: it may lie before onset or after offset, the expression may be subtle, and an open mouth may
  be speech rather than surprise.

Everything is numpy + OpenCV drawing (anti-aliased polygons at 1/16-pixel precision). Per clip, the static part of
the head (skin with soft shading, ears, neck, hair) is rendered once and warped per frame with the head pose; the
moving parts (eyes, brows, mouth, nose, wrinkles) are computed for all frames at once as polygon arrays
``[T, P, 2]`` and only the drawing calls loop over frames.

Geometry lives in *face units*: origin at the face centre, x to the right, y down, 1 unit = half the face width.
Expression timings are fractions of the clip length (whatever ``frames`` is, a clip holds about one event; at the
default 32 frames / 25 fps that is 1.28 s, so surprise rises in 1-4 frames and sadness in 8-14); speech, blinks
and head motion run in seconds.

Each record's ``extra`` holds the ground truth behind the pixels (expression, identity, intensity, blend, timing,
per-frame envelope and action-unit tracks, mouth/brow positions): for analysis and probing, never as model input.

Determinism: every clip is a pure function of ``(seed, split, index)`` (and its identity of
``(seed, identity pool, identity index)``) through ``numpy.random.SeedSequence``, so any number of worker
processes produce byte-identical shards.

CLI::

    python -m data_pipelines.synthetic --out data/synthetic --seed 0 --workers 2
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shlex
import sys
import time
from typing import Any, Sequence

import cv2
import numpy as np

from data_pipelines import records

CLASS_NAMES = ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")  # DFEW order; index = label
FPS = 25.0
SPLITS = ("pretrain", "train", "val", "test")
SHARD_PREFIX = "synthetic"
DATASET_NAME = "synthetic_faces"
# Every identity appears in this many consecutive clips of a split; in labelled splits those clips are exactly
# one of each class (like acted datasets), so a classifier cannot shortcut through "who is it".
CLIPS_PER_IDENTITY = len(CLASS_NAMES)
# Seed-stream tags. Clip streams and identity streams never share an entropy tuple, and each split / identity
# pool has its own code, so val/test people cannot coincide with train/pretrain people.
_CLIP_STREAM, _IDENTITY_STREAM = 0, 1
_SPLIT_CODE = {"pretrain": 11, "train": 12, "val": 13, "test": 14, "adhoc": 15}

_FIXED = 16  # cv2 drawing with shift=4: coordinates in 1/16 pixel
_SHIFT = 4

# ---------------------------------------------------------------------------------------------------------------
# Action units and class prototypes
# ---------------------------------------------------------------------------------------------------------------

ACTION_UNITS = (
    "inner_brow_raise",  # AU1
    "outer_brow_raise",  # AU2
    "brow_lower",  # AU4
    "upper_lid_raise",  # AU5
    "cheek_raise",  # AU6
    "lid_tighten",  # AU7
    "nose_wrinkle",  # AU9
    "upper_lip_raise",  # AU10
    "lip_corner_pull",  # AU12
    "lip_corner_depress",  # AU15
    "chin_raise",  # AU17
    "lip_pucker",  # AU18 (speech rounding)
    "lip_stretch",  # AU20
    "lip_press",  # AU24
    "lips_part",  # AU25
    "jaw_drop",  # AU26
    "lid_droop",  # AU43-like lowered upper lid (sadness)
    "blink",  # AU45
)
AU = {name: i for i, name in enumerate(ACTION_UNITS)}

# class -> (always-present AUs {name: weight}, optional AUs {name: (probability, weight)}).
PROTOTYPES: dict[str, tuple[dict[str, float], dict[str, tuple[float, float]]]] = {
    "happy": ({"cheek_raise": 0.8, "lip_corner_pull": 1.0}, {"lips_part": (0.7, 0.7), "jaw_drop": (0.25, 0.35)}),
    "sad": (
        {"inner_brow_raise": 0.9, "brow_lower": 0.55, "lip_corner_depress": 0.95, "lid_droop": 0.7},
        {"chin_raise": (0.6, 0.7)},
    ),
    "neutral": ({}, {}),
    "angry": (
        {"brow_lower": 1.0, "lid_tighten": 0.7, "lip_press": 0.9},
        {"upper_lid_raise": (0.5, 0.6), "upper_lip_raise": (0.25, 0.5), "lips_part": (0.25, 0.5),
         "chin_raise": (0.3, 0.5)},
    ),
    "surprise": (
        {"inner_brow_raise": 1.0, "outer_brow_raise": 1.0, "upper_lid_raise": 0.9, "jaw_drop": 0.9,
         "lips_part": 0.6},
        {},
    ),
    "disgust": (
        {"nose_wrinkle": 1.0, "upper_lip_raise": 0.9, "brow_lower": 0.5, "lid_tighten": 0.5, "cheek_raise": 0.3},
        {"lip_corner_depress": (0.4, 0.5), "chin_raise": (0.5, 0.6), "lips_part": (0.4, 0.4)},
    ),
    "fear": (
        {"inner_brow_raise": 1.0, "outer_brow_raise": 0.6, "brow_lower": 0.7, "upper_lid_raise": 1.0,
         "lip_stretch": 1.0, "lips_part": 0.7},
        {"jaw_drop": (0.4, 0.4)},
    ),
}

# class -> ranges (fractions of the clip length) of the rise, apex hold and decay durations.
TIMING: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "happy": ((0.12, 0.28), (0.20, 0.50), (0.20, 0.40)),
    "sad": ((0.25, 0.45), (0.30, 0.60), (0.30, 0.50)),
    "neutral": ((0.15, 0.30), (0.20, 0.40), (0.20, 0.40)),  # unused: neutral has no expression event
    "angry": ((0.10, 0.25), (0.25, 0.50), (0.20, 0.40)),
    "surprise": ((0.04, 0.12), (0.10, 0.25), (0.15, 0.35)),
    "disgust": ((0.12, 0.30), (0.15, 0.40), (0.20, 0.40)),
    "fear": ((0.06, 0.15), (0.25, 0.50), (0.20, 0.40)),
}
ONSET_RANGE = (-0.10, 0.45)  # expression onset, as a fraction of the clip (negative: clip starts mid-onset)
INTENSITY_RANGE = (0.35, 1.0)  # some clips are subtle
BLEND_PROBABILITY = 0.25  # share of non-neutral clips that mix in a second, weaker expression
BLEND_WEIGHT = (0.15, 0.45)  # that expression's weight relative to the labelled one


@dataclasses.dataclass(frozen=True)
class Scenario:
    """How much nuisance surrounds the expression: the recording conditions of a dataset.

    ``wild`` (the default) is the DFEW / FERV39k-like setting described in the module docstring. ``posed`` is a
    lab recording like CK+ / MMI / Oulu-CASIA: every clip runs from (near) neutral to a full-intensity apex of one
    prototype, the subject does not talk, holds the head still, sits in front of a plain backdrop under a steady
    camera. Identities, action units, expression prototypes and timing are the same in both, so the scenarios
    differ only in nuisance. The random draws are the same too (factors scale what was drawn), except that a plain
    backdrop skips the clutter draws, so ``wild`` clips are byte-identical to those of earlier versions.
    """

    name: str
    onset_range: tuple[float, float] = ONSET_RANGE
    intensity_range: tuple[float, float] = INTENSITY_RANGE
    blend_probability: float = BLEND_PROBABILITY
    talk: float = 1.0  # factor on the talking amplitude
    fluctuation: float = 1.0  # factor on the idiosyncratic AU drift
    head_motion: float = 1.0  # factor on the head pose jitter (offset, wobble, drift, roll, yaw)
    cluttered_background: bool = True  # blurred colour noise and clutter shapes behind the head
    camera: float = 1.0  # factor on lighting gradient, gain spread, flicker, defocus and sensor noise


SCENARIOS = {
    "wild": Scenario("wild"),
    "posed": Scenario("posed", onset_range=(0.0, 0.3), intensity_range=(0.8, 1.0), blend_probability=0.0, talk=0.0,
                      fluctuation=0.3, head_motion=0.25, cluttered_background=False, camera=0.5),
    "posed_moving": Scenario("posed_moving", onset_range=(0.0, 0.3), intensity_range=(0.8, 1.0),  # posed faces,
                             blend_probability=0.0, talk=0.0, fluctuation=0.3),  # wild head motion/backdrop/camera
}


def get_scenario(name: str) -> Scenario:
    """The scenario called ``name``; an unknown name is a ValueError that lists the known ones."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown synthetic scenario {name!r}; choose one of {sorted(SCENARIOS)}")
    return SCENARIOS[name]


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


# ---------------------------------------------------------------------------------------------------------------
# Time courses: action units, talking, blinks, gaze, head pose
# ---------------------------------------------------------------------------------------------------------------


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


@dataclasses.dataclass
class Dynamics:
    """Per-frame signals of one clip. ``aus`` [T, len(ACTION_UNITS)] in [0, ~1.2]; ``gaze`` [T, 2] in [-1, 1]."""

    aus: np.ndarray
    gaze: np.ndarray
    envelope: np.ndarray  # [T] expression time course in [0, 1] (zeros for neutral)
    timing: dict[str, float]  # onset / apex_start / apex_end / offset_end in frames (may lie outside the clip)
    intensity: float
    talk_amplitude: float
    blink_frames: list[int]
    blend: tuple[str, float] | None  # (second expression, relative weight) mixed into the labelled one


def sample_dynamics(rng: np.random.Generator, expression: str, frames: int,
                    scenario: Scenario = SCENARIOS["wild"]) -> Dynamics:
    """Action-unit tracks for one clip: expression event + speech + blinks + idiosyncratic drift."""
    T = frames
    t = np.arange(T, dtype=np.float64)
    seconds = t / FPS
    aus = np.zeros((T, len(ACTION_UNITS)))

    # 1. the expression event: onset -> apex -> offset at a random time, speed and intensity
    required, optional = PROTOTYPES[expression]
    weights = {k: w * rng.uniform(0.75, 1.2) for k, w in required.items()}
    for k, (p, w) in optional.items():
        if rng.uniform() < p:
            weights[k] = w * rng.uniform(0.75, 1.2)
    # real expressions are often blends (and annotators then disagree): sometimes mix in a weaker second prototype
    blend = None
    if weights and rng.uniform() < scenario.blend_probability:
        others = [c for c in CLASS_NAMES if c not in (expression, "neutral")]
        blend = (others[int(rng.integers(len(others)))], float(rng.uniform(*BLEND_WEIGHT)))
        for k, w in PROTOTYPES[blend[0]][0].items():
            weights[k] = weights.get(k, 0.0) + blend[1] * w
    rise_r, hold_r, decay_r = TIMING[expression]
    onset = rng.uniform(*scenario.onset_range) * T
    rise = max(rng.uniform(*rise_r) * T, 1.0)
    hold = rng.uniform(*hold_r) * T
    decay = max(rng.uniform(*decay_r) * T, 1.0)
    intensity = float(rng.uniform(*scenario.intensity_range))
    lags = rng.uniform(-0.04, 0.04, len(ACTION_UNITS)) * T  # AUs of one expression do not move in lockstep
    tl = t[:, None] - lags[None, :]
    env_au = _smoothstep((tl - onset) / rise) * (1 - _smoothstep((tl - onset - rise - hold) / decay))
    envelope = _smoothstep((t - onset) / rise) * (1 - _smoothstep((t - onset - rise - hold) / decay))
    if not weights:
        envelope = np.zeros(T)
    for k, w in weights.items():
        aus[:, AU[k]] += intensity * w * env_au[:, AU[k]]

    # 2. idiosyncratic slow fluctuations of every AU (faces are never perfectly still)
    amp = rng.uniform(0, 0.07, len(ACTION_UNITS)) * scenario.fluctuation
    freq = rng.uniform(0.3, 1.2, len(ACTION_UNITS))
    phase = rng.uniform(0, 2 * np.pi, len(ACTION_UNITS))
    aus += amp * 0.5 * (1 + np.sin(2 * np.pi * freq * seconds[:, None] + phase))

    # 3. talking: syllable-rate jaw/lip motion, gated into speech segments
    talk_amp = 0.0 if rng.uniform() < 0.25 else float(rng.uniform(0.15, 0.7)) * scenario.talk
    f1, f2 = rng.uniform(3.0, 5.5), rng.uniform(1.5, 3.0)
    p1, p2, p3 = rng.uniform(0, 2 * np.pi, 3)
    syllables = 0.5 + 0.5 * np.sin(2 * np.pi * f1 * seconds + p1) + 0.25 * np.sin(2 * np.pi * f2 * seconds + p2)
    syllables = np.clip(syllables, 0, None) ** 1.5
    if rng.uniform() < 0.5:  # a speech segment inside the clip rather than speech throughout
        a, b = np.sort(rng.uniform(-0.2, 1.2, 2)) * T
        gate = _smoothstep((t - a) / 3.0) * (1 - _smoothstep((t - b) / 3.0))
    else:
        gate = np.ones(T)
    talk = talk_amp * syllables * gate
    aus[:, AU["jaw_drop"]] += 0.5 * talk
    aus[:, AU["lips_part"]] += 0.8 * talk
    aus[:, AU["lip_pucker"]] += talk * 0.6 * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(1, 3) * seconds + p3))

    # 4. blinks (~0.7 per 1.3 s), 3-6 frames each
    n_blinks = rng.poisson(0.7 * T / 32)
    blink_frames = sorted(int(b) for b in rng.integers(0, T, n_blinks)) if T else []
    blink = np.zeros(T)
    for b in blink_frames:
        half = rng.uniform(1.5, 3.0)
        blink = np.maximum(blink, np.clip(1 - np.abs(t - b) / half, 0, 1) ** 0.7)
    aus[:, AU["blink"]] = blink

    # 5. gaze: a few fixations with quick saccades
    gaze = np.zeros((T, 2))
    change_points = np.sort(rng.integers(0, T, rng.integers(1, 4)))
    current = np.array([rng.normal(0, 0.35), rng.normal(0, 0.2)])
    for i in range(T):
        if i in change_points:
            current = np.array([rng.normal(0, 0.4), rng.normal(0, 0.25)])
        gaze[i] = current
    if T > 2:
        gaze = np.concatenate([gaze[:1], 0.25 * gaze[:-2] + 0.5 * gaze[1:-1] + 0.25 * gaze[2:], gaze[-1:]])

    return Dynamics(
        aus=np.clip(aus, 0.0, 1.25),
        gaze=np.clip(gaze, -1, 1),
        envelope=envelope,
        timing={"onset": onset, "apex_start": onset + rise, "apex_end": onset + rise + hold,
                "offset_end": onset + rise + hold + decay},
        intensity=intensity if weights else 0.0,
        talk_amplitude=talk_amp,
        blink_frames=blink_frames,
        blend=blend,
    )


@dataclasses.dataclass
class HeadPose:
    """Per-frame face placement in the image: ``centre`` [T, 2] px, ``scale`` [T] px per face unit, ``roll`` [T]
    radians, ``yaw`` [T] face units of sideways shift for features at depth 1 (a cheap 2-D stand-in for turning)."""

    centre: np.ndarray
    scale: np.ndarray
    roll: np.ndarray
    yaw: np.ndarray


# Framing: the head's size unit as a fraction of the frame, and the face centre height. (0.22, 0.27) / 0.5 shows
# hair, neck and shoulders with the face ~30 px wide in a 64 px frame; (0.36, 0.42) / 0.56 is a tight face crop
# like the DFEW / FERV39k crops, which small token grids need to see expressions at all.
FACE_SCALE = (0.36, 0.42)
FACE_CENTRE_Y = 0.56


def sample_head_pose(rng: np.random.Generator, frames: int, size: int,
                     scenario: Scenario = SCENARIOS["wild"]) -> HeadPose:
    """A face-crop framing (face fills most of the frame, as in DFEW/FERV39k crops) plus smooth head motion."""
    T, S = frames, size
    m = scenario.head_motion
    seconds = np.arange(T) / FPS

    def wobble(amplitude: float, n: int = 2) -> np.ndarray:
        out = np.zeros(T)
        for _ in range(n):
            out += rng.uniform(0, amplitude) * np.sin(2 * np.pi * rng.uniform(0.2, 1.3) * seconds + rng.uniform(0, 6.3))
        return out

    drift = m * rng.uniform(-0.02, 0.02, 2)[None, :] * S * (np.arange(T) / max(T - 1, 1))[:, None]
    centre = np.stack([S * (0.5 + m * rng.uniform(-0.04, 0.04)) + m * wobble(0.02 * S),
                       S * (FACE_CENTRE_Y + m * rng.uniform(-0.03, 0.06)) + m * wobble(0.02 * S)], -1) + drift
    scale = S * rng.uniform(*FACE_SCALE) * (1 + m * wobble(0.03, 1))
    roll = np.deg2rad(m * (rng.uniform(-8, 8) + wobble(4.0)))
    yaw = m * (rng.uniform(-0.08, 0.08) + wobble(0.07))
    return HeadPose(centre=centre, scale=scale, roll=roll, yaw=yaw)


# ---------------------------------------------------------------------------------------------------------------
# Static layers: background, head (skin, ears, neck, hair) and its per-frame warp
# ---------------------------------------------------------------------------------------------------------------


def _random_colour(rng: np.random.Generator, lo: float = 20, hi: float = 235, sat: float = 0.6) -> np.ndarray:
    grey = rng.uniform(lo, hi)
    return np.clip(grey + rng.normal(0, sat * 45, 3), 0, 255)


def render_background(rng: np.random.Generator, size: int, cluttered: bool = True) -> np.ndarray:
    """float32 [S, S, 3]: a gradient, optionally (``cluttered``) mixed with blurred colour noise and blurred
    clutter."""
    S = size
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / max(S - 1, 1)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) + 0.5
    c1, c2 = _random_colour(rng), _random_colour(rng)
    bg = (c1[None, None] * (1 - ramp[..., None]) + c2[None, None] * ramp[..., None]).astype(np.float32)
    if not cluttered:
        return np.clip(bg, 0, 255).astype(np.float32)
    if rng.uniform() < 0.5:
        k = int(rng.integers(2, 7))
        low = rng.uniform(0, 255, (k, k, 3)).astype(np.float32)
        noise = cv2.resize(low, (S, S), interpolation=cv2.INTER_CUBIC)
        mix = rng.uniform(0.3, 0.7)
        bg = (1 - mix) * bg + mix * noise
    if rng.uniform() < 0.5:
        clutter = np.ascontiguousarray(np.clip(bg, 0, 255).astype(np.uint8))
        for _ in range(int(rng.integers(3, 12))):
            colour = tuple(_random_colour(rng, sat=0.8).tolist())
            x0, y0 = (rng.uniform(-0.2, 1.2, 2) * S).astype(int)
            kind = rng.integers(3)
            if kind == 0:
                w, h = (rng.uniform(0.1, 0.6, 2) * S).astype(int)
                cv2.rectangle(clutter, (int(x0), int(y0)), (int(x0 + w), int(y0 + h)), colour, -1, cv2.LINE_AA)
            elif kind == 1:
                cv2.circle(clutter, (int(x0), int(y0)), int(rng.uniform(0.05, 0.3) * S), colour, -1, cv2.LINE_AA)
            else:
                x1, y1 = (rng.uniform(-0.2, 1.2, 2) * S).astype(int)
                cv2.line(clutter, (int(x0), int(y0)), (int(x1), int(y1)), colour,
                         max(1, int(rng.uniform(0.01, 0.05) * S)), cv2.LINE_AA)
        sigma = rng.uniform(0.8, 3.0) * S / 160  # the background is out of focus
        bg = cv2.GaussianBlur(clutter.astype(np.float32), (0, 0), sigma)
    return np.clip(bg, 0, 255).astype(np.float32)


def _poly_mask(shape: tuple[int, int], polygons: Sequence[np.ndarray]) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of float pixel polygons [P, 2]; float32 [H, W]."""
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round(p * _FIXED).astype(np.int32) for p in polygons], 255, cv2.LINE_AA, _SHIFT)
    return mask.astype(np.float32) / 255.0


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 48, start: float = 0.0,
             stop: float = 2 * np.pi) -> np.ndarray:
    a = np.linspace(start, stop, n)
    return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], -1)


def face_contour(ident: FaceIdentity, n: int = 64) -> np.ndarray:
    """[n, 2] face units: an egg whose lower half narrows towards the chin."""
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    s = np.sin(a)
    x = np.cos(a) * (1 - ident.jaw_taper * np.clip(s, 0, None) ** 2)
    return np.stack([x, ident.aspect * s], -1)


@dataclasses.dataclass
class HeadLayer:
    """Premultiplied RGBA float32 [L, L, 4] of the static head at unit pose; ``origin`` is where face unit (0, 0)
    sits (px) and ``unit`` the px per face unit. ``skin_at`` gives shaded skin colours sampled near features so
    that moving parts drawn later blend with the shading."""

    rgba: np.ndarray
    origin: np.ndarray
    unit: float
    skin_at: dict[str, tuple[float, float, float]]


def render_head_layer(rng: np.random.Generator, ident: FaceIdentity, unit: float, size: int) -> HeadLayer:
    """Neck, ears, shaded skin, blush and hair, drawn once per clip and later warped per frame."""
    L = int(size * 1.6)
    origin = np.array([L / 2, L / 2])
    px = lambda p: origin + unit * np.asarray(p, np.float64)  # noqa: E731
    shape = (L, L)
    rgb = np.zeros((L, L, 3), np.float32)
    alpha = np.zeros((L, L), np.float32)
    skin = np.array(ident.skin, np.float32)
    hair = np.array(ident.hair_colour, np.float32)
    b = ident.aspect
    yy, xx = np.mgrid[0:L, 0:L].astype(np.float32)
    ux, uy = (xx - origin[0]) / unit, (yy - origin[1]) / unit

    def paint(mask: np.ndarray, colour: np.ndarray) -> None:
        nonlocal rgb, alpha
        m = mask[..., None]
        rgb = rgb * (1 - m) + colour * m
        alpha = alpha * (1 - mask) + mask

    # hair texture: streaky low-frequency brightness variation
    streaks = cv2.resize(rng.normal(0, 1, (6, 40)).astype(np.float32), (L, L), interpolation=cv2.INTER_CUBIC)
    hair_tex = hair[None, None] * (1 + 0.12 * streaks[..., None])
    vol = ident.hair_volume
    style = ident.hair_style
    top = _ellipse(0, -0.12 * b, 1.06 + vol, b * 0.98 + vol, 64)
    if style == "curly":
        a = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        r = 1 + 0.05 * np.sin(a * 14 + rng.uniform(0, 6))
        top = np.stack([(1.15 + vol) * r * np.cos(a), -0.1 * b + (b + 0.1 + vol) * r * np.sin(a)], -1)

    if style == "long":
        back = np.concatenate([top[32:], [[1.1 + vol, 2.6 * b], [-1.1 - vol, 2.6 * b]]])
        paint(_poly_mask(shape, [px(back)]), hair_tex * 0.85)
    neck = np.array([[-0.5, 0.5 * b], [0.5, 0.5 * b], [0.58, 3 * b], [-0.58, 3 * b]])
    neck_mask = _poly_mask(shape, [px(neck)])
    paint(neck_mask, skin * 0.86)
    for side in (-1, 1):
        ear = _ellipse(side * 0.97, 0.02, 0.15, 0.28, 32)
        paint(_poly_mask(shape, [px(ear)]), skin * 0.9)
    face = face_contour(ident)
    face_mask = _poly_mask(shape, [px(face)])
    paint(face_mask, skin)

    # soft shading: darker rim (roundness), a shadow under the chin, a side light baked into the head
    sigma = 0.22 * unit
    roundness = cv2.GaussianBlur(face_mask, (0, 0), sigma)
    shade = 0.8 + 0.2 * np.clip(roundness * 1.6 - 0.3, 0, 1)
    chin_shadow = cv2.GaussianBlur(_poly_mask(shape, [px(face + np.array([0, 0.12]))]), (0, 0), 0.08 * unit)
    shade = np.where(face_mask > 0.5, shade, shade * (1 - 0.35 * chin_shadow * neck_mask))
    side_light = rng.uniform(-0.12, 0.12)
    shade = shade * (1 + side_light * np.clip(ux, -1.3, 1.3))
    # nose shadow on the side away from the light, blush on the cheeks
    sgn = -1.0 if side_light > 0 else 1.0
    nose_strip = np.array([[sgn * 0.02, ident.eye_y + 0.08], [sgn * 0.12, ident.eye_y + 0.08],
                           [sgn * (ident.nose_w + 0.05), ident.nose_y], [sgn * 0.02, ident.nose_y]])
    nose_shadow = cv2.GaussianBlur(_poly_mask(shape, [px(nose_strip)]), (0, 0), 0.05 * unit)
    shade = shade * (1 - 0.12 * nose_shadow)
    rgb *= shade[..., None]
    cheeks = [px(_ellipse(s * (ident.eye_sep + 0.05), ident.nose_y + 0.02, 0.2, 0.13, 24)) for s in (-1, 1)]
    blush = cv2.GaussianBlur(_poly_mask(shape, cheeks), (0, 0), 0.08 * unit) * ident.blush * face_mask
    rgb = rgb * (1 - blush[..., None]) + np.array((205, 95, 95), np.float32) * blush[..., None] * (skin / 230.0)

    # front hair: the top ellipse minus the forehead below the hairline
    if style != "bald":
        xs = np.linspace(-1.4, 1.4, 41)
        hl = ident.hairline_y + 0.18 * np.clip(np.abs(xs) - 0.35, 0, None) ** 1.5
        if style == "fringe":
            hl = ident.hairline_y + 0.22 + 0.04 * np.abs(np.sin(xs * 9)) + rng.uniform(-0.08, 0.08) * xs
        elif style == "short" and rng.uniform() < 0.5:  # a side parting
            hl = hl + rng.uniform(-0.07, 0.07) * xs
        below = np.concatenate([np.stack([xs, hl], -1), [[1.4, 3 * b], [-1.4, 3 * b]]])
        below_mask = _poly_mask(shape, [px(below)])
        # hair reaches down the sides to the ears (temples); keep the face uncovered below the hairline
        hair_mask = _poly_mask(shape, [px(top)]) * (1 - below_mask * np.clip(face_mask * 1.5, 0, 1))
        if style != "long":  # sides end somewhere between the temples and the ear lobes
            side_end = ident.hair_side * b
            hair_mask *= np.clip((side_end - uy) * unit / 2.0 + 0.5, 0, 1)
        paint(hair_mask * (0.55 if style == "buzz" else 1.0), hair_tex)

    rgba = np.concatenate([rgb, alpha[..., None]], -1)  # paint() composites premultiplied colour

    def sample(p: Sequence[float]) -> tuple[float, float, float]:
        q = px(p)
        x, y = int(round(q[0])), int(round(q[1]))
        r = max(1, int(0.03 * unit))
        patch = rgb[y - r:y + r + 1, x - r:x + r + 1].reshape(-1, 3)
        return tuple(patch.mean(0).tolist())

    skin_at = {
        "eye": sample((ident.eye_sep, ident.eye_y)),
        "forehead": sample((0.0, ident.eye_y - ident.brow_gap - 0.15)),
        "cheek": sample((ident.eye_sep, ident.nose_y + 0.1)),
        "mouth": sample((0.0, ident.mouth_y + 0.2)),
        "nose": sample((0.0, (ident.eye_y + ident.nose_y) / 2)),
    }
    return HeadLayer(rgba=rgba.astype(np.float32), origin=origin, unit=unit, skin_at=skin_at)


def render_shirt(rng: np.random.Generator, pose: HeadPose, ident: FaceIdentity, size: int) -> np.ndarray:
    """Premultiplied RGBA float32 [S, S, 4] of the shoulders (static: the body does not follow head jitter)."""
    S = size
    cx, cy = pose.centre[0]
    unit = float(pose.scale[0])
    top = cy + unit * (ident.aspect * 1.08)
    neck = 0.62 * unit
    xs = np.linspace(-neck, neck, 17)
    collar = np.stack([cx + xs, top + 0.35 * unit * (1 - (xs / neck) ** 2)], -1)
    shoulders = np.concatenate([[[cx - 3 * unit, top + 0.9 * unit], [cx - 1.6 * unit, top]], collar,
                                [[cx + 1.6 * unit, top], [cx + 3 * unit, top + 0.9 * unit], [cx + 3 * unit, S * 2],
                                 [cx - 3 * unit, S * 2]]])
    mask = _poly_mask((S, S), [shoulders])
    colour = _random_colour(rng, sat=0.9).astype(np.float32)
    return np.concatenate([mask[..., None] * colour, mask[..., None]], -1)


def composite_static(background: np.ndarray, head: HeadLayer, shirt: np.ndarray, pose: HeadPose) -> np.ndarray:
    """uint8 [T, S, S, 3]: background, the head warped by each frame's centre/scale/roll, then the static shirt."""
    T, S = len(pose.scale), background.shape[0]
    video = np.empty((T, S, S, 3), np.uint8)
    rows = np.nonzero(shirt[:, :, 3].max(1) > 0)[0]
    r0 = int(rows[0]) if len(rows) else S
    for t in range(T):
        k = pose.scale[t] / head.unit
        c, s = math.cos(pose.roll[t]), math.sin(pose.roll[t])
        A = np.array([[k * c, -k * s], [k * s, k * c]])
        b = pose.centre[t] - A @ head.origin
        layer = cv2.warpAffine(head.rgba, np.concatenate([A, b[:, None]], 1), (S, S), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        frame = background * (1 - layer[..., 3:]) + layer[..., :3]
        frame[r0:] = frame[r0:] * (1 - shirt[r0:, :, 3:]) + shirt[r0:, :, :3]
        np.clip(frame + 0.5, 0, 255, out=frame)
        video[t] = frame
    return video


# ---------------------------------------------------------------------------------------------------------------
# Moving parts: polygons for all frames at once
# ---------------------------------------------------------------------------------------------------------------


class DrawList:
    """Drawing operations for a whole clip, each with per-frame points and colours, replayed frame by frame.

    Points come in face units ``[T, P, 2]``; ``depth`` is how strongly yaw shifts them sideways (the nose tip sits
    in front of the eyes)."""

    def __init__(self, pose: HeadPose):
        self.pose = pose
        self.T = len(pose.scale)
        c, s = np.cos(pose.roll)[:, None], np.sin(pose.roll)[:, None]
        self._rot = (c, s)
        self.ops: list[tuple[bool, np.ndarray, list, int, np.ndarray | None]] = []

    def to_pixels(self, pts: np.ndarray, depth: float) -> np.ndarray:
        """Face units [T or 1, P, 2] -> image pixels [T, P, 2] (float) under each frame's pose."""
        pts = np.broadcast_to(pts, (self.T,) + pts.shape[-2:])
        c, s = self._rot
        x = pts[..., 0] + self.pose.yaw[:, None] * depth
        y = pts[..., 1]
        k = self.pose.scale[:, None]
        px = self.pose.centre[:, 0:1] + k * (c * x - s * y)
        py = self.pose.centre[:, 1:2] + k * (s * x + c * y)
        return np.stack([px, py], -1)

    def _to_fixed(self, pts: np.ndarray, depth: float) -> np.ndarray:
        return np.round(self.to_pixels(pts, depth) * _FIXED).astype(np.int32)

    def _colours(self, colour: Any) -> list:
        col = np.broadcast_to(np.asarray(colour, np.float64), (self.T, 3))
        return [tuple(c) for c in np.clip(col, 0, 255).tolist()]

    def fill(self, pts: np.ndarray, colour: Any, depth: float = 0.3, visible: np.ndarray | None = None) -> None:
        self.ops.append((True, self._to_fixed(pts, depth), self._colours(colour), 0, visible))

    def line(self, pts: np.ndarray, colour: Any, width: float, depth: float = 0.3,
             visible: np.ndarray | None = None) -> None:
        """``width`` in face units, rounded to whole pixels (at least 1)."""
        thickness = max(1, int(round(width * float(np.mean(self.pose.scale)))))
        self.ops.append((False, self._to_fixed(pts, depth), self._colours(colour), thickness, visible))

    def render(self, frames: np.ndarray) -> None:
        """Draw onto uint8 frames [T, S, S, 3] in place."""
        for t in range(self.T):
            img = frames[t]
            for is_fill, pts, cols, thickness, visible in self.ops:
                if visible is not None and not visible[t]:
                    continue
                if is_fill:
                    cv2.fillPoly(img, [pts[t]], cols[t], cv2.LINE_AA, _SHIFT)
                else:
                    cv2.polylines(img, [pts[t]], False, cols[t], thickness, cv2.LINE_AA, _SHIFT)


def _xy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Broadcast x and y to [T, P] and stack -> [T, P, 2]."""
    x, y = np.broadcast_arrays(x, y)
    return np.stack([x, y], -1)


def _lerp_colour(a: Any, b: Any, w: np.ndarray) -> np.ndarray:
    """[T, 3]: colour a where w = 0, b where w = 1."""
    w = np.clip(np.asarray(w, np.float64), 0, 1)[:, None]
    return (1 - w) * np.asarray(a, np.float64) + w * np.asarray(b, np.float64)


def _arch(u: np.ndarray, power: float | np.ndarray) -> np.ndarray:
    """Profile that is 1 at u = 0 and 0 at u = +-1; smaller power -> rounder."""
    return np.clip(1 - u * u, 0, 1) ** power


def draw_eyes(dl: DrawList, ident: FaceIdentity, aus: np.ndarray, gaze: np.ndarray,
              skin_eye: np.ndarray) -> None:
    """Sclera, iris and pupil, clipped by lid 'covers'; lash line, lid crease, lower lid and cheek folds."""
    A = lambda k: aus[:, AU[k], None]  # noqa: E731  [T, 1]
    T = aus.shape[0]
    ew, cy = ident.eye_w, ident.eye_y
    eh = ident.eye_open * ew
    el = ident.eye_lower * ew
    blink = A("blink")
    open_up = eh * np.clip(1 + 0.8 * A("upper_lid_raise") - 0.35 * A("lid_tighten") - 0.25 * A("cheek_raise")
                           - 0.45 * A("lid_droop") - 0.2 * A("nose_wrinkle"), 0.05, None)
    lower = el * np.clip(1 - 0.55 * A("lid_tighten") - 0.6 * A("cheek_raise") - 0.3 * A("nose_wrinkle")
                         + 0.25 * A("upper_lid_raise"), 0.2, None)
    lower = lower * (1 - 0.4 * blink)
    up_mid = -(open_up * (1 - blink)) + blink * lower * 0.9  # relative to the corner line; blink meets the lower lid
    u = np.linspace(-1, 1, 15)[None, :]
    r_iris = ident.iris_ratio * ew
    lid_dark = np.asarray(skin_eye) * 0.88
    lash = np.minimum(np.asarray(ident.brow_colour) * 0.7, 60)
    for side in (-1, 1):
        ex = side * ident.eye_sep
        x = ex + ew * u
        corner_y = cy - ident.eye_tilt * (u * side)  # outer corner higher
        upper_y = corner_y + up_mid * _arch(u + 0.1 * side, 0.8)
        lower_y = corner_y + lower * _arch(u - 0.1 * side, 0.9)
        upper = _xy(x, upper_y)
        lower_c = _xy(x, lower_y)
        dl.fill(np.concatenate([upper, lower_c[:, ::-1]], 1), (238, 234, 228), depth=0.25)
        gx = ex + gaze[:, 0:1] * 0.35 * ew
        gy = cy + gaze[:, 1:2] * 0.12 * ew + 0.1 * ew
        circle = np.linspace(0, 2 * np.pi, 20)[None, :]
        dl.fill(_xy(gx + r_iris * np.cos(circle), gy + r_iris * np.sin(circle)), ident.iris, depth=0.25)
        dl.fill(_xy(gx + 0.45 * r_iris * np.cos(circle), gy + 0.45 * r_iris * np.sin(circle)), (15, 12, 12),
                depth=0.25)
        dl.fill(_xy(gx - 0.3 * r_iris + 0.16 * r_iris * np.cos(circle), gy - 0.3 * r_iris
                    + 0.16 * r_iris * np.sin(circle)), (250, 250, 250), depth=0.25)
        top = np.minimum(cy - r_iris - 0.04 * ew - ident.eye_tilt, upper_y.min(1, keepdims=True) - 1e-3)
        cover_up = np.concatenate([upper, _xy(np.array([[ex + ew * 1.02, ex - ew * 1.02]]), np.repeat(top, 2, 1))], 1)
        dl.fill(cover_up, lid_dark, depth=0.25)
        bottom = np.maximum(cy + r_iris + 0.25 * ew + ident.eye_tilt, lower_y.max(1, keepdims=True) + 1e-3)
        cover_lo = np.concatenate([lower_c, _xy(np.array([[ex + ew * 1.02, ex - ew * 1.02]]),
                                                np.repeat(bottom, 2, 1))], 1)
        dl.fill(cover_lo, skin_eye, depth=0.25)
        dl.line(upper, lash, 0.045, depth=0.25)
        crease_offset = 0.3 * eh * (1 - 0.6 * np.clip(A("upper_lid_raise"), 0, 1))
        crease = _xy(ex + 0.85 * ew * u[:, 2:-2], (upper_y - crease_offset)[:, 2:-2])
        dl.line(crease, np.asarray(skin_eye) * 0.72, 0.02, depth=0.25)
        squeeze = np.clip(A("lid_tighten") + A("cheek_raise") + 0.5 * A("nose_wrinkle"), 0, 1)[:, 0]
        dl.line(lower_c[:, 2:-2], _lerp_colour(np.asarray(skin_eye) * 0.8, np.asarray(skin_eye) * 0.55, squeeze),
                0.02, depth=0.25)
        # cheek raise pushes up a fold under the eye and wrinkles the outer corner (crow's feet)
        cheek = A("cheek_raise")[:, 0]
        bag = _xy(ex + 0.75 * ew * u[:, 3:-3], lower_y[:, 3:-3] + 0.1 * ew + 0.12 * ew * (1 - cheek[:, None]))
        dl.line(bag, _lerp_colour(skin_eye, np.asarray(skin_eye) * 0.6, cheek * 0.9), 0.02, depth=0.25,
                visible=cheek > 0.1)
        for k, ang in enumerate((-0.35, 0.0, 0.35)):
            a0 = np.array([ex + side * 1.1 * ew, cy + 0.02])
            d = np.array([side * math.cos(ang), math.sin(ang)])
            seg = np.stack([a0 + 0.02 * d, a0 + 0.14 * d])[None]
            dl.line(np.repeat(seg, T, 0), _lerp_colour(skin_eye, np.asarray(skin_eye) * 0.6, cheek * 0.8), 0.015,
                    depth=0.2, visible=cheek > 0.15)


def draw_brows(dl: DrawList, ident: FaceIdentity, aus: np.ndarray, skin_forehead: np.ndarray) -> np.ndarray:
    """Tapered brows moved by AU1 (inner up), AU2 (outer up), AU4 (down and together); forehead and glabella
    wrinkles. Returns the brows' mean height [T] (face units)."""
    A = lambda k: aus[:, AU[k], None]  # noqa: E731
    ew = ident.eye_w
    u = np.linspace(0, 1, 9)[None, :]  # inner -> outer
    base = ident.eye_y - ident.brow_gap
    au1, au2, au4 = A("inner_brow_raise"), A("outer_brow_raise"), A("brow_lower")
    y_in = base - 0.2 * au1 + 0.13 * au4 + 0.04 * A("nose_wrinkle")
    y_out = base - 0.05 - 0.19 * au2 - 0.03 * au1 + 0.06 * au4
    arch = ident.brow_arch * np.clip(1 + 1.2 * au2 - 0.8 * au4 - 0.5 * au1, 0.0, None) + 0.02
    mean_y = []
    for side in (-1, 1):
        x_in = side * (ident.eye_sep - 0.95 * ew) - side * 0.07 * au4
        x_out = side * (ident.eye_sep + 1.2 * ew)
        x = x_in + (x_out - x_in) * u
        y = y_in + (y_out - y_in) * u - arch * np.sin(np.pi * u ** 0.75)
        # outline = centre line +- half thickness along the normal
        dx, dy = np.gradient(x, axis=1), np.gradient(y, axis=1)
        norm = np.sqrt(dx * dx + dy * dy) + 1e-9
        nx, ny = -dy / norm, dx / norm
        half = 0.5 * ident.brow_thick * (1.2 - 0.6 * u)
        top = _xy(x + nx * half, y + ny * half)
        bottom = _xy(x - nx * half, y - ny * half)
        dl.fill(np.concatenate([top, bottom[:, ::-1]], 1), ident.brow_colour, depth=0.25)
        mean_y.append(y.mean(1))
    # forehead lines between brows and hairline when the brows rise
    raise_ = np.clip(0.5 * (au1 + au2)[:, 0] + 0.3 * au1[:, 0], 0, 1)
    band_top, band_bottom = ident.hairline_y + 0.08, base - 0.14
    xs = np.linspace(-0.42, 0.42, 9)[None, :]
    for k in range(3):
        yk = band_bottom - (k + 0.6) * (band_bottom - band_top) / 3.6
        if yk < band_top:
            break
        y = yk - 0.03 * np.cos(xs * 2.5) - 0.05 * raise_[:, None]
        dl.line(_xy(xs, y), _lerp_colour(skin_forehead, np.asarray(skin_forehead) * 0.62, raise_ * 0.9), 0.018,
                depth=0.15, visible=raise_ > 0.15)
    frown = np.clip(au4[:, 0] + 0.4 * A("nose_wrinkle")[:, 0], 0, 1)
    for side in (-1, 1):
        seg = np.array([[side * 0.07, base - 0.02], [side * 0.05, base + 0.12]])[None]
        dl.line(np.repeat(seg, dl.T, 0), _lerp_colour(skin_forehead, np.asarray(skin_forehead) * 0.6, frown * 0.9),
                0.02, depth=0.3, visible=frown > 0.15)
    return np.mean(mean_y, 0)


def draw_nose(dl: DrawList, ident: FaceIdentity, aus: np.ndarray, skin_nose: np.ndarray) -> None:
    """Nostrils and wings (raised and flared by AU9/AU10), a bridge line, and nose-wrinkle lines (AU9)."""
    A = lambda k: aus[:, AU[k], None]  # noqa: E731
    T = aus.shape[0]
    nw, ny = ident.nose_w, ident.nose_y
    au9 = A("nose_wrinkle")
    lift = -0.06 * au9 - 0.03 * A("upper_lip_raise")
    flare = 1 + 0.25 * au9
    dark = np.asarray(skin_nose) * 0.35
    circle = np.linspace(0, 2 * np.pi, 14)[None, :]
    wing = np.linspace(-0.6 * np.pi, 0.75 * np.pi, 9)[None, :]
    for side in (-1, 1):
        cx = side * nw * 0.5 * flare
        cy = ny + 0.02 + lift
        dl.fill(_xy(cx + 0.28 * nw * flare * np.cos(circle), cy + 0.13 * nw * np.sin(circle)), dark, depth=0.55)
        wx = side * nw * flare * (0.62 + 0.35 * np.cos(wing))
        wy = ny - 0.02 + lift + 0.5 * nw * np.sin(wing)
        dl.line(_xy(wx, wy), _lerp_colour(np.asarray(skin_nose) * 0.72, np.asarray(skin_nose) * 0.5, au9[:, 0]),
                0.02, depth=0.5)
    tip = np.linspace(-0.45, 0.45, 7)[None, :]
    dl.line(_xy(tip * nw, ny + 0.07 + lift + 0.03 * tip ** 2), np.asarray(skin_nose) * 0.72, 0.018, depth=0.6)
    w = np.clip(au9[:, 0] * 1.2, 0, 1)
    for k in range(3):
        yk = ident.eye_y + 0.05 + 0.055 * k
        seg = np.array([[-0.09 + 0.01 * k, yk], [0.0, yk - 0.015], [0.09 - 0.01 * k, yk]])[None]
        dl.line(np.repeat(seg, T, 0), _lerp_colour(skin_nose, np.asarray(skin_nose) * 0.55, w * 0.9), 0.018,
                depth=0.45, visible=w > 0.15)


def _lip_curve(u: np.ndarray, corner_y: np.ndarray, mid_y: np.ndarray, power: np.ndarray) -> np.ndarray:
    return corner_y + (mid_y - corner_y) * _arch(u, power)


def draw_mouth(dl: DrawList, ident: FaceIdentity, aus: np.ndarray, skin_mouth: np.ndarray,
               skin_cheek: np.ndarray) -> np.ndarray:
    """Lips, mouth opening, teeth, nasolabial folds and chin boss, all driven by AUs. Returns the mouth centre
    [T, 2] in face units (for region statistics)."""
    A = lambda k: aus[:, AU[k], None]  # noqa: E731
    T = aus.shape[0]
    au12, au15, au20, au24 = A("lip_corner_pull"), A("lip_corner_depress"), A("lip_stretch"), A("lip_press")
    au10, au17, au25, au26 = A("upper_lip_raise"), A("chin_raise"), A("lips_part"), A("jaw_drop")
    pucker = A("lip_pucker")
    ym = ident.mouth_y
    half_w = ident.mouth_w * np.clip(1 + 0.2 * au12 + 0.3 * au20 - 0.15 * au24 - 0.3 * pucker - 0.3 * au26
                                     + 0.05 * au15 + 0.06 * au10, 0.45, None)
    corner_y = ym - 0.17 * au12 + 0.13 * au15 + 0.03 * au20 + 0.04 * au26 - 0.03 * au10
    thin = np.clip(1 - 0.6 * au24 - 0.3 * au20 - 0.2 * au12, 0.25, None)
    tu = ident.lip_upper * thin * (1 + 0.3 * pucker)
    tl = ident.lip_lower * thin * (1 + 0.3 * pucker)
    upper_in = ym - 0.03 * au25 - 0.13 * au10 + 0.01
    lower_in = ym + 0.05 * au25 + 0.42 * au26 - 0.05 * au17 + 0.015
    lower_in = np.maximum(lower_in, upper_in + 0.005)
    upper_out, lower_out = upper_in - tu, lower_in + tl * (1 - 0.2 * au26)
    # boxy for stretch/snarl, rounder when the jaw drops, parabolic otherwise
    p_upper = np.clip(0.9 - 0.5 * au20 - 0.5 * au10 - 0.35 * au26, 0.3, 1.0)
    p_lower = np.clip(0.9 - 0.45 * au20 - 0.2 * au10 - 0.4 * au26, 0.3, 1.0)
    u = np.linspace(-1, 1, 21)[None, :]
    x = u * half_w
    bow = 0.3 * tu * (np.exp(-((u - 0.22) / 0.15) ** 2) + np.exp(-((u + 0.22) / 0.15) ** 2)) * (1 - 0.6 * au10)
    y_uo = _lip_curve(u, corner_y, upper_out, p_upper * 0.8) - bow
    y_ui = _lip_curve(u, corner_y, upper_in, p_upper)
    y_li = _lip_curve(u, corner_y, lower_in, p_lower)
    y_lo = _lip_curve(u, corner_y, lower_out, p_lower * 0.85)
    lip = np.asarray(ident.lip_colour)
    dl.fill(np.concatenate([_xy(x, y_uo), _xy(x, y_lo)[:, ::-1]], 1), lip * 0.9, depth=0.35)
    dl.fill(np.concatenate([_xy(x, y_li), _xy(x, y_lo)[:, ::-1]], 1), np.minimum(lip * 1.08, 255), depth=0.35)
    gap = (lower_in - upper_in)[:, 0]
    opened = gap > 0.02
    dl.fill(np.concatenate([_xy(x, y_ui), _xy(x, y_li)[:, ::-1]], 1), (60, 22, 28), depth=0.35, visible=opened)
    # teeth: an upper band hanging from the upper lip, a lower band rising from the lower lip. Retracted lips
    # (smile, sneer, fear grimace) bare them; a dropped jaw (surprise, speech) mostly shows the dark opening.
    ut = np.linspace(-0.78, 0.78, 15)[None, :]
    xt = ut * half_w
    t_ui = _lip_curve(ut, corner_y, upper_in, p_upper)
    t_li = _lip_curve(ut, corner_y, lower_in, p_lower)
    bared = np.clip(0.35 + 0.5 * au12 + 0.4 * au10 + 0.45 * au20, 0, 0.9)
    teeth_top = t_ui + np.minimum(0.08, bared * (t_li - t_ui))
    dl.fill(np.concatenate([_xy(xt, t_ui), _xy(xt, teeth_top)[:, ::-1]], 1), (236, 232, 218), depth=0.35,
            visible=opened)
    teeth_low = t_li - np.minimum(0.045, 0.25 * bared * (t_li - t_ui))
    dl.fill(np.concatenate([_xy(xt, teeth_low), _xy(xt, t_li)[:, ::-1]], 1), (215, 210, 196), depth=0.35,
            visible=gap > 0.12)
    dl.line(_xy(x, np.where(opened[:, None], y_ui, 0.5 * (y_ui + y_li))), lip * 0.45, 0.02, depth=0.35)
    # nasolabial folds deepen with smiles and sneers
    fold_w = np.clip(0.25 + 0.9 * au12 + 0.6 * au10 + 0.4 * A("nose_wrinkle") + 0.3 * A("cheek_raise"), 0, 1)[:, 0]
    v = np.linspace(0, 1, 8)[None, :]
    for side in (-1, 1):
        x0, y0 = side * (ident.nose_w + 0.1), ident.nose_y - 0.04 - 0.04 * au10
        x1, y1 = side * (half_w + 0.1), corner_y + 0.1
        fx = x0 + (x1 - x0) * v + side * 0.07 * np.sin(np.pi * v)
        fy = y0 + (y1 - y0) * v
        dl.line(_xy(fx, fy), _lerp_colour(skin_cheek, np.asarray(skin_cheek) * 0.55, fold_w * 0.8), 0.022,
                depth=0.3)
        # sad / angry corners: a short downward crease
        dep = np.clip(au15[:, 0] + 0.5 * au24[:, 0], 0, 1)
        seg = _xy(side * (half_w + 0.02 + 0.04 * v), corner_y + 0.03 + 0.1 * v)
        dl.line(seg, _lerp_colour(skin_mouth, np.asarray(skin_mouth) * 0.6, dep * 0.8), 0.018, depth=0.3,
                visible=dep > 0.15)
    chin = np.clip(au17[:, 0] + 0.3 * au24[:, 0], 0, 1)
    cu = np.linspace(-1, 1, 9)[None, :]
    chin_line = _xy(cu * 0.22, lower_out + 0.1 + 0.04 * cu ** 2 - 0.03 * chin[:, None])
    dl.line(chin_line, _lerp_colour(skin_mouth, np.asarray(skin_mouth) * 0.6, chin * 0.8), 0.02, depth=0.3,
            visible=chin > 0.15)
    return np.concatenate([np.zeros((T, 1)), 0.5 * (upper_in + lower_in)], 1)


def draw_glasses(dl: DrawList, ident: FaceIdentity) -> None:
    a = np.linspace(0, 2 * np.pi, 28)
    r = ident.eye_w * 1.45
    for side in (-1, 1):
        ex = side * ident.eye_sep
        rim = np.stack([ex + r * np.cos(a), ident.eye_y + 0.02 + 0.75 * r * np.sin(a)], -1)[None]
        dl.line(rim, ident.glasses_colour, 0.035, depth=0.35)
        arm = np.array([[ex + side * r, ident.eye_y - 0.02], [side * 0.97, ident.eye_y - 0.04]])[None]
        dl.line(arm, ident.glasses_colour, 0.035, depth=0.1)
    bridge = np.array([[-ident.eye_sep + r, ident.eye_y - 0.02], [0, ident.eye_y - 0.06],
                       [ident.eye_sep - r, ident.eye_y - 0.02]])[None]
    dl.line(bridge, ident.glasses_colour, 0.03, depth=0.4)


# ---------------------------------------------------------------------------------------------------------------
# Camera: lighting, blur, noise
# ---------------------------------------------------------------------------------------------------------------


def apply_camera(rng: np.random.Generator, frames: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """uint8 [T, S, S, 3] -> uint8: directional light with brightness/tint, slight flicker, optional defocus blur,
    sensor noise (mostly luminance, plus a little chroma); ``strength`` scales all of them."""
    T, S = frames.shape[:2]
    k = float(strength)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / max(S - 1, 1) - 0.5
    phi = rng.uniform(0, 2 * np.pi)
    light = 1 + k * rng.uniform(0, 0.4) * (np.cos(phi) * xx + np.sin(phi) * yy)
    gain = (1 + k * (rng.uniform(0.75, 1.15) * (1 + rng.uniform(-0.05, 0.05, 3)) - 1)).astype(np.float32)
    light_map = light[:, :, None] * gain  # [S, S, 3]
    flicker = (1 + k * rng.normal(0, 0.01, T)).astype(np.float32)
    blur_sigma = k * rng.uniform(0.3, 0.9) * S / 160 if rng.uniform() < 0.6 else 0.0
    noise_sigma = np.float32(k * rng.uniform(1.0, 5.0))
    # Gaussian sampling dominated the cost of a clip, so each frame takes a randomly offset window of one noise
    # bank per clip (mostly luminance, some chroma): frame-to-frame the noise at a pixel is still uncorrelated.
    margin = 24
    bank = rng.standard_normal((S + margin, S + margin, 1), dtype=np.float32) * noise_sigma
    bank = bank + rng.standard_normal((S + margin, S + margin, 3), dtype=np.float32) * (0.35 * noise_sigma) + 0.5
    offsets = rng.integers(0, margin + 1, (T, 2))
    out = np.empty(frames.shape, np.uint8)
    for t in range(T):  # frame by frame: stays in cache, no [T, S, S, 3] float temporaries
        f = frames[t].astype(np.float32)
        f *= light_map * flicker[t]
        if blur_sigma:
            f = cv2.GaussianBlur(f, (0, 0), blur_sigma)
        oy, ox = offsets[t]
        f += bank[oy:oy + S, ox:ox + S]
        np.clip(f, 0, 255, out=f)
        out[t] = f
    return out


# ---------------------------------------------------------------------------------------------------------------
# One clip
# ---------------------------------------------------------------------------------------------------------------


def generate_clip(rng: np.random.Generator, label: int | None, *, frames: int = 32, size: int = 160,
                  identity: FaceIdentity | None = None, scenario: str = "wild") -> tuple[np.ndarray, dict[str, Any]]:
    """Render one clip -> (uint8 [frames, size, size, 3], meta).

    ``label`` is a class index into CLASS_NAMES; ``None`` (unlabelled pretraining clip) still shows a random
    expression, drawn from ``rng``, so pretraining sees the same kind of facial dynamics. ``identity`` None draws a
    fresh person from ``rng``. ``meta`` is msgpack-able: expression, identity, timing (frames), intensity,
    per-frame envelope, action-unit tracks, mouth centre and brow height in pixels. ``scenario`` names the
    recording conditions (``SCENARIOS``).
    """
    scene = get_scenario(scenario)
    if frames < 1 or size < 16:
        raise ValueError(f"generate_clip needs frames >= 1 and size >= 16, got frames={frames}, size={size}")
    if label is not None and not 0 <= int(label) < len(CLASS_NAMES):
        raise ValueError(f"label must be in [0, {len(CLASS_NAMES)}) or None, got {label}")
    expression_index = int(rng.integers(len(CLASS_NAMES))) if label is None else int(label)
    expression = CLASS_NAMES[expression_index]
    if identity is None:
        identity = sample_identity(rng)

    dyn = sample_dynamics(rng, expression, frames, scene)
    pose = sample_head_pose(rng, frames, size, scene)
    background = render_background(rng, size, scene.cluttered_background)
    head = render_head_layer(rng, identity, unit=float(np.mean(pose.scale)), size=size)
    shirt = render_shirt(rng, pose, identity, size)

    video = composite_static(background, head, shirt, pose)

    dl = DrawList(pose)
    skin = {k: np.asarray(v) for k, v in head.skin_at.items()}
    draw_nose(dl, identity, dyn.aus, skin["nose"])
    mouth_units = draw_mouth(dl, identity, dyn.aus, skin["mouth"], skin["cheek"])
    draw_eyes(dl, identity, dyn.aus, dyn.gaze, skin["eye"])
    brow_units = draw_brows(dl, identity, dyn.aus, skin["forehead"])
    if identity.glasses:
        draw_glasses(dl, identity)
    dl.render(video)
    video = apply_camera(rng, video, scene.camera)

    mouth_px = dl.to_pixels(mouth_units[:, None, :], 0.35)[:, 0]
    brow_px = dl.to_pixels(np.stack([np.zeros(frames), brow_units], -1)[:, None, :], 0.25)[:, 0]
    envelope = dyn.envelope
    meta = {
        "expression": expression,
        "label": None if label is None else int(label),
        "identity": identity.name,
        "intensity": round(float(dyn.intensity), 4),
        "timing_frames": {k: round(float(v), 2) for k, v in dyn.timing.items()} if dyn.intensity else None,
        "apex_frame": int(np.argmax(envelope)) if dyn.intensity else None,
        "envelope": [round(float(v), 3) for v in envelope],
        "blend": None if dyn.blend is None else {"expression": dyn.blend[0], "weight": round(dyn.blend[1], 3)},
        "talk_amplitude": round(float(dyn.talk_amplitude), 3),
        "blink_frames": dyn.blink_frames,
        "action_units": {name: [round(float(v), 3) for v in dyn.aus[:, i]] for i, name in enumerate(ACTION_UNITS)},
        "mouth_centre_px": [[round(float(x), 1), round(float(y), 1)] for x, y in mouth_px],
        "brow_centre_px": [[round(float(x), 1), round(float(y), 1)] for x, y in brow_px],
        "face_unit_px": round(float(np.mean(pose.scale)), 2),
        "hair_style": identity.hair_style,
        "glasses": identity.glasses,
    }
    return video, meta


# ---------------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------------


def clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of clip ``index`` of ``split``: independent of every other clip, so order/parallelism don't
    matter."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _CLIP_STREAM, _SPLIT_CODE[split], int(index)]))


def split_identity(seed: int, split: str, identity_index: int) -> FaceIdentity:
    """Person ``identity_index`` of the pool of ``split``. Pools are disjoint by construction (own seed stream)."""
    rng = np.random.default_rng(
        np.random.SeedSequence([int(seed), _IDENTITY_STREAM, _SPLIT_CODE[split], int(identity_index)]))
    return sample_identity(rng, name=f"{split}-{identity_index:05d}")


@dataclasses.dataclass(frozen=True)
class ClipTask:
    """What a worker needs to render and encode one record."""

    seed: int
    split: str
    index: int
    label: int | None
    frames: int
    size: int
    quality: int
    scenario: str = "wild"


def split_tasks(seed: int, split: str, count: int, labelled: bool, frames: int, size: int,
                quality: int, scenario: str = "wild") -> list[ClipTask]:
    """Labelled splits cycle through the classes (clip i has class i % 7, so each person — clips 7k..7k+6 — shows
    every expression once); the pretrain pool is unlabelled."""
    return [ClipTask(seed, split, i, (i % len(CLASS_NAMES)) if labelled else None, frames, size, quality, scenario)
            for i in range(count)]


def render_record(task: ClipTask) -> bytes:
    """ClipTask -> encoded record bytes (module-level so that worker processes can run it)."""
    identity = split_identity(task.seed, task.split, task.index // CLIPS_PER_IDENTITY)
    video, meta = generate_clip(clip_rng(task.seed, task.split, task.index), task.label, frames=task.frames,
                                size=task.size, identity=identity, scenario=task.scenario)
    rec = records.make_record(
        f"{task.split}/{task.index:06d}",
        video,
        quality=task.quality,
        source=f"data_pipelines.synthetic(seed={task.seed}, split={task.split}, index={task.index})",
        label=task.label,
        split=task.split,
        fps=FPS,
        extra=meta,
    )
    return records.encode_clip(rec)


def _init_worker() -> None:
    cv2.setNumThreads(1)  # the workers already use every core; OpenCV's own threads would only contend


def _default_command(out_dir: str, **kw: Any) -> str:
    args = " ".join(f"--{k} {shlex.quote(str(v))}" for k, v in kw.items())
    return f"python -m data_pipelines.synthetic --out {shlex.quote(out_dir)} {args}"


def build_dataset(out_dir: str, *, seed: int = 0, num_pretrain: int = 1400, train_per_class: int = 60,
                  val_per_class: int = 20, test_per_class: int = 30, frames: int = 32, size: int = 160,
                  workers: int = 1, clips_per_shard: int = 128, quality: int = 90, scenario: str = "wild",
                  creation_command: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Render the four splits into ArrayRecord shards + dataset_info.json under ``out_dir``; returns the info.

    Records are written in split order pretrain, train, val, test; shards are numbered globally
    (``synthetic-00000-of-000NN``) so that both the listed order and a sorted glob give the same global indices.
    Output is byte-identical for any ``workers``. ``scenario``: recording conditions, see ``SCENARIOS``.
    """
    scene = get_scenario(scenario)  # fail before any work
    counts = {"pretrain": num_pretrain, "train": train_per_class * len(CLASS_NAMES),
              "val": val_per_class * len(CLASS_NAMES), "test": test_per_class * len(CLASS_NAMES)}
    if any(c < 0 for c in counts.values()):
        raise ValueError(f"clip counts must be >= 0, got {counts}")
    if clips_per_shard < 1:
        raise ValueError(f"clips_per_shard must be >= 1, got {clips_per_shard}")
    tasks: list[ClipTask] = []
    splits: dict[str, list[int]] = {}
    for split in SPLITS:
        start = len(tasks)
        tasks += split_tasks(seed, split, counts[split], split != "pretrain", frames, size, quality, scenario)
        splits[split] = list(range(start, len(tasks)))
    if not tasks:
        raise ValueError("nothing to generate: all clip counts are 0")

    os.makedirs(out_dir, exist_ok=True)
    n_shards = math.ceil(len(tasks) / clips_per_shard)
    shard_names = [records.shard_name(SHARD_PREFIX, i, n_shards) for i in range(n_shards)]
    for stale in os.listdir(out_dir):  # shards of an earlier run with another shard count would be globbed too
        if stale.startswith(SHARD_PREFIX + "-") and stale.endswith(".array_record") and stale not in shard_names:
            os.remove(os.path.join(out_dir, stale))

    started = time.perf_counter()
    if workers > 1:
        import multiprocessing

        # spawn, not fork: callers (trainers, tests) may have started JAX threads, which fork would copy badly
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker)
        encoded = pool.imap(render_record, tasks, chunksize=2)
    else:
        pool = None
        encoded = map(render_record, tasks)
    from data_pipelines.progress import bar as progress_bar  # plain lines when stderr is not a terminal

    bar = progress_bar(total=len(tasks), desc="[synthetic] rendering", unit="clip", disable=not progress)
    try:
        done = 0
        for shard_index, name in enumerate(shard_names):
            with records.ShardWriter(os.path.join(out_dir, name)) as writer:
                for _ in range(min(clips_per_shard, len(tasks) - done)):
                    writer.write(next(encoded))
                    done += 1
                    bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    elapsed = time.perf_counter() - started

    label_histogram: dict[str, int] = {}
    per_split_histogram: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        hist: dict[str, int] = {}
        for i in splits[split]:
            if tasks[i].label is not None:
                hist[str(tasks[i].label)] = hist.get(str(tasks[i].label), 0) + 1
                label_histogram[str(tasks[i].label)] = label_histogram.get(str(tasks[i].label), 0) + 1
        per_split_histogram[split] = dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
    info = {
        "format": "facemae_dataset",
        "version": 1,
        "name": DATASET_NAME,
        "source": "data_pipelines.synthetic (procedurally drawn talking faces)",
        "creation_command": creation_command or _default_command(
            out_dir, seed=seed, num_pretrain=num_pretrain, train_per_class=train_per_class,
            val_per_class=val_per_class, test_per_class=test_per_class, frames=frames, size=size, workers=workers,
            **({} if scenario == "wild" else {"scenario": scenario})),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "num_clips": len(tasks),
        "shards": shard_names,
        "frame_size": {"height": size, "width": size},
        "task": "classification",
        "class_names": list(CLASS_NAMES),
        "label_histogram": dict(sorted(label_histogram.items(), key=lambda kv: int(kv[0]))),
        "splits": splits,
        "skipped": [],
        "extra": {
            "generator": "data_pipelines.synthetic",
            "seed": seed,
            "scenario": dataclasses.asdict(scene),
            "frames": frames,
            "fps": FPS,
            "jpeg_quality": quality,
            "clips_per_identity": CLIPS_PER_IDENTITY,
            "identities": {s: math.ceil(counts[s] / CLIPS_PER_IDENTITY) for s in SPLITS},
            "identity_pools": "disjoint per split (separate seed streams); ids are '<split>-<index>'",
            "label_histogram_per_split": per_split_histogram,
            "pretrain_labels": "None (each pretrain clip still shows a random expression, see record extra)",
            "action_units": list(ACTION_UNITS),
            "generation_seconds": round(elapsed, 2),
            "clips_per_second": round(len(tasks) / max(elapsed, 1e-9), 2),
            "workers": workers,
        },
    }
    tmp = os.path.join(out_dir, "dataset_info.json.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "dataset_info.json"))
    return info


# ---------------------------------------------------------------------------------------------------------------
# Contact sheet
# ---------------------------------------------------------------------------------------------------------------


def contact_sheet(out_dir: str, path: str, *, columns: int = 8, split_order: Sequence[str] = ("train", "val", "test"),
                  tile: int | None = None) -> str:
    """PNG with one row per class: ``columns`` frames across the first stored clip of that class, labelled with the
    class, the frame index and a bar showing the expression envelope. Classes absent from the dataset are drawn
    fresh with generate_clip."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    info = records.load_dataset_info(out_dir)
    source = ArrayRecordDataSource([os.path.join(out_dir, s) for s in info["shards"]])
    chosen: dict[int, tuple[np.ndarray, dict]] = {}
    for split in split_order:
        for gi in info["splits"].get(split, []):
            rec = records.decode_clip(source[gi], where=f"{out_dir} #{gi}")
            if rec.label is not None and rec.label not in chosen:
                chosen[int(rec.label)] = (records.decode_frames(rec), rec.extra)
            if len(chosen) == len(CLASS_NAMES):
                break
    size = int(info["frame_size"]["height"])
    frames = int(info["extra"].get("frames", 32))
    for c in range(len(CLASS_NAMES)):
        if c not in chosen:
            chosen[c] = generate_clip(clip_rng(info["extra"].get("seed", 0), "adhoc", c), c, frames=frames, size=size)
    tile = tile or max(size, 96)
    label_w, bar_h, header = 110, 6, 18
    T = chosen[0][0].shape[0]
    cols = np.unique(np.linspace(0, T - 1, min(columns, T)).round().astype(int))
    sheet = np.full((header + len(CLASS_NAMES) * (tile + bar_h + 4), label_w + len(cols) * (tile + 2), 3), 255,
                    np.uint8)
    for j, t in enumerate(cols):
        cv2.putText(sheet, f"t={t}", (label_w + j * (tile + 2) + 4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1,
                    cv2.LINE_AA)
    for c in range(len(CLASS_NAMES)):
        video, meta = chosen[c]
        y0 = header + c * (tile + bar_h + 4)
        cv2.putText(sheet, CLASS_NAMES[c], (6, y0 + tile // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                    cv2.LINE_AA)
        cv2.putText(sheet, f"int {meta.get('intensity', 0):.2f}", (6, y0 + tile // 2 + 18), cv2.FONT_HERSHEY_SIMPLEX,
                    0.35, (90, 90, 90), 1, cv2.LINE_AA)
        env = meta.get("envelope", [0.0] * T)
        for j, t in enumerate(cols):
            x0 = label_w + j * (tile + 2)
            frame = video[t] if tile == size else cv2.resize(video[t], (tile, tile), interpolation=cv2.INTER_NEAREST)
            sheet[y0:y0 + tile, x0:x0 + tile] = frame
            sheet[y0 + tile + 1:y0 + tile + 1 + bar_h, x0:x0 + int(round(env[t] * tile))] = (220, 60, 60)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cv2.imwrite(path, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return path


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m data_pipelines.synthetic")
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_pretrain", type=int, default=1400, help="unlabelled pretraining clips")
    p.add_argument("--train_per_class", type=int, default=60)
    p.add_argument("--val_per_class", type=int, default=20)
    p.add_argument("--test_per_class", type=int, default=30)
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--size", type=int, default=160, help="square frame side in pixels")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--clips_per_shard", type=int, default=128)
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--scenario", default="wild", choices=sorted(SCENARIOS),
                   help="recording conditions: wild (DFEW-like nuisance) or posed (lab: still, silent, plain)")
    p.add_argument("--contact_sheet", default=None, help="PNG path (default OUT/contact_sheet.png)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out (default: refuse)")
    a = p.parse_args(argv)
    if os.path.exists(os.path.join(a.out, "dataset_info.json")) and not a.overwrite:
        raise SystemExit(f"python -m data_pipelines.synthetic: error: --out {a.out!r} already holds a dataset; pass "
                         "--overwrite to replace it, or choose another --out")
    command = "python -m data_pipelines.synthetic " + " ".join(shlex.quote(x) for x in argv)
    info = build_dataset(a.out, seed=a.seed, num_pretrain=a.num_pretrain, train_per_class=a.train_per_class,
                         val_per_class=a.val_per_class, test_per_class=a.test_per_class, frames=a.frames,
                         size=a.size, workers=a.workers, clips_per_shard=a.clips_per_shard, quality=a.quality,
                         scenario=a.scenario, creation_command=command, progress=True)
    sheet = contact_sheet(a.out, a.contact_sheet or os.path.join(a.out, "contact_sheet.png"))
    ex = info["extra"]
    print(f"[synthetic] wrote {info['num_clips']} clips in {ex['generation_seconds']} s "
          f"({ex['clips_per_second']} clips/s, {a.workers} workers) to {a.out}; contact sheet {sheet}")
    return info


if __name__ == "__main__":
    main()
