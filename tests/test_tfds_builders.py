"""The TFDS builders build ArrayRecord without TensorFlow, read back into grain, and hold the project's clips."""

from __future__ import annotations

import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from data_pipelines import records, synthetic, tfds_builders  # noqa: E402


def test_tfds_builder_builds_without_tensorflow_and_reads_back_through_grain(tmp_path):
    import grain.python as grain

    cfg = tfds_builders.SyntheticFacesConfig(name="tiny", seed=5, num_pretrain=2, train_per_class=1,
                                              val_per_class=0, test_per_class=1, frames=3, size=32,
                                              scenario="posed")
    builder = tfds_builders.SyntheticFaces(config=cfg, data_dir=str(tmp_path))  # ArrayRecord by default
    builder.download_and_prepare()
    assert "tensorflow" not in sys.modules
    assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {"pretrain": 2, "train": 7,
                                                                                      "test": 7}
    # Read back from the folder alone (no builder code needed), as tfds.data_source does.
    source = tfds.builder_from_directory(builder.data_dir).as_data_source("train")
    examples = {ex["clip_id"].decode(): ex for ex in (source[i] for i in range(len(source)))}
    tasks = synthetic.split_tasks(5, "train", 7, True, 3, 32, 90, "posed")
    for task in tasks:  # the same pixels as the project's own shards (same clip, same JPEG bytes, same decoder)
        ex = examples[f"train/{task.index:06d}"]
        video, meta = synthetic.render_clip(task)
        expected = np.stack([records.decode_jpeg(records.encode_jpeg(f, 90)) for f in video])
        np.testing.assert_allclose(np.stack(ex["frames"]).astype(int), expected.astype(int), atol=1)
        assert ex["label"] == task.label == ex["expression"] and ex["identity"].decode() == meta["identity"]
    pretrain = builder.as_data_source("pretrain")
    assert [pretrain[i]["label"] for i in range(len(pretrain))] == [-1, -1]

    class ToBatchable(grain.MapTransform):
        def map(self, ex):
            return {"video": np.stack(ex["frames"]), "label": ex["label"]}

    loader = grain.DataLoader(data_source=source, operations=[ToBatchable(), grain.Batch(4, drop_remainder=True)],
                              sampler=grain.IndexSampler(len(source), grain.NoSharding(), shuffle=True, num_epochs=1,
                                                         seed=0), worker_count=0)
    batches = list(loader)
    assert [b["video"].shape for b in batches] == [(4, 3, 32, 32, 3)]
    assert set(batches[0]["label"].tolist()) <= set(range(7))


def test_dfew_manual_builder_holds_the_converters_clips(tmp_path):
    from test_build import AUTHOR_PREFIX, dfew_argv, make_kfold_tree, read_all, run_main

    manual = tmp_path / "manual"
    data, ann = make_kfold_tree(manual)  # manual/DFEW (frame folders), manual/DFEW_ann (split CSVs)
    (data / "Clip" / "jpg_256" / "00004").rename(manual / "elsewhere")  # one clip path that does not exist
    ann.rename(manual / "annotations")
    (manual / tfds_builders.PATH_REMAP_FILE).write_text(f"{AUTHOR_PREFIX}=DFEW\n")  # relative: inside manual/
    cfg = tfds_builders.AnnotatedFramesConfig(name="fold2_16px", fold=2, short_side=16)
    builder = tfds_builders.Dfew(config=cfg, data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    assert "tensorflow" not in sys.modules

    assert run_main(dfew_argv(data, manual / "annotations", tmp_path / "ours")) == 0
    info, recs = read_all(tmp_path / "ours")
    for split in ("train", "val", "test"):
        ours = {recs[i].clip_id: recs[i] for i in info["splits"][f"fold2/{split}"]}
        source = builder.as_data_source(split)
        theirs = {ex["clip_id"].decode(): ex for ex in (source[i] for i in range(len(source)))}
        assert sorted(theirs) == sorted(ours) and "00004" not in theirs  # the missing clip is skipped in both
        for clip_id, ex in theirs.items():
            assert ex["label"] == ours[clip_id].label
            np.testing.assert_allclose(np.stack(ex["frames"]).astype(int),
                                       records.decode_frames(ours[clip_id]).astype(int), atol=1)
    assert builder.info.features["label"].names == list(info["class_names"])
