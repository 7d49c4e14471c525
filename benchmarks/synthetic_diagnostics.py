"""Calibration for the synthetic study: is the task learnable, and what is the trivial reconstruction loss?

    python -m benchmarks.synthetic_diagnostics [--data data/synthetic_faces_tight] [--out results/...json]

The study (benchmarks/synthetic_study.py) compares learned encoders; when both arms sit at chance one must know
whether the *task* is at fault or the *learning*. This script answers with models that need no training budget:

1. Learnability ceiling: a linear softmax classifier (the same probe for every feature set) on hand-made features
   of the study's clips (16 frames, sampling rate 2, grey, 16x16 area-downsampled maps), trained on the labelled
   train split and tested on the identity-disjoint test split (UAR):
   - ``static``: the time-mean frame (appearance only);
   - ``motion``: per pixel, the largest deviation from the first frame (where the face moved);
   - ``absdiff``: mean absolute frame-to-frame difference.
2. Reconstruction baselines for the per-patch normalised targets (targets.normalized_patch_targets) at the
   study's patch sizes: the loss of predicting all zeros (what ``train/loss_vs_zero`` divides by), and the loss of
   an oracle that knows a Gaussian-blurred copy of the clip (how much of the target is smooth, learnable
   structure rather than noise).

Writes a JSON with every number and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data_pipelines import dataset_info, records  # noqa: E402

FRAMES, SAMPLING_RATE, MAP_SIZE = 16, 2, 16
WEIGHT_DECAYS = (1e-3, 1e-2, 1e-1)


def load_splits(data_dir: str, limits: dict[str, int | None]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (uint8 [N, 16, H, W, 3] sampled like the study's clips, labels [N] (-1 when unlabelled)), decoding
    at most ``limits[split]`` clips of each split (None: all)."""
    info = dataset_info.load(data_dir)
    clips: dict[str, list] = {s: [] for s in limits}
    labels: dict[str, list] = {s: [] for s in limits}
    for rec in records.read_records([os.path.join(data_dir, s) for s in info["shards"]]):
        if rec.split in limits and (limits[rec.split] is None or len(clips[rec.split]) < limits[rec.split]):
            idx = [min(i * SAMPLING_RATE, rec.num_frames - 1) for i in range(FRAMES)]
            clips[rec.split].append(records.decode_frames(rec, idx))
            labels[rec.split].append(-1 if rec.label is None else int(rec.label))
    return {s: (np.stack(clips[s]), np.asarray(labels[s])) for s in limits if clips[s]}


def handmade_features(video: np.ndarray, kind: str) -> np.ndarray:
    g = video.astype(np.float32).mean(-1) / 255.0  # [N, T, H, W]
    if kind == "static":
        m = g.mean(1)
    elif kind == "motion":
        m = np.abs(g - g[:, :1]).max(1)
    elif kind == "absdiff":
        m = np.abs(np.diff(g, axis=1)).mean(1)
    else:
        raise ValueError(f"unknown feature kind {kind!r}")
    return np.stack([cv2.resize(x, (MAP_SIZE, MAP_SIZE), interpolation=cv2.INTER_AREA) for x in m]).reshape(len(m), -1)


def linear_probe_uar(f_train, y_train, f_test, y_test, num_classes: int, weight_decay: float,
                     steps: int = 500) -> float:
    """Full-batch softmax regression (Adam, L2) on standardised features -> test UAR in %."""
    import jax
    import jax.numpy as jnp
    import optax

    from facemae_jax import metrics

    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    xtr, xte = (f_train - mu) / sd, (f_test - mu) / sd
    params = (jnp.zeros((xtr.shape[1], num_classes)), jnp.zeros(num_classes))
    opt = optax.adam(1e-2)
    state = opt.init(params)

    def loss(p):
        logits = xtr @ p[0] + p[1]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y_train).mean()
        return ce + weight_decay * jnp.sum(p[0] ** 2)

    @jax.jit
    def update(p, s):
        u, s = opt.update(jax.grad(loss)(p), s)
        return optax.apply_updates(p, u), s

    for _ in range(steps):
        params, state = update(params, state)
    pred = np.argmax(xte @ np.asarray(params[0]) + np.asarray(params[1]), 1)
    return 100 * metrics.uar(metrics.confusion_matrix(y_test, pred, num_classes))


def reconstruction_baselines(video: np.ndarray, patch: int, tubelet: int = 2) -> dict[str, float]:
    import jax.numpy as jnp

    from facemae_jax import targets

    x = video.astype(np.float32) / 255.0
    out = {}
    for frame_diff in (False, True):
        key = "appearance_motion" if frame_diff else "appearance"
        t = np.asarray(targets.normalized_patch_targets(jnp.asarray(x), patch, tubelet, frame_diff))
        out[f"{key}/zero"] = float(np.mean(t ** 2))
        for sigma in (1.0, 2.5):
            blurred = np.stack([[cv2.GaussianBlur(f, (0, 0), sigma) for f in clip] for clip in x])
            tb = np.asarray(targets.normalized_patch_targets(jnp.asarray(blurred), patch, tubelet, frame_diff))
            out[f"{key}/blur_oracle_sigma{sigma}"] = float(np.mean((t - tb) ** 2))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(ROOT, "data", "synthetic_faces_tight"))
    p.add_argument("--out", default=os.path.join(ROOT, "results", "synthetic_diagnostics.json"))
    p.add_argument("--recon-clips", type=int, default=64, help="pretrain clips for the reconstruction baselines")
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    t0 = time.time()
    if not os.path.exists(os.path.join(a.data, "dataset_info.json")):
        sys.exit(f"{a.data}: no dataset_info.json (build it with `python launch.py --config=configs/demo.py` or "
                 "`python -m data_pipelines.synthetic`)")
    info = dataset_info.load(a.data)
    num_classes = len(info["class_names"])
    data = load_splits(a.data, {"pretrain": a.recon_clips, "train": None, "test": None})
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    probes = {}
    for kind in ("static", "motion", "absdiff"):
        ftr, fte = handmade_features(xtr, kind), handmade_features(xte, kind)
        probes[kind] = {str(wd): round(linear_probe_uar(ftr, ytr, fte, yte, num_classes, wd), 1)
                        for wd in WEIGHT_DECAYS}
        print(f"linear probe on {kind:8s} maps: test UAR % per weight decay {probes[kind]}", flush=True)
    recon = {}
    if "pretrain" in data:
        for patch in (16, 8):
            recon[f"patch{patch}"] = {k: round(v, 4) for k, v in
                                      reconstruction_baselines(data["pretrain"][0], patch).items()}
            print(f"reconstruction baselines, patch {patch}: {recon[f'patch{patch}']}", flush=True)
    out = dict(command=" ".join(["python -m benchmarks.synthetic_diagnostics"] + argv), data=a.data,
               creation_command=info.get("creation_command"), chance_uar=100 / num_classes,
               clips={s: len(info["splits"][s]) for s in data}, recon_clips=len(data.get("pretrain", ((), ()))[1]),
               frames=FRAMES, sampling_rate=SAMPLING_RATE,
               map_size=MAP_SIZE, linear_probe_test_uar=probes, reconstruction_baselines=recon,
               wall_s=round(time.time() - t0, 1))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {a.out} ({out['wall_s']} s)")
    return out


if __name__ == "__main__":
    main()
