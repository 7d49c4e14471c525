"""Per-clip transforms: one :class:`~data_pipelines.dataset_split.ClipItem` -> one example, as the reference's
datasets build them, with an explicit ``np.random.Generator``.

grain's ``random_map`` hands each element a generator derived from (seed, position in the global stream), so
an example depends on the seed and its position only, not on which worker or thread made it. The transforms
are module-level frozen dataclasses because they are pickled into the worker processes; each decodes only the
frames it samples (:func:`~data_pipelines.dataset_split.decode_frames`).

* :class:`PretrainExample` (PRETRAINING §1-2), :class:`FlattenRepeatedSamples` (its n clips per video -> rows);
* :class:`FinetuneTrainExample` (FINETUNING §3);
* :class:`EvalViewExample` (FINETUNING §4.2): one (clip, view) of the multi-view test protocol.

No JAX here: worker processes import this module.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipelines import records, transforms
from data_pipelines.dataset_split import ClipItem, ClipSource, DatasetSplit, clip_label, decode_frames
from data_pipelines.pipeline_options import ClipGeometry, EvalViews
from facemae_jax import masking


@dataclasses.dataclass(frozen=True)
class PretrainExample:
    """ClipItem -> {"video": uint8 [n, T, S, S, 3], "mask": bool [N]} (PRETRAINING §1-2).

    Temporal sampling (§1.1/§1.3) -> optional fixed top-centre crop (Q24) -> multi-scale crop (§1.2, same window
    for all n*T frames) -> one mask for the clip.
    """

    mask_generator: masking.MaskGenerator
    geometry: ClipGeometry
    num_samples: int
    fixed_crop_size: int | None  # None = off
    multiscale_crop: transforms.GroupMultiScaleCrop | None  # None = the reference's --no_augmentation

    def __call__(self, item: ClipItem, rng: np.random.Generator) -> dict[str, np.ndarray]:
        rec = item.record
        g = self.geometry
        indices = transforms.pretrain_frame_indices(
            rng, rec.num_frames, g.num_frames, g.sampling_rate, self.num_samples
        )  # [n, T]
        frames = decode_frames(item, indices)  # [n*T, H, W, 3]
        try:
            if self.fixed_crop_size is not None:
                box = transforms.top_centre_crop_box(rec.height, rec.width, self.fixed_crop_size)
                frames = transforms.crop_frames(frames, box)
            if self.multiscale_crop is not None:
                frames = self.multiscale_crop(frames, rng)
        except ValueError as e:  # frames too small for the configured crops
            raise records.RecordError(f"{item.where}: {e}") from e
        if frames.shape[1:3] != (g.image_size, g.image_size):
            raise records.RecordError(
                f"{item.where}: frames are {frames.shape[1]}x{frames.shape[2]} after cropping, expected "
                f"{g.image_size}x{g.image_size} (store frames at that size or enable the multi-scale crop)"
            )
        video = np.ascontiguousarray(frames).reshape(self.num_samples, g.num_frames, *frames.shape[1:])
        return {"video": video, "mask": self.mask_generator(rng)}


@dataclasses.dataclass(frozen=True, eq=False)
class FinetuneTrainExample:
    """ClipItem -> {"video": uint8 [T, S, S, 3], "label", "erase_box": int32 [4]} (FINETUNING §3, in order).

    Temporal window -> PIL bilinear resize to S x S -> RandAugment -> random resized crop -> flip -> erase box.
    """

    split: DatasetSplit
    geometry: ClipGeometry
    rand_augment: transforms.RandAugment | None  # None = off (and always None with device_augment)
    random_resized_crop: transforms.RandomResizedCrop | None  # None = off
    flip_probability: float
    erase_probability: float
    device_augment: bool  # RandAugment, crop and flip in the train step; only their boxes leave the host
    dct_downscale: bool  # frames stored >= 2x larger: reduced-scale JPEG decode before the resize

    def __call__(self, item: ClipItem, rng: np.random.Generator) -> dict[str, np.ndarray]:
        label = clip_label(item, self.split)
        size = self.geometry.image_size
        indices = transforms.finetune_train_frame_indices(
            rng, item.record.num_frames, self.geometry.num_frames, self.geometry.sampling_rate
        )
        frames = decode_frames(item, indices, size if self.dct_downscale else None)
        frames = transforms.resize_frames_pil(frames, size, size)
        if self.device_augment:
            box, flip = transforms.device_augment_boxes(rng, *frames.shape[1:3], self.random_resized_crop,
                                                        self.flip_probability)
            erase_box = transforms.random_erasing_box(rng, size, size, self.erase_probability)
            return {"video": np.ascontiguousarray(frames), "label": label, "crop_box": box, "flip": flip,
                    "erase_box": erase_box}
        if self.rand_augment is not None:
            frames = self.rand_augment(frames, rng)
        if self.random_resized_crop is not None:
            frames = self.random_resized_crop(frames, rng)
        frames = transforms.random_horizontal_flip(frames, rng, self.flip_probability)
        erase_box = transforms.random_erasing_box(rng, size, size, self.erase_probability)
        return {"video": np.ascontiguousarray(frames), "label": label, "erase_box": erase_box}


@dataclasses.dataclass(frozen=True, eq=False)
class EvalViewExample:
    """Element id -> one test view (FINETUNING §4.2); id = position * num_views + view, or -1 for padding."""

    source: ClipSource
    geometry: ClipGeometry
    views: EvalViews

    def _padding(self) -> dict[str, np.ndarray]:
        split = self.source.split
        label = np.zeros((split.num_targets,), np.float32) if split.task == "regression" else np.int32(0)
        g = self.geometry
        return {
            "video": np.zeros((g.num_frames, g.image_size, g.image_size, 3), np.uint8),
            "label": label,
            "clip_index": np.int32(-1),
            "view": np.int32(-1),
            "frame_indices": np.full((g.num_frames,), -1, np.int32),
            "valid": np.bool_(False),
        }

    def __call__(self, element_id: int) -> dict[str, np.ndarray]:
        element_id = int(element_id)
        if element_id < 0:
            return self._padding()
        g, v = self.geometry, self.views
        position, view = divmod(element_id, v.num_views)
        segment, crop = divmod(view, v.num_crops)
        item = self.source[position]
        indices = transforms.eval_frame_indices(
            item.record.num_frames, segment, v.num_segments, g.num_frames, g.sampling_rate
        )
        frames = decode_frames(item, indices, g.image_size if v.dct_downscale else None)
        frames = transforms.resize_frames_pil(frames, g.image_size, g.image_size)
        frames = transforms.eval_spatial_crop(frames, crop, v.num_crops, g.image_size)
        return {
            "video": np.ascontiguousarray(frames),
            "label": clip_label(item, self.source.split),
            "clip_index": np.int32(position),
            "view": np.int32(view),
            "frame_indices": indices.astype(np.int32),  # stored frames fed to this view (provenance, parity)
            "valid": np.bool_(True),
        }


@dataclasses.dataclass(frozen=True)
class FlattenRepeatedSamples:
    """Batch of n-sample clips -> n times as many rows: video [B, n, T, ...] -> [B*n, T, ...]; mask [B, N] ->
    [B*n, N] (row b*n + j is sample j of clip b and carries clip b's mask)."""

    num_samples: int

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        video = batch["video"]
        return {
            "video": video.reshape(video.shape[0] * video.shape[1], *video.shape[2:]),
            "mask": np.repeat(batch["mask"], self.num_samples, axis=0),
        }
