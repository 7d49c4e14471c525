"""Raw video folders as clip lists: the VoxCeleb2 layout (pre-training pool) and any folder of videos.

VoxCeleb2 dev (spec PRETRAINING §1): ``<root>/idXXXXX/<youtube id>/NNNNN.mp4`` (``root`` = ``.../dev/mp4`` in the
official download), 1,092,009 videos, 224x224 at 25 fps; clip id ``idXXXXX/<youtube id>/NNNNN``, unlabeled. The
reference drops the 283 files decord cannot open through a hard-coded list; here every file is listed and the
converter's strict decoder skips (and reports) whatever does not decode.

Any folder of videos: found recursively (sorted, so the shard plan is deterministic); clip id = the path relative
to the root without extension; optionally the class is the name of the folder that directly holds the file
(``<root>/happy/clip1.mp4`` -> class "happy").

Only listing happens here (no decoding): decoding belongs to the converter's worker processes.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections import Counter
from typing import Sequence

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv")


class VideoSourceError(ValueError):
    """The video folder configuration is unusable (missing root, no videos, wrong layout)."""


@dataclasses.dataclass(frozen=True)
class VideoClip:
    clip_id: str
    path: str
    label: int | None


@dataclasses.dataclass
class VideoListing:
    root: str
    clips: list[VideoClip]  # sorted by clip_id
    class_names: list[str] | None  # classification from folder names, else None (unlabeled)
    skipped: list[dict[str, str]]  # files that cannot be used, with the reason


def find_voxceleb2(root: str) -> VideoListing:
    """List ``<root>/<speaker>/<youtube id>/<n>.mp4`` (exactly that depth)."""
    _require_folder(root)
    paths = sorted(glob.glob(os.path.join(glob.escape(root), "*", "*", "*.mp4")))
    if not paths:
        candidates = [os.path.join(root, "dev", "mp4"), os.path.join(root, "mp4")]
        hint = next((c for c in candidates if os.path.isdir(c)), None)
        raise VideoSourceError(
            f"no VoxCeleb2 videos under {root!r}: expected {root}/idXXXXX/<youtube id>/NNNNN.mp4"
            + (f" - did you mean --root {hint}?" if hint else "")
        )
    clips = [VideoClip(os.path.splitext(os.path.relpath(p, root))[0], p, None) for p in paths]
    return VideoListing(root=os.path.normpath(root), clips=clips, class_names=None, skipped=[])


def find_videos(
    root: str,
    *,
    labels_from_folders: bool = False,
    class_names: Sequence[str] | None = None,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
) -> VideoListing:
    """List every video file under ``root`` (recursively, extensions case-insensitive).

    ``labels_from_folders``: class = name of the folder holding the file; classes are ``class_names`` in that
    order if given (a folder not among them is skipped and reported), else the sorted folder names found.
    """
    _require_folder(root)
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    paths = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders.sort()
        paths.extend(os.path.join(folder, f) for f in files if f.lower().endswith(exts))
    paths.sort()
    if not paths:
        raise VideoSourceError(f"no video files ({', '.join(exts)}) under {root!r}")

    rel = [os.path.relpath(p, root) for p in paths]
    stems = [os.path.splitext(r)[0] for r in rel]
    clashes = {s for s, n in Counter(stems).items() if n > 1}  # a.mp4 + a.avi: keep the extension in their ids
    ids = [r if s in clashes else s for r, s in zip(rel, stems)]

    skipped: list[dict[str, str]] = []
    if not labels_from_folders:
        clips = [VideoClip(i, p, None) for i, p in zip(ids, paths)]
        return VideoListing(os.path.normpath(root), sorted(clips, key=lambda c: c.clip_id), None, skipped)

    folder_of = {p: (os.path.basename(os.path.dirname(r)) or None) for p, r in zip(paths, rel)}
    names = list(class_names) if class_names else sorted({f for f in folder_of.values() if f})
    if not names:
        raise VideoSourceError(f"--labels_from_folders: the videos under {root!r} are not inside class folders")
    index = {n: i for i, n in enumerate(names)}
    clips = []
    for clip_id, path in zip(ids, paths):
        folder = folder_of[path]
        if folder is None:
            skipped.append({"input": path, "reason": "no class folder: the file lies directly in the root folder"})
        elif folder not in index:
            skipped.append({"input": path, "reason": f"label out of range: folder {folder!r} is not one of the "
                                                     f"classes {names}"})
        else:
            clips.append(VideoClip(clip_id, path, index[folder]))
    return VideoListing(os.path.normpath(root), sorted(clips, key=lambda c: c.clip_id), names, skipped)


def _require_folder(root: str) -> None:
    if not root:
        raise VideoSourceError("--root (the folder holding the videos) is required")
    if not os.path.isdir(root):
        raise VideoSourceError(f"--root {root!r} is not an existing folder")
