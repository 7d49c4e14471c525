"""Expression dynamics of the synthetic faces: what moves, when and how strongly (no pixels here).

Why a module of its own: the classes of the synthetic dataset are defined by *time courses* of facial action units
(FACS AUs), not by how they are drawn. This file holds the seven class prototypes (EMFACS combinations, e.g. happy =
AU6+12, surprise = AU1+2+5+26, fear = AU1+2+4+5+20+25), their onset -> apex -> offset timing, the recording
*scenarios* (how much nuisance surrounds an expression) and :func:`sample_dynamics`, which turns a class into
per-frame AU tracks with speech, blinks, gaze and idiosyncratic drift. ``synthetic_render`` draws these tracks;
``synthetic`` writes datasets of them. Expression timings are fractions of the clip length, speech and blinks run
in seconds at ``FPS``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

CLASS_NAMES = ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")  # DFEW order; index = label
FPS = 25.0

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
# Time courses: action units, talking, blinks, gaze
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
