"""Inference commands end to end on tiny models: predict, extract, visualize_mae, and the loading / windowing /
forward pieces they share (facemae_jax.inference, facemae_jax.visualize).

Models are randomly initialised tiny configs at 8 frames x 64 px (token grid 4x4x4); videos are scikit-image's
astronaut photo sliding across a grey canvas (a real face the Haar detector finds), written as H.264 mp4.
"""

from __future__ import annotations

import csv
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data

from data_pipelines import records, transforms, video_io
from facemae_jax import (
    convert,
    extract,
    inference,
    loading,
    masking,
    predict,
    targets,
    torch_io,
    visualize,
    visualize_mae,
)
from facemae_jax.models import registry

GEOMETRY = dict(num_frames=8, img_size=64, region_size=(2, 2, 4), embed_dim=32, num_heads=2, depth=1)
FINETUNE_CFG = registry.get_config("lgi_tiny_finetune", **GEOMETRY)
PRETRAIN_CFG = registry.get_config("lgi_tiny_pretrain", **GEOMETRY, decoder_embed_dim=16, decoder_depth=1,
                                   decoder_num_heads=2, mask_ratio=0.75)  # 2 of 8 tokens visible per band
SAMPLING_RATE = 2  # window span 16 frames
DFEW = ["happy", "sad", "neutral", "angry", "surprise", "disgust", "fear"]
OVERRIDE_ARGS = [f"--override={k}={json.dumps(v)}" for k, v in GEOMETRY.items()]
MOVING_FRAMES = 45  # windows start at 0, 8, 16, 24 and (aligned to the end) 29
BATCH = "4"  # one batch shape everywhere: the forward pass compiles once for the whole file
SHORT_FRAMES = 11  # fewer than one span (16), at least num_frames (8): one padded window


def random_params(cfg, seed: int) -> dict:
    """Parameters of the model's shapes without compiling its initialiser (that costs ~10 s per model on two busy
    cores): LayerNorms as initialised (unit scale, zero bias), every other tensor N(0, 0.02)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        if name == "bias":
            return np.zeros(leaf.shape, np.float32)
        return (0.02 * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, registry.abstract_params(registry.create_model(cfg)))


def astronaut_video(num_frames: int, step: int = 2) -> np.ndarray:
    """The astronaut's head sliding right by ``step`` px per frame over grey: uint8 [T, 300, 280 + step*(T-1), 3]."""
    part = skimage.data.astronaut()[0:300, 100:380]
    width = 280 + step * (num_frames - 1)
    width += width % 2
    frames = np.full((num_frames, 300, width, 3), 128, np.uint8)
    for t in range(num_frames):
        frames[t, :, step * t : step * t + 280] = part
    return frames


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Saved tiny models and a folder of test videos (good, short, too short, truncated, faceless)."""
    root = tmp_path_factory.mktemp("inference")
    params = random_params(FINETUNE_CFG, 0)
    convert.save_converted(str(root / "finetune"), params, FINETUNE_CFG,
                           {"model_name": "lgi_tiny_finetune", "sampling_rate": SAMPLING_RATE})
    pre_params = random_params(PRETRAIN_CFG, 1)
    convert.save_converted(str(root / "pretrain"), pre_params, PRETRAIN_CFG,
                           {"model_name": "lgi_tiny_pretrain", "sampling_rate": SAMPLING_RATE})

    videos = root / "videos"
    videos.mkdir()
    video_io.write_video(videos / "moving.mp4", astronaut_video(MOVING_FRAMES), fps=25)
    video_io.write_video(videos / "short.mp4", astronaut_video(SHORT_FRAMES), fps=25)
    video_io.write_video(videos / "tiny.mp4", astronaut_video(5), fps=25)
    data = (videos / "moving.mp4").read_bytes()
    (videos / "broken.mp4").write_bytes(data[: len(data) // 2])
    noise = np.random.default_rng(0).integers(0, 255, (20, 120, 160, 3), dtype=np.uint8)
    video_io.write_video(videos / "noface.mp4", noise, fps=25)
    return {"root": root, "videos": videos, "params": params, "pre_params": pre_params}


@pytest.fixture(scope="module")
def shards(workspace):
    """A shard file of three clips: 20 frames at the model size, 30 frames at 80 px, and 3 frames (padded)."""
    rng = np.random.default_rng(3)
    clips = [("a", rng.integers(0, 255, (20, 64, 64, 3), dtype=np.uint8), 2),
             ("b", rng.integers(0, 255, (30, 80, 80, 3), dtype=np.uint8), 5),
             ("c", rng.integers(0, 255, (3, 64, 64, 3), dtype=np.uint8), None)]
    directory = workspace["root"] / "shards"
    directory.mkdir()
    with records.ShardWriter(str(directory / records.shard_name("clips", 0, 1))) as writer:
        for clip_id, frames, label in clips:
            writer.write(records.make_record(clip_id, frames, label=label, source=f"/data/{clip_id}", fps=25.0))
    return directory


@pytest.fixture(scope="module")
def predicted(workspace):
    """predict over all five videos with annotation and timeline; (exit code, output dir)."""
    out = workspace["root"] / "pred"
    names = ["moving", "short", "tiny", "broken", "noface"]
    argv = [str(workspace["videos"] / f"{n}.mp4") for n in names]
    argv += ["--checkpoint", str(workspace["root"] / "finetune"), "--out", str(out), "--annotate", "--timeline",
             "--batch", BATCH]
    return predict.main(argv), out


# ---------------------------------------------------------------------------------------------------------------
# windows


@pytest.mark.parametrize("num_frames", [8, 11, 15, 16, 17, 31, 45, 100])
@pytest.mark.parametrize("stride", [None, 1, 5, 16])
def test_windows_cover_the_whole_video(num_frames, stride):
    windows = inference.plan_windows(num_frames, 8, SAMPLING_RATE, stride)
    assert windows[0].start_frame == 0 and windows[-1].end_frame == num_frames - 1
    covered = np.zeros(num_frames, bool)
    for i, w in enumerate(windows):
        assert w.index == i and w.frame_indices.shape == (8,)
        assert np.all(np.diff(w.frame_indices) >= 0)
        assert w.start_frame <= w.frame_indices.min() and w.frame_indices.max() <= w.end_frame < num_frames
        covered[w.start_frame : w.end_frame + 1] = True
    assert covered.all()
    if num_frames >= 16:
        assert all(w.end_frame - w.start_frame + 1 == 16 and not w.padded for w in windows)
        assert all(np.array_equal(w.frame_indices, w.start_frame + 2 * np.arange(8)) for w in windows)
        starts = [w.start_frame for w in windows]
        assert starts[:-1] == list(range(0, num_frames - 15, stride or 8))[: len(starts) - 1]


def test_short_and_too_short_videos():
    (window,) = inference.plan_windows(SHORT_FRAMES, 8, SAMPLING_RATE)
    assert window.padded and window.frame_indices.tolist() == [0, 2, 4, 6, 8, 10, 10, 10]
    # the reference test sampler's indices for the same clip (FINETUNING §4.2)
    assert window.frame_indices.tolist() == transforms.eval_frame_indices(SHORT_FRAMES, 0, 2, 8, 2).tolist()
    assert "repeated 2 times" in inference.shortness_note(window, SHORT_FRAMES, 8, SAMPLING_RATE)
    with pytest.raises(inference.VideoTooShort, match="7 frames: too short.*at least 8"):
        inference.plan_windows(7, 8, SAMPLING_RATE)
    windows = inference.plan_windows(45, 8, 2)
    assert [(w.start_frame, w.end_frame) for w in windows] == [(0, 15), (8, 23), (16, 31), (24, 39), (29, 44)]
    assert windows[0].times(25.0) == (0.0, 16 / 25)


def test_frame_probabilities_average_the_covering_windows():
    windows = inference.plan_windows(24, 8, 2, stride=8)  # spans 0-15 and 8-23
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    per_frame = predict.frame_probabilities(windows, probs, 24)
    np.testing.assert_allclose(per_frame[:8], [[1, 0]] * 8)
    np.testing.assert_allclose(per_frame[8:16], [[0.5, 0.5]] * 8)
    np.testing.assert_allclose(per_frame[16:], [[0, 1]] * 8)


# ---------------------------------------------------------------------------------------------------------------
# loading


def test_load_forms_and_errors(workspace, tmp_path):
    root = workspace["root"]
    loaded = loading.load_model(root / "finetune")
    assert loaded.cfg == FINETUNE_CFG and loaded.sampling_rate == SAMPLING_RATE and loaded.head_trained
    assert list(loaded.class_names) == DFEW and loaded.model_name == "lgi_tiny_finetune"

    workdir = tmp_path / "work"
    shutil.copytree(root / "finetune", workdir / "export")
    from_workdir = loading.load_model(workdir, class_names="a,b,c,d,e,f,g")
    assert from_workdir.cfg == FINETUNE_CFG and from_workdir.class_names == tuple("abcdefg")
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_workdir.params, loaded.params)

    unfinished = tmp_path / "run"
    (unfinished / "checkpoints").mkdir(parents=True)
    with pytest.raises(loading.ModelLoadError, match="export/model.json.*checkpoints"):
        loading.load_model(unfinished)
    with pytest.raises(loading.ModelLoadError, match="no such file"):
        loading.load_model(tmp_path / "missing")
    with pytest.raises(loading.ModelLoadError, match="3 class names given.*7 classes"):
        loading.load_model(root / "finetune", class_names=["x", "y", "z"])
    with pytest.raises(loading.ModelLoadError, match="has 7 classes, not 11"):
        loading.load_model(root / "finetune", num_classes=11)

    # an unfinished run (no export yet): the newest verified checkpoint, the model from the run's config.json
    from configs.base import base_config
    from facemae_jax import checkpoint

    job = base_config()
    job.model.name = "lgi_tiny_finetune"
    job.model.overrides = dict(GEOMETRY)
    job.data.sampling_rate = 3
    (unfinished / "config.json").write_text(job.to_json_best_effort())
    ckpt = checkpoint.Checkpointer(str(unfinished / "checkpoints"), async_save=False)
    for step, scale in ((5, 0.0), (7, 1.0)):  # the newest step wins
        params = jax.tree_util.tree_map(lambda x, s=scale: np.asarray(x) * s, workspace["params"])
        ckpt.save(step, {"params": params, "step": np.int32(step)}, {"position": step}, force=True)
    ckpt.close()
    from_run = loading.load_model(unfinished, class_names=DFEW)
    assert from_run.cfg == FINETUNE_CFG and from_run.sampling_rate == 3 and from_run.model_name == "lgi_tiny_finetune"
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_run.params, loaded.params)
    # ... and init_from reads it too, fitted into another job's model (a 3-class head: fresh)
    three = FINETUNE_CFG.replace(num_classes=3)
    params, report = loading.load_params_into(str(unfinished), three, seed=0)
    assert params["head"]["kernel"].shape[-1] == 3 and "head.weight" in report
    np.testing.assert_array_equal(params["blocks_0"]["mlp"]["fc1"]["kernel"],
                                  loaded.params["blocks_0"]["mlp"]["fc1"]["kernel"])

    # official files: the architecture must be named; the head size comes from the file
    state_dict = convert.flax_to_torch(workspace["params"], FINETUNE_CFG)
    rng = np.random.default_rng(0)
    state_dict["head.weight"] = rng.normal(size=(11, 32)).astype(np.float32)
    state_dict["head.bias"] = np.zeros(11, np.float32)
    torch_io.save_state_dict(str(tmp_path / "mafw.pth"), state_dict)
    with pytest.raises(loading.ModelLoadError, match="--model"):
        loading.load_model(tmp_path / "mafw.pth")
    with pytest.warns(UserWarning, match="class_0 .. class_10"):
        eleven = loading.load_model(tmp_path / "mafw.pth", model="lgi_tiny_finetune", overrides=GEOMETRY)
    assert eleven.cfg.num_classes == 11 and eleven.class_names[-1] == "class_10"
    assert eleven.sampling_rate == loading.DEFAULT_SAMPLING_RATE
    with pytest.raises(loading.ModelLoadError, match="does not fit model"):
        loading.load_model(tmp_path / "mafw.pth", model="lgi_tiny_finetune")  # wrong geometry

    # an official pre-train file into the pre-train model: the same parameters come back
    pre_sd = convert.flax_to_torch(workspace["pre_params"], PRETRAIN_CFG)
    torch_io.save_state_dict(str(tmp_path / "pre.pth"), pre_sd, extra={"args": {"sampling_rate": 2}})
    overrides = {**GEOMETRY, "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2,
                 "mask_ratio": 0.75}
    pre = loading.load_model(tmp_path / "pre.pth", model="lgi_tiny_pretrain", overrides=overrides)
    assert pre.cfg == PRETRAIN_CFG and pre.sampling_rate == 2 and pre.class_names == ()
    jax.tree_util.tree_map(np.testing.assert_array_equal, pre.params, workspace["pre_params"])
    with pytest.raises(loading.ModelLoadError, match="fine-tune state dict"):
        loading.load_model(tmp_path / "mafw.pth", model="lgi_tiny_pretrain", overrides=overrides)


# ---------------------------------------------------------------------------------------------------------------
# predict


def test_predict_outputs_and_failures(workspace, predicted):
    code, out = predicted
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    status = {r["video"].rsplit("/", 1)[-1]: r for r in summary["videos"]}
    assert summary["num_ok"] == 2 and summary["num_failed"] == 3
    assert status["moving.mp4"]["status"] == status["short.mp4"]["status"] == "ok"
    assert {n: status[n]["reason"] for n in ("tiny.mp4", "broken.mp4", "noface.mp4")} == {
        "tiny.mp4": "too_short", "broken.mp4": "unreadable", "noface.mp4": "no_face"}
    assert "too short" in status["tiny.mp4"]["error"] and "broken.mp4" in status["broken.mp4"]["error"]
    assert not (out / "tiny").exists()

    result = json.loads((out / "moving" / "predictions.json").read_text())
    assert result["num_frames"] == MOVING_FRAMES and result["fps"] == 25.0 and result["class_names"] == DFEW
    # re-detection every 5 frames (0, 5, ..., 40) and the last frame: 10 detector hits
    assert result["face_crop"] and result["face_detected_frames"] >= 9
    assert result["num_tracks"] == 1 and result["tracks"][0]["windows"] == result["windows"]
    assert (result["tracks"][0]["start_frame"], result["tracks"][0]["end_frame"]) == (0, MOVING_FRAMES - 1)
    assert not result["padded"] and result["note"] is None
    windows = result["windows"]
    assert [(w["start_frame"], w["end_frame"]) for w in windows] == [(0, 15), (8, 23), (16, 31), (24, 39), (29, 44)]
    assert windows[-1]["end_time"] == pytest.approx(MOVING_FRAMES / 25)
    probs = np.array([[w["probabilities"][c] for c in DFEW] for w in windows])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert all(w["top_class"] == DFEW[int(np.argmax(p))] and w["top_probability"] == p.max()
               for w, p in zip(windows, probs))
    mean = result["summary"]["mean_probabilities"]
    np.testing.assert_allclose([mean[c] for c in DFEW], probs.mean(axis=0), rtol=1e-6)
    assert result["summary"]["top_class"] == DFEW[int(np.argmax(probs.mean(axis=0)))]

    with open(out / "moving" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == (["track_id", "index", "start_frame", "end_frame", "start_time", "end_time"]
                             + [f"p_{c}" for c in DFEW] + ["top_class", "top_probability"])
    assert len(rows) == len(windows) and rows[-1]["end_frame"] == str(MOVING_FRAMES - 1)
    np.testing.assert_allclose([[float(r[f"p_{c}"]) for c in DFEW] for r in rows], probs, atol=1e-6)

    short = json.loads((out / "short" / "predictions.json").read_text())
    assert short["padded"] and "shorter than one window span" in short["note"]
    assert [w["frame_indices"] for w in short["windows"]] == [[0, 2, 4, 6, 8, 10, 10, 10]]

    annotated, fps = video_io.read_video(out / "moving" / "annotated.mp4")
    source, _ = video_io.read_video(workspace["videos"] / "moving.mp4")
    assert annotated.shape == source.shape and fps == 25.0
    assert np.abs(annotated.astype(int) - source.astype(int)).mean() > 1  # something was drawn
    png = (out / "moving" / "timeline.png").read_bytes()
    assert png.startswith(b"\x89PNG") and (out / "short" / "timeline.png").exists()


def test_predict_official_pth_matches_converted_dir(workspace, predicted, tmp_path):
    _, out = predicted
    pth = tmp_path / "finetune.pth"
    torch_io.save_state_dict(str(pth), convert.flax_to_torch(workspace["params"], FINETUNE_CFG))
    argv = [str(workspace["videos"] / "moving.mp4"), "--checkpoint", str(pth), "--model", "lgi_tiny_finetune",
            "--sampling_rate", str(SAMPLING_RATE), "--out", str(tmp_path / "pred"), "--batch", BATCH,
            *OVERRIDE_ARGS]
    assert predict.main(argv) == 0
    again = json.loads((tmp_path / "pred" / "moving" / "predictions.json").read_text())
    first = json.loads((out / "moving" / "predictions.json").read_text())
    assert again["windows"] == first["windows"]  # identical floats, window for window


def test_predict_fails_when_every_video_fails(workspace, tmp_path, capsys):
    videos = workspace["videos"]
    argv = [str(videos / "broken.mp4"), str(videos / "noface.mp4"), "--checkpoint",
            str(workspace["root"] / "finetune"), "--out", str(tmp_path)]
    assert predict.main(argv) == 1
    err = capsys.readouterr().err
    assert "skipped (unreadable)" in err and "skipped (no_face)" in err and "noface.mp4" in err
    assert json.loads((tmp_path / "summary.json").read_text())["num_ok"] == 0
    # a pre-train checkpoint has no classifier: refused up front
    assert predict.main([str(videos / "moving.mp4"), "--checkpoint", str(workspace["root"] / "pretrain"),
                         "--out", str(tmp_path)]) == 2
    assert "no trained classifier head" in capsys.readouterr().err
    # the trainer's export of a regression model: target names become the output names, predict refuses
    regression = tmp_path / "regression"
    shutil.copytree(workspace["root"] / "finetune", regression)
    meta = json.loads((regression / "model.json").read_text())
    targets_7 = [f"trait_{i}" for i in range(7)]
    meta.update(task="regression", class_names=None, target_names=targets_7)
    (regression / "model.json").write_text(json.dumps(meta))
    loaded = loading.load_model(regression)
    assert loaded.task == "regression" and list(loaded.class_names) == targets_7
    assert predict.main([str(videos / "moving.mp4"), "--checkpoint", str(regression), "--out", str(tmp_path)]) == 2
    assert "task='regression'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# extract


def test_extract_videos(workspace, tmp_path):
    out = tmp_path / "features.npz"
    videos = workspace["videos"]
    argv = [str(videos / "moving.mp4"), str(videos / "short.mp4"), str(videos / "noface.mp4"),
            "--checkpoint", str(workspace["root"] / "finetune"), "--out", str(out), "--tokens", "--batch", BATCH]
    assert extract.main(argv) == 0
    with np.load(out) as f:
        assert str(f["kind"]) == "videos" and bool(f["head_trained"])
        emb, tokens = f["embeddings"], f["tokens"]
        assert emb.shape == (6, 32) and emb.dtype == np.float32
        assert tokens.shape == (6, FINETUNE_CFG.num_regions, 32)  # LGI 'region' classify tokens
        assert [v.rsplit("/", 1)[-1] for v in f["video"]] == ["moving.mp4"] * 5 + ["short.mp4"]
        assert f["start_frame"].tolist() == [0, 8, 16, 24, 29, 0]
        assert f["end_frame"].tolist() == [15, 23, 31, 39, 44, 10]
        assert f["padded"].tolist() == [False] * 5 + [True]
        assert f["frame_indices"].shape == (6, 8)
        np.testing.assert_allclose(f["end_time"], (f["end_frame"] + 1) / 25.0)
        assert [p.rsplit("/", 1)[-1] for p in f["failed_videos"]] == ["noface.mp4"]
        # fc_norm as initialised (unit scale, zero bias): every embedding is a standardised vector
        np.testing.assert_allclose(emb.mean(axis=1), 0.0, atol=1e-4)
        np.testing.assert_allclose(emb.std(axis=1), 1.0, atol=1e-2)
        # the embedding is the layer norm of the mean token (the tokens stored are what is pooled)
        pooled = tokens.mean(axis=1)
        standard = (pooled - pooled.mean(1, keepdims=True)) / np.sqrt(pooled.var(1, keepdims=True) + 1e-6)
        np.testing.assert_allclose(emb, standard, atol=1e-4)


def test_extract_shards_matches_a_direct_forward(workspace, shards, tmp_path):
    out = tmp_path / "clips.npz"
    assert extract.main([str(shards), "--checkpoint", str(workspace["root"] / "finetune"), "--out", str(out),
                         "--batch", BATCH]) == 0
    with np.load(out) as f:
        assert str(f["kind"]) == "shards" and "tokens" not in f
        assert f["embeddings"].shape == (3, 32)
        assert f["clip_id"].tolist() == ["a", "b", "c"] and f["label"].tolist() == [2, 5, -1]
        assert f["num_source_frames"].tolist() == [20, 30, 3]
        assert f["frame_indices"].tolist() == [transforms.eval_frame_indices(n, 0, 2, 8, SAMPLING_RATE).tolist()
                                               for n in (20, 30, 3)]
        embeddings = f["embeddings"]
    # the same clips through model.apply directly (eval view 0, PIL resize, reference normalisation)
    clips = []
    for record in records.read_records(str(shards)):
        indices = transforms.eval_frame_indices(record.num_frames, 0, 2, 8, SAMPLING_RATE)
        clips.append(transforms.resize_frames_pil(records.decode_frames(record, indices), 64, 64))
    x = (np.stack(clips).astype(np.float32) / 255 - np.float32(targets.IMAGENET_MEAN)) / np.float32(
        targets.IMAGENET_STD)
    apply = jax.jit(registry.create_model(FINETUNE_CFG).apply, static_argnames="return_aux")
    _, aux = apply({"params": workspace["params"]}, jnp.asarray(x), return_aux=True)
    np.testing.assert_allclose(embeddings, np.asarray(aux["pooled"]), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# reconstructions


def test_reconstruction_copies_visible_patches_and_inverts_the_targets():
    cfg = PRETRAIN_CFG
    video = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    mask = inference.make_mask(cfg, seed=4)
    for frame_diff in (False, True):
        target = np.asarray(targets.normalized_patch_targets(jnp.asarray(video[None] / 255.0, jnp.float32),
                                                             cfg.patch_size, cfg.tubelet_size, frame_diff))[0]
        # a prediction equal to the training target rebuilds the clip everywhere
        exact = visualize.reconstruct_video(video, mask, target[mask], cfg, frame_diff)
        np.testing.assert_allclose(exact, video / 255.0, atol=1e-5)
        # whatever is predicted, visible patches are the input's, bit for bit
        noise = np.random.default_rng(1).normal(size=target[mask].shape).astype(np.float32)
        recon = visualize.patchify(visualize.reconstruct_video(video, mask, noise, cfg, frame_diff), 16, 2)
        original = visualize.patchify(video.astype(np.float32) / 255.0, 16, 2)
        np.testing.assert_array_equal(recon[~mask], original[~mask])
        assert np.abs(recon[mask] - original[mask]).mean() > 0.05
    masked = visualize.patchify(visualize.masked_input(video, mask, cfg), 16, 2)
    assert np.all(masked[mask] == visualize.GREY)
    with pytest.raises(ValueError, match="pred must be"):
        visualize.reconstruct_video(video, mask, noise[:-1], cfg, True)


def test_visualize_mae_on_shards_and_video(workspace, shards, tmp_path, capsys):
    checkpoint = str(workspace["root"] / "pretrain")
    assert visualize_mae.main([str(shards), "--checkpoint", checkpoint, "--out", str(tmp_path / "r.png"),
                               "--index", "1"]) == 0
    assert (tmp_path / "r.png").read_bytes().startswith(b"\x89PNG")
    assert "clip b" in capsys.readouterr().out
    assert visualize_mae.main([str(workspace["videos"] / "moving.mp4"), "--checkpoint", checkpoint, "--out",
                               str(tmp_path / "v.png"), "--index", "4"]) == 0
    assert (tmp_path / "v.png").exists()
    assert visualize_mae.main([str(shards), "--checkpoint", checkpoint, "--out", str(tmp_path / "x.png"),
                               "--index", "3"]) == 1
    assert "record 3 does not exist; the shards hold 3 records" in capsys.readouterr().err
    assert visualize_mae.main([str(shards), "--checkpoint", str(workspace["root"] / "finetune"), "--out",
                               str(tmp_path / "y.png")]) == 2

    # the model's own mask generator: LGI band contract, the configured ratio
    loaded = loading.load_model(checkpoint)
    mask = inference.make_mask(PRETRAIN_CFG, 0)
    assert mask.shape == (PRETRAIN_CFG.num_tokens,) and mask.mean() == 0.75
    clip, clip_id = visualize_mae.clip_from_shards(str(shards), loaded, 2)
    assert clip_id == "c" and clip.shape == (8, 64, 64, 3)
    pred = inference.predict_masked_patches(loaded, clip, mask)
    assert pred.shape == (48, PRETRAIN_CFG.patch_dim) and np.isfinite(pred).all()
    unbalanced = mask.copy()  # same visible count, but band 0 of frame 0 gains a token that band 1 loses
    unbalanced[np.flatnonzero(mask[:8])[0]] = False
    unbalanced[8 + np.flatnonzero(~mask[8:16])[0]] = True
    with pytest.raises(masking.MaskContractError, match="band"):
        inference.predict_masked_patches(loaded, clip, unbalanced)


def test_pretrain_encoder_as_feature_backbone(workspace):
    """extract with a pre-train checkpoint: its encoder in the fine-tune model, fc_norm a plain LayerNorm."""
    pre = loading.load_model(workspace["root"] / "pretrain")
    backbone = loading.as_backbone(pre)
    assert backbone.cfg.mode == "finetune" and backbone.cfg.embed_dim == 32 and not backbone.head_trained
    encoder = workspace["pre_params"]["encoder"]
    for name in ("blocks_0", "lg_region_tokens", "patch_embed"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, backbone.params[name], encoder[name])
    np.testing.assert_array_equal(backbone.params["fc_norm"]["scale"], np.ones(32, np.float32))
    np.testing.assert_array_equal(backbone.params["fc_norm"]["bias"], np.zeros(32, np.float32))
    assert loading.as_backbone(backbone) is backbone


# ---------------------------------------------------------------------------------------------------------------
# own videos at real length: streamed windows, several people, truncated files, folders, resume


@pytest.mark.parametrize("num_frames", [8, 11, 16, 17, 31, 45, 100])
@pytest.mark.parametrize("stride", [None, 3, 16, 20])
def test_streamed_windows_are_plan_windows(num_frames, stride):
    """The Windower, fed frame by frame, emits exactly plan_windows' windows with the right frames."""
    from facemae_jax import video_stream

    windower = video_stream.Windower(8, SAMPLING_RATE, stride, start_frame=100)
    emitted = []
    for t in range(num_frames):
        emitted += windower.push(np.full((2, 2, 3), t, np.uint8))
        assert len(windower.buffer) <= 16  # never more than one window span held
    emitted += windower.finish()
    planned = inference.plan_windows(num_frames, 8, SAMPLING_RATE, stride)
    assert len(emitted) == len(planned)
    for (window, clip), plan in zip(emitted, planned):
        assert (window.index, window.start_frame, window.end_frame, window.padded) == (
            plan.index, plan.start_frame + 100, plan.end_frame + 100, plan.padded)
        np.testing.assert_array_equal(window.frame_indices, plan.frame_indices + 100)
        np.testing.assert_array_equal(clip[:, 0, 0, 0], plan.frame_indices)  # each frame carries its index


def two_people_video(num_frames: int) -> np.ndarray:
    """Two faces side by side (the astronaut, and her mirror image lower down), both drifting: [T, 340, 620, 3]."""
    part = skimage.data.astronaut()[0:300, 100:380]
    frames = np.full((num_frames, 340, 620, 3), 128, np.uint8)
    for t in range(num_frames):
        frames[t, 0:300, t : t + 280] = part
        frames[t, 40:340, 330 - t // 2 : 610 - t // 2] = part[:, ::-1]
    return frames


def test_two_people_get_two_tracks_with_their_own_predictions(workspace, tmp_path):
    video = tmp_path / "two.mp4"
    video_io.write_video(video, two_people_video(40), fps=25)
    base = [str(video), "--checkpoint", str(workspace["root"] / "finetune"), "--batch", BATCH]
    assert predict.main(base + ["--out", str(tmp_path / "all"), "--annotate"]) == 0
    result = json.loads((tmp_path / "all" / "two" / "predictions.json").read_text())
    assert result["num_tracks"] == 2 and [t["track_id"] for t in result["tracks"]] == [0, 1]
    for track in result["tracks"]:
        assert (track["start_frame"], track["end_frame"]) == (0, 39) and track["face_detected_frames"] >= 6
        assert [(w["start_frame"], w["end_frame"]) for w in track["windows"]] == [(0, 15), (8, 23), (16, 31),
                                                                                  (24, 39)]
        probs = np.array([[w["probabilities"][c] for c in DFEW] for w in track["windows"]])
        np.testing.assert_allclose([track["summary"]["mean_probabilities"][c] for c in DFEW], probs.mean(0),
                                   rtol=1e-6)
        assert all(w["track_id"] == track["track_id"] for w in track["windows"])
    first, second = (np.array([[w["probabilities"][c] for c in DFEW] for w in t["windows"]])
                     for t in result["tracks"])
    assert np.abs(first - second).max() > 1e-4  # two different faces, two different model inputs
    assert sum(t["main"] for t in result["tracks"]) == 1
    main = next(t for t in result["tracks"] if t["main"])
    assert result["windows"] == main["windows"] and result["summary"] == main["summary"]
    with open(tmp_path / "all" / "two" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["track_id"] for r in rows] == ["0"] * 4 + ["1"] * 4

    # the annotated video labels both faces ("#0 ...", "#1 ..."): drawn pixels near both faces' tops
    annotated, _ = video_io.read_video(tmp_path / "all" / "two" / "annotated.mp4")
    source, _ = video_io.read_video(video)
    changed = np.abs(annotated.astype(int) - source.astype(int)).max(axis=-1) > 60
    assert changed[:, 100:200, 340:600].any() and changed[:, 0:150, 0:300].any()

    # --largest_face: today's single-face behaviour, one track over the whole video
    assert predict.main(base + ["--out", str(tmp_path / "one"), "--largest_face"]) == 0
    one = json.loads((tmp_path / "one" / "two" / "predictions.json").read_text())
    assert one["num_tracks"] == 1 and one["face_tracking"]["largest_face_only"]


def faststart_mp4(path, frames, fps=25):
    """An mp4 whose index (moov) comes first, as web videos are written: cut short, it still opens."""
    import av

    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_truncated_faststart_mp4_is_noted_in_predict_and_conversion(workspace, tmp_path, capsys):
    from data_pipelines import build

    full = tmp_path / "full.mp4"
    noise = np.random.default_rng(0).integers(0, 255, (40, 64, 80, 3), dtype=np.uint8)  # bytes spread evenly
    faststart_mp4(full, noise)
    data = full.read_bytes()
    videos = tmp_path / "videos" / "happy"
    videos.mkdir(parents=True)
    cut = videos / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    with video_io.VideoFile(cut) as video:
        decoded = sum(1 for _ in video.frames(on_error="stop"))
        truncation = video.truncation()
    assert 8 <= decoded < 40 and truncation["declared_frames"] == 40 and truncation["decoded_frames"] == decoded
    with video_io.VideoFile(full) as video:
        assert sum(1 for _ in video.frames()) == 40 and video.truncation() is None

    out = tmp_path / "pred"
    assert predict.main([str(cut), "--checkpoint", str(workspace["root"] / "finetune"), "--out", str(out),
                         "--batch", BATCH, "--no_face_crop"]) == 0
    result = json.loads((out / "cut" / "predictions.json").read_text())
    assert result["num_frames"] == decoded and result["declared_frames"] == 40
    assert result["truncation"]["decoded_frames"] == decoded and "of 40 declared" in result["note"]
    assert "warning:" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["videos"][0]["truncation"]["declared_frames"] == 40

    # dataset conversion: skipped and reported by default, kept with a flag on request
    root = tmp_path / "videos"
    video_io.write_video(root / "happy" / "good.mp4", astronaut_video(12, step=1)[:, :64, :64], fps=25)
    common = ["videos", "--root", str(root), "--labels_from_folders", "--short_side", "32", "--no_progress"]
    assert build.main(common + ["--out", str(tmp_path / "ds")]) == 0
    info = json.loads((tmp_path / "ds" / "dataset_info.json").read_text())
    assert info["num_clips"] == 1
    (skipped,) = info["skipped"]
    assert skipped["input"].endswith("cut.mp4") and skipped["reason"].startswith("truncated video")
    assert f"{decoded} frame(s) decoded of 40 declared" in skipped["reason"]
    assert build.main(common + ["--out", str(tmp_path / "ds_keep"), "--keep_truncated"]) == 0
    kept = {r.clip_id: r for r in records.read_records(str(tmp_path / "ds_keep"))}
    assert kept["happy/cut"].num_frames == decoded and "truncated" not in kept["happy/good"].extra
    assert kept["happy/cut"].extra["truncated"]["declared_frames"] == 40


def test_folder_argument_and_resume(workspace, tmp_path, capsys):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(workspace["videos"] / "moving.mp4", folder / "moving.mp4")
    shutil.copy(workspace["videos"] / "short.mp4", folder / "sub" / "short.MP4")
    (folder / "notes.txt").write_text("not a video")
    out = tmp_path / "out"
    argv = [str(folder), "--checkpoint", str(workspace["root"] / "finetune"), "--out", str(out), "--batch", BATCH]
    assert predict.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [os.path.basename(v["video"]) for v in summary["videos"]] == ["moving.mp4", "short.MP4"]
    assert summary["num_ok"] == 2 and summary["num_reused"] == 0
    first = (out / "moving" / "predictions.json").stat().st_mtime_ns
    assert "frames/s" in capsys.readouterr().out  # the summary line

    assert predict.main(argv) == 0  # rerun: both reused, nothing recomputed
    captured = capsys.readouterr()
    assert captured.err.count("already done") == 2 and "2 from an earlier run" in captured.out
    assert (out / "moving" / "predictions.json").stat().st_mtime_ns == first
    assert json.loads((out / "summary.json").read_text())["num_ok"] == 2

    assert predict.main(argv + ["--overwrite"]) == 0
    assert (out / "moving" / "predictions.json").stat().st_mtime_ns > first
    assert "already done" not in capsys.readouterr().err


def test_progress_is_plain_lines_when_not_a_terminal(monkeypatch):
    import io

    from data_pipelines import progress

    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 0.0)
    log = io.StringIO()
    with progress.bar(total=3, desc="frames x.mp4", unit="frame", file=log) as bar:
        for _ in range(3):
            bar.update(1)
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[0].startswith("frames x.mp4:   0% 0/3") and lines[-1].startswith("frames x.mp4: 100% 3/3")
    assert all("frame/s" in line for line in lines[1:])

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert not isinstance(progress.bar(total=1, file=Terminal()), progress.PlainLines)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    silent = io.StringIO()
    with progress.bar(total=2, file=silent) as bar:
        bar.update(2)
    assert silent.getvalue() == ""


def test_converter_face_crops_long_videos_in_two_streamed_passes(workspace, tmp_path, monkeypatch):
    """Above STREAMED_FACE_CROP_BYTES of decoded frames, --face_crop tracks and crops with the streaming tracker."""
    from data_pipelines import build, clip_conversion

    root = tmp_path / "videos"
    root.mkdir()
    shutil.copy(workspace["videos"] / "moving.mp4", root / "moving.mp4")
    shutil.copy(workspace["videos"] / "noface.mp4", root / "noface.mp4")
    monkeypatch.setattr(clip_conversion, "STREAMED_FACE_CROP_BYTES", 0)  # every video counts as long
    assert build.main(["videos", "--root", str(root), "--face_crop", "--short_side", "48", "--no_progress",
                       "--out", str(tmp_path / "ds")]) == 0
    (rec,) = records.read_records(str(tmp_path / "ds"))
    assert rec.clip_id == "moving" and rec.extra["face_crop_streamed"] and rec.num_frames == MOVING_FRAMES
    assert len(rec.extra["face_boxes"]) == MOVING_FRAMES and 0 < rec.extra["face_detected_fraction"] < 1
    frames = records.decode_frames(rec)
    assert frames.shape == (MOVING_FRAMES, 48, 48, 3) and frames.std() > 20  # a face crop, not the grey canvas
    boxes = np.array(rec.extra["face_boxes"])
    assert np.all(np.diff((boxes[:, 0] + boxes[:, 2]) / 2) > 0)  # the box follows the face sliding right
    info = json.loads((tmp_path / "ds" / "dataset_info.json").read_text())
    assert [s["reason"].split(":")[0] for s in info["skipped"]] == ["no face found"]
