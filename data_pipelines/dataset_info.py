"""``dataset_info.json``: the one schema, writer and validator of a dataset directory's index.

A dataset directory is a set of ArrayRecord shards (``records``) plus this file, which says what the shards hold::

    {
      "format": "facemae_dataset", "version": 1,
      "name": str,                    # dataset name (also the shard prefix of data_pipelines.build)
      "source": str,                  # where the clips came from
      "creation_command": str,        # the command that made the folder (to rebuild it)
      "created": str,                 # ISO 8601 UTC
      "num_clips": int,               # records in all shards together
      "shards": [str, ...],           # shard file names, in global-index order
      "frame_size": {"height": int, "width": int} | {"short_side": int} | {"original": true},
      "task": "classification" | "regression" | "unlabeled",
      "class_names": [str, ...],      # classification only; index = label
      "target_names": [str, ...],     # regression only
      "label_histogram": {"0": int, ...},   # classification: clips per class ({} otherwise)
      "splits": {name: [int, ...]},   # split name -> global record indices ("fold1/train", "test", "pretrain" ...)
      "folds": int,                   # k-fold datasets only
      "skipped": [{"input": str, "reason": str}, ...],   # inputs that did not become records
      "extra": {...}                  # free-form provenance (preprocessing, generator settings, ...)
    }

Why one module: three writers (the converters of ``data_pipelines.build``, the synthetic generator and the
input-pipeline benchmark) used to assemble this dict by hand, each with its own key order and JSON layout, and the
readers checked it piecemeal. :func:`make` builds the dict in one canonical key order, :func:`write` validates and
writes it atomically (``.tmp`` then rename, so a folder never shows a half-written index), and :func:`load` reads
and validates it, naming the file and the key when something is wrong. The validator checks structure and types
only; what needs the shards (``num_clips`` against the records, indices in range, split integrity) is checked
where a split is opened (``data_pipelines.pipeline``, ``data_pipelines.integrity``).
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Iterable, Mapping

FILE = "dataset_info.json"
FORMAT = "facemae_dataset"
VERSION = 1
TASKS = ("classification", "regression", "unlabeled")
SIDECAR_DIR = "_build"  # data_pipelines.shard_runner keeps its per-shard sidecars here (named in repair hints)


class DatasetInfoError(ValueError):
    """dataset_info.json cannot be used: cut short, damaged, not a JSON object, or a key missing or mistyped.
    The message names the file and, for schema errors, the key."""


def path(directory: str) -> str:
    return os.path.join(directory, FILE)


def now() -> str:
    """The ``created`` timestamp: UTC, ISO 8601, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def make(*, name: str, source: str, creation_command: str, shards: Iterable[str], num_clips: int,
         frame_size: Mapping[str, Any], task: str, splits: Mapping[str, Iterable[int]],
         class_names: Iterable[str] | None = None, target_names: Iterable[str] | None = None,
         label_histogram: Mapping[str, int] | None = None, folds: int | None = None,
         skipped: Iterable[Mapping[str, str]] = (), extra: Mapping[str, Any] | None = None,
         created: str | None = None) -> dict[str, Any]:
    """The info dict in the canonical key order (see the module docstring); validated, so a writer's mistake fails
    here with the key named. ``class_names`` is required for classification, ``target_names`` for regression;
    ``label_histogram`` defaults to {} (classification writers give the per-class counts)."""
    info: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "name": name,
        "source": source,
        "creation_command": creation_command,
        "created": created or now(),
        "num_clips": int(num_clips),
        "shards": list(shards),
        "frame_size": dict(frame_size),
        "task": task,
    }
    if class_names is not None:
        info["class_names"] = list(class_names)
    if target_names is not None:
        info["target_names"] = list(target_names)
    info["label_histogram"] = dict(label_histogram or {})
    info["splits"] = {split: [int(i) for i in ids] for split, ids in splits.items()}
    if folds:
        info["folds"] = int(folds)
    info["skipped"] = [dict(s) for s in skipped]
    info["extra"] = dict(extra or {})
    validate(info, "dataset_info (being written)")
    return info


def write(directory: str, info: Mapping[str, Any]) -> str:
    """Validate ``info`` and write it to ``directory/dataset_info.json`` atomically; returns the path."""
    target = path(directory)
    validate(info, target)
    write_json_atomic(target, info)
    return target


def write_json_atomic(file: str, obj: Any) -> None:
    """JSON (indent 1, trailing newline) to ``file`` via ``file.tmp`` + rename: readers see the old or the new file,
    never a part (also used for the shard runner's sidecars)."""
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    tmp = file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, file)


def load(directory: str) -> dict[str, Any]:
    """Read and validate ``directory/dataset_info.json``. FileNotFoundError when the folder has none;
    DatasetInfoError (naming the file, and the key) when it is damaged or does not follow the schema."""
    target = path(directory)
    if not os.path.exists(target):
        raise FileNotFoundError(f"{target} not found: is {directory!r} a folder written by data_pipelines.build?")
    try:
        with open(target, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        size = os.path.getsize(target)
        sidecars = os.path.isdir(os.path.join(directory, SIDECAR_DIR))
        repair = ("rerun the command that made it with the same --out (python -m data_pipelines.synthetic also needs "
                  "--overwrite): the finished shards are reused and dataset_info.json is rewritten" if sidecars else
                  "rebuild the dataset (the command that made it is at the top of an intact copy's "
                  "'creation_command')")
        raise DatasetInfoError(f"{target} ({size} bytes) cannot be read: {e}. The file is damaged or was cut short "
                               f"(a full disk, an interrupted copy); {repair}.") from None
    validate(info, target)
    return info


def _fail(where: str, key: str, problem: str) -> None:
    raise DatasetInfoError(f"{where}: key {key!r} {problem}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str_list(info: Mapping[str, Any], key: str, where: str, non_empty: bool = False) -> None:
    v = info[key]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        _fail(where, key, f"must be a list of strings, found {_describe(v)}")
    if non_empty and not v:
        _fail(where, key, "must not be empty")


def _describe(v: Any) -> str:
    text = json.dumps(v, default=str)
    return f"{type(v).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


_REQUIRED = ("format", "version", "num_clips", "shards", "splits", "task")


def validate(info: Any, where: str = FILE) -> None:
    """Raise DatasetInfoError (``where: key 'k' ...``) unless ``info`` follows the schema of the module docstring.

    Required: format, version, num_clips, shards, splits, task (+ class_names for classification, target_names for
    regression). The other keys are optional for readers (hand-written folders of tests and tools omit them) but
    must have the documented type when present; :func:`make` always writes all of them."""
    if not isinstance(info, dict):
        raise DatasetInfoError(f"{where}: expected a JSON object, found {type(info).__name__}")
    for key in _REQUIRED:
        if key not in info:
            _fail(where, key, f"is missing (a {FORMAT} index needs {', '.join(_REQUIRED)})")
    if info["format"] != FORMAT or info["version"] != VERSION:
        raise DatasetInfoError(f"{where}: format {info['format']!r} version {info['version']!r}, expected {FORMAT!r} "
                               f"version {VERSION}")
    if not _is_int(info["num_clips"]) or info["num_clips"] < 0:
        _fail(where, "num_clips", f"must be an integer >= 0, found {_describe(info['num_clips'])}")
    _str_list(info, "shards", where)
    if info["task"] not in TASKS:
        _fail(where, "task", f"is {info['task']!r}, not one of {TASKS}")
    if info["task"] == "classification":
        if "class_names" not in info:
            _fail(where, "class_names", "is missing (a classification dataset needs its class names)")
        _str_list(info, "class_names", where, non_empty=True)
    if info["task"] == "regression":
        if "target_names" not in info:
            _fail(where, "target_names", "is missing (a regression dataset needs its target names)")
        _str_list(info, "target_names", where, non_empty=True)
    splits = info["splits"]
    if not isinstance(splits, dict):
        _fail(where, "splits", f"must map split names to lists of record indices, found {_describe(splits)}")
    for name, ids in splits.items():
        if not isinstance(ids, list) or not all(_is_int(i) for i in ids):
            _fail(where, f"splits.{name}", f"must be a list of integer record indices, found {_describe(ids)}")
    for key in ("name", "source", "creation_command", "created"):
        if key in info and not isinstance(info[key], str):
            _fail(where, key, f"must be a string, found {_describe(info[key])}")
    for key in ("frame_size", "extra", "label_histogram"):
        if key in info and not isinstance(info[key], dict):
            _fail(where, key, f"must be an object, found {_describe(info[key])}")
    if "label_histogram" in info and not all(_is_int(v) for v in info["label_histogram"].values()):
        _fail(where, "label_histogram", "must map class indices to integer counts")
    if "folds" in info and (not _is_int(info["folds"]) or info["folds"] < 1):
        _fail(where, "folds", f"must be an integer >= 1, found {_describe(info['folds'])}")
    if "skipped" in info:
        skipped = info["skipped"]
        if not isinstance(skipped, list) or not all(isinstance(s, dict) and {"input", "reason"} <= s.keys()
                                                    for s in skipped):
            _fail(where, "skipped", "must be a list of {\"input\": ..., \"reason\": ...} objects")
