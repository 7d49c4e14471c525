"""Official annotation CSVs over frame folders (DFEW, MAFW, FERV39k, CREMA-D, RAVDESS, eNTERFACE, generic).

The reference format (spec DATA §3): plain text, no header, space separated, one clip per line::

    /mnt/data1/brain/AC/Dataset/DFEW/Clip/jpg_256/02522 5          # <clip path> <class index>
    /data/some/clip 0.31 -0.12                                       # regression: several float columns

one file per split, and for k-fold datasets one folder per fold::

    <annotations>/split01/train.csv, val.csv (DFEW: identical to test.csv), test.csv   ... split05/
    <annotations>/train.csv, test.csv                                                 (FERV39k all_scenes)

This module turns such a folder into a clip list: every clip exactly once (five DFEW folds share the same 11,697
clips), its label, the fold whose *test* set holds it, and split memberships (``fold1/train`` ... ``fold5/test``,
or ``train``/``test``). It also checks the fold structure the reference silently relies on — every clip tested
exactly once, each fold's train set the complement of its test set — and reports violations instead of
"fixing" them.

It also holds the frame-folder reader (DATA §4.1): frames are the ``*.jpg`` (MAFW ``*.png``) files directly
inside the clip folder, sorted lexicographically; a clip path that is a single image is a one-frame clip (the
reference repeats it 16 times, which the temporal sampler's padding reproduces).

Annotation problems of one line (label out of range, wrong column count) or one clip (conflicting labels in two
files) are returned as ``skipped`` entries; only *configuration* problems (folder missing, wrong fold layout, a
``--path_remap`` that matches nothing) raise :class:`AnnotationError`.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections import Counter
from typing import Sequence

from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# Class lists: index = label (spec FINETUNING §2).
DFEW_CLASSES = ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")
FERV39K_CLASSES = ("Happy", "Sad", "Neutral", "Angry", "Surprise", "Disgust", "Fear")
MAFW_CLASSES = ("anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise",
                "contempt", "anxiety", "helplessness", "disappointment")
CREMA_D_CLASSES = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
RAVDESS_CLASSES = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")
ENTERFACE_CLASSES = ("anger", "disgust", "fear", "happiness", "sadness", "surprise")


@dataclasses.dataclass(frozen=True)
class OfficialLayout:
    """What the reference split folder of one dataset looks like."""

    class_names: tuple[str, ...]
    num_folds: int  # 0 = one official split (train/test files directly in the folder)
    frame_ext: str  # frame file extension inside clip folders


OFFICIAL_LAYOUTS: dict[str, OfficialLayout] = {
    "dfew": OfficialLayout(DFEW_CLASSES, 5, "jpg"),  # dfew/org/split01..05/{train,val,test}.csv
    "mafw": OfficialLayout(MAFW_CLASSES, 5, "png"),  # mafw/single/split01..05/{train,test}.csv
    "ferv39k": OfficialLayout(FERV39K_CLASSES, 0, "jpg"),  # ferv39k/all_scenes/{train,test}.csv
    "crema_d": OfficialLayout(CREMA_D_CLASSES, 5, "jpg"),
    "ravdess": OfficialLayout(RAVDESS_CLASSES, 6, "jpg"),
    "enterface": OfficialLayout(ENTERFACE_CLASSES, 5, "jpg"),
}

OFFICIAL_REQUIRED_SPLITS = ("train", "test")  # val is optional (DFEW ships it as a copy of test)
SPLIT_PRIORITY = ("train", "test", "val")  # which split a record's own `split` field names if it is in several


class AnnotationError(ValueError):
    """The annotation configuration is unusable (missing folder, wrong layout, bad --path_remap)."""


class FrameReadError(ValueError):
    """A frame file that cannot be read as an image; the message names the file."""


# ---------------------------------------------------------------------------------------------------------------
# Path remapping
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PathRemap:
    """``OLD=NEW``: annotation paths starting with the folder OLD are moved under NEW (the shipped CSVs contain
    the authors' absolute paths, e.g. ``/mnt/data1/brain/AC/Dataset/DFEW``)."""

    old: str
    new: str

    @classmethod
    def parse(cls, text: str) -> "PathRemap":
        old, sep, new = text.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise AnnotationError(f"--path_remap {text!r}: expected OLD=NEW with both sides non-empty")
        old = os.path.normpath(old.strip())
        new = os.path.normpath(os.path.expanduser(new.strip()))
        if not os.path.isdir(new):
            raise AnnotationError(f"--path_remap {text!r}: the new prefix {new!r} is not an existing folder")
        return cls(old, new)

    def apply(self, path: str) -> str | None:
        """The remapped path, or None if ``path`` is not inside OLD (matched at a folder boundary)."""
        if path == self.old:
            return self.new
        prefix = self.old.rstrip(os.sep) + os.sep
        if path.startswith(prefix):
            return os.path.join(self.new, path[len(prefix):])
        return None


# ---------------------------------------------------------------------------------------------------------------
# Split-file discovery
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AnnotationFile:
    path: str
    fold: int | None  # 0-based fold index (split01 -> 0), None for single-split datasets
    split: str  # file stem: "train", "val", "test", ...

    @property
    def split_name(self) -> str:
        """Split name in dataset_info.json: 'fold1/train' for k-fold datasets, 'train' otherwise."""
        return self.split if self.fold is None else f"fold{self.fold + 1}/{self.split}"


_FOLD_DIR = re.compile(r"^split(\d+)$")


def find_annotation_files(
    annotations: str, *, num_folds: int | None, required_splits: Sequence[str] = ()
) -> list[AnnotationFile]:
    """Locate the split files under ``annotations``.

    ``num_folds``: the layout an official dataset must have (0 = split files directly in the folder, K = the
    sub-folders split01..split0K); None (generic csv) accepts either, or a single .csv file (split = its stem).
    ``required_splits``: split files that must exist (in every fold folder), e.g. ("train", "test").
    """
    if not os.path.exists(annotations):
        raise AnnotationError(f"--annotations {annotations!r} does not exist")
    if os.path.isfile(annotations):
        if num_folds is not None:
            raise AnnotationError(
                f"--annotations must be the split folder for this dataset, got the file {annotations!r}"
            )
        return [AnnotationFile(annotations, None, _stem(annotations))]

    fold_dirs = sorted(
        (int(m.group(1)), entry.path)
        for entry in os.scandir(annotations)
        if entry.is_dir() and (m := _FOLD_DIR.match(entry.name))
    )
    if num_folds is None:
        num_folds = len(fold_dirs)
    if num_folds == 0:
        files = sorted(glob.glob(os.path.join(annotations, "*.csv")))
        if not files:
            raise AnnotationError(f"--annotations {annotations!r}: no *.csv split files and no split01.. folders in it")
        found = [AnnotationFile(f, None, _stem(f)) for f in files]
        _require_splits(found, annotations, required_splits)
        return found

    numbers = [n for n, _ in fold_dirs]
    if numbers != list(range(1, num_folds + 1)):
        raise AnnotationError(
            f"--annotations {annotations!r}: expected fold folders split01..split{num_folds:02d}, found "
            f"{[os.path.basename(p) for _, p in fold_dirs] or 'none'}"
        )
    found = []
    for number, folder in fold_dirs:
        files = sorted(glob.glob(os.path.join(folder, "*.csv")))
        if not files:
            raise AnnotationError(f"{folder}: fold folder holds no *.csv split file")
        fold_files = [AnnotationFile(f, number - 1, _stem(f)) for f in files]
        _require_splits(fold_files, folder, required_splits)
        found.extend(fold_files)
    return found


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _require_splits(files: Sequence[AnnotationFile], folder: str, required: Sequence[str]) -> None:
    have = {f.split for f in files}
    missing = [s for s in required if s not in have]
    if missing:
        raise AnnotationError(
            f"{folder}: split file(s) {', '.join(s + '.csv' for s in missing)} missing (found "
            f"{', '.join(sorted(s + '.csv' for s in have)) or 'no .csv file'})"
        )


# ---------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AnnotatedClip:
    """One clip of the dataset, however many annotation files list it."""

    clip_id: str  # path relative to the common root of all clips ("02522", "Crime/Angry/0063")
    path: str  # remapped absolute path of the clip folder (or single image / video file)
    label: int | tuple[float, ...] | None
    fold: int | None  # k-fold datasets: 0-based fold whose test split holds the clip (None if no test split does)
    split: str | None  # single-split datasets: the split it belongs to (train > test > val > others)


@dataclasses.dataclass
class Annotations:
    task: str  # "classification" | "regression" | "unlabeled"
    class_names: list[str] | None
    target_names: list[str] | None
    num_folds: int  # 0 for single-split datasets
    root: str  # common folder of all clips (clip ids are relative to it)
    clips: list[AnnotatedClip]  # sorted by clip_id
    splits: dict[str, list[str]]  # split name -> clip ids (ordered by clip id)
    skipped: list[dict[str, str]]  # [{"input": "file:line" or path, "reason": ...}]
    checks: dict  # fold / overlap structure report (see check_structure)
    warnings: list[str]  # human-readable summary of failed checks
    files: list[str]  # annotation files read


def load_annotations(
    annotations: str,
    *,
    num_folds: int | None,
    required_splits: Sequence[str] = (),
    class_names: Sequence[str] | None,
    target_names: Sequence[str] | None = None,
    unlabeled: bool = False,
    path_remaps: Sequence[PathRemap] = (),
    root: str | None = None,
) -> Annotations:
    """Read every split file under ``annotations`` into one deduplicated clip list.

    Task: ``class_names`` given -> classification (labels must be ints in [0, C)); else ``unlabeled`` -> label
    columns ignored; else regression with the float columns (names ``target_names`` or target0..). If neither
    class nor target names are given and the files have no label column, the set is unlabeled.
    Relative clip paths are resolved against ``root`` (default: the current directory), then ``path_remaps`` are
    applied (first match wins, longest OLD first).
    """
    files = find_annotation_files(annotations, num_folds=num_folds, required_splits=required_splits)
    remaps = sorted(path_remaps, key=lambda r: -len(r.old))
    remap_hits = Counter()
    rows = []  # (clip path, label, AnnotationFile, "file:line")
    skipped: list[dict[str, str]] = []
    duplicate_lines = 0

    if class_names:
        task = "classification"
    elif unlabeled:
        task = "unlabeled"
    elif target_names:
        task = "regression"
    else:
        task = None  # decided by the first data line
    for afile in files:
        seen_in_file = set()
        with open(afile.path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                tokens = line.split()
                if not tokens:
                    continue
                where = f"{afile.path}:{lineno}"
                if task is None:  # label columns present -> regression, none -> unlabeled
                    task = "regression" if len(tokens) > 1 else "unlabeled"
                    target_names = [f"target{i}" for i in range(len(tokens) - 1)] if task == "regression" else None
                try:
                    label = _parse_label(tokens[1:], task, class_names, target_names)
                except ValueError as e:
                    skipped.append({"input": where, "reason": str(e)})
                    continue
                path = os.path.normpath(os.path.join(root or os.getcwd(), tokens[0]))  # absolute paths stay
                for r in remaps:
                    moved = r.apply(path)
                    if moved is not None:
                        remap_hits[r] += 1
                        path = moved
                        break
                if path in seen_in_file:
                    duplicate_lines += 1
                    continue
                seen_in_file.add(path)
                rows.append((path, label, afile, where))

    if not rows:
        raise AnnotationError(f"--annotations {annotations!r}: no usable annotation line in {len(files)} file(s)"
                              + (f" (first problem: {skipped[0]['input']}: {skipped[0]['reason']})" if skipped else ""))
    for r in remaps:
        if not remap_hits[r]:
            raise AnnotationError(
                f"--path_remap {r.old}={r.new}: matched no annotation path (the first path is {rows[0][0]!r})"
            )
    if not any(os.path.exists(path) for path, *_ in rows):
        raise AnnotationError(
            f"none of the {len(rows)} clip paths in {annotations!r} exists (first: {rows[0][0]!r}); the shipped CSVs "
            f"hold the authors' absolute paths - pass --path_remap OLD=NEW"
        )

    # Merge rows per clip path.
    labels: dict[str, object] = {}
    label_sources: dict[str, list[str]] = {}
    memberships: dict[str, list[AnnotationFile]] = {}
    conflicting: set[str] = set()
    for path, label, afile, where in rows:
        if path in labels and labels[path] != label:
            conflicting.add(path)
        labels.setdefault(path, label)
        label_sources.setdefault(path, []).append(f"{where} -> {label}")
        memberships.setdefault(path, []).append(afile)
    for path in sorted(conflicting):
        skipped.append({"input": path, "reason": "conflicting labels across annotation files: "
                                                 + "; ".join(label_sources[path])})

    root_dir = _common_root(list(labels))
    k = max((f.fold for f in files if f.fold is not None), default=-1) + 1
    clips: list[AnnotatedClip] = []
    splits: dict[str, list[str]] = {name: [] for name in _split_order(files)}
    for path in sorted(labels, key=lambda p: os.path.relpath(p, root_dir)):
        if path in conflicting:
            continue
        clip_id = os.path.relpath(path, root_dir)
        member_of = memberships[path]
        test_folds = sorted({f.fold for f in member_of if f.fold is not None and f.split == "test"})
        own_splits = sorted({f.split for f in member_of}, key=_split_rank)
        clips.append(AnnotatedClip(
            clip_id=clip_id,
            path=path,
            label=labels[path],
            fold=test_folds[0] if (k and test_folds) else None,
            split=None if k else own_splits[0],
        ))
        for f in member_of:
            splits[f.split_name].append(clip_id)

    checks, warnings = check_structure(files, memberships, conflicting, k)
    if duplicate_lines:
        checks["duplicate_lines"] = duplicate_lines
        warnings.append(f"{duplicate_lines} duplicate line(s) inside annotation files were ignored")
    return Annotations(
        task=task or "unlabeled",
        class_names=list(class_names) if class_names else None,
        target_names=list(target_names) if task == "regression" else None,
        num_folds=k,
        root=root_dir,
        clips=clips,
        splits={name: ids for name, ids in splits.items()},
        skipped=skipped,
        checks=checks,
        warnings=warnings,
        files=[f.path for f in files],
    )


def _parse_label(columns: list[str], task: str, class_names, target_names):
    """The label columns of one line -> int class index / tuple of floats / None. ValueError says what is wrong."""
    if task == "unlabeled":
        return None
    if task == "classification":
        if len(columns) != 1:
            raise ValueError(f"malformed line: expected '<path> <class index>', got {len(columns)} label column(s)")
        try:
            label = int(columns[0])
        except ValueError:
            raise ValueError(f"malformed label: {columns[0]!r} is not an integer class index") from None
        if not 0 <= label < len(class_names):
            raise ValueError(f"label out of range: {label} not in [0, {len(class_names)}) ({len(class_names)} classes)")
        return label
    if len(columns) != len(target_names):
        raise ValueError(f"malformed line: expected {len(target_names)} regression column(s) "
                         f"({', '.join(target_names)}), got {len(columns)}")
    try:
        return tuple(float(c) for c in columns)
    except ValueError:
        raise ValueError(f"malformed label: regression columns {columns} are not all numbers") from None


def _split_rank(split: str) -> tuple[int, str]:
    return (SPLIT_PRIORITY.index(split) if split in SPLIT_PRIORITY else len(SPLIT_PRIORITY), split)


def _split_order(files: Sequence[AnnotationFile]) -> list[str]:
    """fold1/train, fold1/val, fold1/test, fold2/... — folds in order, splits train/val/test/others."""
    order = {"train": 0, "val": 1, "test": 2}
    keyed = sorted(files, key=lambda f: (-1 if f.fold is None else f.fold, order.get(f.split, 3), f.split))
    return list(dict.fromkeys(f.split_name for f in keyed))


def _common_root(paths: list[str]) -> str:
    parents = {os.path.dirname(p) for p in paths}
    return os.path.commonpath(list(parents)) if parents else ""


def check_structure(files, memberships, excluded, num_folds: int) -> tuple[dict, list[str]]:
    """Report how the split files relate (the reference assumes, never checks, these properties).

    k-fold: each clip in exactly one fold's test set; fold k's train set = all clips minus its test set; val ==
    test where a val file exists. Single split: train and test disjoint. Returns (report dict, warning lines).
    """
    by_split: dict[tuple[int | None, str], set[str]] = {}
    for path, member_of in memberships.items():
        for f in member_of:
            by_split.setdefault((f.fold, f.split), set()).add(path)
    all_clips = set(memberships)
    warnings: list[str] = []
    report: dict = {}
    if num_folds:
        test_count = Counter(p for (fold, split), ps in by_split.items() if split == "test" for p in ps)
        several = sorted(p for p, n in test_count.items() if n > 1)
        never = sorted(all_clips - set(test_count))
        report["clips_in_several_test_sets"] = len(several)
        report["clips_in_no_test_set"] = len(never)
        if several:
            report["examples_in_several_test_sets"] = several[:10]
            warnings.append(f"{len(several)} clip(s) appear in more than one fold's test set (e.g. {several[0]}); "
                            f"their record 'fold' is the first such fold")
        if never:
            report["examples_in_no_test_set"] = never[:10]
            warnings.append(f"{len(never)} clip(s) are in no fold's test set (e.g. {never[0]})")
        report["folds"] = {}
        for fold in range(num_folds):
            train = by_split.get((fold, "train"), set())
            test = by_split.get((fold, "test"), set())
            fold_report = {
                "train": len(train), "test": len(test),
                "train_test_overlap": len(train & test),
                "in_neither": len(all_clips - train - test),
            }
            if (fold, "val") in by_split:
                fold_report["val_equals_test"] = by_split[(fold, "val")] == test
            report["folds"][f"fold{fold + 1}"] = fold_report
            if fold_report["train_test_overlap"] or fold_report["in_neither"]:
                warnings.append(
                    f"fold{fold + 1}: train is not the complement of test ({fold_report['train_test_overlap']} clip(s) "
                    f"in both, {fold_report['in_neither']} in neither)"
                )
    else:
        train, test = by_split.get((None, "train"), set()), by_split.get((None, "test"), set())
        report["train_test_overlap"] = len(train & test)
        if (None, "val") in by_split:
            report["val_equals_test"] = by_split[(None, "val")] == test
        if train & test:
            warnings.append(f"{len(train & test)} clip(s) are in both train and test (e.g. {sorted(train & test)[0]})")
    if excluded:
        report["clips_with_conflicting_labels"] = len(excluded)
        warnings.append(f"{len(excluded)} clip(s) have conflicting labels in different files and were skipped")
    report["ok"] = not warnings
    return report, warnings


# ---------------------------------------------------------------------------------------------------------------
# Frame-folder reader (DATA §4.1)
# ---------------------------------------------------------------------------------------------------------------


def list_frame_files(folder: str, ext: str) -> list[str]:
    """The ``*.{ext}`` files directly inside ``folder``, sorted lexicographically by name (the reference order:
    zero-padded names give temporal order)."""
    suffix = "." + ext.lstrip(".")
    return sorted(
        os.path.join(folder, e.name) for e in os.scandir(folder) if e.name.endswith(suffix) and e.is_file()
    )


def open_frame(path: str) -> Image.Image:
    """Fully decode one frame file as RGB; a corrupt or truncated file raises FrameReadError naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return img if img.mode == "RGB" else img.convert("RGB")
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError('image file is truncated'), SyntaxError ...
        raise FrameReadError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
