"""Build plans: what ``data_pipelines.build`` converts - the sorted clip inputs, their labels and splits - read
from official annotation CSVs (``sources/official_csv.py``) or from a folder of videos (``sources/videos.py``).

Why a module of its own: a plan is decided before any frame is touched, and every layout problem (annotation folder
missing, fold layout wrong, a ``--path_remap`` that matches nothing) must stop the build here, as a
:class:`BuildConfigError`, before anything is written. Problems with single inputs (a bad annotation line, an empty
class folder) are collected in ``BuildPlan.skipped`` instead and end up in ``dataset_info.json["skipped"]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from data_pipelines.clip_conversion import ClipInput
from data_pipelines.sources import official_csv, videos

CSV_NAMES = (*official_csv.OFFICIAL_LAYOUTS, "csv")
VIDEO_NAMES = ("voxceleb2", "videos")


class BuildConfigError(ValueError):
    """The command line or the input layout cannot work; raised before anything is written."""


@dataclasses.dataclass
class BuildPlan:
    name: str
    source: str
    task: str
    class_names: list[str] | None
    target_names: list[str] | None
    folds: int | None
    inputs: list[ClipInput]  # sorted by clip_id: the record order
    splits: dict[str, list[str]]  # split name -> clip ids
    skipped: list[dict[str, str]]  # problems found while planning (annotation lines, class folders)
    warnings: list[str]
    extra: dict[str, Any]


def plan_from_annotations(args: argparse.Namespace) -> BuildPlan:
    layout = official_csv.OFFICIAL_LAYOUTS.get(args.name)
    if layout is None and args.classes is None and args.targets is None and not args.unlabeled:
        task_note = "inferred from the column count (no --classes/--targets/--unlabeled)"
    else:
        task_note = None
    try:
        remaps = [official_csv.PathRemap.parse(r) for r in args.path_remap]
        ann = official_csv.load_annotations(
            args.annotations,
            num_folds=layout.num_folds if layout else None,
            required_splits=official_csv.OFFICIAL_REQUIRED_SPLITS if layout else (),
            class_names=layout.class_names if layout else args.classes,
            target_names=args.targets,
            unlabeled=args.unlabeled,
            path_remaps=remaps,
            root=args.root,
        )
    except official_csv.AnnotationError as e:
        raise BuildConfigError(str(e)) from e
    inputs = [ClipInput(c.clip_id, c.path, c.label, c.fold, c.split) for c in ann.clips]
    extra = {
        "input": "annotation CSVs over frame folders",
        "annotations": os.path.abspath(args.annotations),
        "annotation_files": [os.path.relpath(f, args.annotations) if os.path.isdir(args.annotations) else f
                             for f in ann.files],
        "path_remap": [f"{r.old}={r.new}" for r in remaps],
        "structure_check": ann.checks,
    }
    if task_note:
        extra["task_inferred"] = f"{ann.task}: {task_note}"
    return BuildPlan(
        name=args.dataset_name, source=ann.root, task=ann.task, class_names=ann.class_names,
        target_names=ann.target_names, folds=ann.num_folds or None, inputs=inputs, splits=ann.splits,
        skipped=ann.skipped, warnings=ann.warnings, extra=extra,
    )


def plan_from_videos(args: argparse.Namespace) -> BuildPlan:
    try:
        if args.name == "voxceleb2":
            listing = videos.find_voxceleb2(args.root)
        else:
            listing = videos.find_videos(args.root, labels_from_folders=args.labels_from_folders,
                                         class_names=args.classes)
    except videos.VideoSourceError as e:
        raise BuildConfigError(str(e)) from e
    split = args.split or ("train" if listing.class_names else "pretrain")
    inputs = [ClipInput(c.clip_id, c.path, c.label, None, split) for c in listing.clips]
    return BuildPlan(
        name=args.dataset_name, source=listing.root, task="classification" if listing.class_names else "unlabeled",
        class_names=listing.class_names, target_names=None, folds=None, inputs=inputs,
        splits={split: [c.clip_id for c in listing.clips]}, skipped=listing.skipped, warnings=[],
        extra={"input": "video files" + (" (VoxCeleb2 layout)" if args.name == "voxceleb2" else ""),
               "labels_from_folders": bool(args.labels_from_folders)},
    )
