"""Facial-expression probabilities over time for your own videos.

Each video is decoded, the main face is found and tracked (square crops at the model's input size), and a window of
``num_frames`` frames at the model's sampling rate slides over the whole video (``facemae_jax.inference`` has the
rules). Every window gets a softmax over the classes; the whole-video result is the mean of the windows'
probabilities, as the reference averages the probabilities of its test views (FINETUNING §4.2).

CLI::

    python -m facemae_jax.predict VIDEO [VIDEO ...] --checkpoint CKPT [--model NAME] [--out DIR]
        [--stride_frames N] [--batch N] [--annotate] [--timeline] [--no_face_crop]

``CKPT`` is a converted directory, a training workdir (its ``export/``) or an official ``.pth`` with ``--model``.
Written to ``DIR/<video stem>/``:

* ``predictions.json``: the video, the model, the window rule, one entry per window (index, start/end frame,
  start/end time in s, the frames used, probability per class, top class and probability) and ``summary``
  (mean probabilities, top class);
* ``predictions.csv``: one row per window: ``index, start_frame, end_frame, start_time, end_time, p_<class>...,
  top_class, top_probability`` (times are empty when the file has no frame rate);
* ``annotated.mp4`` (``--annotate``): every frame with the face box, the top emotion and probability bars (per
  frame: the mean over the windows covering it), H.264;
* ``timeline.png`` (``--timeline``): class probabilities over time.

``DIR/summary.json`` lists every video with its result or the reason it failed (unreadable file, no face found,
fewer frames than the model needs). Failures do not stop the batch; the exit status is 1 only if every video failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from facemae_jax import inference
from facemae_jax.inference import LoadedModel, Window

PANEL_WIDTH_FRACTION = 0.34  # probability panel width / frame width in annotated videos


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------


def frame_probabilities(windows: Sequence[Window], probs: np.ndarray, num_frames: int) -> np.ndarray:
    """Per source frame, the mean probabilities of the windows whose span contains it -> float32 [F, K]."""
    total = np.zeros((num_frames, probs.shape[1]), np.float64)
    count = np.zeros((num_frames, 1), np.float64)
    for w, p in zip(windows, probs):
        total[w.start_frame : w.end_frame + 1] += p
        count[w.start_frame : w.end_frame + 1] += 1
    return (total / np.maximum(count, 1)).astype(np.float32)


def window_entries(windows: Sequence[Window], probs: np.ndarray, fps: float | None,
                   class_names: Sequence[str]) -> list[dict[str, Any]]:
    entries = []
    for w, p in zip(windows, probs):
        start_time, end_time = w.times(fps)
        top = int(np.argmax(p))
        entries.append({
            "index": w.index,
            "start_frame": w.start_frame,
            "end_frame": w.end_frame,
            "start_time": None if start_time is None else round(start_time, 4),
            "end_time": None if end_time is None else round(end_time, 4),
            "frame_indices": w.frame_indices.tolist(),
            "probabilities": {name: float(v) for name, v in zip(class_names, p)},
            "top_class": class_names[top],
            "top_probability": float(p[top]),
        })
    return entries


def write_csv(path: str, entries: Sequence[dict[str, Any]], class_names: Sequence[str]) -> None:
    header = ["index", "start_frame", "end_frame", "start_time", "end_time"]
    header += [f"p_{name}" for name in class_names] + ["top_class", "top_probability"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for e in entries:
            writer.writerow([e["index"], e["start_frame"], e["end_frame"],
                             "" if e["start_time"] is None else f"{e['start_time']:.4f}",
                             "" if e["end_time"] is None else f"{e['end_time']:.4f}"]
                            + [f"{e['probabilities'][n]:.6f}" for n in class_names]
                            + [e["top_class"], f"{e['top_probability']:.6f}"])


def _write_json(path: str, data: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Annotated video
# ---------------------------------------------------------------------------------------------------------------


def annotate_frame(frame: np.ndarray, probs: np.ndarray, class_names: Sequence[str], colors: np.ndarray,
                   box: np.ndarray | None) -> np.ndarray:
    """A copy of ``frame`` (uint8 [H, W, 3]) with the face box labelled by the top class and a panel of
    probability bars in the top-left corner."""
    import cv2

    from data_pipelines import faces

    top = int(np.argmax(probs))
    label = f"{class_names[top]} {probs[top]:.0%}"
    out = frame.copy()
    if box is not None:
        out = faces.draw_box(out, box, label, color=tuple(int(c) for c in colors[top]))
    height, width = out.shape[:2]
    k = len(class_names)
    font = cv2.FONT_HERSHEY_SIMPLEX
    row = int(np.clip(round(height * 0.45 / k), 9, 28))  # row height: the panel covers at most ~half the frame
    font_scale = row / 40
    pad = max(2, row // 6)
    names = [n[:14] for n in class_names]
    name_w = max(cv2.getTextSize(n, font, font_scale, 1)[0][0] for n in names) + 2 * pad
    pct_w = cv2.getTextSize("100%", font, font_scale, 1)[0][0] + 2 * pad
    panel_w = min(width, max(int(width * PANEL_WIDTH_FRACTION), name_w + pct_w + 4 * row))
    panel_h = min(height, k * row + 2 * pad)
    out[:panel_h, :panel_w] = (out[:panel_h, :panel_w] * 0.35).astype(np.uint8)  # darken: legible on any frame
    bar_x0 = pad + name_w
    bar_room = max(1, panel_w - bar_x0 - pct_w)
    for i, name in enumerate(names):
        y0 = pad + i * row
        bar_len = int(round(bar_room * float(probs[i])))
        if bar_len > 0:
            cv2.rectangle(out, (bar_x0, y0 + 2), (bar_x0 + bar_len, y0 + row - 3),
                          tuple(int(c) for c in colors[i]), cv2.FILLED)
        text_color = (255, 255, 0) if i == top else (255, 255, 255)
        baseline_y = y0 + row - 4
        cv2.putText(out, name, (pad, baseline_y), font, font_scale, text_color, 1, lineType=cv2.LINE_AA)
        cv2.putText(out, f"{probs[i]:.0%}", (bar_x0 + bar_len + pad, baseline_y), font, font_scale, text_color, 1,
                    lineType=cv2.LINE_AA)
    if box is None:  # no face box to carry the label: write it under the panel
        cv2.putText(out, label, (pad, min(height - pad, panel_h + row)), font, font_scale * 1.2,
                    tuple(int(c) for c in colors[top]), 2, lineType=cv2.LINE_AA)
    return out


def write_annotated_video(path: str, frames: np.ndarray, per_frame: np.ndarray, class_names: Sequence[str],
                          boxes: np.ndarray | None, fps: float) -> None:
    from data_pipelines import video_io
    from facemae_jax import visualize

    colors = visualize.class_colors(len(class_names))
    annotated = np.stack([
        annotate_frame(frames[t], per_frame[t], class_names, colors, None if boxes is None else boxes[t])
        for t in range(len(frames))
    ])
    video_io.write_video(path, annotated, fps)


# ---------------------------------------------------------------------------------------------------------------
# One video
# ---------------------------------------------------------------------------------------------------------------


def predict_video(path: str, loaded: LoadedModel, forward: inference.ClipForward, out_dir: str, *,
                  stride: int | None = None, face_crop: bool = True, annotate: bool = False, timeline: bool = False,
                  detect_every: int = 1) -> dict[str, Any]:
    """Run one video and write its outputs into ``out_dir``; returns the video's ``predictions.json`` content.

    Raises VideoReadError, NoFaceFound or VideoTooShort (the caller records them and goes on).
    """
    cfg = loaded.cfg
    names = loaded.class_names
    frames, fps = inference.read_frames(path)
    num_frames = len(frames)
    windows = inference.plan_windows(num_frames, cfg.num_frames, loaded.sampling_rate, stride)
    inputs, boxes, detected = inference.model_frames(frames, cfg.img_size, face_crop=face_crop,
                                                     detect_every=detect_every)
    if not annotate:
        del frames  # the source frames can be large; only the crops are needed from here on
    probs = forward(inference.iter_window_clips(inputs, windows), total=len(windows),
                    desc=f"windows {os.path.basename(path)}")["probs"]
    entries = window_entries(windows, probs, fps, names)
    mean = probs.mean(axis=0)
    top = int(np.argmax(mean))
    span = cfg.num_frames * loaded.sampling_rate
    note = inference.shortness_note(windows[0], num_frames, cfg.num_frames, loaded.sampling_rate)
    result: dict[str, Any] = {
        "video": os.path.abspath(path),
        "num_frames": num_frames,
        "fps": fps,
        "duration_s": None if not fps else round(num_frames / fps, 4),
        "model": loaded.describe(),
        "class_names": list(names),
        "face_crop": face_crop,
        "face_detected_frames": None if detected is None else int(detected.sum()),
        "window_rule": {"num_frames": cfg.num_frames, "sampling_rate": loaded.sampling_rate, "span_frames": span,
                        "stride_frames": stride if stride is not None else max(1, span // 2),
                        "last_window_aligned_to_end": True},
        "padded": note is not None,
        "note": note,
        "windows": entries,
        "summary": {
            "num_windows": len(windows),
            "mean_probabilities": {n: float(v) for n, v in zip(names, mean)},
            "top_class": names[top],
            "top_probability": float(mean[top]),
        },
    }
    os.makedirs(out_dir, exist_ok=True)
    _write_json(os.path.join(out_dir, "predictions.json"), result)
    write_csv(os.path.join(out_dir, "predictions.csv"), entries, names)
    if timeline:
        from facemae_jax import visualize

        if fps:
            spans = np.array([[w.start_frame / fps, (w.end_frame + 1) / fps] for w in windows])
            xlabel = "time (s)"
        else:
            spans = np.array([[w.start_frame, w.end_frame + 1] for w in windows], np.float64)
            xlabel = "frame (the file has no frame rate)"
        visualize.probability_timeline(spans.mean(axis=1), probs, names, os.path.join(out_dir, "timeline.png"),
                                       spans=spans, xlabel=xlabel,
                                       title=f"{os.path.basename(path)}: {names[top]} ({mean[top]:.0%} mean)")
    if annotate:
        per_frame = frame_probabilities(windows, probs, num_frames)
        write_annotated_video(os.path.join(out_dir, "annotated.mp4"), frames, per_frame, names, boxes,
                              fps or 25.0)
    return result


def output_dirs(videos: Sequence[str], out_root: str) -> list[str]:
    """``out_root/<stem>`` per video; a repeated stem gets ``_2``, ``_3``... so no video overwrites another."""
    seen: dict[str, int] = {}
    dirs = []
    for v in videos:
        stem = os.path.splitext(os.path.basename(os.path.normpath(v)))[0] or "video"
        seen[stem] = seen.get(stem, 0) + 1
        dirs.append(os.path.join(out_root, stem if seen[stem] == 1 else f"{stem}_{seen[stem]}"))
    return dirs


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m facemae_jax.predict", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("videos", nargs="+", metavar="VIDEO", help="video files (anything FFmpeg decodes)")
    ap.add_argument("--out", default="predictions", help="output directory (default: ./predictions)")
    ap.add_argument("--stride_frames", type=int, default=None,
                    help="source frames between window starts (default: half a window span)")
    ap.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    ap.add_argument("--annotate", action="store_true", help="write annotated.mp4 (box, top emotion, bars)")
    ap.add_argument("--timeline", action="store_true", help="write timeline.png (probabilities over time)")
    ap.add_argument("--no_face_crop", action="store_true",
                    help="use whole frames resized to the input size (videos that are already face crops)")
    ap.add_argument("--detect_every", type=int, default=1, help="run the face detector on every N-th frame")
    ap.add_argument("--class_names", default=None, help="comma-separated class names (override the checkpoint's)")
    inference.add_model_args(ap)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from tqdm import tqdm

    from data_pipelines.faces import NoFaceFound
    from data_pipelines.video_io import VideoReadError

    args = build_parser().parse_args(argv)
    if args.stride_frames is not None and args.stride_frames < 1:
        raise SystemExit(f"--stride_frames must be >= 1, got {args.stride_frames}")
    try:
        overrides = inference.parse_overrides(args.override)
        loaded = inference.load_model(args.checkpoint, model=args.model, class_names=args.class_names,
                                      sampling_rate=args.sampling_rate, overrides=overrides)
    except ValueError as e:  # ModelLoadError, or a malformed --override
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = loaded.cfg
    if cfg.mode != "finetune" or not loaded.head_trained:
        print(f"error: {args.checkpoint} has no trained classifier head (a pre-train checkpoint); predict needs a "
              f"fine-tuned model (use facemae_jax.extract for features)", file=sys.stderr)
        return 2
    if loaded.task != "classification" or cfg.head_activation is not None or cfg.keep_temporal_dim:
        print(f"error: {args.checkpoint} is not a single-label classifier (task={loaded.task!r}, head_activation="
              f"{cfg.head_activation!r}, keep_temporal_dim={cfg.keep_temporal_dim}); predict reports softmax "
              f"probabilities over classes", file=sys.stderr)
        return 2
    span = cfg.num_frames * loaded.sampling_rate
    if args.stride_frames is not None and args.stride_frames > span:
        print(f"warning: --stride_frames {args.stride_frames} is longer than a window ({span} frames): frames between "
              f"windows are not seen by the model", file=sys.stderr)
    forward = inference.ClipForward(loaded, batch_size=args.batch, outputs=("probs",))
    os.makedirs(args.out, exist_ok=True)
    results = []
    started = time.time()
    for video, out_dir in tqdm(list(zip(args.videos, output_dirs(args.videos, args.out))), desc="videos",
                               unit="video", disable=len(args.videos) < 2):
        entry: dict[str, Any] = {"video": os.path.abspath(video), "output_dir": os.path.abspath(out_dir)}
        try:
            res = predict_video(video, loaded, forward, out_dir, stride=args.stride_frames,
                                face_crop=not args.no_face_crop, annotate=args.annotate, timeline=args.timeline,
                                detect_every=args.detect_every)
        except (VideoReadError, NoFaceFound, inference.VideoTooShort) as e:
            kind = ("unreadable" if isinstance(e, VideoReadError)
                    else "no_face" if isinstance(e, NoFaceFound) else "too_short")
            message = str(e) if isinstance(e, VideoReadError) else f"{video}: {e}"
            tqdm.write(f"skipped ({kind}): {message}", file=sys.stderr)
            entry.update(status="failed", reason=kind, error=message, output_dir=None)
        else:
            summary = res["summary"]
            tqdm.write(f"{video}: {summary['top_class']} ({summary['top_probability']:.1%} mean over "
                       f"{summary['num_windows']} windows){' - ' + res['note'] if res['note'] else ''}")
            entry.update(status="ok", num_frames=res["num_frames"], fps=res["fps"], padded=res["padded"],
                         note=res["note"], **summary)
        results.append(entry)
    ok = sum(r["status"] == "ok" for r in results)
    _write_json(os.path.join(args.out, "summary.json"), {
        "checkpoint": os.path.abspath(args.checkpoint),
        "model": loaded.describe(),
        "class_names": list(loaded.class_names),
        "num_videos": len(results),
        "num_ok": ok,
        "num_failed": len(results) - ok,
        "seconds": round(time.time() - started, 2),
        "videos": results,
    })
    print(f"{ok} of {len(results)} videos done; results in {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
