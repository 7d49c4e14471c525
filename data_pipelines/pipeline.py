"""grain input pipelines: a dataset directory + split name -> batches of uint8 video for pretrain / finetune / eval.

Batches (numpy, host side; the train/eval steps put them on devices):

* pretrain: ``{"video": uint8 [B*n, T, S, S, 3], "mask": bool [B*n, N]}`` — ``n = num_samples`` repeated clips per
  video (PRETRAINING §1.3; the n clips of a video are consecutive rows and share one crop and one mask);
* finetune train: ``{"video": uint8 [B, T, S, S, 3], "label": int32 [B] (classification) or float32 [B, K]
  (regression), "erase_box": int32 [B, 4]}`` — erase box (top, left, height, width), zeros = no erasing;
* eval: ``{"video": uint8 [B, T, S, S, 3], "label": ..., "clip_index": int32 [B], "view": int32 [B],
  "frame_indices": int32 [B, T], "valid": bool [B]}`` — every (clip, view) of the split exactly once per process
  group; ``clip_index`` is the clip's position in the split (``Pipeline.record_indices[clip_index]`` is its global record index),
  ``view = segment * num_crops + crop``; ``frame_indices`` are the stored frames the view was made of; padding rows
  have ``valid = False``, ``clip_index = view = -1`` (and frame indices -1).

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
it, its global index and the split; errors in worker processes surface in the training process. Skipping was
rejected: a silently shrinking dataset changes epochs and metrics (QUIRKS Q21 asks to fail loudly).

No JAX here: worker processes import this module.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import grain
import numpy as np

from data_pipelines import integrity, records, transforms
from facemae_jax import masking

DATASET_FORMAT = "facemae_dataset"
DATASET_VERSION = 1
TASKS = ("classification", "regression", "unlabeled")


# ---------------------------------------------------------------------------------------------------------------
# Dataset directory and split
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetSplit:
    """A validated split of a dataset directory: which global records it holds and where they live."""

    directory: str
    split: str
    task: str
    record_indices: np.ndarray  # int64 [num_clips_in_split], global record indices in split order
    shard_paths: tuple[str, ...]
    shard_starts: np.ndarray  # int64 [num_shards + 1]: first global index of each shard, then the total
    num_classes: int | None  # classification
    num_targets: int | None  # regression
    contract: integrity.SplitContract | None = None  # what each record must say about its split (None: unchecked)

    @classmethod
    def open(cls, directory: str, split: str) -> "DatasetSplit":
        info = records.load_dataset_info(directory)
        where = os.path.join(directory, "dataset_info.json")
        if info.get("format") != DATASET_FORMAT or info.get("version") != DATASET_VERSION:
            raise ValueError(
                f"{where}: format {info.get('format')!r} version {info.get('version')!r}, expected "
                f"{DATASET_FORMAT!r} version {DATASET_VERSION}"
            )
        for key in ("shards", "splits", "num_clips", "task"):
            if key not in info:
                raise ValueError(f"{where}: missing key {key!r}")
        task = info["task"]
        if task not in TASKS:
            raise ValueError(f"{where}: task {task!r} is not one of {TASKS}")
        if split not in info["splits"]:
            raise KeyError(f"{where}: no split {split!r}; the dataset has {sorted(info['splits'])}")
        paths = tuple(os.path.join(directory, name) for name in info["shards"])
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(
                f"{where} lists shards that do not exist: {missing[:3]}{' ...' if len(missing) > 3 else ''}"
            )
        sizes = integrity.shard_sizes(paths, directory, info)
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if int(starts[-1]) != int(info["num_clips"]):
            raise ValueError(f"{where}: num_clips is {info['num_clips']} but the shards hold {int(starts[-1])} records")
        if task == "classification" and not info.get("class_names"):
            raise ValueError(f"{where}: a classification dataset needs 'class_names'")
        if task == "regression" and not info.get("target_names"):
            raise ValueError(f"{where}: a regression dataset needs 'target_names'")
        indices = np.asarray(info["splits"][split], dtype=np.int64).reshape(-1)
        if len(indices) == 0:
            raise ValueError(f"{where}: split {split!r} is empty")
        bad = indices[(indices < 0) | (indices >= starts[-1])]
        if len(bad):
            raise ValueError(
                f"{where}: split {split!r} has record indices outside [0, {int(starts[-1])}): {bad[:5].tolist()}"
            )
        integrity.check_no_train_test_overlap(split, info["splits"], where)
        opened = cls(
            directory=directory,
            split=split,
            task=task,
            record_indices=indices,
            shard_paths=paths,
            shard_starts=starts,
            num_classes=len(info["class_names"]) if task == "classification" else None,
            num_targets=len(info["target_names"]) if task == "regression" else None,
            contract=integrity.SplitContract.for_split(split, info["splits"], integrity.rebuild_hint(directory, info)),
        )
        ClipSource(opened).check_sample()  # a split that disagrees with its records fails now, before any step
        return opened

    def __len__(self) -> int:
        return len(self.record_indices)

    def describe(self, position: int) -> str:
        """'train-00001-of-00004.array_record record 17 (global record 1041, split 'train' position 3, /data/x)'."""
        record_index = int(self.record_indices[position])
        shard = int(np.searchsorted(self.shard_starts, record_index, side="right")) - 1
        local = record_index - int(self.shard_starts[shard])
        return (
            f"{os.path.basename(self.shard_paths[shard])} record {local} (global record {record_index}, "
            f"split {self.split!r} position {position}, {self.directory})"
        )


@dataclasses.dataclass(frozen=True)
class ClipItem:
    position: int  # position in the split
    record: records.ClipRecord
    where: str  # human-readable location for error messages


class ClipSource:
    """grain random-access source over one split: position -> :class:`ClipItem` (record decoded, frames not).

    The ArrayRecord readers open lazily in each process (the object is pickled into the workers).
    """

    def __init__(self, split: DatasetSplit):
        self.split = split
        self._source = None

    def __getstate__(self) -> dict[str, Any]:
        return {"split": self.split, "_source": None}

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, position: int) -> ClipItem:
        position = int(position)
        where = self.split.describe(position)
        if self._source is None:
            self._source = grain.sources.ArrayRecordDataSource(list(self.split.shard_paths))
        try:
            data = self._source[int(self.split.record_indices[position])]
        except Exception as e:  # array_record raises several types for damaged chunks
            raise records.RecordError(f"{where}: cannot read the record ({type(e).__name__}: {e})") from e
        record = records.decode_clip(data, where=where)
        if self.split.contract is not None:
            self.split.contract.check(record, int(self.split.record_indices[position]), where)
        if record.num_frames == 0:
            raise records.RecordError(f"{where}: clip {record.clip_id!r} has no frames")
        return ClipItem(position=position, record=record, where=where)

    def check_sample(self) -> None:
        """Read (and so check) a sample of the split's records: its first in every shard, plus evenly spread."""
        for position in integrity.sample_positions(self.split.record_indices, self.split.shard_starts):
            self[int(position)]
        self._source = None  # readers reopen lazily in each process


def _decode(item: ClipItem, indices: np.ndarray, resize_to: int | None = None) -> np.ndarray:
    """Decode only the frames at ``indices`` -> uint8 [len(indices), H, W, 3]; ``resize_to``: the frames will be
    resized to that square size next, so a larger stored JPEG may be decoded at a reduced DCT scale."""
    try:
        return records.decode_frames(item.record, indices.reshape(-1), min_size=resize_to)
    except records.RecordError as e:
        raise records.RecordError(f"{item.where}: {e}") from e


def _label(item: ClipItem, split: DatasetSplit) -> np.ndarray:
    """The record's label as int32 [] (classification) or float32 [K] (regression), validated."""
    label = item.record.label
    if split.task == "classification":
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise records.RecordError(f"{item.where}: classification label must be an int, got {label!r}")
        if not 0 <= label < split.num_classes:
            raise records.RecordError(f"{item.where}: label {label} is outside [0, {split.num_classes})")
        return np.int32(label)
    if split.task == "regression":
        if not isinstance(label, (list, tuple)):
            raise records.RecordError(f"{item.where}: regression label must be a list of floats, got {label!r}")
        target = np.asarray(label, np.float32)
        if target.shape != (split.num_targets,):
            raise records.RecordError(
                f"{item.where}: regression label has {target.size} values, expected {split.num_targets}"
            )
        return target
    raise ValueError(f"split {split.split!r} of {split.directory} is unlabeled; it cannot feed a supervised pipeline")


# ---------------------------------------------------------------------------------------------------------------
# Per-element transforms (module level and picklable: they run in the worker processes)
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PretrainExample:
    """ClipItem -> {"video": uint8 [n, T, S, S, 3], "mask": bool [N]} (PRETRAINING §1-2).

    Temporal sampling (§1.1/§1.3) -> optional fixed top-centre crop (Q24) -> multi-scale crop (§1.2, same window
    for all n*T frames) -> one mask for the clip.
    """

    mask_generator: masking.MaskGenerator
    num_frames: int = 16
    sampling_rate: int = 4
    image_size: int = 160
    num_samples: int = 1
    fixed_crop_size: int | None = None
    multiscale_crop: transforms.GroupMultiScaleCrop | None = None  # None = the reference's --no_augmentation

    def __call__(self, item: ClipItem, rng: np.random.Generator) -> dict[str, np.ndarray]:
        rec = item.record
        indices = transforms.pretrain_frame_indices(
            rng, rec.num_frames, self.num_frames, self.sampling_rate, self.num_samples
        )  # [n, T]
        frames = _decode(item, indices)  # [n*T, H, W, 3]
        try:
            if self.fixed_crop_size is not None:
                box = transforms.top_centre_crop_box(rec.height, rec.width, self.fixed_crop_size)
                frames = transforms.crop_frames(frames, box)
            if self.multiscale_crop is not None:
                frames = self.multiscale_crop(frames, rng)
        except ValueError as e:  # frames too small for the configured crops
            raise records.RecordError(f"{item.where}: {e}") from e
        if frames.shape[1:3] != (self.image_size, self.image_size):
            raise records.RecordError(
                f"{item.where}: frames are {frames.shape[1]}x{frames.shape[2]} after cropping, expected "
                f"{self.image_size}x{self.image_size} (store frames at that size or enable the multi-scale crop)"
            )
        video = np.ascontiguousarray(frames).reshape(self.num_samples, self.num_frames, *frames.shape[1:])
        return {"video": video, "mask": self.mask_generator(rng)}


@dataclasses.dataclass(frozen=True, eq=False)
class FinetuneTrainExample:
    """ClipItem -> {"video": uint8 [T, S, S, 3], "label", "erase_box": int32 [4]} (FINETUNING §3, in order).

    Temporal window -> PIL bilinear resize to S x S -> RandAugment -> random resized crop -> flip -> erase box.
    """

    split: DatasetSplit
    num_frames: int = 16
    sampling_rate: int = 4
    image_size: int = 160
    rand_augment: transforms.RandAugment | None = None
    random_resized_crop: transforms.RandomResizedCrop | None = None
    flip_probability: float = 0.5
    erase_probability: float = 0.25
    device_augment: bool = False  # RandAugment, crop and flip in the train step; only their boxes leave the host
    dct_downscale: bool = True  # frames stored >= 2x larger: reduced-scale JPEG decode before the resize

    def __call__(self, item: ClipItem, rng: np.random.Generator) -> dict[str, np.ndarray]:
        label = _label(item, self.split)
        indices = transforms.finetune_train_frame_indices(
            rng, item.record.num_frames, self.num_frames, self.sampling_rate
        )
        frames = _decode(item, indices, self.image_size if self.dct_downscale else None)
        frames = transforms.resize_frames_pil(frames, self.image_size, self.image_size)
        if self.device_augment:
            box, flip = transforms.device_augment_boxes(rng, *frames.shape[1:3], self.random_resized_crop,
                                                        self.flip_probability)
            erase_box = transforms.random_erasing_box(rng, self.image_size, self.image_size, self.erase_probability)
            return {"video": np.ascontiguousarray(frames), "label": label, "crop_box": box, "flip": flip,
                    "erase_box": erase_box}
        if self.rand_augment is not None:
            frames = self.rand_augment(frames, rng)
        if self.random_resized_crop is not None:
            frames = self.random_resized_crop(frames, rng)
        frames = transforms.random_horizontal_flip(frames, rng, self.flip_probability)
        erase_box = transforms.random_erasing_box(rng, self.image_size, self.image_size, self.erase_probability)
        return {"video": np.ascontiguousarray(frames), "label": label, "erase_box": erase_box}


@dataclasses.dataclass(frozen=True, eq=False)
class EvalViewExample:
    """Element id -> one test view (FINETUNING §4.2); id = position * num_views + view, or -1 for padding."""

    source: ClipSource
    num_frames: int = 16
    sampling_rate: int = 4
    image_size: int = 160
    num_segments: int = 2
    num_crops: int = 2
    dct_downscale: bool = True

    def _padding(self) -> dict[str, np.ndarray]:
        split = self.source.split
        label = np.zeros((split.num_targets,), np.float32) if split.task == "regression" else np.int32(0)
        return {
            "video": np.zeros((self.num_frames, self.image_size, self.image_size, 3), np.uint8),
            "label": label,
            "clip_index": np.int32(-1),
            "view": np.int32(-1),
            "frame_indices": np.full((self.num_frames,), -1, np.int32),
            "valid": np.bool_(False),
        }

    def __call__(self, element_id: int) -> dict[str, np.ndarray]:
        element_id = int(element_id)
        if element_id < 0:
            return self._padding()
        position, view = divmod(element_id, self.num_segments * self.num_crops)
        segment, crop = divmod(view, self.num_crops)
        item = self.source[position]
        indices = transforms.eval_frame_indices(
            item.record.num_frames, segment, self.num_segments, self.num_frames, self.sampling_rate
        )
        frames = _decode(item, indices, self.image_size if self.dct_downscale else None)
        frames = transforms.resize_frames_pil(frames, self.image_size, self.image_size)
        frames = transforms.eval_spatial_crop(frames, crop, self.num_crops, self.image_size)
        return {
            "video": np.ascontiguousarray(frames),
            "label": _label(item, self.source.split),
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


def _worker_init(worker_index: int, worker_count: int) -> None:
    """Keep any accidental JAX import in a worker off the accelerator (workers spawn a fresh interpreter)."""
    del worker_index, worker_count
    os.environ["JAX_PLATFORMS"] = "cpu"


# ---------------------------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
    """How batches are produced on this host. None of these change the batch contents.

    shard_index / shard_count: this process's share (e.g. ``jax.process_index()`` / ``jax.process_count()``,
    supplied by the caller). worker_count: grain worker processes (0 = the calling process, in background
    threads). read_threads: threads per process computing batches; prefetch_batches: batches buffered per process.
    """

    shard_index: int = 0
    shard_count: int = 1
    worker_count: int = 0
    read_threads: int = 1
    prefetch_batches: int = 2
    worker_buffer_size: int = 1

    def __post_init__(self):
        if self.shard_count <= 0 or not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"shard_index {self.shard_index} must be in [0, shard_count={self.shard_count})")
        if self.worker_count < 0 or self.read_threads < 0 or self.prefetch_batches < 0:
            raise ValueError(f"worker_count, read_threads and prefetch_batches must be >= 0: {self}")


class ResumableIterator(grain.DatasetIterator):
    """Iterator over a pipeline's batches whose state is a position, not grain's internal worker bookkeeping.

    get_state() -> ``{"pipeline": {...identity...}, "batches": k, "global_clips": k * clips per global step}``
    (JSON). set_state() rebuilds the grain iterator from batch k (``batches[k:]`` of the index-based dataset), so
    a restored job continues with identical batches for **any** worker_count / read_threads. Training pipelines
    can even resume with a different number of processes or batch size: the state counts clips consumed from the
    one global stream, and process p's batch j is always block p of global batch j (when the new clips per global step
    divide the count). The identity (kind, split, split size, seed, geometry) must match, otherwise set_state
    raises: restoring a position into a different pipeline would silently train on other data.

    It subclasses grain's DatasetIterator, so orbax's grain checkpoint handler saves and restores it as JSON.
    Worker processes start on the first ``next()`` (or ``start_prefetch()``), after a possible ``set_state``.
    """

    def __init__(
        self,
        batches: grain.MapDataset,
        options: "LoaderOptions",
        identity: dict[str, Any],
        global_clips_per_batch: int | None,
    ):
        super().__init__()
        self._batches = batches
        self._options = options
        self._identity = identity
        self._global_clips_per_batch = global_clips_per_batch  # None: position tied to batch size and sharding
        self._position = 0
        self._inner: grain.DatasetIterator | None = None

    def _started(self) -> grain.DatasetIterator:
        if self._inner is None:
            self._inner = iter(_finish(self._batches[self._position :], self._options))
        return self._inner

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        batch = next(self._started())
        self._position += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"pipeline": dict(self._identity), "batches": self._position}
        if self._global_clips_per_batch is not None:
            state["global_clips"] = self._position * self._global_clips_per_batch
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("pipeline", {})
        keys = list(self._identity) + [k for k in saved if k not in self._identity]  # also keys only the save has
        differences = {k: (saved.get(k), self._identity.get(k)) for k in keys if saved.get(k) != self._identity.get(k)}
        if differences:
            listed = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differences.items())
            raise ValueError(f"iterator state belongs to a different pipeline ({listed})")
        if self._global_clips_per_batch is not None:
            clips = int(state["global_clips"])
            if clips % self._global_clips_per_batch:
                raise ValueError(
                    f"iterator state is at global clip {clips}, which is not a whole number of steps of "
                    f"{self._global_clips_per_batch} clips (batch size x process count); resume with a batch "
                    "size / process count whose product divides it"
                )
            position = clips // self._global_clips_per_batch
        else:
            position = int(state["batches"])
        if self._inner is not None:
            self._inner.close()
            self._inner = None
        self._position = position

    def start_prefetch(self) -> None:
        self._started().start_prefetch()

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None
        super().close()

    def __str__(self) -> str:
        return f"ResumableIterator({self._identity.get('kind')}, batch {self._position})"


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


def _check_geometry(num_frames: int, image_size: int, sampling_rate: int) -> None:
    if num_frames <= 0 or image_size <= 0 or sampling_rate <= 0:
        raise ValueError(
            f"num_frames {num_frames}, image_size {image_size} and sampling_rate {sampling_rate} must be > 0"
        )


def _seeds(seed: int) -> tuple[int, int]:
    """Two independent 32-bit seeds (shuffle order, per-element augmentation) from the pipeline seed."""
    shuffle_seed, augment_seed = np.random.SeedSequence(seed).generate_state(2)
    return int(shuffle_seed), int(augment_seed)


def _finish(ds: grain.MapDataset, options: LoaderOptions) -> grain.IterDataset:
    """MapDataset of batches -> IterDataset with background threads and (optionally) worker processes."""
    if options.worker_count > 0:
        from absl import flags  # grain's workers read absl flags; an unparsed FLAGS object makes them fail

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    iter_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=options.read_threads, prefetch_buffer_size=options.prefetch_batches)
    )
    if options.worker_count > 0:
        iter_ds = iter_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=options.worker_count, per_worker_buffer_size=options.worker_buffer_size
            ),
            worker_init_fn=_worker_init,
        )
    return iter_ds


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
    split: str = "pretrain",
    *,
    batch_size: int,
    seed: int,
    num_frames: int = 16,
    sampling_rate: int = 4,
    image_size: int = 160,
    patch_size: int = 16,
    tubelet_size: int = 2,
    mask_kind: str = "tube_window",
    mask_ratio: float = 0.9,
    mask_window: Sequence[int] | None = (5, 10),
    mask_symmetry: str | None = None,
    num_samples: int = 1,
    fixed_crop_size: int | None = None,
    multiscale_scales: Sequence[float] | None = (1.0, 0.875, 0.75, 0.66),
    multiscale_resize: str = "fast",
    options: LoaderOptions | None = None,
) -> Pipeline:
    """Infinite pre-training batches {"video": uint8 [B*n, T, S, S, 3], "mask": bool [B*n, N]}.

    batch_size counts clips on this process; rows per batch = batch_size * num_samples. Mask grid =
    (T / tubelet_size, S / patch_size, S / patch_size). ``mask_window`` is used by 'tube_window' only (the
    published MAE-DFER setting is (5, 10); SVFAP uses mask_kind='tube'). ``fixed_crop_size``: the reference's
    top-centre VoxCeleb2 crop (160 for 224x224 VoxCeleb2 frames; QUIRKS Q24). ``multiscale_scales=None`` turns
    the multi-scale crop off (the reference's ``--no_augmentation``); frames must then already be S x S.
    ``multiscale_resize``: 'fast' (default; ~10x faster than PIL, mean difference ~0.2 grey levels), 'cv2' or the
    faithful 'pil'
    (see :class:`~data_pipelines.transforms.GroupMultiScaleCrop`).
    """
    options = options or LoaderOptions()
    _check_geometry(num_frames, image_size, sampling_rate)
    if num_frames % tubelet_size or image_size % patch_size:
        raise ValueError(
            f"{num_frames} frames / {image_size} px do not split into tubelets of {tubelet_size} "
            f"x patches of {patch_size}"
        )
    grid = (num_frames // tubelet_size, image_size // patch_size, image_size // patch_size)
    mask_args: dict[str, Any] = {"grid": grid, "mask_ratio": mask_ratio}
    if mask_kind == "tube_window":
        mask_args.update(window=mask_window, symmetry=mask_symmetry)
    generator = masking.make_mask_generator(mask_kind, **mask_args)
    dataset_split = DatasetSplit.open(data_dir, split)
    transform = PretrainExample(
        mask_generator=generator,
        num_frames=num_frames,
        sampling_rate=sampling_rate,
        image_size=image_size,
        num_samples=num_samples,
        fixed_crop_size=fixed_crop_size,
        multiscale_crop=(
            None
            if multiscale_scales is None
            else transforms.GroupMultiScaleCrop(image_size, tuple(multiscale_scales), resize=multiscale_resize)
        ),
    )
    ds = _training_stream(dataset_split, transform, batch_size, seed, options).map(FlattenRepeatedSamples(num_samples))
    identity = {
        "kind": "pretrain", "split": split, "num_clips": len(dataset_split), "seed": seed, "num_frames": num_frames,
        "sampling_rate": sampling_rate, "image_size": image_size, "mask_kind": mask_kind, "num_samples": num_samples,
    }  # fmt: skip
    return _training_pipeline(ds, options, identity, dataset_split, batch_size, rows_per_clip=num_samples)


def finetune_train_pipeline(
    data_dir: str,
    split: str = "train",
    *,
    batch_size: int,
    seed: int,
    num_frames: int = 16,
    sampling_rate: int = 4,
    image_size: int = 160,
    rand_augment: str | None = "rand-m7-n4-mstd0.5-inc1",
    rand_augment_interpolation: str = "bicubic",
    crop_scale: tuple[float, float] | None = (0.08, 1.0),
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_probability: float = 0.5,
    erase_probability: float = 0.25,
    rand_augment_on: str = "host",
    dct_downscale: bool = True,
    options: LoaderOptions | None = None,
) -> Pipeline:
    """Infinite fine-tuning batches {"video": uint8 [B, T, S, S, 3], "label": int32 [B] | float32 [B, K],
    "erase_box": int32 [B, 4]} (FINETUNING §3). Defaults are the published recipe; ``crop_scale=(0.8, 1)`` is the
    face-friendly option of QUIRKS Q23, ``crop_scale=None`` / ``rand_augment=None`` switch those steps off.
    ``rand_augment_on='device'``: batches carry the frames after step 3 plus "crop_box" int32 [B, 4] and "flip"
    bool [B]; RandAugment, crop and flip run in the train step (``augment.device_video_augment``).
    ``dct_downscale``: frames stored at >= 2x the image size are decoded at a reduced JPEG scale before the PIL
    resize (~3x cheaper for 320 -> 160 px, mean difference to full decode + resize ~1.2 grey levels); False =
    always decode at full size (the reference).
    """
    if rand_augment_on not in ("host", "device"):
        raise ValueError(f"rand_augment_on must be 'host' or 'device', got {rand_augment_on!r}")
    on_device = rand_augment_on == "device"
    options = options or LoaderOptions()
    _check_geometry(num_frames, image_size, sampling_rate)
    dataset_split = DatasetSplit.open(data_dir, split)
    if dataset_split.task == "unlabeled":
        raise ValueError(f"{data_dir}: split {split!r} is unlabeled (task 'unlabeled'); fine-tuning needs labels")
    transform = FinetuneTrainExample(
        split=dataset_split,
        num_frames=num_frames,
        sampling_rate=sampling_rate,
        image_size=image_size,
        rand_augment=(
            None
            if rand_augment is None or on_device
            else transforms.RandAugment(rand_augment, interpolation=rand_augment_interpolation)
        ),
        random_resized_crop=(
            None
            if crop_scale is None
            else transforms.RandomResizedCrop(image_size, scale=tuple(crop_scale), ratio=tuple(crop_ratio))
        ),
        flip_probability=flip_probability,
        erase_probability=erase_probability,
        device_augment=on_device,
        dct_downscale=dct_downscale,
    )
    ds = _training_stream(dataset_split, transform, batch_size, seed, options)
    identity = {
        "kind": "finetune_train", "split": split, "num_clips": len(dataset_split), "seed": seed,
        "num_frames": num_frames, "sampling_rate": sampling_rate, "image_size": image_size,
    }  # fmt: skip
    if on_device:  # other batch contents; states saved by host-augmented runs keep their identity
        identity["augment_on"] = "device"
    return _training_pipeline(ds, options, identity, dataset_split, batch_size)


def eval_pipeline(
    data_dir: str,
    split: str = "test",
    *,
    batch_size: int,
    num_frames: int = 16,
    sampling_rate: int = 4,
    image_size: int = 160,
    num_segments: int = 2,
    num_crops: int = 2,
    dct_downscale: bool = True,
    options: LoaderOptions | None = None,
) -> Pipeline:
    """Finite multi-view test batches (FINETUNING §4.2); see the module docstring for the keys.

    The (clip, view) elements are enumerated clip-major, dealt round-robin to the ``shard_count`` processes, and
    every process's share is padded to the same number of full batches (so all processes step together and the
    last batch keeps its shape); padding rows have ``valid = False``. Over all processes every view of every clip
    appears exactly once.
    """
    options = options or LoaderOptions()
    _check_geometry(num_frames, image_size, sampling_rate)
    if num_segments <= 0 or num_crops <= 0 or batch_size <= 0:
        raise ValueError(f"num_segments {num_segments}, num_crops {num_crops}, batch_size {batch_size} must be > 0")
    dataset_split = DatasetSplit.open(data_dir, split)
    if dataset_split.task == "unlabeled":
        raise ValueError(f"{data_dir}: split {split!r} is unlabeled (task 'unlabeled'); evaluation needs labels")
    num_elements = len(dataset_split) * num_segments * num_crops
    per_shard = math.ceil(num_elements / options.shard_count)
    num_batches = math.ceil(per_shard / batch_size)
    element_ids = np.arange(options.shard_index, num_elements, options.shard_count, dtype=np.int64)
    element_ids = np.concatenate([element_ids, np.full(num_batches * batch_size - len(element_ids), -1, np.int64)])
    transform = EvalViewExample(
        source=ClipSource(dataset_split),
        num_frames=num_frames,
        sampling_rate=sampling_rate,
        image_size=image_size,
        num_segments=num_segments,
        num_crops=num_crops,
        dct_downscale=dct_downscale,
    )
    ds = grain.MapDataset.source(element_ids).map(transform).batch(batch_size, drop_remainder=True)
    identity = {
        "kind": "eval", "split": split, "num_clips": len(dataset_split), "num_frames": num_frames,
        "sampling_rate": sampling_rate, "image_size": image_size, "num_segments": num_segments,
        "num_crops": num_crops, "batch_size": batch_size, "shard_index": options.shard_index,
        "shard_count": options.shard_count,
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
