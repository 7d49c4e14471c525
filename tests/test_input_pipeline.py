"""Input-pipeline throughput features: device-augmentation batches, worker autotuning, input-wait measurement, and
the benchmark's quick mode (README "Input pipeline")."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_pipeline import FRAMES, SIZE, finetune, take, write_dataset

from data_pipelines import worker_autotune
from facemae_jax import input_timing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny_input"))
    write_dataset(d)
    return d


def test_device_mode_batches_carry_boxes_and_the_unaugmented_frames(directory):
    off = dict(rand_augment=None, crop_scale=None, flip_probability=0.0, erase_probability=0.5)
    host = take(iter(finetune(directory, **off)), 2)
    device = take(iter(finetune(directory, rand_augment_on="device", **off)), 2)
    for h, d in zip(host, device):
        assert set(d) == {"video", "label", "erase_box", "crop_box", "flip"}
        # with nothing random on the host path, both modes draw the same numbers: same clips, frames, erase boxes
        for key in ("video", "label", "erase_box"):
            assert np.array_equal(h[key], d[key]), key
        assert (d["crop_box"] == [0, 0, SIZE, SIZE]).all() and not d["flip"].any()
    full = next(iter(finetune(directory, rand_augment_on="device", crop_scale=(0.08, 1.0))))
    assert full["video"].shape == (4, FRAMES, SIZE, SIZE, 3) and full["crop_box"].dtype == np.int32
    top, left, h, w = full["crop_box"].T
    assert (h > 0).all() and (w > 0).all() and (top + h <= SIZE).all() and (left + w <= SIZE).all()
    with pytest.raises(ValueError, match="rand_augment_on"):
        finetune(directory, rand_augment_on="gpu")
    # a position of one mode cannot be restored into the other (other batch contents)
    for saved_mode, restored_mode in (("device", "host"), ("host", "device")):
        state = iter(finetune(directory, rand_augment_on=saved_mode)).get_state()
        with pytest.raises(ValueError, match="augment_on"):
            iter(finetune(directory, rand_augment_on=restored_mode)).set_state(state)


def test_worker_autotune_rules():
    choose = worker_autotune.choose
    two = worker_autotune.Machine(cores=2, processes_per_host=1, available_ram_bytes=8 << 30)
    assert choose(machine=two).worker_count == 0  # one spare core: in-process is faster than one worker
    node = worker_autotune.Machine(cores=96, processes_per_host=8, available_ram_bytes=512 << 30)
    picked = choose(machine=node, batch_bytes=12 * 16 * 160 * 160 * 3)
    assert (picked.worker_count, picked.worker_buffer_size, picked.prefetch_batches) == (11, 2, 2)
    assert "96 cores / 8 process(es)" in picked.describe()
    tight = worker_autotune.Machine(cores=64, processes_per_host=1, available_ram_bytes=1 << 30)
    capped = choose(machine=tight, batch_bytes=64 << 20)  # 256 MiB budget / (64 MiB x 3 buffers) -> 1 worker
    assert capped.worker_count == 1 and "RAM caps" in capped.reason
    fixed = choose(3, 5, 4, machine=node)
    assert (fixed.worker_count, fixed.prefetch_batches, fixed.worker_buffer_size) == (3, 5, 4)
    with pytest.raises(ValueError, match="worker_count"):
        choose(-2, machine=node)


def test_local_process_count_comes_from_the_launcher(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert worker_autotune.Machine.detect().processes_per_host == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8(x2)")
    assert worker_autotune.Machine.detect().processes_per_host == 8


def test_input_wait_fraction_and_one_warning():
    now = [0.0]
    meter = input_timing.InputWaitMeter(clock=lambda: now[0])

    def slow_batches(wait):
        while True:
            now[0] += wait  # the iterator takes `wait` seconds to produce a batch
            yield {}

    it = slow_batches(0.3)
    meter.next(it)  # start-up batch: not counted
    for _ in range(4):
        meter.next(it)
        now[0] += 0.1  # the loop's own work per step
    assert meter.window() == pytest.approx(0.75)
    assert "75%" in meter.warning(0.75, 4)
    assert meter.warning(0.9, 8) is None  # once
    fast = input_timing.InputWaitMeter(clock=lambda: now[0])
    fed = slow_batches(0.0)
    fast.next(fed)
    for _ in range(3):
        fast.next(fed)
        now[0] += 0.2
    assert fast.window() == 0.0 and fast.warning(0.0, 3) is None


@pytest.mark.slow  # ~1 min of CPU (XLA compiles of the augmentation with mixup, worker start-up)
def test_benchmark_quick_mode_writes_the_report(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = ""  # one CPU device, like a user's run
    proc = subprocess.run([sys.executable, "-m", "benchmarks.data_pipeline", "--quick", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    per_core = report["per_core_ms_per_clip"]
    assert per_core["pretrain"] > 0 and per_core["finetune"] > 0 and per_core["finetune_host_randaugment"] > 0
    assert report["calibration"]["jpeg_decode_160px_ms"] > 0
    assert {r["workers"] for r in report["throughput"]} == {0, 1}
    assert {r["pipeline"] for r in report["throughput"]} == {"pretrain", "finetune", "finetune_host_randaugment"}
    device = report["device_augment"]
    assert device["ms_per_batch"] > 0 and 0 < device["fraction_of_train_step"]
    assert [row["job"] for row in report["demand_supply"]][:2] == ["LGI finetune", "MAE-DFER pretrain"]


@pytest.mark.slow  # three launches of the tiny trainer (~1 min each on an idle 2-core machine)
def test_device_augmented_training_resumes_bit_identically(tmp_path):
    """data.rand_augment_on='device': stopping at step 2 and rerunning gives the uninterrupted run's weights."""
    from test_train import SMALL_LGI, _config_file, _export_params, _launch

    from data_pipelines import synthetic

    data = tmp_path / "faces"
    synthetic.build_dataset(str(data), seed=0, num_pretrain=8, train_per_class=2, val_per_class=1, test_per_class=1,
                            frames=10, size=32, workers=1, clips_per_shard=16)  # fmt: skip
    assert SMALL_LGI["img_size"] == 32
    config = _config_file(tmp_path, str(data))
    common = ["--config.final_eval=False", "--config.data.rand_augment_on=device", "--config.optim.total_steps=4"]
    ref = _launch(config, str(tmp_path / "ref"), *common)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    first = _launch(config, str(tmp_path / "split"), *common, "--config.optim.stop_after_steps=2")
    assert first.returncode == 0, first.stdout + first.stderr
    second = _launch(config, str(tmp_path / "split"), *common)
    assert second.returncode == 0 and "[resume] restored step 2" in second.stdout + second.stderr
    a, b = _export_params(str(tmp_path / "ref")), _export_params(str(tmp_path / "split"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
