"""What the pipeline builders are asked to produce: clip geometry, augmentation recipes and test views, as typed
values.

The builders (:mod:`data_pipelines.pipeline`) take these instead of long keyword lists, so a caller states each
setting once and a misspelt or missing one fails when the object is made, not deep inside a worker. The
training config (``configs/base.py``) is the one place that holds the defaults: every field the config also
holds is required here (a second default could drift from it); only settings the config does not expose keep
one (``rand_augment_interpolation``, ``crop_ratio``: the reference's values). "Off" is spelled ``None``.

No JAX here: worker processes unpickle these (the per-clip transforms hold a :class:`ClipGeometry`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

RAND_AUGMENT_PLACES = ("host", "device")


def _pair(value: Sequence[float], name: str) -> tuple[float, float]:
    pair = tuple(float(v) for v in value)
    if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {tuple(value)!r}")
    return pair  # type: ignore[return-value]


def _probability(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")


@dataclasses.dataclass(frozen=True)
class ClipGeometry:
    """The clips a model eats: ``num_frames`` frames taken every ``sampling_rate`` stored frames, ``image_size``
    pixels square. num_frames / image_size come from the model config, sampling_rate from ``config.data``."""

    num_frames: int
    sampling_rate: int
    image_size: int

    def __post_init__(self):
        if self.num_frames <= 0 or self.image_size <= 0 or self.sampling_rate <= 0:
            raise ValueError(
                f"num_frames {self.num_frames}, image_size {self.image_size} and sampling_rate "
                f"{self.sampling_rate} must be > 0"
            )

    def check_token_grid(self, grid: Sequence[int], what: str = "mask generator") -> None:
        """Raise unless ``grid`` (T', H', W') cuts these clips into whole tubelets and square patches."""
        t, h, w = (int(g) for g in grid)
        if self.num_frames % t or self.image_size % h or self.image_size % w or h != w:
            raise ValueError(
                f"the {what}'s token grid {tuple(grid)} does not match the clip geometry ({self.num_frames} "
                f"frames of {self.image_size}x{self.image_size} px): the frames / pixels do not split into "
                f"{t} tubelets x {h}x{w} square patches; build the mask for this geometry "
                "(masking.MaskGenerator.for_model(cfg) with the model config the clips are made for)"
            )


@dataclasses.dataclass(frozen=True)
class PretrainAugment:
    """Pre-training augmentation (PRETRAINING §1), ``config.data``'s keys of the same names.

    num_samples: clips drawn per video per step (§1.3; they share one crop and one mask). fixed_crop_size: the
    reference's top-centre VoxCeleb2 crop (160 for 224 x 224 frames, QUIRKS Q24), None = off. multiscale_scales:
    the multi-scale crop's scales, None = off (the reference's ``--no_augmentation``; frames must then already be
    image_size square). multiscale_resize: 'fast' (~10x faster than PIL, mean difference ~0.2 grey levels), 'cv2'
    or the faithful 'pil' (:class:`~data_pipelines.transforms.GroupMultiScaleCrop`).
    """

    num_samples: int
    fixed_crop_size: int | None
    multiscale_scales: tuple[float, ...] | None
    multiscale_resize: str

    def __post_init__(self):
        if self.num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {self.num_samples}")
        if self.fixed_crop_size is not None and self.fixed_crop_size <= 0:
            raise ValueError(f"fixed_crop_size must be > 0 or None (off), got {self.fixed_crop_size}")
        if self.multiscale_scales is not None:
            scales = tuple(float(s) for s in self.multiscale_scales)
            if not scales:
                raise ValueError("multiscale_scales is empty; None switches the multi-scale crop off")
            object.__setattr__(self, "multiscale_scales", scales)


@dataclasses.dataclass(frozen=True)
class FinetuneAugment:
    """Fine-tuning augmentation (FINETUNING §3, in order), ``config.data``'s keys of the same names
    (``dct_downscale`` = ``jpeg_dct_downscale``).

    rand_augment: a timm RandAugment spec ('rand-m7-n4-mstd0.5-inc1' published), None = off. crop_scale: the
    random resized crop's area range ((0.08, 1) published; (0.8, 1) is the face-friendly option of QUIRKS Q23),
    None = off. rand_augment_on: 'host' (PIL, faithful) or 'device' (batches then carry the frames before
    RandAugment plus "crop_box" int32 [B, 4] and "flip" bool [B]; RandAugment, crop and flip run in the train
    step, ``augment.device_video_augment``). dct_downscale: frames stored at >= 2x the image size are decoded at a
    reduced JPEG scale before the resize (~3x cheaper for 320 -> 160 px, ~1.2 grey levels mean difference);
    False = always decode at full size (the reference).
    """

    rand_augment: str | None
    crop_scale: tuple[float, float] | None
    flip_probability: float
    erase_probability: float
    rand_augment_on: str
    dct_downscale: bool
    rand_augment_interpolation: str = "bicubic"
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self):
        if self.rand_augment_on not in RAND_AUGMENT_PLACES:
            raise ValueError(f"rand_augment_on must be 'host' or 'device', got {self.rand_augment_on!r}")
        if self.rand_augment is not None and not self.rand_augment:
            raise ValueError("rand_augment is empty; None switches RandAugment off")
        if self.crop_scale is not None:
            object.__setattr__(self, "crop_scale", _pair(self.crop_scale, "crop_scale"))
        object.__setattr__(self, "crop_ratio", _pair(self.crop_ratio, "crop_ratio"))
        _probability(self.flip_probability, "flip_probability")
        _probability(self.erase_probability, "erase_probability")

    @property
    def on_device(self) -> bool:
        return self.rand_augment_on == "device"


@dataclasses.dataclass(frozen=True)
class EvalViews:
    """The multi-view test protocol (FINETUNING §4.2): ``num_segments`` temporal x ``num_crops`` spatial views per
    clip (``config.eval``); dct_downscale as in :class:`FinetuneAugment` (``config.data.jpeg_dct_downscale``)."""

    num_segments: int
    num_crops: int
    dct_downscale: bool

    def __post_init__(self):
        if self.num_segments <= 0 or self.num_crops <= 0:
            raise ValueError(f"num_segments {self.num_segments} and num_crops {self.num_crops} must be > 0")

    @property
    def num_views(self) -> int:
        return self.num_segments * self.num_crops
