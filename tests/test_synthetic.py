"""The procedural face-expression dataset: format, determinism, identity-disjoint splits, and that the task is a
*video* task (labels live in the dynamics; a single early frame is not enough)."""

import filecmp
import json
import os

import cv2
import msgpack
import numpy as np
import pytest

from data_pipelines import dataset_info, records, synthetic_expressions
from data_pipelines import synthetic as S

SIZE, FRAMES = 48, 8


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """One small dataset written through the CLI (also writes the contact sheet)."""
    out = str(tmp_path_factory.mktemp("synthetic") / "ds")
    S.main(["--out", out, "--seed", "3", "--num_pretrain", "9", "--train_per_class", "2", "--val_per_class", "1",
            "--test_per_class", "1", "--frames", str(FRAMES), "--size", str(SIZE), "--workers", "1",
            "--clips_per_shard", "10"])
    return out


def _records_by_split(directory):
    info = dataset_info.load(directory)
    recs = list(records.read_records([os.path.join(directory, s) for s in info["shards"]]))
    return info, recs


def test_class_names_follow_dfew_order():
    assert S.CLASS_NAMES == ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")
    assert set(synthetic_expressions.PROTOTYPES) == set(synthetic_expressions.TIMING) == set(S.CLASS_NAMES)


def test_generate_clip_shapes_dtype_and_meta():
    video, meta = S.generate_clip(np.random.default_rng(0), 4, frames=FRAMES, size=SIZE)
    assert video.dtype == np.uint8 and video.shape == (FRAMES, SIZE, SIZE, 3)
    assert meta["expression"] == "surprise" and meta["label"] == 4
    assert len(meta["envelope"]) == FRAMES and len(meta["mouth_centre_px"]) == FRAMES
    assert set(meta["action_units"]) == set(S.ACTION_UNITS)
    assert 0 < meta["intensity"] <= 1
    msgpack.packb(meta)  # must be storable in a record's extra
    # unlabelled clips still show some expression, chosen by the generator
    _, meta_u = S.generate_clip(np.random.default_rng(1), None, frames=FRAMES, size=SIZE)
    assert meta_u["label"] is None and meta_u["expression"] in S.CLASS_NAMES
    # neutral has no expression event
    _, meta_n = S.generate_clip(np.random.default_rng(2), S.CLASS_NAMES.index("neutral"), frames=FRAMES, size=SIZE)
    assert meta_n["intensity"] == 0 and max(meta_n["envelope"]) == 0 and meta_n["apex_frame"] is None
    with pytest.raises(ValueError):
        S.generate_clip(np.random.default_rng(0), 7, frames=FRAMES, size=SIZE)


def test_same_seed_same_bytes_different_seed_different():
    task = S.ClipTask(seed=5, split="train", index=3, label=3, frames=FRAMES, size=SIZE, quality=90)
    a, b = S.render_record(task), S.render_record(task)
    assert a == b
    other_seed = S.render_record(S.ClipTask(6, "train", 3, 3, FRAMES, SIZE, 90))
    other_index = S.render_record(S.ClipTask(5, "train", 4, 3, FRAMES, SIZE, 90))
    assert other_seed != a and other_index != a
    frames_a = records.decode_frames(records.decode_clip(a))
    frames_b = records.decode_frames(records.decode_clip(other_seed))
    assert np.abs(frames_a.astype(int) - frames_b.astype(int)).mean() > 5


def test_clips_change_over_time():
    video, meta = S.generate_clip(S.clip_rng(0, "adhoc", 0), S.CLASS_NAMES.index("happy"), frames=16, size=64)
    temporal_std = video.astype(np.float32).std(0).mean()
    assert temporal_std > 1.5, temporal_std  # head motion, expression, talking, noise
    env = np.array(meta["envelope"])
    assert env.max() > 0.5 and env.min() < env.max()  # an onset/apex/offset time course, not a constant


def _corner_motion(video):
    """Mean absolute frame-to-frame change in the four 6 px corners: background only, so it measures head motion
    (the head moves over the backdrop), camera flicker and sensor noise, not the expression."""
    v = video.astype(np.float32)
    corners = np.concatenate([v[:, :6, :6], v[:, :6, -6:], v[:, -6:, :6], v[:, -6:, -6:]], 1)
    return float(np.abs(np.diff(corners, axis=0)).mean())


def test_posed_scenario_keeps_the_expression_and_drops_the_nuisance():
    """Same clip streams, two recording conditions: posed clips show a full-intensity single prototype, no speech,
    and a calmer scene; the wild default is unchanged by the scenario knob."""
    wild_motion, posed_motion = [], []
    for i in range(7):
        identity = S.split_identity(0, "train", 0)
        wild, wm = S.generate_clip(S.clip_rng(0, "train", i), i, frames=FRAMES, size=SIZE, identity=identity)
        default, _ = S.generate_clip(S.clip_rng(0, "train", i), i, frames=FRAMES, size=SIZE, identity=identity,
                                     scenario="wild")
        np.testing.assert_array_equal(wild, default)
        posed, pm = S.generate_clip(S.clip_rng(0, "train", i), i, frames=FRAMES, size=SIZE, identity=identity,
                                    scenario="posed")
        assert pm["expression"] == wm["expression"] and pm["talk_amplitude"] == 0.0 and pm["blend"] is None
        if pm["expression"] != "neutral":
            assert 0.8 <= pm["intensity"] <= 1.0 and max(pm["envelope"]) > 0.9, pm
        wild_motion.append(_corner_motion(wild))
        posed_motion.append(_corner_motion(posed))
    assert np.mean(posed_motion) < 0.6 * np.mean(wild_motion), (posed_motion, wild_motion)


def test_unknown_scenario_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic scenario 'studio'.*posed.*wild"):
        S.build_dataset(str(tmp_path / "ds"), num_pretrain=1, scenario="studio")
    assert not (tmp_path / "ds").exists()


def test_scenario_is_recorded_in_dataset_info(tmp_path):
    info = S.main(["--out", str(tmp_path), "--num_pretrain", "2", "--train_per_class", "0", "--val_per_class", "0",
                   "--test_per_class", "0", "--frames", "4", "--size", "32", "--workers", "1",
                   "--scenario", "posed", "--contact_sheet", str(tmp_path / "sheet.png")])
    assert info["extra"]["scenario"]["name"] == "posed" and info["extra"]["scenario"]["talk"] == 0.0
    assert "--scenario posed" in info["creation_command"]
    assert dataset_info.load(str(tmp_path))["extra"]["scenario"]["name"] == "posed"


def test_identity_pools_are_disjoint():
    fields = lambda i: tuple(v for k, v in vars(i).items() if k != "name")  # noqa: E731
    train = {fields(S.split_identity(0, "train", k)) for k in range(20)}
    pretrain = {fields(S.split_identity(0, "pretrain", k)) for k in range(20)}
    for split in ("val", "test"):
        held_out = {fields(S.split_identity(0, split, k)) for k in range(20)}
        assert not held_out & (train | pretrain)
    assert S.split_identity(0, "test", 3) == S.split_identity(0, "test", 3)  # deterministic


def test_dataset_info_and_records(tiny_dataset):
    info, recs = _records_by_split(tiny_dataset)
    assert info["format"] == "facemae_dataset" and info["version"] == 1
    assert info["task"] == "classification" and info["class_names"] == list(S.CLASS_NAMES)
    assert info["frame_size"] == {"height": SIZE, "width": SIZE}
    assert info["num_clips"] == len(recs) == 9 + 7 * (2 + 1 + 1)
    assert info["shards"] == sorted(info["shards"]) == [os.path.basename(p) for p in records.list_shards(tiny_dataset)]
    assert len(info["shards"]) == 4  # 37 clips, 10 per shard
    assert "--train_per_class 2" in info["creation_command"]
    # splits partition the global record indices and agree with each record's own split field
    all_indices = sorted(i for idx in info["splits"].values() for i in idx)
    assert all_indices == list(range(len(recs)))
    assert {k: len(v) for k, v in info["splits"].items()} == {"pretrain": 9, "train": 14, "val": 7, "test": 7}
    for split, indices in info["splits"].items():
        for i in indices:
            assert recs[i].split == split
            assert (recs[i].label is None) == (split == "pretrain")
    assert info["label_histogram"] == {str(c): 4 for c in range(7)}
    assert info["extra"]["label_histogram_per_split"]["train"] == {str(c): 2 for c in range(7)}
    rec = recs[info["splits"]["train"][0]]
    assert rec.fps == 25.0 and rec.num_frames == FRAMES and (rec.height, rec.width) == (SIZE, SIZE)
    assert records.decode_frames(rec).shape == (FRAMES, SIZE, SIZE, 3)
    assert rec.extra["expression"] == S.CLASS_NAMES[rec.label]
    # people in val/test never appear in train or pretrain
    people = {s: {recs[i].extra["identity"] for i in idx} for s, idx in info["splits"].items()}
    seen = people["train"] | people["pretrain"]
    assert not people["val"] & seen and not people["test"] & seen and not people["val"] & people["test"]
    # each train identity shows every class once
    by_person = {}
    for i in info["splits"]["train"]:
        by_person.setdefault(recs[i].extra["identity"], []).append(recs[i].label)
    assert all(sorted(v) == list(range(7)) for v in by_person.values())


def test_parallel_build_is_byte_identical(tiny_dataset, tmp_path):
    info = S.build_dataset(str(tmp_path), seed=3, num_pretrain=9, train_per_class=2, val_per_class=1,
                           test_per_class=1, frames=FRAMES, size=SIZE, workers=2, clips_per_shard=10)
    reference = dataset_info.load(tiny_dataset)
    assert info["shards"] == reference["shards"] and info["splits"] == reference["splits"]
    for name in info["shards"]:
        assert filecmp.cmp(os.path.join(tiny_dataset, name), os.path.join(tmp_path, name), shallow=False), name


def test_contact_sheet_written(tiny_dataset):
    sheet = cv2.imread(os.path.join(tiny_dataset, "contact_sheet.png"))
    assert sheet is not None
    assert sheet.shape[0] >= 7 * SIZE and sheet.shape[1] >= FRAMES * SIZE  # a row per class, frames across
    assert sheet.std() > 10  # not blank


def _mouth_contrast(video, meta, t):
    """Grey-level spread in a box around the mouth at frame ``t``: an opening (dark cavity, white teeth) raises it,
    pressed lips lower it. Unlike mean brightness it does not depend on skin tone."""
    unit = meta["face_unit_px"]
    x, y = meta["mouth_centre_px"][t]
    box = video[t, int(y - 0.25 * unit):int(y + 0.4 * unit) + 1, int(x - 0.35 * unit):int(x + 0.35 * unit) + 1]
    return float(box.mean(-1).std())


def test_expressions_differ_on_average():
    """Apex versus the least expressive frame of the same clip: surprise (jaw drop) opens the mouth, angry (lip
    press) does not; same people for both classes."""
    change = {}
    for name in ("surprise", "angry"):
        values = []
        for i in range(8):
            video, meta = S.generate_clip(S.clip_rng(1, "adhoc", i), S.CLASS_NAMES.index(name), frames=16, size=64,
                                          identity=S.split_identity(1, "test", i))
            envelope = np.array(meta["envelope"])
            values.append(_mouth_contrast(video, meta, int(envelope.argmax()))
                          - _mouth_contrast(video, meta, int(envelope.argmin())))
        change[name] = np.array(values)
    assert change["surprise"].mean() > change["angry"].mean() + 8, change
    assert (change["surprise"] > 0).mean() >= 0.75, change
    # angry never opens the mouth: every angry clip changes less than every surprise clip
    assert change["angry"].max() < change["surprise"].min(), change


def _nearest_class_mean_accuracy(train_x, train_y, test_x, test_y):
    means = np.stack([train_x[train_y == c].mean(0) for c in range(7)])
    pred = ((test_x[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    return float((pred == test_y).mean())


def test_a_single_first_frame_does_not_solve_the_task():
    """Nearest class mean on the first frame (pixels), new people at test time, is near chance (1/7)."""

    def first_frames(split, per_class):
        x, y = [], []
        for i in range(7 * per_class):
            video, _ = S.generate_clip(S.clip_rng(0, split, i), i % 7, frames=16, size=32,
                                       identity=S.split_identity(0, split, i // 7))
            x.append(cv2.resize(video[0].mean(-1), (16, 16), interpolation=cv2.INTER_AREA).ravel())
            y.append(i % 7)
        return np.array(x), np.array(y)

    acc = _nearest_class_mean_accuracy(*first_frames("train", 6), *first_frames("test", 4))
    assert acc < 0.45, acc


def test_label_lives_in_the_dynamics():
    """With perfect perception (the generator's action-unit tracks), the whole clip identifies the class far better
    than its first frame: the task is solvable, but only by looking across time."""
    def features(seed, n_per_class):
        clip_f, first_f, y = [], [], []
        for i in range(7 * n_per_class):
            dyn = synthetic_expressions.sample_dynamics(np.random.default_rng([seed, i]), S.CLASS_NAMES[i % 7], 32)
            clip_f.append(np.concatenate([dyn.aus.max(0), dyn.aus.mean(0)]))
            first_f.append(dyn.aus[0])
            y.append(i % 7)
        return np.array(clip_f), np.array(first_f), np.array(y)

    clip_tr, first_tr, y_tr = features(0, 40)
    clip_te, first_te, y_te = features(1, 40)
    clip_acc = _nearest_class_mean_accuracy(clip_tr, y_tr, clip_te, y_te)
    first_acc = _nearest_class_mean_accuracy(first_tr, y_tr, first_te, y_te)
    assert clip_acc > 0.75, clip_acc
    assert first_acc < 0.45, first_acc
    assert clip_acc > first_acc + 0.3


def test_synthetic_video_cli_writes_a_decodable_mp4(tmp_path):
    from data_pipelines import synthetic_video, video_io

    out = tmp_path / "demo.mp4"
    assert synthetic_video.main(["--out", str(out), "--expressions", "happy,sad", "--frames_per_expression", "6",
                                 "--size", "64"]) == 0
    frames, fps = video_io.read_video(str(out))
    assert frames.shape == (12, 64, 64, 3) and fps == 25
    import pytest

    with pytest.raises(ValueError, match="unknown expressions"):
        synthetic_video.render(["joy"], frames_per_expression=4, size=32, seed=0)
    # The scenario reaches the renderer (same person and seed, other recording conditions), and is checked.
    wild = synthetic_video.render(["happy"], frames_per_expression=4, size=32, seed=0)
    posed = synthetic_video.render(["happy"], frames_per_expression=4, size=32, seed=0, scenario="posed")
    assert wild.shape == posed.shape and not np.array_equal(wild, posed)
    with pytest.raises(ValueError, match="scenario"):
        synthetic_video.render(["happy"], frames_per_expression=4, size=32, seed=0, scenario="studio")


def test_diagnostics_calibration_on_a_tiny_dataset(tiny_dataset, tmp_path):
    """benchmarks.synthetic_diagnostics: the all-zero baseline of per-patch normalised appearance targets is ~1
    (unbiased std), the frame-difference target lowers it, a blurred copy of the clip predicts much better than
    zeros, and the probes give a UAR for every feature set and weight decay."""
    from benchmarks import synthetic_diagnostics as D

    out = D.main(["--data", tiny_dataset, "--out", str(tmp_path / "diag.json"), "--recon-clips", "4"])
    assert json.load(open(tmp_path / "diag.json"))["clips"] == {"pretrain": 9, "train": 14, "test": 7}
    for kind in ("static", "motion", "absdiff"):
        assert set(out["linear_probe_test_uar"][kind]) == {str(w) for w in D.WEIGHT_DECAYS}
        assert all(0 <= v <= 100 for v in out["linear_probe_test_uar"][kind].values())
    r = out["reconstruction_baselines"]["patch16"]
    assert 0.99 < r["appearance/zero"] <= 1.0
    assert r["appearance_motion/zero"] < r["appearance/zero"]
    assert r["appearance/blur_oracle_sigma1.0"] < r["appearance/blur_oracle_sigma2.5"] < r["appearance/zero"]
