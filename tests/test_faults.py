"""Fault injection: each storage fault or wrong command of issue 18 is reproduced on tiny data and must give one
clear message (what, where, what to do) and lose nothing.

Cases: split/fold leakage between dataset_info.json and the shards, a train split overlapping its test split,
corrupted checkpoints (fallback to the newest that verifies, or stop), a model shape changed since the checkpoint,
disk full during an asynchronous save (a real 3 MiB tmpfs; needs root), a damaged or 0-byte shard, a damaged
dataset_info.json, a mistyped --config for an existing workdir, convert/extract over existing results, an empty
eval split (found before training), and a conversion where every input is skipped.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import dataset_info, pipeline, records
from facemae_jax import checkpoint as ckpt_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["a", "b", "c"]


# ---------------------------------------------------------------------------------------------------------------
# A hand-made dataset directory: 3 shards of 4 clips (train, train, test), or 5-fold records
# ---------------------------------------------------------------------------------------------------------------


def _write_dataset(directory, layout: list[list[dict]], splits: dict[str, list[int]], name="toy") -> str:
    """layout: per shard, the records' metadata (split / fold / label). Returns the directory."""
    os.makedirs(directory, exist_ok=True)
    frames = np.full((2, 8, 8, 3), 128, np.uint8)
    names, n = [], 0
    for i, shard in enumerate(layout):
        shard_file = records.shard_name(name, i, len(layout))
        with records.ShardWriter(os.path.join(directory, shard_file)) as w:
            for meta in shard:
                w.write(records.make_record(f"clip{n:03d}", frames, source=f"toy/{n}", **meta))
                n += 1
        names.append(shard_file)
    info = {"format": "facemae_dataset", "version": 1, "name": name, "num_clips": n, "shards": names,
            "task": "classification", "class_names": CLASSES, "splits": splits,
            "creation_command": f"python -m data_pipelines.build csv --annotations ann --out {directory}"}
    with open(os.path.join(directory, "dataset_info.json"), "w") as f:
        json.dump(info, f)
    return str(directory)


def _plain_dataset(directory, test_split_empty=False) -> str:
    layout = [[{"split": "train", "label": i % 3} for i in range(4)],
              [{"split": "train", "label": i % 3} for i in range(4)],
              [{"split": "test", "label": i % 3} for i in range(4)]]
    splits = {"train": list(range(8)), "test": [] if test_split_empty else list(range(8, 12))}
    return _write_dataset(directory, layout, splits)


def _edit_info(directory, edit) -> None:
    path = os.path.join(directory, "dataset_info.json")
    info = json.load(open(path))
    edit(info)
    json.dump(info, open(path, "w"))


# ---------------------------------------------------------------------------------------------------------------
# 1. Split integrity
# ---------------------------------------------------------------------------------------------------------------


def test_swapped_shards_in_dataset_info_are_refused_when_the_split_opens(tmp_path):
    d = _plain_dataset(tmp_path / "ds")
    _edit_info(d, lambda info: info["shards"].__setitem__(slice(1, 3), info["shards"][1:3][::-1]))  # train <-> test
    with pytest.raises(records.RecordError) as e:  # SplitIntegrityError
        pipeline.DatasetSplit.open(d, "train")
    msg = str(e.value)
    assert "toy-00002-of-00003.array_record record 0" in msg  # which shard and record
    assert "expected split 'train', found split 'test'" in msg  # expected vs found
    assert "python -m data_pipelines.build csv" in msg  # how to repair
    with pytest.raises(records.RecordError, match="expected split 'test', found split 'train'"):
        pipeline.DatasetSplit.open(d, "test")


def test_every_record_read_in_the_input_pipeline_is_checked(tmp_path, monkeypatch):
    """A mismatch that the sample at open time misses still stops the pipeline at that record."""
    d = _plain_dataset(tmp_path / "ds")
    def test_clips_as_train(info):
        info["splits"]["train"] = list(range(12))
        del info["splits"]["test"]  # (with a test split, the overlap check refuses this when the split opens)

    _edit_info(d, test_clips_as_train)
    monkeypatch.setattr(pipeline.ClipSource, "check_sample", lambda self: None, raising=False)
    augment = pipeline.FinetuneAugment(rand_augment=None, crop_scale=None, flip_probability=0.5, erase_probability=0.25,
                                       rand_augment_on="host", dct_downscale=True)
    pipe = pipeline.finetune_train_pipeline(d, "train", batch_size=12, seed=0, augment=augment,
                                            geometry=pipeline.ClipGeometry(num_frames=2, sampling_rate=1, image_size=8))
    it = iter(pipe)
    with pytest.raises(records.RecordError, match=r"toy-00002-of-00003\.array_record record \d.*"
                                                           r"expected split 'train', found split 'test'"):
        next(it)
    it.close()


def test_train_split_sharing_clips_with_the_test_split_is_refused(tmp_path):
    d = _plain_dataset(tmp_path / "ds")
    _edit_info(d, lambda info: info["splits"].__setitem__("train", list(range(10))))  # 2 test clips also in train
    with pytest.raises(records.RecordError, match=r"2 record\(s\) are in both 'train' and 'test' .*\[8, 9\]"):
        pipeline.DatasetSplit.open(d, "train")


def test_kfold_rules_and_train_test_overlap():
    from data_pipelines import integrity

    contract = integrity.SplitContract.for_split("fold2/train", {})
    rec = records.ClipRecord("x", [b""], 8, 8, fold=1)
    assert "test clip of this fold" in contract.problem(rec, 0)
    assert contract.problem(records.ClipRecord("x", [b""], 8, 8, fold=0), 0) is None
    assert contract.problem(records.ClipRecord("x", [b""], 8, 8, split="test"), 0) is None  # says nothing of folds
    test = integrity.SplitContract.for_split("fold2/test", {})
    assert test.problem(rec, 0) is None and "found fold 3" in test.problem(
        records.ClipRecord("x", [b""], 8, 8, fold=3), 0)
    # a clip listed in two plain splits stores one of them: allowed only where the info lists it there too
    both = integrity.SplitContract.for_split("val", {"val": [4, 5], "test": [5, 6]})
    in_test = records.ClipRecord("x", [b""], 8, 8, split="test")
    assert both.problem(in_test, 5) is None and both.problem(in_test, 4) is not None
    with pytest.raises(integrity.SplitIntegrityError, match="in both 'fold1/train' and 'fold1/test'"):
        integrity.check_no_train_test_overlap("fold1/train", {"fold1/train": [0, 1, 2], "fold1/test": [2, 3]}, "x")


def test_kfold_dataset_with_a_test_clip_in_train_is_refused(tmp_path):
    layout = [[{"fold": k, "label": 0} for k in range(5)]]
    splits = {f"fold{k + 1}/test": [k] for k in range(5)}
    splits.update({f"fold{k + 1}/train": [i for i in range(5) if i != k] for k in range(5)})
    d = _write_dataset(tmp_path / "kf", layout, splits)
    assert len(pipeline.DatasetSplit.open(d, "fold1/train")) == 4
    def leak(info):  # fold2's test clip (record 1) also in fold2's train split
        info["splits"]["fold2/train"] = [0, 1, 2, 3]
        del info["splits"]["fold2/test"]  # (else the overlap check refuses it first)

    _edit_info(d, leak)
    with pytest.raises(records.RecordError, match="record 1 .*test clip of this fold"):
        pipeline.DatasetSplit.open(d, "fold2/train")


# ---------------------------------------------------------------------------------------------------------------
# 2. Checkpoint integrity
# ---------------------------------------------------------------------------------------------------------------


def _state(seed: int, width: int = 64):
    rng = np.random.default_rng(seed)
    return {"params": {"w": jnp.asarray(rng.normal(size=(64, width)).astype(np.float32)),
                       "b": jnp.asarray(rng.normal(size=(width,)).astype(np.float32))},
            "step": jnp.int32(seed)}


def _flip_a_byte_in_every_data_file(step_dir) -> None:
    for path in glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")):
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0x08
        open(path, "wb").write(bytes(data))


def test_corrupted_checkpoint_falls_back_to_the_newest_that_verifies(tmp_path, capfd):
    d = str(tmp_path / "ck")
    c = ckpt_lib.Checkpointer(d, keep=5)
    for step in (1, 2):
        c.save(step, _state(step), {"position": step}, force=True)
    c.close()
    _flip_a_byte_in_every_data_file(os.path.join(d, "2"))
    c = ckpt_lib.Checkpointer(d, keep=5)
    state, data, step = c.restore(jax.eval_shape(lambda: _state(0)))
    assert step == 1 and data == {"position": 1}
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.asarray(_state(1)["params"]["w"]))
    err = capfd.readouterr().err
    assert f"step 2 ({d}/2) fails verification" in err and "falling back to step 1" in err
    assert os.path.isdir(d + ".corrupt/2") and c.latest_step() == 1  # kept aside; step 2 can be written again
    c.save(2, _state(2), {"position": 2}, force=True)
    c.close()

    for step in (1, 2):
        _flip_a_byte_in_every_data_file(os.path.join(d, str(step)))
    c = ckpt_lib.Checkpointer(d, keep=5)
    with pytest.raises(Exception, match=r"no checkpoint in .* verifies:\n  step 2 .*\n  step 1") as e:
        c.restore(jax.eval_shape(lambda: _state(0)))
    c.close()
    assert type(e.value).__name__ == "CheckpointCorrupt"


def test_optimizer_state_verifies_with_and_without_a_restore_target(tmp_path):
    """optax states are named tuples in memory but nested dicts when orbax restores without a target: the checksum
    keys must name both the same way."""
    import optax

    params = _state(4)["params"]
    state = {"params": params, "opt_state": optax.adamw(1e-3).init(params), "step": jnp.int32(4)}
    c = ckpt_lib.Checkpointer(str(tmp_path / "ck"))
    c.save(4, state, {}, force=True)
    c.close()
    c = ckpt_lib.Checkpointer(str(tmp_path / "ck"))
    assert c.restore(jax.eval_shape(lambda: state))[2] == 4
    restored, _ = c.restore_unsharded(4)
    c.close()
    np.testing.assert_array_equal(np.asarray(restored["opt_state"][0]["mu"]["w"]), np.zeros((64, 64), np.float32))


def test_changed_model_shape_gets_one_message_with_keys_and_shapes(tmp_path, capfd):
    d = str(tmp_path / "ck")
    c = ckpt_lib.Checkpointer(d)
    c.save(3, _state(3, width=64), {}, force=True)
    c.close()
    c = ckpt_lib.Checkpointer(d)
    with pytest.raises(Exception) as e:
        c.restore(jax.eval_shape(lambda: _state(0, width=48)))
    c.close()
    msg = str(e.value)
    assert type(e.value).__name__ == "CheckpointMismatch", msg[:500]
    assert "params/w: checkpoint (64, 64) float32, model (64, 48) float32" in msg
    assert "params/b: checkpoint (64,) float32, model (48,) float32" in msg
    assert "new --workdir" in msg and "init_from" in msg
    assert "Traceback" not in capfd.readouterr().err
    assert os.path.isdir(os.path.join(d, "3"))  # a mismatch is not corruption: nothing moved


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 3 MiB filesystem (tmpfs), so that orbax's writer threads hit ENOSPC themselves."""
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs (needs root): {r.stderr.decode().strip()}")
    yield str(mount)
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_async_save_is_one_message_and_keeps_the_last_checkpoint(tiny_disk, capfd):
    big = {"params": {f"w{i}": jnp.asarray(np.random.default_rng(i).normal(size=(256, 256)).astype(np.float32))
                      for i in range(8)}, "step": jnp.int32(0)}  # 2 MiB: one checkpoint fits, two do not
    d = os.path.join(tiny_disk, "ck")
    c = ckpt_lib.Checkpointer(d)
    c.save(1, big, {"position": 1}, force=True)
    c.wait()
    with pytest.raises(Exception) as e:
        c.save(2, big, {"position": 2}, force=True)
        c.save(3, big, {"position": 3}, force=True)  # the failure of step 2 surfaces here at the latest
    c.close()
    msg = str(e.value)
    assert type(e.value).__name__ == "CheckpointSaveError", msg[:500]
    assert msg.startswith(f"checkpoint of step 2 could not be written to {d}/2: the disk holding {d} is full")
    assert f"last complete checkpoint, step 1 ({d}/1), is kept" in msg
    err = capfd.readouterr().err
    assert "Traceback" not in err and "No space left" not in err, err[:2000]  # no flood from orbax's threads
    assert sorted(os.listdir(d)) == ["1"]  # the partial step 2 is removed, step 1 untouched
    c = ckpt_lib.Checkpointer(d)
    _, data, step = c.restore(jax.eval_shape(lambda: big))
    c.close()
    assert step == 1 and data == {"position": 1}


def test_known_faults_print_one_line_without_traceback(capsys):
    from facemae_jax import faults

    with pytest.raises(SystemExit) as e, faults.one_message("launch.py"):
        raise ckpt_lib.CheckpointSaveError("checkpoint of step 7 could not be written to /x/7: disk full")
    assert e.value.code == 1
    assert capsys.readouterr().err == "launch.py: error: checkpoint of step 7 could not be written to /x/7: disk full\n"


# ---------------------------------------------------------------------------------------------------------------
# 4. No data lost by a wrong command
# ---------------------------------------------------------------------------------------------------------------


def test_mistyped_config_leaves_the_existing_run_config_intact(tmp_path):
    work = tmp_path / "run"
    work.mkdir()
    (work / "config.json").write_text('{"seed": 1}')
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, os.path.join(REPO, "launch.py"), f"--config={tmp_path / 'missing.py'}",
                        f"--workdir={work}"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert (work / "config.json").read_text() == '{"seed": 1}'
    assert "missing.py" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_save_config_is_atomic_and_only_after_the_config_loads(tmp_path):
    sys.path.insert(0, REPO)
    import launch

    (tmp_path / "config.json").write_text("old")

    class Broken:
        def to_json_best_effort(self, **_):
            raise IOError("Configuration is not available")

    with pytest.raises(IOError):
        launch.save_config(Broken(), str(tmp_path))
    assert (tmp_path / "config.json").read_text() == "old" and os.listdir(tmp_path) == ["config.json"]


def test_rerun_with_other_settings_keeps_the_earlier_config_record(tmp_path):
    sys.path.insert(0, REPO)
    from ml_collections import ConfigDict

    import launch

    launch.save_config(ConfigDict({"seed": 1}), str(tmp_path))
    launch.save_config(ConfigDict({"seed": 1}), str(tmp_path))  # same settings (a resume): nothing to keep
    launch.save_config(ConfigDict({"seed": 2}), str(tmp_path))
    kept = sorted(n for n in os.listdir(tmp_path) if n != "config.json")
    assert len(kept) == 1 and kept[0].startswith("config.2") and json.load(open(tmp_path / kept[0])) == {"seed": 1}
    assert json.load(open(tmp_path / "config.json")) == {"seed": 2}


def test_synthetic_generator_refuses_an_existing_dataset(tmp_path):
    from data_pipelines import synthetic

    d = _plain_dataset(tmp_path / "ds")
    before = open(os.path.join(d, "dataset_info.json")).read()
    with pytest.raises(SystemExit, match="already holds a dataset; pass --overwrite"):
        synthetic.main(["--out", d, "--num_pretrain", "1", "--train_per_class", "0", "--val_per_class", "0",
                        "--test_per_class", "0", "--frames", "2", "--size", "16"])
    assert open(os.path.join(d, "dataset_info.json")).read() == before


def _tiny_state_dict(tmp_path):
    from facemae_jax import convert
    from facemae_jax.models import get_config

    cfg = get_config("lgi_tiny_finetune", num_frames=4, img_size=32, patch_size=8, embed_dim=32, num_heads=2,
                     depth=2, region_size=(2, 2, 4), num_classes=3)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda a: rng.normal(size=a.shape).astype(np.float32) * 0.02,
                                    convert._abstract(cfg))
    path = tmp_path / "model.npz"
    np.savez(path, **convert.flax_to_torch(params, cfg))
    return str(path)


def test_convert_refuses_an_existing_output_unless_overwrite(tmp_path, capsys):
    from facemae_jax import convert

    out = tmp_path / "export"
    out.mkdir()
    (out / "model.json").write_text('{"class_names": ["mine"]}')
    pth = _tiny_state_dict(tmp_path)
    args = ["--checkpoint", pth, "--model", "lgi_tiny_finetune", "--out", str(out), "--num_classes", "3",
            "--override", "num_frames=4", "--override", "img_size=32", "--override", "patch_size=8",
            "--override", "embed_dim=32", "--override", "num_heads=2", "--override", "depth=2",
            "--override", "region_size=[2,2,4]"]
    assert convert.main(args) == 2
    assert "already holds a converted model" in capsys.readouterr().err
    assert (out / "model.json").read_text() == '{"class_names": ["mine"]}'
    assert convert.main(args + ["--overwrite"]) == 0
    assert json.load(open(out / "model.json"))["model_name"] == "lgi_tiny_finetune"


def test_extract_refuses_an_existing_output_before_any_work(tmp_path):
    from facemae_jax import extract

    out = tmp_path / "features.npz"
    out.write_bytes(b"results")
    with pytest.raises(SystemExit, match="already exists; pass --overwrite"):
        extract.main([str(tmp_path / "video.mp4"), "--out", str(out), "--checkpoint", str(tmp_path)])
    assert out.read_bytes() == b"results"


# ---------------------------------------------------------------------------------------------------------------
# 5. Storage faults: one message that names the file and says what to do
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["zero_bytes", "overwritten"])
def test_damaged_shard_names_the_file_and_the_rebuild_command(tmp_path, damage):
    d = _plain_dataset(tmp_path / "ds")
    shard = os.path.join(d, "toy-00001-of-00003.array_record")
    size = os.path.getsize(shard)
    open(shard, "wb").write(b"" if damage == "zero_bytes" else os.urandom(size))
    with pytest.raises(records.RecordError) as e:
        pipeline.DatasetSplit.open(d, "train")
    msg = str(e.value)
    assert msg.startswith(f"{shard}: not a readable ArrayRecord shard")
    assert f"delete {shard} and rerun python -m data_pipelines.build csv" in msg


def test_damaged_dataset_info_names_the_file(tmp_path):

    d = _plain_dataset(tmp_path / "ds")
    path = os.path.join(d, "dataset_info.json")
    text = open(path).read()
    open(path, "w").write(text[: len(text) // 2])  # cut short
    for read in (dataset_info.load, lambda d: pipeline.DatasetSplit.open(d, "train")):
        with pytest.raises(ValueError, match=rf"{path} \(\d+ bytes\) cannot be read: .*cut short") as e:
            read(d)
        assert type(e.value).__name__ == "DatasetInfoError"


# ---------------------------------------------------------------------------------------------------------------
# 6. Empty splits before training; a conversion that converts nothing fails
# ---------------------------------------------------------------------------------------------------------------


def test_empty_eval_split_stops_before_training(tmp_path, monkeypatch):
    from configs.base import base_config
    from facemae_jax import train

    d = _plain_dataset(tmp_path / "ds", test_split_empty=True)
    c = base_config()
    c.model.name = "lgi_tiny_finetune"
    c.model.overrides = dict(num_frames=2, img_size=8, patch_size=4, embed_dim=16, num_heads=2, depth=1,
                             region_size=(1, 2, 2), num_classes=3)
    c.data.dir = d
    c.data.sampling_rate = 1
    c.batch_size = 8
    c.mesh.data, c.mesh.fsdp = 8, 1

    def no_training(*a, **k):
        raise AssertionError("training started although the eval split is empty")

    monkeypatch.setattr(ckpt_lib, "Checkpointer", no_training)
    with pytest.raises(ValueError, match="split 'test' is empty"):
        train.run(c, str(tmp_path / "work"))


def test_conversion_where_every_input_is_skipped_exits_nonzero(tmp_path, capsys):
    from data_pipelines import build

    root = tmp_path / "videos"
    root.mkdir()
    (root / "a.mp4").write_bytes(b"")
    (root / "b.mp4").write_bytes(b"not a video")
    assert build.main(["videos", "--root", str(root), "--out", str(tmp_path / "out"), "--no_progress"]) == 1
    assert "no clip was converted (all 2 input(s) skipped" in capsys.readouterr().err
