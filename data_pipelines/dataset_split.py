"""A dataset directory's split as grain reads it: which records it holds, where they live, and one record decoded.

:class:`DatasetSplit` validates ``dataset_info.json`` against the shards once, when a pipeline is built (missing
shards, wrong counts, indices out of range, train/test overlap, a sample of records against the split's
contract), so a bad directory fails before the first step, naming the file. :class:`ClipSource` is the grain
random-access source over it (split position -> :class:`ClipItem`, frames still encoded); :func:`decode_frames`
and :func:`clip_label` are the two things every per-clip transform asks of an item, with errors that name the
record (:meth:`DatasetSplit.describe`).

Corrupt records raise :class:`~data_pipelines.records.RecordError` naming the shard file, the record's position in
it, its global index and the split. Skipping was rejected: a silently shrinking dataset changes epochs and metrics
(QUIRKS Q21 asks to fail loudly).

No JAX here: worker processes import this module.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
import numpy as np

from data_pipelines import dataset_info, integrity, records

DATASET_FORMAT = "facemae_dataset"
DATASET_VERSION = 1
TASKS = ("classification", "regression", "unlabeled")


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
        info = dataset_info.load(directory)  # validated: format, version, required keys, task, class/target names
        where = dataset_info.path(directory)
        task = info["task"]
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


def decode_frames(item: ClipItem, indices: np.ndarray, resize_to: int | None = None) -> np.ndarray:
    """Decode only the frames at ``indices`` -> uint8 [len(indices), H, W, 3]; ``resize_to``: the frames will be
    resized to that square size next, so a larger stored JPEG may be decoded at a reduced DCT scale."""
    try:
        return records.decode_frames(item.record, indices.reshape(-1), min_size=resize_to)
    except records.RecordError as e:
        raise records.RecordError(f"{item.where}: {e}") from e


def clip_label(item: ClipItem, split: DatasetSplit) -> np.ndarray:
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
