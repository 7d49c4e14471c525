"""The dataset-writing core: the dataset_info schema/writer/validator and the resumable shard runner shared by the
converters (data_pipelines.build) and the synthetic generator."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data_pipelines import dataset_info, records, shard_runner, synthetic


def _info(**overrides):
    info = dataset_info.make(name="toy", source="tests", creation_command="pytest", shards=["a.array_record"],
                             num_clips=3, frame_size={"height": 8, "width": 8}, task="classification",
                             class_names=["x", "y"], label_histogram={"0": 2, "1": 1},
                             splits={"train": [0, 1], "test": [2]})
    info.update(overrides)
    return info


def test_make_writes_the_canonical_key_order_and_load_reads_it_back(tmp_path):
    info = _info()
    assert list(info) == ["format", "version", "name", "source", "creation_command", "created", "num_clips",
                          "shards", "frame_size", "task", "class_names", "label_histogram", "splits", "skipped",
                          "extra"]
    path = dataset_info.write(str(tmp_path), info)
    assert path == str(tmp_path / "dataset_info.json") and not os.path.exists(path + ".tmp")
    assert dataset_info.load(str(tmp_path)) == info == dataset_info.load(str(tmp_path))


@pytest.mark.parametrize("edit, key, problem", [
    (lambda i: i.pop("splits"), "splits", "is missing"),
    (lambda i: i.update(num_clips="3"), "num_clips", "must be an integer >= 0"),
    (lambda i: i.update(task="ranking"), "task", "not one of"),
    (lambda i: i.pop("class_names"), "class_names", "classification dataset needs its class names"),
    (lambda i: i["splits"].update(train=[0, "1"]), "splits.train", "list of integer record indices"),
    (lambda i: i.update(shards="a.array_record"), "shards", "list of strings"),
    (lambda i: i.update(skipped=[{"input": "x"}]), "skipped", "\"reason\""),
    (lambda i: i.update(folds=0), "folds", "integer >= 1"),
])
def test_schema_errors_name_the_file_and_the_key(tmp_path, edit, key, problem):
    info = _info()
    edit(info)
    path = tmp_path / "dataset_info.json"
    path.write_text(json.dumps(info))
    with pytest.raises(dataset_info.DatasetInfoError) as e:
        dataset_info.load(str(tmp_path))
    assert str(e.value).startswith(f"{path}: key {key!r}") and problem in str(e.value)
    with pytest.raises(dataset_info.DatasetInfoError, match=f"key {key!r}"):  # and the writer refuses it
        dataset_info.write(str(tmp_path / "out"), info)
    assert not (tmp_path / "out" / "dataset_info.json").exists()


def test_wrong_format_is_refused(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps(_info(format="tfds", version=3)))
    with pytest.raises(ValueError, match=r"format 'tfds' version 3, expected 'facemae_dataset' version 1"):
        dataset_info.load(str(tmp_path))


def _write_numbers(job, writer, count):
    """Test writer: job.work = (first, n, fail_at) -> records first..first+n-1; raises at fail_at."""
    first, n, fail_at = job.work
    for i in range(first, first + n):
        if i == fail_at:
            raise RuntimeError(f"writer failed at {i}")
        writer.write(records.make_record(f"c{i}", np.full((1, 4, 4, 3), i, np.uint8), label=i % 2))
        count(1)
    return {"num_records": n, "first": first}


def _jobs(out_dir, fail_at=-1, n=3):
    return [shard_runner.ShardJob(str(out_dir), records.shard_name("t", s, 3),
                                  shard_runner.fingerprint({"shard": s, "n": n}), n, (s * n, n, fail_at))
            for s in range(3)]


def test_runner_resumes_only_unfinished_shards_and_rebuilds_changed_ones(tmp_path):
    with pytest.raises(RuntimeError, match="writer failed at 4"):  # the second shard fails: the first is kept
        shard_runner.run(_jobs(tmp_path, fail_at=4), _write_numbers, progress=False)
    assert sorted(os.listdir(tmp_path)) == [shard_runner.SIDECAR_DIR, "t-00000-of-00003.array_record"]
    (tmp_path / "dataset_info.json").write_text("{}")  # an old index must not survive a run that writes shards
    result = shard_runner.run(_jobs(tmp_path), _write_numbers, progress=False)
    assert result.written == (1, 2) and result.reused == 1 and not (tmp_path / "dataset_info.json").exists()
    assert [s["first"] for s in result.sidecars] == [0, 3, 6]
    assert [r.clip_id for r in records.read_records(str(tmp_path))] == [f"c{i}" for i in range(9)]
    again = shard_runner.run(_jobs(tmp_path), _write_numbers, progress=False)
    assert again.written == () and again.sidecars == result.sidecars  # finished: nothing touched
    changed = shard_runner.run(_jobs(tmp_path, n=2), _write_numbers, progress=False)  # other plan, other prints
    assert changed.written == (0, 1, 2)


def test_a_worker_process_failure_reaches_the_caller(tmp_path):
    # (identical shards from worker processes: test_synthetic's parallel build and test_build's module entry)
    with pytest.raises(RuntimeError, match="writer failed at 7"):
        shard_runner.run(_jobs(tmp_path, fail_at=7), _write_numbers, workers=2, progress=False)
    assert "t-00002-of-00003.array_record" not in os.listdir(tmp_path)  # no half-written shard under its name


def test_synthetic_generator_resumes_through_the_runner(tmp_path):
    kw = dict(seed=1, num_pretrain=4, train_per_class=1, val_per_class=0, test_per_class=0, frames=2, size=16,
              clips_per_shard=4)
    info = synthetic.build_dataset(str(tmp_path), **kw)
    first = {n: os.stat(tmp_path / n).st_mtime_ns for n in info["shards"]}
    os.remove(tmp_path / info["shards"][1])
    again = synthetic.build_dataset(str(tmp_path), **kw)
    assert {k: v for k, v in again.items() if k not in ("created", "extra")} == \
           {k: v for k, v in info.items() if k not in ("created", "extra")}
    assert os.stat(tmp_path / info["shards"][0]).st_mtime_ns == first[info["shards"][0]]  # kept
    assert sorted(os.listdir(tmp_path / shard_runner.SIDECAR_DIR)) == sorted(s + ".json" for s in info["shards"])
    assert dataset_info.load(str(tmp_path)) == json.loads(json.dumps(again))
