"""grain input pipelines: a dataset directory + split name -> batches of uint8 video for pretrain / finetune / eval.

Batches (numpy, host side; the train/eval steps put them on devices):

* pretrain: ``{"video": uint8 [B*n, T, S, S, 3], "mask": bool [B*n, N]}`` — ``n = num_samples`` repeated clips per
  video (PRETRAINING §1.3; the n clips of a video are consecutive rows and share one crop and one mask);
* finetune train: ``{"video": uint8 [B, T, S, S, 3], "label": int32 [B] (classification) or float32 [B, K]
  (regression), "erase_box": int32 [B, 4]}`` — erase box (top, left, height, width), zeros = no erasing;
* eval: ``{"video": uint8 [B, T, S, S, 3], "label": ..., "clip_index": int32 [B], "view": int32 [B],
  "frame_indices": int32 [B, T], "valid": bool [B]}`` — every (clip, view) of the split exactly once per process
  group; ``clip_index`` is the clip's position in the split (``Pipeline.record_indices[clip_index]`` is its global
  record index), ``view = segment * num_crops + crop``; ``frame_indices`` are the stored frames the view was made
  of; padding rows have ``valid = False``, ``clip_index = view = -1`` (and frame indices -1).

Why ``MapDataset`` (not ``grain.DataLoader`` or an ``IterDataset`` source): the split is random-access
(ArrayRecord), so the whole chain up to batching is index-based — ``source -> shuffle -> repeat -> random_map ->
batch -> [shard::count]`` — and only then converted with ``to_iter_dataset`` and ``mp_prefetch``. That gives:

* a global shuffle that changes every epoch (grain reseeds ``shuffle`` per epoch under ``repeat``), identical on
  all processes; of every global batch of P * B clips process p takes the p-th block of B (a DistributedSampler
  takes every P-th clip instead: the same clips per step, but then a global batch's row order, and with it mixup
  pairs, would depend on P);
* per-element random generators derived from (seed, position in the global stream), so batches depend on the
  seed only — **not** on ``worker_count``, the number of read threads, or where a job was resumed; they do depend
  on ``shard_count`` only through which process gets which rows;
* batching inside the workers (one shared-memory transfer per batch), and resumption by position: the iterator
  (:class:`ResumableIterator`) saves how far it got as a small JSON dict and restores by slicing the batch
  dataset, so a job can resume with another ``worker_count`` (grain's own multi-process state cannot: its layout
  depends on the worker count).
``DataLoader`` offers the same through samplers and operations but is grain's older API; the dataset API is where
new features land (see the flax gemma example in DESIGN.md).

Corrupt records raise :class:`~data_pipelines.records.RecordError` naming the shard file, the record's position in
it, its global index and the split; errors in worker processes surface in the training process.

The builders here take typed options (:mod:`data_pipelines.pipeline_options`: :class:`ClipGeometry`,
:class:`PretrainAugment`, :class:`FinetuneAugment`, :class:`EvalViews`, and a ready
:class:`~facemae_jax.masking.MaskGenerator`) and put together the parts that live in their own modules: the split
(:mod:`data_pipelines.dataset_split`), the per-clip transforms (:mod:`data_pipelines.clip_transforms`) and the
resumable iterator with the host loader options (:mod:`data_pipelines.resumable_iterator`). The names callers
need (options, :class:`LoaderOptions`, :class:`DatasetSplit`, :class:`ResumableIterator`) are importable from here.

No JAX here: worker processes import this module.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import grain
import numpy as np

from data_pipelines import transforms
from data_pipelines.clip_transforms import (
    EvalViewExample,
    FinetuneTrainExample,
    FlattenRepeatedSamples,
    PretrainExample,
)
from data_pipelines.dataset_split import ClipSource, DatasetSplit
from data_pipelines.pipeline_options import ClipGeometry, EvalViews, FinetuneAugment, PretrainAugment
from data_pipelines.resumable_iterator import LoaderOptions, ResumableIterator
from facemae_jax import masking

__all__ = [
    "ClipGeometry", "ClipSource", "DatasetSplit", "EvalViews", "FinetuneAugment", "LoaderOptions", "Pipeline",
    "PretrainAugment", "ResumableIterator", "eval_pipeline", "finetune_train_pipeline", "pretrain_pipeline",
    "training_clip_positions",
]  # fmt: skip


@dataclasses.dataclass
class Pipeline:
    """A configured input pipeline. ``iter(pipeline)`` -> :class:`ResumableIterator` (get_state / set_state).

    batches: the index-based grain dataset of this process's batches (infinite for training). batch_size: rows
    per batch on this process. steps_per_epoch: training steps per epoch (len(split) // clips per global step, as
    the reference's drop_last sampler). num_batches: finite pipelines (eval) only. record_indices: global record
    index of each split position (eval ``clip_index`` -> record).
    """

    batches: grain.MapDataset
    options: LoaderOptions
    identity: dict[str, Any]
    global_clips_per_batch: int | None
    batch_size: int
    steps_per_epoch: int | None
    num_batches: int | None
    record_indices: np.ndarray

    def __iter__(self) -> ResumableIterator:
        return ResumableIterator(self.batches, self.options, self.identity, self.global_clips_per_batch)


def _seeds(seed: int) -> tuple[int, int]:
    """Two independent 32-bit seeds (shuffle order, per-element augmentation) from the pipeline seed."""
    shuffle_seed, augment_seed = np.random.SeedSequence(seed).generate_state(2)
    return int(shuffle_seed), int(augment_seed)


def _training_pipeline(ds: grain.MapDataset, options: LoaderOptions, identity: dict[str, Any],
                       dataset_split: DatasetSplit, batch_size: int, rows_per_clip: int = 1) -> Pipeline:
    """An infinite training Pipeline: position counted in clips of the global stream, drop-last epochs."""
    return Pipeline(
        batches=ds,
        options=options,
        identity=identity,
        global_clips_per_batch=batch_size * options.shard_count,
        batch_size=batch_size * rows_per_clip,
        steps_per_epoch=len(dataset_split) // (batch_size * options.shard_count),
        num_batches=None,
        record_indices=dataset_split.record_indices,
    )


def _training_stream(
    split: DatasetSplit, transform: Any, batch_clips: int, seed: int, options: LoaderOptions
) -> grain.MapDataset:
    """shuffle (per epoch, global) -> repeat forever -> per-element random transform -> batches -> this shard.

    Process p's batch j is block p of global step j (global clips (j * P + p) * B .. + B - 1): every global batch is
    the rows of a 1-process batch in the same order, and batching before sharding reads only this shard's clips
    (MapDataset batches are index-based)."""
    if batch_clips <= 0:
        raise ValueError(f"batch size must be > 0, got {batch_clips}")
    shuffle_seed, augment_seed = _seeds(seed)
    ds = grain.MapDataset.source(ClipSource(split)).shuffle(seed=shuffle_seed).repeat()
    ds = ds.random_map(transform, seed=augment_seed)
    return _batch_and_shard(ds, batch_clips, options)


def _batch_and_shard(ds: grain.MapDataset, batch_clips: int, options: LoaderOptions) -> grain.MapDataset:
    return ds.batch(batch_clips, drop_remainder=True)[options.shard_index :: options.shard_count]


def training_clip_positions(num_clips: int, *, batch_size: int, seed: int,
                            options: LoaderOptions | None = None) -> grain.MapDataset:
    """Split positions of the clips in this process's training batches, without reading anything: batch j is an
    int64 array [batch_size] for batch j of the training pipeline with the same arguments (the same shuffle
    permutation, which depends on the seed and the split size only, then the same batching and sharding). For
    audits: which process read which clips (the trainer's ``log_clip_positions``)."""
    options = options or LoaderOptions()
    shuffle_seed, _ = _seeds(seed)
    ds = grain.MapDataset.range(num_clips).shuffle(seed=shuffle_seed).repeat()
    return _batch_and_shard(ds, batch_size, options)


def pretrain_pipeline(
    data_dir: str,
    split: str,
    *,
    batch_size: int,
    seed: int,
    geometry: ClipGeometry,
    mask: masking.MaskGenerator,
    augment: PretrainAugment,
    options: LoaderOptions | None = None,
) -> Pipeline:
    """Infinite pre-training batches {"video": uint8 [B*n, T, S, S, 3], "mask": bool [B*n, N]}.

    batch_size counts clips on this process; rows per batch = batch_size * augment.num_samples. ``mask``: the
    model's generator (``masking.MaskGenerator.for_model(cfg)``: 'tube_window' with the LGI band window for
    MAE-DFER, 'tube' for SVFAP); its token grid must cut ``geometry``'s clips into whole tubelets and patches.
    """
    options = options or LoaderOptions()
    geometry.check_token_grid(mask.grid)
    dataset_split = DatasetSplit.open(data_dir, split)
    size = geometry.image_size
    transform = PretrainExample(
        mask_generator=mask,
        geometry=geometry,
        num_samples=augment.num_samples,
        fixed_crop_size=augment.fixed_crop_size,
        multiscale_crop=(
            None
            if augment.multiscale_scales is None
            else transforms.GroupMultiScaleCrop(size, augment.multiscale_scales, resize=augment.multiscale_resize)
        ),
    )
    num_samples = augment.num_samples
    ds = _training_stream(dataset_split, transform, batch_size, seed, options)
    ds = ds.map(FlattenRepeatedSamples(num_samples))
    identity = {
        "kind": "pretrain", "split": split, "num_clips": len(dataset_split), "seed": seed,
        "num_frames": geometry.num_frames, "sampling_rate": geometry.sampling_rate, "image_size": size,
        "mask_kind": mask.kind, "num_samples": num_samples,
    }  # fmt: skip
    return _training_pipeline(ds, options, identity, dataset_split, batch_size, rows_per_clip=num_samples)


def finetune_train_pipeline(
    data_dir: str,
    split: str,
    *,
    batch_size: int,
    seed: int,
    geometry: ClipGeometry,
    augment: FinetuneAugment,
    options: LoaderOptions | None = None,
) -> Pipeline:
    """Infinite fine-tuning batches {"video": uint8 [B, T, S, S, 3], "label": int32 [B] | float32 [B, K],
    "erase_box": int32 [B, 4]} (FINETUNING §3), plus "crop_box" / "flip" with ``augment.rand_augment_on='device'``
    (see :class:`FinetuneAugment`)."""
    options = options or LoaderOptions()
    dataset_split = DatasetSplit.open(data_dir, split)
    if dataset_split.task == "unlabeled":
        raise ValueError(f"{data_dir}: split {split!r} is unlabeled (task 'unlabeled'); fine-tuning needs labels")
    size = geometry.image_size
    transform = FinetuneTrainExample(
        split=dataset_split,
        geometry=geometry,
        rand_augment=(
            None
            if augment.rand_augment is None or augment.on_device
            else transforms.RandAugment(augment.rand_augment, interpolation=augment.rand_augment_interpolation)
        ),
        random_resized_crop=(
            None
            if augment.crop_scale is None
            else transforms.RandomResizedCrop(size, scale=augment.crop_scale, ratio=augment.crop_ratio)
        ),
        flip_probability=augment.flip_probability,
        erase_probability=augment.erase_probability,
        device_augment=augment.on_device,
        dct_downscale=augment.dct_downscale,
    )
    ds = _training_stream(dataset_split, transform, batch_size, seed, options)
    identity = {
        "kind": "finetune_train", "split": split, "num_clips": len(dataset_split), "seed": seed,
        "num_frames": geometry.num_frames, "sampling_rate": geometry.sampling_rate, "image_size": size,
    }  # fmt: skip
    if augment.on_device:  # other batch contents; states saved by host-augmented runs keep their identity
        identity["augment_on"] = "device"
    return _training_pipeline(ds, options, identity, dataset_split, batch_size)


def eval_pipeline(
    data_dir: str,
    split: str,
    *,
    batch_size: int,
    geometry: ClipGeometry,
    views: EvalViews,
    options: LoaderOptions | None = None,
) -> Pipeline:
    """Finite multi-view test batches (FINETUNING §4.2); see the module docstring for the keys.

    The (clip, view) elements are enumerated clip-major, dealt round-robin to the ``shard_count`` processes, and
    every process's share is padded to the same number of full batches (so all processes step together and the
    last batch keeps its shape); padding rows have ``valid = False``. Over all processes every view of every clip
    appears exactly once.
    """
    options = options or LoaderOptions()
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    dataset_split = DatasetSplit.open(data_dir, split)
    if dataset_split.task == "unlabeled":
        raise ValueError(f"{data_dir}: split {split!r} is unlabeled (task 'unlabeled'); evaluation needs labels")
    num_elements = len(dataset_split) * views.num_views
    per_shard = math.ceil(num_elements / options.shard_count)
    num_batches = math.ceil(per_shard / batch_size)
    element_ids = np.arange(options.shard_index, num_elements, options.shard_count, dtype=np.int64)
    element_ids = np.concatenate([element_ids, np.full(num_batches * batch_size - len(element_ids), -1, np.int64)])
    transform = EvalViewExample(source=ClipSource(dataset_split), geometry=geometry, views=views)
    ds = grain.MapDataset.source(element_ids).map(transform).batch(batch_size, drop_remainder=True)
    identity = {
        "kind": "eval", "split": split, "num_clips": len(dataset_split), "num_frames": geometry.num_frames,
        "sampling_rate": geometry.sampling_rate, "image_size": geometry.image_size,
        "num_segments": views.num_segments, "num_crops": views.num_crops, "batch_size": batch_size,
        "shard_index": options.shard_index, "shard_count": options.shard_count,
    }  # fmt: skip
    return Pipeline(
        batches=ds,
        options=options,
        identity=identity,
        global_clips_per_batch=None,
        batch_size=batch_size,
        steps_per_epoch=None,
        num_batches=num_batches,
        record_indices=dataset_split.record_indices,
    )
