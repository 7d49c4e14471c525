"""Dataset converters (data_pipelines.build): official CSV layouts, raw videos, broken inputs, resume, CLI entry.

Every tree is made here in tmp_path with tiny frames (24x32) whose pixel values encode (clip, frame index), so
labels, frame order and crops are checked on the decoded records, not just counted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest
from PIL import Image

from data_pipelines import build, clip_conversion, dataset_info, records, shard_runner, video_io
from data_pipelines.sources import official_csv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUTHOR_PREFIX = "/mnt/data1/brain/AC/Dataset/DFEW"  # what the shipped CSVs contain
H, W = 24, 32
SHORT = 16
RESIZED_W = 21  # round(32 * 16 / 24)


# ---------------------------------------------------------------------------------------------------------------
# Fake trees
# ---------------------------------------------------------------------------------------------------------------


def clip_red(clip_number: int) -> int:
    return 20 + (clip_number * 37) % 200


def frame_green(frame_index: int) -> int:
    return 10 + 20 * frame_index


def write_frame_folder(folder, clip_number: int, num_frames: int, ext: str = "jpg") -> None:
    """Frames 00000.ext..: red encodes the clip, green the frame index (uniform colours survive JPEG)."""
    os.makedirs(folder, exist_ok=True)
    for i in range(num_frames):
        img = Image.new("RGB", (W, H), (clip_red(clip_number), frame_green(i), 128))
        img.save(os.path.join(folder, f"{i:05d}.{ext}"), quality=95)


def make_kfold_tree(tmp_path, *, name="DFEW", ext="jpg", clips=10, folds=5, with_val=True, label_of=None):
    """<tmp>/<name>/Clip/jpg_256/000NN frame folders + <tmp>/<name>_ann/split0k/{train,val,test}.csv with the
    authors' absolute paths. Fold k tests clips 2k+1, 2k+2 (clips/folds per fold)."""
    label_of = label_of or (lambda c: (c - 1) % 7)
    data = tmp_path / name
    per_fold = clips // folds
    for c in range(1, clips + 1):
        write_frame_folder(data / "Clip" / "jpg_256" / f"{c:05d}", c, 5 + c % 4, ext)
    ann = tmp_path / f"{name}_ann"
    for k in range(folds):
        test = list(range(k * per_fold + 1, (k + 1) * per_fold + 1))
        train = [c for c in range(1, clips + 1) if c not in test]
        fold_dir = ann / f"split{k + 1:02d}"
        fold_dir.mkdir(parents=True)
        line = lambda c: f"{AUTHOR_PREFIX}/Clip/jpg_256/{c:05d} {label_of(c)}\n"  # noqa: E731
        (fold_dir / "train.csv").write_text("".join(line(c) for c in train))
        (fold_dir / "test.csv").write_text("".join(line(c) for c in test))
        if with_val:
            (fold_dir / "val.csv").write_text("".join(line(c) for c in test))
    return data, ann


def read_all(out_dir):
    info = dataset_info.load(str(out_dir))
    recs = list(records.read_records([os.path.join(out_dir, s) for s in info["shards"]]))
    return info, recs


def run_main(argv):
    return build.main([str(a) for a in argv] + ["--no_progress"])


def dfew_argv(data, ann, out, *extra):
    return ["dfew", "--annotations", ann, "--path_remap", f"{AUTHOR_PREFIX}={data}", "--out", out,
            "--short_side", SHORT, "--clips_per_shard", 4, *extra]


def without_created(info):
    return {k: v for k, v in info.items() if k != "created"}


# ---------------------------------------------------------------------------------------------------------------
# Annotation CSVs over frame folders
# ---------------------------------------------------------------------------------------------------------------


def test_dfew_five_folds_become_one_set_of_shards(tmp_path):
    data, ann = make_kfold_tree(tmp_path)
    out = tmp_path / "out"
    assert run_main(dfew_argv(data, ann, out)) == 0
    info, recs = read_all(out)

    ids = [f"{c:05d}" for c in range(1, 11)]
    assert info["format"] == "facemae_dataset" and info["version"] == 1 and info["name"] == "dfew"
    assert info["shards"] == [records.shard_name("dfew", i, 3) for i in range(3)]
    assert all((out / s).is_file() for s in info["shards"])
    assert info["num_clips"] == 10 and [r.clip_id for r in recs] == ids  # each clip once, sorted
    assert info["task"] == "classification" and info["class_names"] == list(official_csv.DFEW_CLASSES)
    assert info["frame_size"] == {"short_side": SHORT} and info["folds"] == 5 and info["skipped"] == []
    assert info["source"] == str(data / "Clip" / "jpg_256")
    assert info["creation_command"].startswith("python -m data_pipelines.build dfew")
    assert info["label_histogram"] == {"0": 2, "1": 2, "2": 2, "3": 1, "4": 1, "5": 1, "6": 1}

    # Splits: global indices; fold k tests clips 2k+1, 2k+2 and trains on the other 8; val == test.
    assert list(info["splits"])[:3] == ["fold1/train", "fold1/val", "fold1/test"]
    for k in range(5):
        test = [2 * k, 2 * k + 1]
        assert info["splits"][f"fold{k + 1}/test"] == test
        assert info["splits"][f"fold{k + 1}/val"] == test
        assert info["splits"][f"fold{k + 1}/train"] == [i for i in range(10) if i not in test]
    check = info["extra"]["structure_check"]
    assert check["ok"] and check["clips_in_several_test_sets"] == 0 and check["folds"]["fold3"]["val_equals_test"]

    for index, rec in enumerate(recs):
        c = index + 1
        assert rec.label == (c - 1) % 7 and rec.fold == (c - 1) // 2 and rec.split is None
        assert rec.source == str(data / "Clip" / "jpg_256" / f"{c:05d}") and rec.fps is None
        frames = records.decode_frames(rec)
        assert frames.shape == (5 + c % 4, SHORT, RESIZED_W, 3)
        np.testing.assert_allclose(frames[..., 0].mean(axis=(1, 2)), clip_red(c), atol=3)
        np.testing.assert_allclose(frames[..., 1].mean(axis=(1, 2)), [frame_green(i) for i in range(len(frames))],
                                   atol=3)  # temporal order kept
        assert rec.extra["source_size"] == [H, W]
    assert info["extra"]["source_frame_sizes"] == {f"{H}x{W}": 10}


def test_mafw_png_frames_eleven_classes(tmp_path):
    labels = {1: 0, 2: 3, 3: 7, 4: 10, 5: 5}
    data, ann = make_kfold_tree(tmp_path, name="MAFW", ext="png", clips=5, folds=5, with_val=False,
                                label_of=labels.__getitem__)
    out = tmp_path / "out"
    assert run_main(["mafw", "--annotations", ann, "--path_remap", f"{AUTHOR_PREFIX}={data}", "--out", out,
                     "--short_side", SHORT]) == 0
    info, recs = read_all(out)
    assert info["class_names"] == list(official_csv.MAFW_CLASSES) and len(info["class_names"]) == 11
    assert [r.label for r in recs] == [0, 3, 7, 10, 5]
    assert info["label_histogram"] == {str(i): int(i in labels.values()) for i in range(11)}
    assert sorted(info["splits"]) == sorted(f"fold{k}/{s}" for k in range(1, 6) for s in ("train", "test"))
    assert info["extra"]["preprocessing"]["frame_ext"] == "png"
    frames = records.decode_frames(recs[2])
    np.testing.assert_allclose(frames[..., 1].mean(axis=(1, 2)), [frame_green(i) for i in range(len(frames))], atol=3)

    # Every 2nd frame, at most 2 of them: frames 0 and 2 of each folder.
    out2 = tmp_path / "out2"
    assert run_main(["mafw", "--annotations", ann, "--path_remap", f"{AUTHOR_PREFIX}={data}", "--out", out2,
                     "--short_side", SHORT, "--frame_stride", 2, "--max_frames", 2]) == 0
    info2, recs2 = read_all(out2)
    assert info2["extra"]["preprocessing"]["frame_stride"] == 2 and info2["extra"]["num_frames"]["max"] == 2
    for rec in recs2:
        assert rec.extra["frame_stride"] == 2
        np.testing.assert_allclose(records.decode_frames(rec)[..., 1].mean(axis=(1, 2)),
                                   [frame_green(0), frame_green(2)], atol=3)


def test_store_original_frames_keeps_the_files_bytes(tmp_path, capsys):
    """--store_original_frames: PNG (MAFW) and JPEG frame files go into the records byte for byte and decode as PIL
    decodes them (the eval-views golden relies on this for bit-identical views); a size change inside a clip is
    skipped with the file named; videos / crops are refused up front."""
    labels = {1: 0, 2: 3, 3: 7, 4: 10, 5: 5}
    data, ann = make_kfold_tree(tmp_path, name="MAFW", ext="png", clips=5, folds=5, with_val=False,
                                label_of=labels.__getitem__)
    odd = data / "Clip" / "jpg_256" / "00004"
    Image.new("RGB", (W + 2, H), (1, 2, 3)).save(odd / "00001.png")  # second frame of clip 4 is wider
    out = tmp_path / "out"
    base = ["mafw", "--annotations", ann, "--path_remap", f"{AUTHOR_PREFIX}={data}", "--out", out]
    assert run_main([*base, "--store_original_frames"]) == 0
    info, recs = read_all(out)
    assert [r.clip_id for r in recs] == ["00001", "00002", "00003", "00005"]
    assert "00004" in info["skipped"][0]["input"] and "frame size changes" in info["skipped"][0]["reason"]
    assert info["extra"]["preprocessing"]["store_original"] is True
    for rec in recs:
        files = sorted((data / "Clip" / "jpg_256" / rec.clip_id).glob("*.png"))
        assert rec.frames == [f.read_bytes() for f in files] and rec.extra["stored"] == "original"
        assert (rec.height, rec.width) == (H, W)
        want = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
        assert np.array_equal(records.decode_frames(rec), want)
    capsys.readouterr()
    assert run_main([*base[:-1], tmp_path / "out2", "--store_original_frames", "--face_crop"]) == 2
    assert "--store_original_frames" in capsys.readouterr().err


def test_fold_structure_problems_are_reported(tmp_path, capsys):
    """Clip 1 in the test sets of both folds; clip 4 in fold 2's train *and* test; clip 3 missing from fold 1."""
    data = tmp_path / "clips"
    for c in range(1, 5):
        write_frame_folder(data / f"c{c}", c, 3)
    ann = tmp_path / "ann"
    layout = {1: {"train": [2], "test": [1, 4]}, 2: {"train": [2, 3, 4], "test": [1, 4]}}
    for k, files in layout.items():
        (ann / f"split{k:02d}").mkdir(parents=True)
        for split, clips in files.items():
            (ann / f"split{k:02d}" / f"{split}.csv").write_text("".join(f"{data}/c{c} 1\n" for c in clips))
    out = tmp_path / "out"
    assert run_main(["csv", "--annotations", ann, "--classes", "a,b", "--out", out, "--short_side", SHORT]) == 0
    info, recs = read_all(out)
    check = info["extra"]["structure_check"]
    assert not check["ok"] and info["folds"] == 2
    assert check["clips_in_several_test_sets"] == 2  # c1 and c4
    assert check["clips_in_no_test_set"] == 2  # c2, c3
    assert check["folds"]["fold1"]["in_neither"] == 1 and check["folds"]["fold2"]["train_test_overlap"] == 1
    assert [r.fold for r in recs] == [0, None, None, 0]  # first test fold wins
    err = capsys.readouterr().err
    assert "more than one fold's test set" in err and "fold2: train is not the complement" in err


def test_generic_csv_regression_with_relative_paths(tmp_path):
    data = tmp_path / "frames"
    for c in range(1, 4):
        write_frame_folder(data / f"s{c}", c, 4)
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "train.csv").write_text("frames/s1 0.5 -1.0\nframes/s2 0.25 2\n")
    (ann / "test.csv").write_text("frames/s3 -0.75 0\n")
    out = tmp_path / "out"
    assert run_main(["csv", "--annotations", ann, "--root", tmp_path, "--targets", "valence,arousal", "--out", out,
                     "--short_side", SHORT]) == 0
    info, recs = read_all(out)
    assert info["task"] == "regression" and info["target_names"] == ["valence", "arousal"]
    assert "class_names" not in info and info["label_histogram"] == {} and "folds" not in info
    assert info["splits"] == {"train": [0, 1], "test": [2]}
    assert [r.label for r in recs] == [[0.5, -1.0], [0.25, 2.0], [-0.75, 0.0]]
    assert [r.split for r in recs] == ["train", "train", "test"] and all(r.fold is None for r in recs)


def test_broken_inputs_are_skipped_and_listed(tmp_path, capsys):
    """FERV39k layout (single split): good clips are written, every bad one is listed with its reason."""
    root = tmp_path / "FERV39k" / "2_ClipsforFaceCrop"
    for c, rel in enumerate(["Crime/Angry/0001", "Crime/Happy/0002", "War/Sad/0003"], 1):
        write_frame_folder(root / rel, c, 4)
    (root / "War" / "Sad" / "0004").mkdir(parents=True)  # empty folder
    write_frame_folder(root / "War" / "Sad" / "0005", 5, 4)
    (root / "War" / "Sad" / "0005" / "00002.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    write_frame_folder(root / "War" / "Sad" / "0006", 6, 4)
    good = (root / "War" / "Sad" / "0006" / "00001.jpg").read_bytes()
    (root / "War" / "Sad" / "0006" / "00001.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    ann = tmp_path / "all_scenes"
    ann.mkdir()
    old = "/data/ycs/AC/Dataset/FERV39k/2_ClipsforFaceCrop"
    (ann / "train.csv").write_text(
        f"{old}/Crime/Angry/0001 3\n{old}/Crime/Happy/0002 0\n{old}/War/Sad/0004 1\n{old}/War/Sad/0005 1\n"
        f"{old}/War/Sad/0099 1\n"  # missing folder
        f"{old}/War/Sad/0003 9\n"  # label out of range (7 classes)
    )
    (ann / "test.csv").write_text(f"{old}/War/Sad/0003 1\n{old}/War/Sad/0006 1\n")
    out = tmp_path / "out"
    assert run_main(["ferv39k", "--annotations", ann, "--path_remap", f"{old}={root}", "--out", out,
                     "--short_side", SHORT]) == 0
    info, recs = read_all(out)
    assert [r.clip_id for r in recs] == ["Crime/Angry/0001", "Crime/Happy/0002", "War/Sad/0003"]
    assert [(r.label, r.split) for r in recs] == [(3, "train"), (0, "train"), (1, "test")]
    assert info["splits"] == {"train": [0, 1], "test": [2]}
    reasons = {os.path.basename(s["input"]).split(":")[0]: s["reason"] for s in info["skipped"]}
    assert len(info["skipped"]) == 5
    assert reasons["train.csv"].startswith("label out of range: 9 not in [0, 7)")
    assert reasons["0004"].startswith("empty clip folder")
    assert reasons["0005"].startswith("unreadable frame") and "00002.jpg" in reasons["0005"]
    assert reasons["0006"].startswith("unreadable frame") and "00001.jpg" in reasons["0006"]
    assert reasons["0099"].startswith("missing path")
    assert info["label_histogram"] == {"0": 1, "1": 1, "2": 0, "3": 1, "4": 0, "5": 0, "6": 0}
    err = capsys.readouterr().err
    assert "skipped 5 input(s)" in err and "2 x unreadable frame" in err and "1 x missing path" in err


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (["--annotations", "{tmp}/nowhere"], "does not exist"),
        (["--annotations", "{ann}", "--path_remap", "no-equals-sign"], "expected OLD=NEW"),
        (["--annotations", "{ann}", "--path_remap", "/not/the/prefix={data}"], "matched no annotation path"),
        (["--annotations", "{ann}"], "pass --path_remap"),  # authors' absolute paths, none exists here
        (["--annotations", "{ann}/split01", "--path_remap", AUTHOR_PREFIX + "={data}"], "expected fold folders"),
        (["--annotations", "{ann}", "--classes", "a,b"], "fixed classes"),
    ],
)
def test_bad_configuration_fails_up_front(tmp_path, capsys, argv_tail, message):
    data, ann = make_kfold_tree(tmp_path, clips=5, folds=5)
    out = tmp_path / "out"
    argv = ["dfew", "--out", out] + [a.format(tmp=tmp_path, ann=ann, data=data) for a in argv_tail]
    assert run_main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing written


def test_missing_split_file_is_a_configuration_error(tmp_path, capsys):
    data, ann = make_kfold_tree(tmp_path, clips=5, folds=5)
    os.remove(ann / "split03" / "test.csv")
    assert run_main(dfew_argv(data, ann, tmp_path / "out")) == 2
    assert "split03: split file(s) test.csv missing" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Videos
# ---------------------------------------------------------------------------------------------------------------


def video_frames(num_frames: int) -> np.ndarray:
    """Gray frames: value 4*col + 20*t in rows < 16 (what the fixed crop keeps), 250 below."""
    cols = np.arange(W)
    frames = np.full((num_frames, H, W, 3), 250, np.uint8)
    for t in range(num_frames):
        frames[t, :SHORT] = (4 * cols + 20 * t)[None, :, None]
    return frames


def test_video_io_roundtrip_and_errors(tmp_path):
    path = tmp_path / "v.mp4"
    video_io.write_video(path, video_frames(6), fps=25, crf=0)
    frames, fps = video_io.read_video(path)
    assert frames.shape == (6, H, W, 3) and frames.dtype == np.uint8 and fps == 25.0
    np.testing.assert_allclose(frames[:, 0, :, 1].astype(float), video_frames(6)[:, 0, :, 1], atol=3)
    strided, _ = video_io.read_video(path, frame_stride=2, max_frames=2)
    np.testing.assert_array_equal(strided, frames[[0, 2]])

    video_io.write_video(tmp_path / "odd.mp4", np.zeros((2, 7, 9, 3), np.uint8), fps=10)
    assert video_io.read_video(tmp_path / "odd.mp4")[0].shape == (2, 8, 10, 3)  # padded to even size

    data = path.read_bytes()
    (tmp_path / "trunc.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "zero.mp4").write_bytes(b"")
    with av.open(str(tmp_path / "no_frames.mp4"), "w") as container:  # a header, not a single frame
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        container.start_encoding()
    for name, message in [("trunc.mp4", "cannot open"), ("zero.mp4", "cannot open"), ("nope.mp4", "no such file"),
                          ("no_frames.mp4", "no video stream")]:
        with pytest.raises(video_io.VideoReadError, match=message) as e:
            video_io.read_video(tmp_path / name)
        assert name in str(e.value)


def make_vox_tree(root):
    layout = {"id00012/abcDEF_01/00001": 6, "id00012/abcDEF_01/00002": 5, "id00012/zzzXYZ_99/00001": 4,
              "id00517/Q-q_/00003": 6}
    for clip_id, n in layout.items():
        os.makedirs(root / os.path.dirname(clip_id), exist_ok=True)
        video_io.write_video(root / f"{clip_id}.mp4", video_frames(n), fps=25, crf=0)
    return layout


def test_voxceleb2_tree_with_fixed_crop(tmp_path):
    root = tmp_path / "vox" / "dev" / "mp4"
    layout = make_vox_tree(root)
    out = tmp_path / "out"
    assert run_main(["voxceleb2", "--root", root, "--out", out, "--short_side", SHORT]) == 0
    info, recs = read_all(out)
    assert [r.clip_id for r in recs] == sorted(layout)
    assert info["task"] == "unlabeled" and "class_names" not in info and info["label_histogram"] == {}
    assert info["splits"] == {"pretrain": [0, 1, 2, 3]} and info["frame_size"] == {"height": SHORT, "width": SHORT}
    preprocessing = info["extra"]["preprocessing"]
    assert preprocessing["fixed_crop"] is True and "Q24" in preprocessing["fixed_crop_rule"]
    for rec in recs:
        assert rec.label is None and rec.split == "pretrain" and rec.fold is None and rec.fps == 25.0
        frames = records.decode_frames(rec).astype(float)
        assert frames.shape == (layout[rec.clip_id], SHORT, SHORT, 3)
        # top-centre crop: rows 0-15 (nothing of the 250 rows below), cols 8-23 of the 32-wide frame
        for t in range(len(frames)):
            np.testing.assert_allclose(frames[t, :, :, 1].mean(axis=0), 4 * np.arange(8, 24) + 20 * t, atol=6)

    # Every 2nd frame, at most 2: frames 0 and 2 at half the frame rate.
    out2 = tmp_path / "out2"
    assert run_main(["voxceleb2", "--root", root, "--out", out2, "--short_side", SHORT, "--frame_stride", 2,
                     "--max_frames", 2]) == 0
    _, recs2 = read_all(out2)
    for rec in recs2:
        frames = records.decode_frames(rec).astype(float)
        assert rec.num_frames == 2 and rec.fps == 12.5 and rec.extra["frame_stride"] == 2
        np.testing.assert_allclose(frames[:, :, :, 1].mean(axis=(1, 2)), 62 + 20 * np.array([0, 2]), atol=4)


def test_video_folder_labels_from_folders_and_broken_files(tmp_path, capsys):
    root = tmp_path / "videos"
    for rel, n in [("happy/a.mp4", 3), ("sad/b.mp4", 4), ("sad/deeper/c.MOV", 2)]:
        os.makedirs(root / os.path.dirname(rel), exist_ok=True)
        video_io.write_video(root / rel, video_frames(n), fps=30)
    data = (root / "sad" / "b.mp4").read_bytes()
    (root / "sad" / "trunc.mp4").write_bytes(data[: len(data) // 2])
    (root / "happy" / "zero.mp4").write_bytes(b"")
    video_io.write_video(root / "loose.mp4", video_frames(2), fps=30)  # not inside a class folder
    out = tmp_path / "out"
    assert run_main(["videos", "--root", root, "--labels_from_folders", "--classes", "happy,sad,deeper", "--out", out,
                     "--short_side", SHORT]) == 0
    info, recs = read_all(out)
    assert info["class_names"] == ["happy", "sad", "deeper"]
    assert [(r.clip_id, r.label, r.num_frames) for r in recs] == [("happy/a", 0, 3), ("sad/b", 1, 4),
                                                                    ("sad/deeper/c", 2, 2)]
    assert info["splits"] == {"train": [0, 1, 2]} and info["frame_size"] == {"short_side": SHORT}
    assert records.decode_frames(recs[0]).shape == (3, SHORT, RESIZED_W, 3) and recs[0].fps == 30.0
    reasons = {os.path.basename(s["input"]): s["reason"] for s in info["skipped"]}
    assert reasons["loose.mp4"].startswith("no class folder")
    assert reasons["trunc.mp4"].startswith("unreadable video") and reasons["zero.mp4"].startswith("unreadable video")
    assert "skipped 3 input(s)" in capsys.readouterr().err


def test_face_crop_uses_the_faces_api(tmp_path, monkeypatch):
    faces = pytest.importorskip("data_pipelines.faces")
    calls = []

    def fake_detect_and_crop(frames, out_size, **kwargs):
        calls.append((frames.shape, out_size, kwargs))
        if frames.shape[0] == 4:  # the 4-frame clip has "no face"
            raise faces.NoFaceFound("no face in 4 frames")
        t = frames.shape[0]
        return faces.FaceTrack(crops=np.full((t, out_size, out_size, 3), 99, np.uint8),
                               boxes=np.tile(np.float32([1, 2, 21, 22]), (t, 1)), detected=np.ones(t, bool))

    monkeypatch.setattr(faces, "detect_and_crop", fake_detect_and_crop)
    root = tmp_path / "vox"
    make_vox_tree(root)
    out = tmp_path / "out"
    assert run_main(["voxceleb2", "--root", root, "--out", out, "--short_side", SHORT, "--face_crop",
                     "--face_margin", 0.3]) == 0
    info, recs = read_all(out)
    assert all(shape[1:] == (H, W, 3) and size == SHORT and kw == {"margin": 0.3} for shape, size, kw in calls)
    assert info["frame_size"] == {"height": SHORT, "width": SHORT}
    assert info["extra"]["preprocessing"]["fixed_crop"] is False  # the face crop replaces the Q24 crop
    assert len(recs) == 3 and info["skipped"][0]["reason"].startswith("no face found")
    assert recs[0].extra["face_boxes"][0] == [1.0, 2.0, 21.0, 22.0] and recs[0].extra["face_detected_fraction"] == 1.0
    assert abs(records.decode_frames(recs[0]).mean() - 99) < 2


# ---------------------------------------------------------------------------------------------------------------
# Resume, parallel workers, module entry
# ---------------------------------------------------------------------------------------------------------------


def test_resume_rebuilds_only_missing_shards(tmp_path, capsys):
    data, ann = make_kfold_tree(tmp_path)
    out = tmp_path / "out"
    argv = dfew_argv(data, ann, out)
    assert run_main(argv) == 0
    info_before = json.loads((out / "dataset_info.json").read_text())
    shards = info_before["shards"]
    content = {s: (out / s).read_bytes() for s in shards}
    past = 1_000_000_000
    for s in shards:
        os.utime(out / s, (past, past))
    os.remove(out / shards[1])

    assert run_main(argv) == 0
    assert "1 shard(s) built" in capsys.readouterr().err
    assert without_created(json.loads((out / "dataset_info.json").read_text())) == without_created(info_before)
    assert {s: (out / s).read_bytes() for s in shards} == content  # same bytes, deterministic
    assert [os.stat(out / s).st_mtime for s in shards] != [past] * 3
    assert os.stat(out / shards[0]).st_mtime == past and os.stat(out / shards[2]).st_mtime == past

    # Other options -> every shard's fingerprint changes -> all rebuilt.
    assert run_main(argv + ["--jpeg_quality", 70]) == 0
    assert all(os.stat(out / s).st_mtime != past for s in shards)
    # Another plan (different shard count) must not mix with these shards.
    assert run_main(dfew_argv(data, ann, out) + ["--clips_per_shard", 3]) == 2
    assert "another build plan" in capsys.readouterr().err


def test_interrupted_build_continues_where_it_stopped(tmp_path, monkeypatch, capsys):
    data, ann = make_kfold_tree(tmp_path)
    out = tmp_path / "out"
    real_convert = clip_conversion.convert_clip

    def interrupt_at_clip_7(inp, opts):  # clip 7 lies in the second of three shards
        if inp.clip_id == "00007":
            raise KeyboardInterrupt
        return real_convert(inp, opts)

    monkeypatch.setattr(clip_conversion, "convert_clip", interrupt_at_clip_7)
    with pytest.raises(KeyboardInterrupt):
        run_main(dfew_argv(data, ann, out))
    names = [records.shard_name("dfew", i, 3) for i in range(3)]
    assert sorted(p.name for p in out.iterdir()) == [shard_runner.SIDECAR_DIR, names[0]]  # no half shard, no info file
    monkeypatch.undo()

    assert run_main(dfew_argv(data, ann, out)) == 0
    err = capsys.readouterr().err
    assert "2 shard(s) built" in err and "1 reused" in err
    assert run_main(dfew_argv(data, ann, tmp_path / "fresh")) == 0
    info, recs = read_all(out)
    info_fresh, recs_fresh = read_all(tmp_path / "fresh")
    assert [records.encode_clip(r) for r in recs] == [records.encode_clip(r) for r in recs_fresh]
    assert info["splits"] == info_fresh["splits"] and info["num_clips"] == 10


def test_module_entry_with_worker_processes_matches_in_process_build(tmp_path):
    data, ann = make_kfold_tree(tmp_path)
    assert run_main(dfew_argv(data, ann, tmp_path / "inproc")) == 0
    cmd = [sys.executable, "-m", "data_pipelines.build", *map(str, dfew_argv(data, ann, tmp_path / "sub")),
           "--workers", "2", "--no_progress"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "10 clips in 3 shard(s)" in proc.stderr
    info_in, recs_in = read_all(tmp_path / "inproc")
    info_sub, recs_sub = read_all(tmp_path / "sub")
    assert info_sub["splits"] == info_in["splits"] and info_sub["num_clips"] == 10
    assert [records.encode_clip(r) for r in recs_sub] == [records.encode_clip(r) for r in recs_in]
    assert sorted(os.listdir(tmp_path / "sub" / shard_runner.SIDECAR_DIR)) == [s + ".json" for s in info_sub["shards"]]
    shutil.rmtree(tmp_path / "sub")
