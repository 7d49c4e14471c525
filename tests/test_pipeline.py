"""grain pipelines on a tiny dataset written here: shapes, determinism, sharding, checkpointing, eval coverage, errors.

Tiny geometry: 8 frames at 32x32, sampling rate 2, patch 8, tubelet 2 -> token grid (4, 4, 4). Every stored frame
is a flat colour: red = 10 + 4 * frame index, green = 10 + 20 * clip index, so a batch tells which clip and which
frames it came from (flat colours survive JPEG, crops and resizes).
"""

import dataclasses
import datetime
import json
import os

import numpy as np
import pytest

from configs.base import base_config
from data_pipelines import pipeline, records, transforms
from facemae_jax import masking

FRAMES, SIZE, SR, PATCH, TUBELET = 8, 32, 2, 8, 2
GRID = (FRAMES // TUBELET, SIZE // PATCH, SIZE // PATCH)
FRAME_COUNTS = [12, 30, 7, 25, 40, 16, 9, 33, 21, 18]  # some shorter than the 16-frame span, some longer
NUM_CLASSES = 3
GEOMETRY = pipeline.ClipGeometry(num_frames=FRAMES, sampling_rate=SR, image_size=SIZE)
MASK = masking.MaskGenerator("tube_window", GRID, mask_ratio=0.75, window=(2, 4))
_DATA, _EVAL = base_config().data, base_config().eval  # the configured recipes, as the trainer builds them
PRETRAIN_AUGMENT = pipeline.PretrainAugment(
    num_samples=_DATA.num_samples, fixed_crop_size=_DATA.fixed_crop_size,
    multiscale_scales=tuple(_DATA.multiscale_scales), multiscale_resize=_DATA.multiscale_resize)
FINETUNE_AUGMENT = pipeline.FinetuneAugment(
    rand_augment=_DATA.rand_augment, crop_scale=tuple(_DATA.crop_scale), flip_probability=_DATA.flip_probability,
    erase_probability=_DATA.erase_probability, rand_augment_on=_DATA.rand_augment_on,
    dct_downscale=_DATA.jpeg_dct_downscale)
VIEWS = pipeline.EvalViews(_EVAL.num_segments, _EVAL.num_crops, _DATA.jpeg_dct_downscale)


def clip_frames(clip_index: int, num_frames: int, height: int = 36, width: int = 44) -> np.ndarray:
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for f in range(num_frames):
        frames[f] = (10 + 4 * f, 10 + 20 * clip_index, 128)
    return frames


def decode_content(video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """video [..., T, H, W, 3] -> (frame indices [..., T], clip index [...]) read back from the flat colours."""
    centre = video[..., video.shape[-3] // 2, video.shape[-2] // 2, :].astype(float)
    frame_index = np.rint((centre[..., 0] - 10) / 4).astype(int)
    clip_index = np.rint((centre[..., 1] - 10) / 20).astype(int)
    assert (clip_index == clip_index[..., :1]).all()
    return frame_index, clip_index[..., 0]


def write_dataset(directory, frame_counts=FRAME_COUNTS, task="classification", num_shards=2, corrupt=None):
    """Write shards + dataset_info.json following the shared dataset-directory convention."""
    os.makedirs(directory, exist_ok=True)
    names = [records.shard_name("clips", i, num_shards) for i in range(num_shards)]
    per_shard = np.array_split(np.arange(len(frame_counts)), num_shards)
    labels = {}
    for shard_index, clip_indices in enumerate(per_shard):
        with records.ShardWriter(os.path.join(directory, names[shard_index])) as writer:
            for c in clip_indices:
                c = int(c)
                if task == "classification":
                    labels[c] = c % NUM_CLASSES
                elif task == "regression":
                    labels[c] = [c / 10, -c / 10]
                else:
                    labels[c] = None
                if corrupt is not None and c in corrupt:
                    kind = corrupt[c]
                    if kind == "bytes":
                        writer.write(b"\x00 definitely not msgpack")
                        continue
                    rec = records.make_record(f"clip{c:02d}", clip_frames(c, frame_counts[c]), label=labels[c])
                    rec.frames[0] = b"\xff\xd8 broken jpeg"  # frame 0 is in every sampled view
                    writer.write(rec)
                    continue
                writer.write(
                    records.make_record(f"clip{c:02d}", clip_frames(c, frame_counts[c]), label=labels[c], fps=25.0)
                )
    n = len(frame_counts)
    info = {
        "format": "facemae_dataset",
        "version": 1,
        "name": "tiny",
        "source": "tests/test_pipeline.py",
        "creation_command": "pytest tests/test_pipeline.py",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "num_clips": n,
        "shards": names,
        "frame_size": {"height": 36, "width": 44},
        "task": task,
        "splits": {
            "train": [c for c in list(range(0, n, 2)) + list(range(1, n, 2)) if c not in (1, 4, 7, 8, 2)],
            "test": [1, 4, 7, 8, 2],
            "pretrain": list(range(n)),
        },
        "skipped": [],
        "extra": {},
    }
    if task == "classification":
        info["class_names"] = ["a", "b", "c"]
        info["label_histogram"] = {str(k): sum(1 for v in labels.values() if v == k) for k in range(NUM_CLASSES)}
    if task == "regression":
        info["target_names"] = ["valence", "arousal"]
    with open(os.path.join(directory, "dataset_info.json"), "w") as f:
        json.dump(info, f)
    return info, labels


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tiny"))
    info, labels = write_dataset(directory)
    return directory, info, labels


def pretrain(directory, batch_size=4, seed=0, mask=MASK, options=None, num_frames=FRAMES, **augment):
    """The pre-training pipeline on the tiny geometry; ``augment``: PretrainAugment fields to change."""
    return pipeline.pretrain_pipeline(
        directory, "pretrain", batch_size=batch_size, seed=seed,
        geometry=dataclasses.replace(GEOMETRY, num_frames=num_frames), mask=mask,
        augment=dataclasses.replace(PRETRAIN_AUGMENT, **augment), options=options)


def finetune(directory, batch_size=4, seed=0, options=None, **augment):
    """The fine-tuning pipeline on the tiny geometry; ``augment``: FinetuneAugment fields to change."""
    return pipeline.finetune_train_pipeline(
        directory, "train", batch_size=batch_size, seed=seed, geometry=GEOMETRY,
        augment=dataclasses.replace(FINETUNE_AUGMENT, **augment), options=options)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert np.array_equal(x[key], y[key]), key


def test_pretrain_batch_contract(dataset):
    directory, info, _ = dataset
    pipe = pretrain(directory)
    batch = next(iter(pipe))
    assert set(batch) == {"video", "mask"}
    assert batch["video"].dtype == np.uint8 and batch["video"].shape == (4, FRAMES, SIZE, SIZE, 3)
    assert batch["mask"].dtype == bool and batch["mask"].shape == (4, 64)
    assert masking.check_lgi_mask(batch["mask"], GRID, (2, 2, 4)) == 2
    assert pipe.steps_per_epoch == 10 // 4 and pipe.batch_size == 4
    frame_index, clip_index = decode_content(batch["video"])
    for row in range(4):  # frames follow the pre-training sampling rule for that clip
        num_frames = FRAME_COUNTS[clip_index[row]]
        step = np.diff(frame_index[row])
        if num_frames >= FRAMES * SR:
            assert (step == SR).all()
        else:
            assert (
                frame_index[row].tolist() == transforms.pretrain_frame_indices(None, num_frames, FRAMES, SR)[0].tolist()
            )


def test_pretrain_epochs_cover_the_split_and_reshuffle(dataset):
    directory, _, _ = dataset
    it = iter(pretrain(directory, batch_size=5, mask=masking.MaskGenerator("tube", GRID, mask_ratio=0.75)))
    clips = [decode_content(b["video"])[1].tolist() for b in take(it, 4)]
    epoch0, epoch1 = clips[0] + clips[1], clips[2] + clips[3]
    assert sorted(epoch0) == list(range(10)) and sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1  # a new order every epoch
    assert epoch0 != list(range(10))


def test_pretrain_process_shards_partition_the_stream(dataset):
    directory, _, _ = dataset
    full = [decode_content(b["video"])[1] for b in take(iter(pretrain(directory, batch_size=4)), 5)]
    shards = []
    for p in range(2):
        opts = pipeline.LoaderOptions(shard_index=p, shard_count=2)
        got = [decode_content(b["video"])[1] for b in take(iter(pretrain(directory, batch_size=2, options=opts)), 5)]
        shards.append(got)
        pipe = pretrain(directory, batch_size=2, options=opts)
        positions = pipeline.training_clip_positions(len(pipe.record_indices), batch_size=2, seed=0, options=opts)
        for step in range(5):  # process p holds block p of every global batch: a global batch is the 1-process one
            assert np.array_equal(got[step], full[step][2 * p : 2 * p + 2])
            assert np.array_equal(pipe.record_indices[positions[step]], got[step])  # the audit's index stream
    epoch = np.concatenate([np.concatenate([shards[0][s], shards[1][s]]) for s in range(2)])
    assert len(set(epoch.tolist())) == 8  # 10 clips, global batch 4: the 2 steps of an epoch read 8 distinct clips


def test_pretrain_repeated_samples_flatten_into_the_batch(dataset):
    directory, _, _ = dataset
    pipe = pretrain(directory, batch_size=3, num_samples=2)
    batch = next(iter(pipe))
    assert batch["video"].shape == (6, FRAMES, SIZE, SIZE, 3) and batch["mask"].shape == (6, 64)
    assert pipe.batch_size == 6
    _, clip_index = decode_content(batch["video"])
    for b in range(3):
        assert clip_index[2 * b] == clip_index[2 * b + 1]
        assert np.array_equal(batch["mask"][2 * b], batch["mask"][2 * b + 1])


def test_same_seed_same_batches_other_seed_differs(dataset):
    directory, _, _ = dataset
    a = take(iter(finetune(directory)), 3)
    b = take(iter(finetune(directory, options=pipeline.LoaderOptions(read_threads=3, prefetch_batches=4))), 3)
    c = take(iter(finetune(directory, seed=1)), 3)
    assert_batches_equal(a, b)  # threads do not change the batches
    assert not all(np.array_equal(x["video"], y["video"]) for x, y in zip(a, c))


def test_finetune_batch_contract(dataset):
    directory, _, labels = dataset
    pipe = finetune(directory, rand_augment=None, crop_scale=None, flip_probability=0.0, erase_probability=1.0)
    batches = take(iter(pipe), 5)
    for batch in batches:
        assert set(batch) == {"video", "label", "erase_box"}
        assert batch["video"].dtype == np.uint8 and batch["video"].shape == (4, FRAMES, SIZE, SIZE, 3)
        assert batch["label"].dtype == np.int32 and batch["label"].shape == (4,)
        assert batch["erase_box"].dtype == np.int32 and batch["erase_box"].shape == (4, 4)
        top, left, h, w = batch["erase_box"].T
        assert (h > 0).all() and (top + h <= SIZE).all() and (left + w <= SIZE).all()
        frame_index, clip_index = decode_content(batch["video"])
        assert batch["label"].tolist() == [labels[c] for c in clip_index]
        for row, c in enumerate(clip_index):
            num_frames = FRAME_COUNTS[c]
            if num_frames <= FRAMES * SR:  # deterministic short-clip rule
                assert (
                    frame_index[row].tolist()
                    == transforms.finetune_train_frame_indices(None, num_frames, FRAMES, SR).tolist()
                )
            else:
                assert frame_index[row, -1] - frame_index[row, 0] == FRAMES * SR - 1


def test_finetune_full_augmentation_runs(dataset):
    directory, _, _ = dataset
    batch = next(iter(finetune(directory, crop_scale=(0.8, 1.0))))
    assert batch["video"].shape == (4, FRAMES, SIZE, SIZE, 3)
    assert (batch["erase_box"][:, 2:] >= 0).all()


def test_regression_labels(tmp_path):
    directory = str(tmp_path / "reg")
    _, labels = write_dataset(directory, task="regression")
    batch = next(iter(finetune(directory, rand_augment=None)))
    assert batch["label"].dtype == np.float32 and batch["label"].shape == (4, 2)
    _, clip_index = decode_content(batch["video"])
    assert np.allclose(batch["label"], [labels[c] for c in clip_index])
    ev = next(
        iter(
            pipeline.eval_pipeline(directory, "test", batch_size=8, geometry=GEOMETRY, views=VIEWS)
        )
    )
    assert ev["label"].shape == (8, 2) and ev["label"].dtype == np.float32


def test_checkpoint_restore_continues_identically(dataset):
    directory, _, _ = dataset
    for make in (lambda: pretrain(directory), lambda: finetune(directory)):
        it = iter(make())
        take(it, 3)
        state = json.loads(json.dumps(it.get_state()))  # must survive a JSON round trip
        expected = take(it, 3)
        restored = iter(make())
        restored.set_state(state)
        assert_batches_equal(take(restored, 3), expected)


def test_worker_processes_give_the_same_batches_and_states_move_between_worker_counts(dataset):
    directory, _, _ = dataset
    reference = take(iter(pretrain(directory)), 7)
    in_process = iter(pretrain(directory))
    take(in_process, 3)
    state = json.loads(json.dumps(in_process.get_state()))
    with_worker = iter(pretrain(directory, options=pipeline.LoaderOptions(worker_count=1, read_threads=2)))
    try:
        with_worker.set_state(state)  # saved without workers, restored with one
        assert_batches_equal(take(with_worker, 2), reference[3:5])
        state = json.loads(json.dumps(with_worker.get_state()))
    finally:
        with_worker.close()
    restored = iter(pretrain(directory))  # saved with a worker, restored without
    restored.set_state(state)
    assert_batches_equal(take(restored, 2), reference[5:7])


def test_training_state_resumes_with_other_process_count_and_batch_size(dataset):
    directory, _, _ = dataset
    reference = take(iter(pretrain(directory, batch_size=4)), 3)
    it = iter(pretrain(directory, batch_size=4))
    take(it, 2)
    state = it.get_state()
    assert state["global_clips"] == 8
    halves = []
    for p in range(2):  # now 2 processes x batch 2: process p's batch j covers global clips 8+4j+2p .. +1
        resumed = iter(pretrain(directory, batch_size=2, options=pipeline.LoaderOptions(shard_index=p, shard_count=2)))
        resumed.set_state(state)
        halves.append(next(resumed))
    for key in ("video", "mask"):  # the same global batch: process p's rows are block p of it
        assert np.array_equal(np.concatenate([halves[0][key], halves[1][key]]), reference[2][key])
    with pytest.raises(ValueError, match="not a whole number of steps"):
        iter(pretrain(directory, batch_size=3)).set_state(state)
    with pytest.raises(ValueError, match="different pipeline .*seed: saved 0, now 1"):
        iter(pretrain(directory, seed=1)).set_state(state)
    with pytest.raises(ValueError, match="different pipeline .*kind"):
        iter(finetune(directory)).set_state(state)


def test_orbax_grain_checkpoint_handler_round_trip(dataset, tmp_path):
    import grain
    from etils import epath

    directory, _, _ = dataset
    it = iter(finetune(directory))
    take(it, 2)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), item=it)
    expected = take(it, 2)
    restored = handler.restore(epath.Path(tmp_path), item=iter(finetune(directory)))
    assert_batches_equal(take(restored, 2), expected)


def test_eval_views_cover_every_clip_once_across_processes(dataset):
    directory, info, labels = dataset
    test_split = info["splits"]["test"]
    seen = []
    for p in range(2):
        opts = pipeline.LoaderOptions(shard_index=p, shard_count=2)
        pipe = pipeline.eval_pipeline(directory, "test", batch_size=3, geometry=GEOMETRY,
                                      views=dataclasses.replace(VIEWS, num_segments=2, num_crops=2), options=opts)
        batches = list(iter(pipe))
        assert len(batches) == pipe.num_batches == 4  # 20 views / 2 processes = 10 -> 4 batches of 3, padded
        assert np.array_equal(pipe.record_indices, test_split)
        for batch in batches:
            assert set(batch) == {"video", "label", "clip_index", "view", "frame_indices", "valid"}
            assert batch["video"].shape == (3, FRAMES, SIZE, SIZE, 3) and batch["video"].dtype == np.uint8
            assert batch["clip_index"].dtype == np.int32 and batch["view"].dtype == np.int32
            assert batch["valid"].dtype == bool
            for row in range(3):
                if not batch["valid"][row]:
                    assert batch["clip_index"][row] == -1 and batch["view"][row] == -1
                    continue
                position, view = int(batch["clip_index"][row]), int(batch["view"][row])
                record = test_split[position]
                frame_index, clip_index = decode_content(batch["video"][row])
                assert clip_index == record and batch["label"][row] == labels[record]
                segment = view // 2
                expected = transforms.eval_frame_indices(FRAME_COUNTS[record], segment, 2, FRAMES, SR)
                assert frame_index.tolist() == expected.tolist()
                assert batch["frame_indices"][row].tolist() == expected.tolist()  # what the view reports
                seen.append((position, view))
    assert sorted(seen) == [(c, v) for c in range(len(test_split)) for v in range(4)]  # each view exactly once


def test_eval_single_view_protocol(dataset):
    directory, _, _ = dataset
    pipe = pipeline.eval_pipeline(directory, "test", batch_size=4, geometry=GEOMETRY,
                                  views=dataclasses.replace(VIEWS, num_segments=1, num_crops=1))
    batches = list(iter(pipe))
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.sum() == 5 and len(valid) == 8 and (np.concatenate([b["view"] for b in batches])[valid] == 0).all()


def test_corrupt_record_raises_naming_shard_and_record(tmp_path):
    directory = str(tmp_path / "bad")
    write_dataset(directory, corrupt={6: "bytes"})  # clip 6 = shard 1 (clips 5..9), record 1
    with pytest.raises(records.RecordError, match=r"clips-00001-of-00002\.array_record record 1 \(global record 6"):
        next(iter(pretrain(directory, batch_size=10)))  # (found when the split opens: its sample holds this record)


def test_corrupt_jpeg_raises_naming_the_record(tmp_path):
    directory = str(tmp_path / "badjpeg")
    write_dataset(directory, corrupt={2: "jpeg"})
    pipe = pipeline.eval_pipeline(directory, "test", batch_size=20, geometry=GEOMETRY, views=VIEWS)
    with pytest.raises(records.RecordError, match=r"clips-00000-of-00002\.array_record record 2 .*not a valid JPEG"):
        next(iter(pipe))


def test_dataset_directory_errors(tmp_path, dataset):
    directory, _, _ = dataset
    with pytest.raises(KeyError, match="no split 'fold1/train'"):
        pipeline.DatasetSplit.open(directory, "fold1/train")
    with pytest.raises(FileNotFoundError, match="dataset_info.json"):
        pipeline.DatasetSplit.open(str(tmp_path), "train")
    other = str(tmp_path / "unlabeled")
    info, _ = write_dataset(other, task="unlabeled")
    with pytest.raises(ValueError, match="unlabeled"):
        finetune(other)
    assert next(iter(pretrain(other)))["video"].shape[0] == 4  # pre-training needs no labels
    info["num_clips"] = 11
    with open(os.path.join(other, "dataset_info.json"), "w") as f:
        json.dump(info, f)
    with pytest.raises(ValueError, match="num_clips is 11 but the shards hold 10"):
        pipeline.DatasetSplit.open(other, "pretrain")
    info["num_clips"] = 10
    info["splits"]["pretrain"] = [0, 10]
    with open(os.path.join(other, "dataset_info.json"), "w") as f:
        json.dump(info, f)
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        pipeline.DatasetSplit.open(other, "pretrain")


def test_bad_geometry_is_rejected(dataset):
    directory, _, _ = dataset
    with pytest.raises(records.RecordError, match=r"clips-0000\d-of-00002\.array_record record \d+ .*at least"):
        next(iter(pretrain(directory, fixed_crop_size=40)))  # 36x44 frames cannot give a 40x40 fixed crop
    with pytest.raises(ValueError, match=r"token grid \(4, 4, 4\) does not match .*7 frames of 32x32 px.*tubelets"):
        pretrain(directory, num_frames=7)  # the mask's grid names 4 tubelets: 7 frames do not split into them
    with pytest.raises(ValueError, match="token grid"):
        pretrain(directory, mask=masking.MaskGenerator("tube", (4, 4, 8), mask_ratio=0.75))  # non-square patches
    with pytest.raises(ValueError, match="not a whole number"):
        masking.MaskGenerator("tube_window", GRID, mask_ratio=0.9, window=(2, 4))  # 0.9 of 8 tokens
    with pytest.raises(ValueError, match="shard_index"):
        pipeline.LoaderOptions(shard_index=2, shard_count=2)


def test_option_objects_reject_bad_values_and_other_spellings_of_off():
    with pytest.raises(ValueError, match="must be > 0"):
        pipeline.ClipGeometry(num_frames=0, sampling_rate=SR, image_size=SIZE)
    with pytest.raises(ValueError, match="None switches the multi-scale crop off"):
        dataclasses.replace(PRETRAIN_AUGMENT, multiscale_scales=())
    with pytest.raises(ValueError, match="num_samples"):
        dataclasses.replace(PRETRAIN_AUGMENT, num_samples=0)
    with pytest.raises(ValueError, match="None switches RandAugment off"):
        dataclasses.replace(FINETUNE_AUGMENT, rand_augment="")
    with pytest.raises(ValueError, match="crop_scale"):
        dataclasses.replace(FINETUNE_AUGMENT, crop_scale=(1.0, 0.5))
    with pytest.raises(ValueError, match="erase_probability"):
        dataclasses.replace(FINETUNE_AUGMENT, erase_probability=1.5)
    with pytest.raises(ValueError, match="num_segments 0"):
        dataclasses.replace(VIEWS, num_segments=0)
    with pytest.raises(TypeError):  # the config holds these defaults; the options restate none of them
        pipeline.FinetuneAugment(rand_augment=None, crop_scale=None)
    assert dataclasses.replace(PRETRAIN_AUGMENT, multiscale_scales=[1, 0.5]).multiscale_scales == (1.0, 0.5)


def test_data_modules_do_not_need_jax():
    # grain itself imports jax.tree_util when jax is installed (and falls back to pure Python when it is not), so
    # the honest check is: with jax made unimportable, our data modules still import and build a pipeline.
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['jax'] = None\n"
        "import data_pipelines.pipeline, data_pipelines.transforms, facemae_jax.masking\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    transforms_only = "import sys, data_pipelines.transforms, data_pipelines.records; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", transforms_only], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
