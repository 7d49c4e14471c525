"""Input-pipeline cost per clip and per core, what the device part costs, and whether a host can feed an accelerator.

Writes a temporary dataset of synthetic JPEG clips (frames stored at 160x160, 64-100 frames per clip so temporal
sampling matters; smooth noise of ~15 KB per frame, like face crops), then, in one run:

1. **calibration**: decode time of one fixed 160 px JPEG (start and end of the run), the load average and the CPU
   count, so numbers from a shared machine can be compared (ratios to the calibration are load-independent-ish);
2. **per_core_ms_per_clip**: one process, no workers, the published recipe, CPU time of this thread per clip
   (``time.thread_time``: what one core spends, not inflated by other processes on a shared machine); wall-clock
   medians beside it. ``pretrain``: read + decode + multi-scale crop (fast resize, the default) + tube-window mask;
   ``finetune``: the host part when RandAugment runs on device (read + decode + resize + box sampling);
   ``finetune_host_randaugment``: the faithful all-host path (PIL RandAugment, crop, flip). Stage breakdowns too;
3. **device_augment**: RandAugment + crop + flip + normalise + erasing + mixup/cutmix for a batch under ``jit`` on
   this machine's accelerator (CPU here), against the LGI-Former fine-tuning train step it feeds (same batch);
4. **throughput**: clips/s of the real grain pipelines with 0, 1, 2 worker processes (wall clock);
5. **demand_supply**: clips/s an H100/H200, a TPU v4 or v5e chip consumes at a target MFU, against what the host
   cores next to it supply at the measured per-core cost.

Usage::

    python -m benchmarks.data_pipeline --out results/data_pipeline_cpu.json
    python -m benchmarks.data_pipeline --quick --out /tmp/quick.json   # CI: tiny, ~1 minute
"""

from __future__ import annotations

import argparse
import dataclasses
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

from configs.base import base_config
from data_pipelines import clip_transforms, dataset_info, pipeline, records, transforms
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
    dataset_info.write(directory, dataset_info.make(
        name="benchmark", source=f"synthetic {texture} noise", creation_command=" ".join(sys.argv),
        num_clips=num_clips, shards=names, frame_size={"height": size, "width": size}, task="classification",
        class_names=[f"class{i}" for i in range(7)], label_histogram={str(k): labels.count(k) for k in range(7)},
        splits={"train": list(range(num_clips)), "pretrain": list(range(num_clips))},
    ))
    return {"mean_frames_per_clip": float(frame_counts.mean()), "mean_jpeg_kb": float(np.mean(jpeg_bytes) / 1024)}



# ---------------------------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------------------------


def calibration(repeats: int) -> dict[str, float]:
    """Median ms to decode one fixed 160 px JPEG (the same bytes in every run), CPU time and wall clock."""
    frame = synthetic_frames(np.random.default_rng(12345), 1, 160, "smooth")[0]
    data = records.encode_jpeg(frame)
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = time.thread_time(), time.perf_counter()
        records.decode_jpeg(data)
        cpu.append(time.thread_time() - c)
        wall.append(time.perf_counter() - w)
    return {"jpeg_decode_160px_ms": 1e3 * statistics.median(cpu),
            "jpeg_decode_160px_wall_ms": 1e3 * statistics.median(wall), "load_average_1m": os.getloadavg()[0]}


# ---------------------------------------------------------------------------------------------------------------
# Per-core cost (one process, one clip at a time)
# ---------------------------------------------------------------------------------------------------------------


class StageClock:
    """Per-stage CPU time (this thread) and wall time of the library calls, medians over clips."""

    def __init__(self):
        self.cpu: dict[str, list[float]] = {}
        self.wall: dict[str, list[float]] = {}

    def __call__(self, name: str, fn: Callable, *args):
        c, w = time.thread_time(), time.perf_counter()
        out = fn(*args)
        self.cpu.setdefault(name, []).append(time.thread_time() - c)
        self.wall.setdefault(name, []).append(time.perf_counter() - w)
        return out

    def summary(self) -> dict[str, dict[str, float]]:
        return {name: {"cpu_ms": 1e3 * statistics.median(v), "wall_ms": 1e3 * statistics.median(self.wall[name])}
                for name, v in self.cpu.items()}  # fmt: skip


def per_core_profile(directory: str, size: int, passes: int) -> dict[str, dict]:
    """Every clip of the dataset ``passes`` times through each recipe: end-to-end element cost + stage breakdown.

    Between clips, 16 decodes of the fixed calibration JPEG are timed too ("calibration: ..."): on a shared machine
    CPU time per instruction drifts with the neighbours' load (shared caches, hyperthread siblings), and this
    measures the drift under the same conditions as the recipes."""
    split = pipeline.DatasetSplit.open(directory, "train")
    source = pipeline.ClipSource(split)
    grid = (8, size // 16, size // 16)
    mask = masking.make_mask_generator("tube_window", grid=grid, window=(5, size // 16))
    rrc = transforms.RandomResizedCrop(size)
    d = base_config().data  # the published recipes
    geometry = pipeline.ClipGeometry(num_frames=16, sampling_rate=d.sampling_rate, image_size=size)
    pretrain_args = dict(mask_generator=mask, geometry=geometry, num_samples=1, fixed_crop_size=None)
    finetune_args = dict(split=split, geometry=geometry, random_resized_crop=rrc, flip_probability=d.flip_probability,
                         erase_probability=d.erase_probability, dct_downscale=d.jpeg_dct_downscale)
    recipes = {
        "pretrain": clip_transforms.PretrainExample(
            **pretrain_args, multiscale_crop=transforms.GroupMultiScaleCrop(size, resize="fast")),
        "pretrain_pil_resize": clip_transforms.PretrainExample(
            **pretrain_args, multiscale_crop=transforms.GroupMultiScaleCrop(size)),
        "finetune": clip_transforms.FinetuneTrainExample(**finetune_args, rand_augment=None, device_augment=True),
        "finetune_host_randaugment": clip_transforms.FinetuneTrainExample(
            **finetune_args, rand_augment=transforms.RandAugment("rand-m7-n4-mstd0.5-inc1"), device_augment=False),
    }  # fmt: skip
    stages = {name: StageClock() for name in ("pretrain", "finetune_host_randaugment")}
    total = StageClock()
    rng = np.random.default_rng(0)
    ra = transforms.RandAugment("rand-m7-n4-mstd0.5-inc1")
    multiscale = transforms.GroupMultiScaleCrop(size, resize="fast")
    multiscale_pil = transforms.GroupMultiScaleCrop(size)
    calibration_jpeg = records.encode_jpeg(synthetic_frames(np.random.default_rng(12345), 1, size, "smooth")[0])
    for _ in range(passes):
        for position in range(len(source)):
            total("calibration: 16 decodes of the fixed JPEG",
                  lambda: [records.decode_jpeg(calibration_jpeg) for _ in range(16)])  # fmt: skip
            for name, recipe in recipes.items():
                total(name, lambda p, r=recipe: r(source[p], rng), position)
            # stage breakdowns with the same library calls
            st = stages["pretrain"]
            item = st("read record + msgpack", source.__getitem__, position)
            idx = transforms.pretrain_frame_indices(rng, item.record.num_frames, 16, 4)
            frames = st("jpeg decode 16 frames", records.decode_frames, item.record, idx[0])
            st("multi-scale crop + fast resize", multiscale, frames, rng)
            st("(alt.) multi-scale crop + PIL resize", multiscale_pil, frames, rng)
            st("tube-window mask", mask, rng)
            st = stages["finetune_host_randaugment"]
            item = st("read record + msgpack", source.__getitem__, position)
            idx = transforms.finetune_train_frame_indices(rng, item.record.num_frames, 16, 4)
            frames = st("jpeg decode 16 frames", records.decode_frames, item.record, idx, size)
            frames = st("PIL resize to square (no-op at 160)", transforms.resize_frames_pil, frames, size, size)
            st("crop box + flip + erase box (device mode)", lambda: (
                transforms.device_augment_boxes(rng, size, size, rrc, 0.5),
                transforms.random_erasing_box(rng, size, size)))  # fmt: skip
            frames = st("RandAugment m7 n4 (PIL)", ra, frames, rng)
            frames = st("random resized crop", rrc, frames, rng)
            st("flip", transforms.random_horizontal_flip, frames, rng)
            st("erase box", transforms.random_erasing_box, rng, size, size)
    return {"elements": total.summary(), "stages": {k: v.summary() for k, v in stages.items()}}


# ---------------------------------------------------------------------------------------------------------------
# Device part: augmentation vs the train step it feeds
# ---------------------------------------------------------------------------------------------------------------


def device_augment_cost(model_name: str, overrides: dict, batch: int, repeats: int) -> dict:
    """Median ms of (a) the on-device augmentation of one batch (RandAugment, crop, flip, normalise, erase,
    mixup/cutmix) and (b) the fine-tuning train step on the same batch without it, on jax's default device."""
    import jax
    import jax.numpy as jnp
    import optax

    from configs.base import base_config
    from facemae_jax import augment, randaugment, sharding, steps, targets
    from facemae_jax.models import create_model, get_config
    from facemae_jax.train import create_state

    cfg = get_config(model_name, **overrides)
    t, s = cfg.num_frames, cfg.img_size
    rng = np.random.default_rng(0)
    host = {
        "video": rng.integers(0, 256, (batch, t, s, s, 3), dtype=np.uint8),
        "label": rng.integers(0, cfg.num_classes, batch).astype(np.int32),
        "erase_box": np.stack([transforms.random_erasing_box(rng, s, s, 1.0) for _ in range(batch)]),
    }
    boxes = [transforms.device_augment_boxes(rng, s, s, transforms.RandomResizedCrop(s), 0.5) for _ in range(batch)]
    crop_box, flip = np.stack([b for b, _ in boxes]), np.array([f for _, f in boxes])
    ra = randaugment.DeviceRandAugment.from_string("rand-m7-n4-mstd0.5-inc1")
    mix = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5)

    @jax.jit
    def device_augment(video, crop_box, flip, erase_box, label, key):
        k_ra, k_erase, k_mix = jax.random.split(key, 3)
        x = targets.normalize_video(augment.device_video_augment(video, crop_box, flip, k_ra, ra, s))
        x = augment.random_erase(x, erase_box, k_erase)
        y = optax.smooth_labels(jax.nn.one_hot(label, cfg.num_classes, dtype=jnp.float32), 0.1)
        return augment.mixup_cutmix(x, y, k_mix, **mix)[:2]

    def timed(fn, *args) -> tuple[float, float, float]:
        """-> (first call s, median wall ms, median CPU ms of the whole process: on a CPU backend this is the work
        done, whatever share of the shared machine the process got; on an accelerator use the wall time)."""
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        first = time.perf_counter() - start
        wall, cpu = [], []
        for _ in range(repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(*args))
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
        return first, 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)

    key = jax.random.key(0)
    aug_args = tuple(jnp.asarray(a) for a in (host["video"], crop_box, flip, host["erase_box"], host["label"]))
    aug_first, aug_wall, aug_cpu = timed(device_augment, *aug_args, key)

    model = create_model(cfg)
    tx = optax.adamw(1e-4)
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    state, _ = create_state(model, cfg, tx, mesh, base_config().sharding_rules, 0, None)
    step = jax.jit(steps.make_finetune_step(model, cfg, tx, 0, mixup=mix))
    device_batch = {k: jnp.asarray(v) for k, v in host.items()}
    compiled = step.lower(state, device_batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    step_first, step_wall, step_cpu = timed(compiled, state, device_batch)
    on_cpu = jax.devices()[0].platform == "cpu"
    aug_ms, step_ms = (aug_cpu, step_cpu) if on_cpu else (aug_wall, step_wall)
    return {
        "model": model_name, "batch": batch, "frames": t, "size": s, "device": str(jax.devices()[0].platform),
        "timing": "process CPU time" if on_cpu else "wall clock",
        "ms_per_batch": aug_ms, "compile_and_first_s": aug_first, "wall_ms_per_batch": aug_wall,
        "train_step_ms": step_ms, "train_step_compile_and_first_s": step_first, "train_step_wall_ms": step_wall,
        "fraction_of_train_step": aug_ms / step_ms, "fraction_of_train_step_wall": aug_wall / step_wall,
        "load_average_1m": os.getloadavg()[0],
        "train_step_gflop_per_clip": float(cost.get("flops", float("nan"))) / batch / 1e9 if cost else None,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Pipeline throughput (real grain pipelines, wall clock)
# ---------------------------------------------------------------------------------------------------------------


def measure(make: Callable[[], pipeline.Pipeline], warmup: int, windows: int, window_batches: int) -> dict:
    it = iter(make())
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
        it.close()
    return {"clips_per_s": statistics.median(rates), "windows": rates, "warmup_s": warmup_s}


# ---------------------------------------------------------------------------------------------------------------
# Demand / supply
# ---------------------------------------------------------------------------------------------------------------

# Peak dense bf16 FLOP/s per chip and host vCPUs per chip (public spec sheets): H100/H200 SXM 989 TFLOP/s, 8-GPU
# nodes with 16-26 vCPUs per GPU (the range; e.g. 208 vCPUs / 8 GPUs on a cloud a3-highgpu-8g); TPU v4
# 275 TFLOP/s, 240 vCPUs per 4-chip host; TPU v5e 197 TFLOP/s, 224 vCPUs per 8-chip host (ct5lp-hightpu-8t).
ACCELERATORS = (
    ("H100/H200 (16 vCPU/GPU)", 989e12, 16), ("H100/H200 (26 vCPU/GPU)", 989e12, 26),
    ("TPU v4 (60 vCPU/chip)", 275e12, 60), ("TPU v5e (28 vCPU/chip)", 197e12, 28),
)  # fmt: skip
# Forward GFLOP per 16x160x160 view (issue 16: LGI-Former fine-tune 99, MAE-DFER pre-training 28); train ~ 3x.
JOBS = (
    ("LGI finetune", "finetune", 99e9, 0.45),
    ("LGI finetune (RandAugment on host)", "finetune_host_randaugment", 99e9, 0.45),
    ("MAE-DFER pretrain", "pretrain", 28e9, 0.35),
)  # fmt: skip


def demand_supply(per_core_ms: dict[str, float]) -> list[dict]:
    rows = []
    for job, key, forward_flops, mfu in JOBS:
        for accelerator, peak, cores in ACCELERATORS:
            demand = peak * mfu / (3 * forward_flops)  # clips/s per chip
            supply = cores * 1e3 / per_core_ms[key]
            rows.append({
                "job": job, "accelerator": accelerator, "mfu": mfu, "demand_clips_per_s": demand,
                "needed_ms_per_clip_per_core": cores * 1e3 / demand, "measured_ms_per_clip_per_core": per_core_ms[key],
                "cores_needed": demand * per_core_ms[key] / 1e3, "cores_available": cores,
                "supply_clips_per_s": supply, "supply_over_demand": supply / demand,
            })  # fmt: skip
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n  {'job':<36s} {'accelerator':<26s} {'demand/s':>9s} {'need ms/clip/core':>18s} {'have':>6s} "
          f"{'cores needed':>13s} {'supply/demand':>14s}")  # fmt: skip
    for r in rows:
        print(f"  {r['job']:<36s} {r['accelerator']:<26s} {r['demand_clips_per_s']:9.0f} "
              f"{r['needed_ms_per_clip_per_core']:18.1f} {r['measured_ms_per_clip_per_core']:6.1f} "
              f"{r['cores_needed']:13.1f} {r['supply_over_demand']:14.2f}")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write results as JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny run for CI: 8 clips, short windows, tiny model")
    parser.add_argument("--clips", type=int, default=64, help="clips in the temporary dataset (>= 64 for the record)")
    parser.add_argument("--frames", type=int, nargs=2, default=(64, 100), help="min/max frames per clip")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--texture", choices=("smooth", "white"), default="smooth")
    parser.add_argument("--passes", type=int, default=2, help="profile passes over the dataset")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=(0, 1, 2))
    parser.add_argument("--warmup", type=int, default=3, help="batches before timing (workers start here)")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--window-batches", type=int, default=4)
    parser.add_argument("--device-model", default="vit_base_dim512_no_depth_patch16_160",
                        help="model whose train step the device augmentation is compared with (LGI-Former base)")
    parser.add_argument("--device-batch", type=int, default=2)
    parser.add_argument("--device-repeats", type=int, default=3)
    parser.add_argument("--device-only", action="store_true",
                        help="run only the device part and replace 'device_augment' in the existing --out JSON")
    args = parser.parse_args()
    overrides: dict = {}
    if args.quick:
        args.clips, args.frames, args.passes, args.workers = 8, (24, 40), 1, (0, 1)
        args.warmup, args.windows, args.window_batches, args.batch_size = 1, 2, 2, 4
        args.device_model, args.device_repeats = "lgi_tiny_finetune", 2
        overrides = dict(num_frames=4, img_size=32, patch_size=8, embed_dim=32, num_heads=2, depth=2,
                         region_size=(2, 2, 4))  # fmt: skip

    if args.device_only:
        device = device_augment_cost(args.device_model, overrides, args.device_batch, args.device_repeats)
        device["command"] = "python -m benchmarks.data_pipeline " + " ".join(sys.argv[1:])
        report = {}
        if args.out and os.path.exists(args.out):
            with open(args.out) as f:
                report = json.load(f)
        report["device_augment"] = device
        print(json.dumps(device, indent=1))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
        return

    directory = tempfile.mkdtemp(prefix="facemae_bench_")
    try:
        report: dict = {"command": "python -m benchmarks.data_pipeline " + " ".join(sys.argv[1:])}
        report["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                             "python": platform.python_version()}  # fmt: skip
        report["calibration"] = calibration(50 if args.quick else 400)
        start = time.perf_counter()
        data = write_dataset(directory, args.clips, args.size, tuple(args.frames), args.texture, seed=0)
        report["dataset"] = {"clips": args.clips, "size": args.size, "texture": args.texture, **data}
        print(f"calibration: {report['calibration']}")
        print(f"dataset: {args.clips} clips, {data['mean_frames_per_clip']:.0f} frames/clip, "
              f"{data['mean_jpeg_kb']:.1f} KB/frame, written in {time.perf_counter() - start:.1f} s")  # fmt: skip

        profile = per_core_profile(directory, args.size, args.passes)
        elements = profile["elements"]
        recipes = [k for k in elements if not k.startswith("calibration")]
        report["per_core_ms_per_clip"] = {k: elements[k]["cpu_ms"] for k in recipes}
        report["wall_ms_per_clip"] = {k: elements[k]["wall_ms"] for k in recipes}
        decode = elements["calibration: 16 decodes of the fixed JPEG"]["cpu_ms"] / 16
        report["calibration"]["jpeg_decode_160px_ms_during_profile"] = decode
        report["per_core_in_jpeg_decodes"] = {k: elements[k]["cpu_ms"] / decode for k in recipes}
        report["stages_ms_per_clip"] = profile["stages"]
        print(f"\nper clip, one process (CPU ms of this thread / wall ms; median over {args.passes} x {args.clips}):")
        for name, v in elements.items():
            print(f"  {name:<28s} {v['cpu_ms']:7.2f} / {v['wall_ms']:7.2f}  (= {v['cpu_ms'] / decode:.1f} decodes)")
        for recipe, stages in profile["stages"].items():
            print(f"  stages of {recipe}:")
            for stage, v in stages.items():
                print(f"    {stage:<44s} {v['cpu_ms']:7.2f} / {v['wall_ms']:7.2f}")

        print(f"\ndevice augmentation vs the {args.device_model} train step (batch {args.device_batch}) ...",
              flush=True)
        device = device_augment_cost(args.device_model, overrides, args.device_batch, args.device_repeats)
        report["device_augment"] = device
        print(f"  augmentation {device['ms_per_batch']:.1f} ms, train step {device['train_step_ms']:.1f} ms -> "
              f"{100 * device['fraction_of_train_step']:.2f}% ({device['device']}, {device['timing']})")  # fmt: skip

        d = base_config().data  # the published recipes, MAE-DFER's mask
        common = dict(batch_size=args.batch_size, seed=0,
                      geometry=pipeline.ClipGeometry(num_frames=16, sampling_rate=d.sampling_rate,
                                                     image_size=args.size))
        mask = masking.MaskGenerator("tube_window", grid=(8, args.size // 16, args.size // 16), mask_ratio=0.9,
                                     window=(5, args.size // 16))
        pretrain_augment = pipeline.PretrainAugment(num_samples=d.num_samples, fixed_crop_size=None,
                                                    multiscale_scales=tuple(d.multiscale_scales),
                                                    multiscale_resize=d.multiscale_resize)
        finetune_augment = pipeline.FinetuneAugment(
            rand_augment=d.rand_augment, crop_scale=tuple(d.crop_scale), flip_probability=d.flip_probability,
            erase_probability=d.erase_probability, rand_augment_on="host", dct_downscale=d.jpeg_dct_downscale)
        on_device = dataclasses.replace(finetune_augment, rand_augment_on="device")
        makers = {
            "pretrain": lambda o: pipeline.pretrain_pipeline(directory, "pretrain", mask=mask,
                                                             augment=pretrain_augment, options=o, **common),
            "finetune": lambda o: pipeline.finetune_train_pipeline(directory, "train", augment=on_device, options=o,
                                                                   **common),
            "finetune_host_randaugment": lambda o: pipeline.finetune_train_pipeline(
                directory, "train", augment=finetune_augment, options=o, **common),
        }  # fmt: skip
        report["load_average_before_throughput"] = os.getloadavg()[0]
        print(f"\nthroughput (batch {args.batch_size}, median of {args.windows} windows x {args.window_batches} "
              f"batches, load {report['load_average_before_throughput']:.1f} on {os.cpu_count()} cores):")  # fmt: skip
        results = []
        for name, make in makers.items():
            for workers in args.workers:
                opts = pipeline.LoaderOptions(worker_count=workers, worker_buffer_size=2 if workers else 1)
                r = measure(lambda: make(opts), args.warmup, args.windows, args.window_batches)  # noqa: B023 (called here)
                results.append({"pipeline": name, "workers": workers, **r})
                print(f"  {name:<28s} workers {workers}: {r['clips_per_s']:7.1f} clips/s  "
                      f"(warm-up {r['warmup_s']:.1f} s)")
        report["throughput"] = results

        report["demand_supply"] = demand_supply(report["per_core_ms_per_clip"])
        print("\ndemand (one chip at the target MFU) vs supply (its host cores at the measured per-core cost):")
        print_table(report["demand_supply"])
        end = calibration(50 if args.quick else 400)
        report["calibration_end"] = end
        report["machine"]["load_average_1m_end"] = end["load_average_1m"]
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
            print(f"wrote {args.out}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
