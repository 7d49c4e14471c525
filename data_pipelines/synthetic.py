"""Procedurally drawn talking faces with seven *dynamic* facial expressions: the embedded default dataset.

Real affect datasets (VoxCeleb2, DFEW, FERV39k, MAFW) cannot be downloaded here, yet the library must show, end to
end, that masked-video pretraining helps dynamic facial expression recognition. This module draws a stand-in that
keeps the properties that make the real task a *video* task:

* identity nuisance: face shape, skin tone, eyes, brows, nose, lips, hair, glasses differ per person; val/test
  people are never seen in pretrain/train (identity parameters come from their own seed streams);
* scene nuisance: backgrounds (gradients, blurred noise, clutter), directional lighting and tint, smooth head motion
  (translation, roll, scale, a little yaw), blur, sensor noise, JPEG;
* expressions built from facial action units (FACS AUs: brow raise/lower, lid raise/tighten, cheek raise, nose
  wrinkle, upper-lip raise, lip-corner pull/depress, chin raise, lip stretch/press, lips part, jaw drop) whose
  class prototypes follow the classic EMFACS combinations, e.g. happy = AU6+12, surprise = AU1+2+5+26,
  fear = AU1+2+4+5+20+25 — so fear/surprise and angry/disgust differ in details;
* dynamics: each expression has an onset -> apex -> offset time course at a random time, speed and intensity
  (surprise is fast and brief, sadness slow), per-AU latencies, and every clip — "neutral" included — has
  talking-like mouth motion, blinks, gaze shifts and small idiosyncratic AU fluctuations. A single frame is
  therefore ambiguous: it may lie before onset or after offset, the expression may be subtle, and an open mouth may
  be speech rather than surprise.

The code is split along these ideas: ``synthetic_expressions`` (action units, class prototypes, timing, recording
scenarios, ``sample_dynamics``), ``synthetic_identities`` (``FaceIdentity``, ``sample_identity``, the per-split
identity pools), ``synthetic_render`` (background, head layer, eyes/brows/nose/mouth/glasses, compositing, camera,
``generate_clip``) and this module (dataset writing through ``shard_runner`` and ``dataset_info``, contact sheet,
CLI). ``generate_clip``, ``CLASS_NAMES`` and ``SCENARIOS`` are re-exported here for callers of the one-module API.
Rendering is numpy + OpenCV drawing (anti-aliased polygons at 1/16-pixel precision; see ``synthetic_render``).

Geometry lives in *face units*: origin at the face centre, x to the right, y down, 1 unit = half the face width.
Expression timings are fractions of the clip length (whatever ``frames`` is, a clip holds about one event; at the
default 32 frames / 25 fps that is 1.28 s, so surprise rises in 1-4 frames and sadness in 8-14); speech, blinks
and head motion run in seconds.

Each record's ``extra`` holds the ground truth behind the pixels (expression, identity, intensity, blend, timing,
per-frame envelope and action-unit tracks, mouth/brow positions): for analysis and probing, never as model input.

Determinism: every clip is a pure function of ``(seed, split, index)`` (and its identity of
``(seed, identity pool, identity index)``) through ``numpy.random.SeedSequence``, so any number of worker
processes produce byte-identical shards.

CLI::

    python -m data_pipelines.synthetic --out data/synthetic --seed 0 --workers 2
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import shlex
import sys
from typing import Any, Sequence

import cv2
import numpy as np

from data_pipelines import dataset_info, records, shard_runner
from data_pipelines.synthetic_expressions import ACTION_UNITS, CLASS_NAMES, FPS, SCENARIOS, get_scenario
from data_pipelines.synthetic_identities import CLIP_STREAM, SPLIT_CODE, split_identity
from data_pipelines.synthetic_render import generate_clip

SPLITS = ("pretrain", "train", "val", "test")
SHARD_PREFIX = "synthetic"
DATASET_NAME = "synthetic_faces"
# Every identity appears in this many consecutive clips of a split; in labelled splits those clips are exactly
# one of each class (like acted datasets), so a classifier cannot shortcut through "who is it".
CLIPS_PER_IDENTITY = len(CLASS_NAMES)


# ---------------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------------


def clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of clip ``index`` of ``split``: independent of every other clip, so order/parallelism don't
    matter."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), CLIP_STREAM, SPLIT_CODE[split], int(index)]))


@dataclasses.dataclass(frozen=True)
class ClipTask:
    """What a worker needs to render and encode one record."""

    seed: int
    split: str
    index: int
    label: int | None
    frames: int
    size: int
    quality: int
    scenario: str = "wild"


def split_tasks(seed: int, split: str, count: int, labelled: bool, frames: int, size: int,
                quality: int, scenario: str = "wild") -> list[ClipTask]:
    """Labelled splits cycle through the classes (clip i has class i % 7, so each person — clips 7k..7k+6 — shows
    every expression once); the pretrain pool is unlabelled."""
    return [ClipTask(seed, split, i, (i % len(CLASS_NAMES)) if labelled else None, frames, size, quality, scenario)
            for i in range(count)]


def render_clip(task: ClipTask) -> tuple[np.ndarray, dict[str, Any]]:
    """ClipTask -> (uint8 [frames, size, size, 3], meta): the clip of ``task``'s split and index, with its person."""
    identity = split_identity(task.seed, task.split, task.index // CLIPS_PER_IDENTITY)
    return generate_clip(clip_rng(task.seed, task.split, task.index), task.label, frames=task.frames,
                         size=task.size, identity=identity, scenario=task.scenario)


def render_record(task: ClipTask) -> bytes:
    """ClipTask -> encoded record bytes (module-level so that worker processes can run it)."""
    video, meta = render_clip(task)
    rec = records.make_record(
        f"{task.split}/{task.index:06d}",
        video,
        quality=task.quality,
        source=f"data_pipelines.synthetic(seed={task.seed}, split={task.split}, index={task.index})",
        label=task.label,
        split=task.split,
        fps=FPS,
        extra=meta,
    )
    return records.encode_clip(rec)


def _init_worker() -> None:
    cv2.setNumThreads(1)  # the workers already use every core; OpenCV's own threads would only contend


def _write_shard(job: shard_runner.ShardJob, writer: records.ShardWriter, count) -> dict[str, Any]:
    """shard_runner writer: render the clips of one shard (``job.work``: its ClipTasks) in order."""
    clip_ids = []
    for task in job.work:
        writer.write(render_record(task))
        clip_ids.append(f"{task.split}/{task.index:06d}")
        count(1)
    return {"num_records": len(clip_ids), "clip_ids": clip_ids}


_GENERATOR_MODULES = ("synthetic.py", "synthetic_expressions.py", "synthetic_identities.py", "synthetic_render.py",
                      "records.py")


def generator_version() -> str:
    """sha256 of the generator's source files: a shard reused on resume must come from the same drawing code (the
    clips are a pure function of their task *and* of this code)."""
    here = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for name in _GENERATOR_MODULES:
        with open(os.path.join(here, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def _default_command(out_dir: str, **kw: Any) -> str:
    args = " ".join(f"--{k} {shlex.quote(str(v))}" for k, v in kw.items())
    return f"python -m data_pipelines.synthetic --out {shlex.quote(out_dir)} {args}"


def build_dataset(out_dir: str, *, seed: int = 0, num_pretrain: int = 1400, train_per_class: int = 60,
                  val_per_class: int = 20, test_per_class: int = 30, frames: int = 32, size: int = 160,
                  workers: int = 1, clips_per_shard: int = 128, quality: int = 90, scenario: str = "wild",
                  creation_command: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Render the four splits into ArrayRecord shards + dataset_info.json under ``out_dir``; returns the info.

    Records are written in split order pretrain, train, val, test; shards are numbered globally
    (``synthetic-00000-of-000NN``) so that both the listed order and a sorted glob give the same global indices.
    Output is byte-identical for any ``workers`` (each worker process writes whole shards). Resumable through
    ``shard_runner``: shards finished by an earlier run with the same settings and generator code are kept.
    ``scenario``: recording conditions, see ``SCENARIOS``.
    """
    scene = get_scenario(scenario)  # fail before any work
    counts = {"pretrain": num_pretrain, "train": train_per_class * len(CLASS_NAMES),
              "val": val_per_class * len(CLASS_NAMES), "test": test_per_class * len(CLASS_NAMES)}
    if any(c < 0 for c in counts.values()):
        raise ValueError(f"clip counts must be >= 0, got {counts}")
    if clips_per_shard < 1:
        raise ValueError(f"clips_per_shard must be >= 1, got {clips_per_shard}")
    tasks: list[ClipTask] = []
    splits: dict[str, list[int]] = {}
    for split in SPLITS:
        start = len(tasks)
        tasks += split_tasks(seed, split, counts[split], split != "pretrain", frames, size, quality, scenario)
        splits[split] = list(range(start, len(tasks)))
    if not tasks:
        raise ValueError("nothing to generate: all clip counts are 0")

    os.makedirs(out_dir, exist_ok=True)
    n_shards = math.ceil(len(tasks) / clips_per_shard)
    shard_names = [records.shard_name(SHARD_PREFIX, i, n_shards) for i in range(n_shards)]
    for stale in shard_runner.stray_shards(out_dir, shard_names, prefix=SHARD_PREFIX + "-"):
        shard_runner.remove_shard(out_dir, stale)  # shards of an earlier run with another shard count
    version = generator_version()
    jobs = []
    for i, name in enumerate(shard_names):
        chunk = tuple(tasks[i * clips_per_shard:(i + 1) * clips_per_shard])
        fingerprint = shard_runner.fingerprint({"shard": name, "generator": version, "scenario": dataclasses.asdict(
            scene), "tasks": [dataclasses.astuple(t) for t in chunk]})
        jobs.append(shard_runner.ShardJob(out_dir, name, fingerprint, len(chunk), chunk))
    result = shard_runner.run(jobs, _write_shard, workers=workers, progress=progress, desc="[synthetic] rendering",
                              worker_init=_init_worker)
    elapsed = result.seconds

    label_histogram: dict[str, int] = {}
    per_split_histogram: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        hist: dict[str, int] = {}
        for i in splits[split]:
            if tasks[i].label is not None:
                hist[str(tasks[i].label)] = hist.get(str(tasks[i].label), 0) + 1
                label_histogram[str(tasks[i].label)] = label_histogram.get(str(tasks[i].label), 0) + 1
        per_split_histogram[split] = dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
    rendered = sum(jobs[i].size for i in result.written)
    info = dataset_info.make(
        name=DATASET_NAME,
        source="data_pipelines.synthetic (procedurally drawn talking faces)",
        creation_command=creation_command or _default_command(
            out_dir, seed=seed, num_pretrain=num_pretrain, train_per_class=train_per_class,
            val_per_class=val_per_class, test_per_class=test_per_class, frames=frames, size=size, workers=workers,
            **({} if scenario == "wild" else {"scenario": scenario})),
        num_clips=len(tasks),
        shards=shard_names,
        frame_size={"height": size, "width": size},
        task="classification",
        class_names=CLASS_NAMES,
        label_histogram=dict(sorted(label_histogram.items(), key=lambda kv: int(kv[0]))),
        splits=splits,
        extra={
            "generator": "data_pipelines.synthetic",
            "seed": seed,
            "scenario": dataclasses.asdict(scene),
            "frames": frames,
            "fps": FPS,
            "jpeg_quality": quality,
            "clips_per_identity": CLIPS_PER_IDENTITY,
            "identities": {s: math.ceil(counts[s] / CLIPS_PER_IDENTITY) for s in SPLITS},
            "identity_pools": "disjoint per split (separate seed streams); ids are '<split>-<index>'",
            "label_histogram_per_split": per_split_histogram,
            "pretrain_labels": "None (each pretrain clip still shows a random expression, see record extra)",
            "action_units": list(ACTION_UNITS),
            "generation_seconds": round(elapsed, 2),
            "clips_per_second": round(rendered / max(elapsed, 1e-9), 2),
            "workers": workers,
            "clips_rendered": rendered,  # by this run; the rest lay in shards kept from an interrupted earlier run
        },
    )
    dataset_info.write(out_dir, info)
    return info


# ---------------------------------------------------------------------------------------------------------------
# Contact sheet
# ---------------------------------------------------------------------------------------------------------------


def contact_sheet(out_dir: str, path: str, *, columns: int = 8, split_order: Sequence[str] = ("train", "val", "test"),
                  tile: int | None = None) -> str:
    """PNG with one row per class: ``columns`` frames across the first stored clip of that class, labelled with the
    class, the frame index and a bar showing the expression envelope. Classes absent from the dataset are drawn
    fresh with generate_clip."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    info = dataset_info.load(out_dir)
    source = ArrayRecordDataSource([os.path.join(out_dir, s) for s in info["shards"]])
    chosen: dict[int, tuple[np.ndarray, dict]] = {}
    for split in split_order:
        for gi in info["splits"].get(split, []):
            rec = records.decode_clip(source[gi], where=f"{out_dir} #{gi}")
            if rec.label is not None and rec.label not in chosen:
                chosen[int(rec.label)] = (records.decode_frames(rec), rec.extra)
            if len(chosen) == len(CLASS_NAMES):
                break
    size = int(info["frame_size"]["height"])
    frames = int(info["extra"].get("frames", 32))
    for c in range(len(CLASS_NAMES)):
        if c not in chosen:
            chosen[c] = generate_clip(clip_rng(info["extra"].get("seed", 0), "adhoc", c), c, frames=frames, size=size)
    tile = tile or max(size, 96)
    label_w, bar_h, header = 110, 6, 18
    T = chosen[0][0].shape[0]
    cols = np.unique(np.linspace(0, T - 1, min(columns, T)).round().astype(int))
    sheet = np.full((header + len(CLASS_NAMES) * (tile + bar_h + 4), label_w + len(cols) * (tile + 2), 3), 255,
                    np.uint8)
    for j, t in enumerate(cols):
        cv2.putText(sheet, f"t={t}", (label_w + j * (tile + 2) + 4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1,
                    cv2.LINE_AA)
    for c in range(len(CLASS_NAMES)):
        video, meta = chosen[c]
        y0 = header + c * (tile + bar_h + 4)
        cv2.putText(sheet, CLASS_NAMES[c], (6, y0 + tile // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                    cv2.LINE_AA)
        cv2.putText(sheet, f"int {meta.get('intensity', 0):.2f}", (6, y0 + tile // 2 + 18), cv2.FONT_HERSHEY_SIMPLEX,
                    0.35, (90, 90, 90), 1, cv2.LINE_AA)
        env = meta.get("envelope", [0.0] * T)
        for j, t in enumerate(cols):
            x0 = label_w + j * (tile + 2)
            frame = video[t] if tile == size else cv2.resize(video[t], (tile, tile), interpolation=cv2.INTER_NEAREST)
            sheet[y0:y0 + tile, x0:x0 + tile] = frame
            sheet[y0 + tile + 1:y0 + tile + 1 + bar_h, x0:x0 + int(round(env[t] * tile))] = (220, 60, 60)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cv2.imwrite(path, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return path


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m data_pipelines.synthetic")
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_pretrain", type=int, default=1400, help="unlabelled pretraining clips")
    p.add_argument("--train_per_class", type=int, default=60)
    p.add_argument("--val_per_class", type=int, default=20)
    p.add_argument("--test_per_class", type=int, default=30)
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--size", type=int, default=160, help="square frame side in pixels")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--clips_per_shard", type=int, default=128)
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--scenario", default="wild", choices=sorted(SCENARIOS),
                   help="recording conditions: wild (DFEW-like nuisance) or posed (lab: still, silent, plain)")
    p.add_argument("--contact_sheet", default=None, help="PNG path (default OUT/contact_sheet.png)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a dataset already in --out (default: refuse); shards that this run would write byte "
                        "for byte (same settings and generator code) are kept")
    a = p.parse_args(argv)
    if os.path.exists(os.path.join(a.out, "dataset_info.json")) and not a.overwrite:
        raise SystemExit(f"python -m data_pipelines.synthetic: error: --out {a.out!r} already holds a dataset; pass "
                         "--overwrite to replace it, or choose another --out")
    command = "python -m data_pipelines.synthetic " + " ".join(shlex.quote(x) for x in argv)
    info = build_dataset(a.out, seed=a.seed, num_pretrain=a.num_pretrain, train_per_class=a.train_per_class,
                         val_per_class=a.val_per_class, test_per_class=a.test_per_class, frames=a.frames,
                         size=a.size, workers=a.workers, clips_per_shard=a.clips_per_shard, quality=a.quality,
                         scenario=a.scenario, creation_command=command, progress=True)
    sheet = contact_sheet(a.out, a.contact_sheet or os.path.join(a.out, "contact_sheet.png"))
    ex = info["extra"]
    kept = info["num_clips"] - ex["clips_rendered"]
    print(f"[synthetic] wrote {info['num_clips']} clips in {ex['generation_seconds']} s "
          f"({ex['clips_per_second']} clips/s, {a.workers} workers"
          f"{f'; {kept} kept from an earlier run' if kept else ''})"
          f" to {a.out}; contact sheet {sheet}")
    return info


if __name__ == "__main__":
    main()

