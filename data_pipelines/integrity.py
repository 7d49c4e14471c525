"""Does a dataset directory say what its shards hold? Split integrity and readable shards, with one message each.

``dataset_info.json`` is an index: split name -> global record indices, shard order -> where index i lives. The
records themselves carry where they belong (``split`` for single-split datasets, ``fold`` - the fold whose *test*
split holds the clip - for k-fold datasets). If the index and the records disagree (shards listed in another order,
an info file copied from another build, a hand edit), training would silently read the wrong clips - val or test
clips in the train split. So every record read through :class:`~data_pipelines.dataset_split.ClipSource` is checked
against the split it was requested for (:class:`SplitContract`, a few comparisons per record), a sample of records
is checked when a split is opened (before any training step), and a train split that shares clips with its test
split is refused outright.

What is compared, per record:
* ``foldK/test``: the record's ``fold`` must be K-1; ``foldK/train``: it must not be K-1 (never train on a clip of
  the fold's own test set); other parts (``foldK/val``) have no rule (DFEW's val is its test set);
* a plain split S: the record's ``split`` must be S, or another split that dataset_info.json also lists this very
  record in (a clip in several splits stores one of them);
* a record without the field a rule needs (no ``fold`` in a k-fold split, no ``split`` in a plain one) is not
  judged: it says nothing to compare (e.g. folds defined afterwards over a single-split dataset).
Labels are checked per record for type and range against ``class_names`` / ``target_names`` (dataset_split.clip_label);
the per-split class histograms are not recounted (that needs a full pass over the data).

No JAX here: grain worker processes import this module.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import numpy as np

from data_pipelines import records

_FOLD_SPLIT = re.compile(r"^fold(\d+)/(.+)$")
SAMPLE_PER_OPEN = 16  # records checked when a split is opened (spread over its shards)


class SplitIntegrityError(records.RecordError):
    """A record disagrees with dataset_info.json about which split it belongs to."""


def rebuild_hint(directory: str, info: Mapping[str, Any] | None, shard_path: str | None = None) -> str:
    """What to run to repair a dataset directory (its recorded creation command when there is one)."""
    command = (info or {}).get("creation_command")
    if not command:
        command = "the command that built it (python -m data_pipelines.build ... / python -m data_pipelines.synthetic)"
    if shard_path:
        return (f"delete {shard_path} and rerun {command} with the same --out: finished shards are reused, the "
                "missing one is rebuilt")
    return f"rebuild the directory: rerun {command} (a new --out is safest)"


def shard_sizes(paths: tuple[str, ...], directory: str, info: Mapping[str, Any]) -> list[int]:
    """Records per shard; a shard that is not a readable ArrayRecord file (0 bytes, cut short, overwritten) stops
    with its name and the rebuild command, instead of array_record's bare riegeli error."""
    import grain

    sizes = []
    for path in paths:
        try:
            sizes.append(len(grain.sources.ArrayRecordDataSource([path])))
        except Exception as e:  # array_record raises several types (ValueError, RuntimeError, ...)
            size = os.path.getsize(path) if os.path.exists(path) else 0
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise records.RecordError(
                f"{path}: not a readable ArrayRecord shard ({size} bytes: {first}). The file is damaged or "
                f"incomplete; {rebuild_hint(directory, info, path)}."
            ) from None
    return sizes


@dataclasses.dataclass(frozen=True, eq=False)
class SplitContract:
    """What every record read for ``split`` must say about itself (see the module docstring)."""

    split: str
    fold: int | None  # k-fold split: 0-based fold; None for a plain split
    part: str | None  # k-fold split: 'train' / 'test' / 'val' ...
    members: Mapping[str, np.ndarray]  # plain splits of the dataset -> sorted global indices
    hint: str = ""  # how to repair the directory (ends the error message)

    @classmethod
    def for_split(cls, split: str, splits: Mapping[str, Any], hint: str = "") -> "SplitContract":
        m = _FOLD_SPLIT.match(split)
        members = {} if m else {
            name: np.sort(np.asarray(idx, np.int64).reshape(-1))
            for name, idx in splits.items() if not _FOLD_SPLIT.match(name) and name != split
        }
        return cls(split=split, fold=int(m.group(1)) - 1 if m else None, part=m.group(2) if m else None,
                   members=members, hint=hint)

    def problem(self, record: records.ClipRecord, record_index: int) -> str | None:
        """None if the record may be in this split, else what disagrees (expected vs found)."""
        if self.fold is not None:
            if record.fold is None:
                return None
            if self.part == "test" and record.fold != self.fold:
                return f"expected fold {self.fold} (0-based) in its 'fold' field, found fold {record.fold}"
            if self.part == "train" and record.fold == self.fold:
                return (f"it is a test clip of this fold (its 'fold' field is {record.fold}); expected any fold but "
                        f"{self.fold}")
            return None
        if record.split is None:
            return None
        if record.split == self.split:
            return None
        listed = self.members.get(record.split)
        if listed is not None:
            i = int(np.searchsorted(listed, record_index))
            if i < len(listed) and listed[i] == record_index:
                return None  # the info lists it in both splits; the record stores the other one
        return f"expected split {self.split!r}, found split {record.split!r} in the record's own 'split' field"

    def check(self, record: records.ClipRecord, record_index: int, where: str) -> None:
        problem = self.problem(record, record_index)
        if problem is not None:
            raise SplitIntegrityError(
                f"{where}: clip {record.clip_id!r} does not belong to split {self.split!r}: {problem}. "
                "dataset_info.json and the shards disagree (shards listed in another order, or an info file of "
                f"another build); stopped so that no clip is used in the wrong split. {self.hint}".rstrip()
            )


def check_no_train_test_overlap(split: str, splits: Mapping[str, Any], where: str) -> None:
    """A train split sharing clips with its test split (``foldK/train`` vs ``foldK/test``, ``train`` vs ``test``)
    would train on test clips: refuse it when the split is opened."""
    if not split.endswith("train"):
        return
    test = split[: -len("train")] + "test"
    if test not in splits:
        return
    both = np.intersect1d(np.asarray(splits[split], np.int64), np.asarray(splits[test], np.int64))
    if len(both):
        raise SplitIntegrityError(
            f"{where}: {len(both)} record(s) are in both {split!r} and {test!r} (e.g. global records "
            f"{both[:5].tolist()}): training on {split!r} would train on test clips. Fix the split lists "
            "(annotation files) and rebuild the dataset."
        )


def sample_positions(record_indices: np.ndarray, shard_starts: np.ndarray, limit: int = SAMPLE_PER_OPEN) -> np.ndarray:
    """Split positions checked when a split is opened: the split's first record in each shard it touches (a shard
    listed in the wrong place is caught whichever it is), plus evenly spread ones; at most 2 x ``limit``."""
    n = len(record_indices)
    shard_of = np.searchsorted(shard_starts, record_indices, side="right") - 1
    first_in_shard = np.unique(shard_of, return_index=True)[1]
    if len(first_in_shard) > limit:
        first_in_shard = first_in_shard[np.linspace(0, len(first_in_shard) - 1, limit).round().astype(np.int64)]
    spread = np.linspace(0, n - 1, min(n, limit)).round().astype(np.int64)
    return np.unique(np.concatenate([first_in_shard, spread]))
