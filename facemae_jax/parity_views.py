"""Parity of the test views with the reference test loader (eval-views goldens, ``meta.format == "eval_views v1"``).

The golden holds frame folders (the image files as written) and, for each clip, the exact uint8 views the
reference test loader (2 temporal segments x 2 spatial crops) made of them. This check goes the way a user's data
goes: the frames are written back into folders, one dataset per clip is built with the official-CSV converter
(``data_pipelines.build csv``), and the project's eval pipeline for the clip's sampling rate produces the views.

Twice: with ``--store_original_frames`` (frame files kept as they are) every view must be bit-identical (SHA-256 of
the uint8 [16, 160, 160, 3] view) and use the same source frames; with the default storage (short side 160, JPEG
q90 re-encoding) the frames must be the same and the pixel deviation is measured in grey levels on the stored
thumbnails (every 8th row and column of every view) and the one full view — pass: mean |Δ| <= 1.0.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import numpy as np

MEAN_GREY_TOLERANCE = 1.0
STORAGES = {"original": ["--store_original_frames"], "default": []}


def _write_frames(z, clip: dict[str, Any], folder: str) -> None:
    os.makedirs(folder)
    for k in range(clip["frames"]):
        with open(os.path.join(folder, f"{k + 1:05d}.{clip['ext']}"), "wb") as f:
            f.write(z[f"{clip['name']}/frame{k:05d}"].tobytes())


def _views(data_dir: str, clip: dict[str, Any]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{view: (uint8 [T, S, S, 3], frame indices [T])} from the project's eval pipeline."""
    from data_pipelines import pipeline as pipelines

    pipe = pipelines.eval_pipeline(
        data_dir, "test", batch_size=1,
        geometry=pipelines.ClipGeometry(clip["num_frames"], clip["sampling_rate"], clip["crop_size"]),
        # config.data.jpeg_dct_downscale's default: reduced-scale JPEG decode for frames stored >= 2x larger
        views=pipelines.EvalViews(clip["test_num_segment"], clip["test_num_crop"], dct_downscale=True))
    out = {}
    for batch in pipe:
        if batch["valid"][0]:
            out[int(batch["view"][0])] = (batch["video"][0], batch["frame_indices"][0])
    return out


def _build(frames_dir: str, clip: dict[str, Any], out: str, storage: str) -> None:
    from data_pipelines import build

    csv = os.path.join(f"{out}_annotations", "test.csv")  # the file's stem names the split
    os.makedirs(os.path.dirname(csv))
    with open(csv, "w") as f:
        f.write(f"{frames_dir} {clip['label']}\n")
    classes = ",".join(f"class{i}" for i in range(max(7, clip["label"] + 1)))
    argv = ["csv", "--annotations", csv, "--classes", classes, "--frame_ext", clip["ext"], "--out", out,
            "--short_side", str(clip["short_side_size"]), "--no_progress", *STORAGES[storage]]
    args = build.make_parser().parse_args(argv)
    info = build.build(args, "parity_views " + " ".join(argv))
    if info["num_clips"] != 1:
        raise RuntimeError(f"{clip['name']}: the converter wrote {info['num_clips']} clips ({info['skipped']})")


def check_eval_views(path: str) -> tuple[dict[str, Any], bool, str]:
    """-> (results, passed, one-line summary)."""
    import contextlib
    import io

    z = np.load(path)
    meta = json.loads(str(z["meta"]))
    clips = meta["clips"]
    for c in clips:
        if c["short_side_size"] != c["crop_size"]:
            raise ValueError(f"{c['name']}: short side {c['short_side_size']} != crop {c['crop_size']}: the eval "
                             "pipeline resizes to a square of the crop size (as every published protocol)")
    res: dict[str, Any] = {"indices_equal": 0, "views": 0, "bit_identical": 0, "diffs": [], "max": 0}
    with tempfile.TemporaryDirectory(prefix="parity_views_") as tmp:
        for clip in clips:
            frames_dir = os.path.join(tmp, "frames", clip["name"])
            _write_frames(z, clip, frames_dir)
            for storage in STORAGES:
                out = os.path.join(tmp, f"{clip['name']}_{storage}")
                with contextlib.redirect_stderr(io.StringIO()):  # the converter's summary
                    _build(frames_dir, clip, out, storage)
                views = _views(out, clip)
                for s in range(clip["test_num_segment"]):
                    for c in range(clip["test_num_crop"]):
                        key = f"{clip['name']}/view{s}_{c}"
                        video, indices = views[s * clip["test_num_crop"] + c]
                        res["views"] += 1
                        res["indices_equal"] += int(np.array_equal(indices, z[f"{key}/indices"]))
                        if storage == "original":
                            digest = hashlib.sha256(np.ascontiguousarray(video).tobytes()).hexdigest()
                            res["bit_identical"] += int(digest == str(z[f"{key}/sha256"]))
                            continue
                        diff = np.abs(video[:, ::8, ::8].astype(np.int16) - z[f"{key}/thumb"].astype(np.int16))
                        res["diffs"].append(diff.ravel())
                        res["max"] = max(res["max"], int(diff.max()))
                        if f"{key}/full" in z.files:
                            full = np.abs(video.astype(np.int16) - z[f"{key}/full"].astype(np.int16))
                            res["full_mean"] = float(full.mean())
                            res["max"] = max(res["max"], int(full.max()))
    n_views = res["views"] // len(STORAGES)
    res["mean"] = float(np.concatenate(res.pop("diffs")).mean())
    passed = (res["indices_equal"] == res["views"] and res["bit_identical"] == n_views
              and res["mean"] <= MEAN_GREY_TOLERANCE)
    full = f", full view {res['full_mean']:.2f}" if "full_mean" in res else ""
    summary = (f"frame indices {res['indices_equal']}/{res['views']} identical  original storage: "
               f"{res['bit_identical']}/{n_views} views bit-identical  default storage (short side, JPEG q90): "
               f"mean |d| {res['mean']:.2f}{full}, max {res['max']} grey levels")
    return res, passed, summary
