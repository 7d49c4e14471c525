"""Throughput of the pre-training and fine-tuning input pipelines at the real geometry, and where the time goes.

Writes a temporary dataset of synthetic JPEG clips (frames stored at 160x160, 64-100 frames per clip so temporal
sampling matters), then

1. profiles one clip's work stage by stage in this process (record read, JPEG decode of the 16 sampled frames,
   crops/resizes, RandAugment, mask), and
2. measures clips/s of ``pretrain_pipeline`` and ``finetune_train_pipeline`` with worker_count 0, 1, 2: medians of
   several timed windows after a warm-up.

Usage::

    python -m benchmarks.data_pipeline --out /tmp/data_pipeline.json
    python -m benchmarks.data_pipeline --workers 0 1 2 4 --windows 7 --out results.json

Frames are smooth noise by default (blurred noise plus fine grain: JPEGs of ~10-20 KB, closer to face crops than
white noise); ``--texture white`` stores white noise (~40 KB per frame, a worst case for the decoder).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable

import cv2
import numpy as np

from data_pipelines import pipeline, records, transforms
from facemae_jax import masking


def synthetic_frames(rng: np.random.Generator, num_frames: int, size: int, texture: str) -> np.ndarray:
    """uint8 [F, size, size, 3] of noise; 'smooth' = low-frequency noise + grain, drifting slowly over time."""
    if texture == "white":
        return rng.integers(0, 256, (num_frames, size, size, 3), dtype=np.uint8)
    base = rng.normal(128, 50, (size // 8, size // 8, 3)).astype(np.float32)
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for f in range(num_frames):
        base += rng.normal(0, 4, base.shape).astype(np.float32)
        smooth = cv2.resize(base, (size, size), interpolation=cv2.INTER_CUBIC)
        frames[f] = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
    return frames


def write_dataset(
    directory: str, num_clips: int, size: int, frames_range: tuple[int, int], texture: str, seed: int
) -> dict:
    """Two shards + dataset_info.json following the shared dataset-directory convention."""
    rng = np.random.default_rng(seed)
    num_shards = 2
    names = [records.shard_name("bench", i, num_shards) for i in range(num_shards)]
    frame_counts = rng.integers(frames_range[0], frames_range[1] + 1, num_clips)
    jpeg_bytes, labels = [], []
    for shard, clip_ids in enumerate(np.array_split(np.arange(num_clips), num_shards)):
        with records.ShardWriter(os.path.join(directory, names[shard])) as writer:
            for c in clip_ids:
                rec = records.make_record(
                    f"bench{c:04d}", synthetic_frames(rng, int(frame_counts[c]), size, texture),
                    label=int(c % 7), fps=25.0, source="benchmarks/data_pipeline.py",
                )  # fmt: skip
                jpeg_bytes += [len(b) for b in rec.frames]
                labels.append(int(c % 7))
                writer.write(rec)
    info = {
        "format": "facemae_dataset", "version": 1, "name": "benchmark", "source": f"synthetic {texture} noise",
        "creation_command": " ".join(sys.argv), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "num_clips": num_clips, "shards": names, "frame_size": {"height": size, "width": size},
        "task": "classification", "class_names": [f"class{i}" for i in range(7)],
        "label_histogram": {str(k): labels.count(k) for k in range(7)},
        "splits": {"train": list(range(num_clips)), "pretrain": list(range(num_clips))},
        "skipped": [], "extra": {},
    }  # fmt: skip
    with open(os.path.join(directory, "dataset_info.json"), "w") as f:
        json.dump(info, f)
    return {"mean_frames_per_clip": float(frame_counts.mean()), "mean_jpeg_kb": float(np.mean(jpeg_bytes) / 1024)}


# ---------------------------------------------------------------------------------------------------------------
# Stage profile (one process, one clip at a time)
# ---------------------------------------------------------------------------------------------------------------


def _time_stage(stats: dict[str, list[float]], name: str, fn: Callable, *args):
    start = time.perf_counter()
    out = fn(*args)
    stats.setdefault(name, []).append(time.perf_counter() - start)
    return out


def profile_stages(directory: str, num_clips: int, size: int) -> dict[str, dict[str, float]]:
    """Median milliseconds per clip for each stage of the two training transforms, using the library functions."""
    split = pipeline.DatasetSplit.open(directory, "train")
    source = pipeline.ClipSource(split)
    rng = np.random.default_rng(0)
    multiscale = transforms.GroupMultiScaleCrop(size)
    multiscale_cv2 = transforms.GroupMultiScaleCrop(size, resize="cv2")
    mask = masking.make_mask_generator("tube_window", grid=(8, size // 16, size // 16), window=(5, size // 16))
    rand_augment = transforms.RandAugment("rand-m7-n4-mstd0.5-inc1")
    rrc = transforms.RandomResizedCrop(size)
    pre: dict[str, list[float]] = {}
    fine: dict[str, list[float]] = {}
    for position in range(num_clips):
        item = _time_stage(pre, "read record + msgpack", source.__getitem__, position % len(source))
        idx = transforms.pretrain_frame_indices(rng, item.record.num_frames, 16, 4)
        frames = _time_stage(pre, "jpeg decode 16 frames", records.decode_frames, item.record, idx[0])
        _time_stage(pre, "multi-scale crop + PIL resize", multiscale, frames, rng)
        _time_stage(pre, "(alt.) multi-scale crop + cv2 resize", multiscale_cv2, frames, rng)
        _time_stage(pre, "tube-window mask", mask, rng)

        item = _time_stage(fine, "read record + msgpack", source.__getitem__, position % len(source))
        idx = transforms.finetune_train_frame_indices(rng, item.record.num_frames, 16, 4)
        frames = _time_stage(fine, "jpeg decode 16 frames", records.decode_frames, item.record, idx)
        frames = _time_stage(fine, "PIL resize to square", transforms.resize_frames_pil, frames, size, size)
        frames = _time_stage(fine, "RandAugment (m7 n4)", rand_augment, frames, rng)
        frames = _time_stage(fine, "random resized crop", rrc, frames, rng)
        _time_stage(fine, "flip", transforms.random_horizontal_flip, frames, rng)
        _time_stage(fine, "erase box", transforms.random_erasing_box, rng, size, size)
    summary = {}
    for name, stats in (("pretrain", pre), ("finetune", fine)):
        stages = {stage: 1e3 * statistics.median(t) for stage, t in stats.items()}
        stages["total"] = sum(v for k, v in stages.items() if not k.startswith("(alt.)"))
        summary[name] = stages
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Pipeline throughput
# ---------------------------------------------------------------------------------------------------------------


def measure(make: Callable[[], pipeline.Pipeline], warmup: int, windows: int, window_batches: int) -> dict:
    pipe = make()
    it = iter(pipe)
    try:
        start = time.perf_counter()
        for _ in range(warmup):
            next(it)
        warmup_s = time.perf_counter() - start
        rates = []
        for _ in range(windows):
            start = time.perf_counter()
            for _ in range(window_batches):
                batch = next(it)
            rates.append(window_batches * batch["video"].shape[0] / (time.perf_counter() - start))
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    return {"clips_per_s": statistics.median(rates), "windows": rates, "warmup_s": warmup_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write results as JSON here")
    parser.add_argument("--clips", type=int, default=64, help="clips in the temporary dataset")
    parser.add_argument("--frames", type=int, nargs=2, default=(64, 100), help="min/max frames per clip")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--texture", choices=("smooth", "white"), default="smooth")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=(0, 1, 2))
    parser.add_argument("--read-threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3, help="batches before timing (workers start here)")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--window-batches", type=int, default=4)
    parser.add_argument("--profile-clips", type=int, default=40)
    parser.add_argument(
        "--pipelines",
        nargs="+",
        default=("pretrain", "pretrain_cv2", "finetune"),
        choices=("pretrain", "pretrain_cv2", "finetune"),
    )
    args = parser.parse_args()

    directory = tempfile.mkdtemp(prefix="facemae_bench_")
    try:
        start = time.perf_counter()
        data = write_dataset(directory, args.clips, args.size, tuple(args.frames), args.texture, seed=0)
        print(
            f"dataset: {args.clips} clips, {data['mean_frames_per_clip']:.0f} frames/clip, "
            f"{data['mean_jpeg_kb']:.1f} KB/frame ({args.texture}), written in {time.perf_counter() - start:.1f} s"
        )

        profile = profile_stages(directory, args.profile_clips, args.size)
        for name, stages in profile.items():
            print(f"\n{name} transform, ms per clip (median over {args.profile_clips} clips, one process):")
            for stage, ms in stages.items():
                print(f"  {stage:<32s} {ms:7.2f}")

        geometry = dict(batch_size=args.batch_size, seed=0, num_frames=16, sampling_rate=4, image_size=args.size)

        def pretrain(opts, resize):
            return pipeline.pretrain_pipeline(
                directory,
                "pretrain",
                patch_size=16,
                mask_kind="tube_window",
                mask_window=(5, args.size // 16),
                multiscale_resize=resize,
                options=opts,
                **geometry,
            )

        makers = {
            "pretrain": lambda opts: pretrain(opts, "pil"),
            "pretrain_cv2": lambda opts: pretrain(opts, "cv2"),
            "finetune": lambda opts: pipeline.finetune_train_pipeline(directory, "train", options=opts, **geometry),
        }  # fmt: skip
        results = []
        print(f"\nload average before timing: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(
            f"\nthroughput (batch {args.batch_size}, median of {args.windows} windows x {args.window_batches} batches):"
        )
        print(f"  {'pipeline':<10s} {'workers':>7s} {'clips/s':>9s} {'per worker':>11s} {'warm-up s':>10s}")
        for name in args.pipelines:
            for workers in args.workers:
                opts = pipeline.LoaderOptions(worker_count=workers, read_threads=args.read_threads)
                r = measure(functools.partial(makers[name], opts), args.warmup, args.windows, args.window_batches)
                per_worker = r["clips_per_s"] / max(workers, 1)
                results.append({"pipeline": name, "workers": workers, "per_worker_clips_per_s": per_worker, **r})
                print(
                    f"  {name:<10s} {workers:>7d} {r['clips_per_s']:>9.1f} {per_worker:>11.1f} {r['warmup_s']:>10.1f}"
                )

        report = {
            "command": " ".join(sys.argv),
            "machine": {
                "platform": platform.platform(),
                "cpu_count": os.cpu_count(),
                "python": platform.python_version(),
                "load_average_1m": os.getloadavg()[0],
            },  # fmt: skip
            "dataset": {"clips": args.clips, "size": args.size, "texture": args.texture, **data},
            "profile_ms_per_clip": profile,
            "throughput": results,
        }
        for name in ("pretrain", "finetune"):
            single = 1e3 / profile[name]["total"]
            print(
                f"\n{name}: one core does ~{single:.0f} clips/s by the stage profile -> ~{single * 15:.0f} clips/s "
                "with 15 workers on a 16-core host (one core left for the trainer)"
            )
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
            print(f"wrote {args.out}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
