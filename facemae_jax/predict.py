"""Facial-expression probabilities over time for your own videos, for every person in them.

Each video is streamed (never held in memory): a first pass finds and tracks every face (fast Haar tracking,
``data_pipelines.face_tracks``), a second pass crops each face track square at the model's input size and slides a
window of ``num_frames`` frames at the model's sampling rate over it (``facemae_jax.inference`` has the window
rules, ``facemae_jax.video_stream`` the streaming). Every window gets a softmax over the classes; a track's result
is the mean of its windows' probabilities, as the reference averages the probabilities of its test views
(FINETUNING §4.2). Memory is bounded by a window span of crops per track plus one forward batch, whatever the
video's length and resolution (the bound is stated in ``facemae_jax.video_stream``).

CLI::

    python -m facemae_jax.predict VIDEO_OR_FOLDER [...] --checkpoint CKPT [--model NAME] [--out DIR]
        [--stride_frames N] [--batch N] [--annotate] [--timeline] [--no_face_crop] [--largest_face]
        [--detect_every K] [--scan_every M] [--search_seconds S | --search_whole_video] [--overwrite]

``CKPT`` is a converted directory, a training workdir (its ``export/``) or an official ``.pth`` with ``--model``.
A folder is searched recursively for video files. Written to ``DIR/<video stem>/``:

* ``predictions.json``: the video, the model, the window rule, ``tracks`` (one entry per face track long enough for
  a window: track id, first/last frame and time, detected frames, its windows - index, start/end frame and time,
  the frames used, probability per class, top class and probability - and its ``summary`` of mean
  probabilities); ``windows`` / ``summary`` at the top level repeat the main track's (the largest face:
  the largest sum of face sizes over time); ``truncation`` and ``note`` when the file is cut short;
* ``predictions.csv``: one row per window: ``track_id, index, start_frame, end_frame, start_time, end_time,
  p_<class>..., top_class, top_probability`` (times are empty when the file has no frame rate);
* ``annotated.mp4`` (``--annotate``): every frame with every tracked face boxed and labelled (track id, top
  emotion and probability: per frame the mean over that track's windows covering it) and the main track's
  probability bars, H.264;
* ``timeline.png`` (``--timeline``): the main track's class probabilities over time (``timeline_track<i>.png``
  for the others).

``DIR/summary.json`` lists every video with its result or the reason it failed (unreadable file, no face found,
fewer frames than the model needs). Failures do not stop the batch; the exit status is 1 only if every video
failed. A video whose ``predictions.json`` exists is skipped on a rerun (``--overwrite`` redoes it).

Progress: a bar per video and pass (frames/s, ETA) and one over the videos; when stderr is not a terminal, one
plain line every few seconds instead (``data_pipelines.progress``). The last line sums up frames/s and windows/s.
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

from facemae_jax import convert, inference, loading
from facemae_jax.inference import Window
from facemae_jax.loading import LoadedModel

PANEL_WIDTH_FRACTION = 0.34  # probability panel width / frame width in annotated videos


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------


def frame_probabilities(windows: Sequence[Window], probs: np.ndarray, num_frames: int,
                        first_frame: int = 0) -> np.ndarray:
    """Per source frame ``first_frame .. first_frame + num_frames - 1``, the mean probabilities of the windows
    whose span contains it -> float32 [F, K]."""
    total = np.zeros((num_frames, probs.shape[1]), np.float64)
    count = np.zeros((num_frames, 1), np.float64)
    for w, p in zip(windows, probs):
        total[w.start_frame - first_frame : w.end_frame - first_frame + 1] += p
        count[w.start_frame - first_frame : w.end_frame - first_frame + 1] += 1
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
    """One row per window; ``entries`` are window entries with a ``track_id``."""
    header = ["track_id", "index", "start_frame", "end_frame", "start_time", "end_time"]
    header += [f"p_{name}" for name in class_names] + ["top_class", "top_probability"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for e in entries:
            writer.writerow([e["track_id"], e["index"], e["start_frame"], e["end_frame"],
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


def annotate_frame(frame: np.ndarray, probs: np.ndarray | None, class_names: Sequence[str], colors: np.ndarray,
                   faces_here: Sequence[tuple[np.ndarray, np.ndarray, int | None]] = ()) -> np.ndarray:
    """A copy of ``frame`` (uint8 [H, W, 3]) with every face box labelled and a panel of probability bars.

    probs: [K] for the panel in the top-left corner (the main track's), or None for no panel.
    faces_here: (box, probabilities [K], track id or None) per face on this frame; each box is labelled with the
    track id and its top class.
    """
    import cv2

    from data_pipelines import faces

    out = frame.copy()
    for box, face_probs, track_id in faces_here:
        top = int(np.argmax(face_probs))
        label = (f"#{track_id} " if track_id is not None else "") + f"{class_names[top]} {face_probs[top]:.0%}"
        out = faces.draw_box(out, box, label, color=tuple(int(c) for c in colors[top]))
    if probs is None:
        return out
    top = int(np.argmax(probs))
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
    if not faces_here:  # no face box to carry the label: write it under the panel
        cv2.putText(out, f"{class_names[top]} {probs[top]:.0%}", (pad, min(height - pad, panel_h + row)), font,
                    font_scale * 1.2, tuple(int(c) for c in colors[top]), 2, lineType=cv2.LINE_AA)
    return out


def write_annotated_video(path: str, video_path: str, num_frames: int, tracks: Sequence[dict[str, Any]],
                          main_id: int, class_names: Sequence[str], fps: float, bar=None) -> None:
    """Decode ``video_path`` again and write every frame annotated, one frame at a time (bounded memory).

    tracks: per track {"track_id", "start_frame", "boxes" [L, 4] or None (whole frame), "per_frame" [L, K]}.
    """
    from data_pipelines import video_io
    from facemae_jax import visualize

    colors = visualize.class_colors(len(class_names))
    with video_io.VideoFile(video_path) as video, video_io.VideoWriter(path, fps) as writer:
        for t, frame in enumerate(video.frames(on_error="stop")):
            if t >= num_frames:
                break
            here, panel = [], None
            for track in tracks:
                local = t - track["start_frame"]
                if 0 <= local < len(track["per_frame"]):
                    p = track["per_frame"][local]
                    if track["boxes"] is not None:
                        here.append((track["boxes"][local], p, track["track_id"] if len(tracks) > 1 else None))
                    if track["track_id"] == main_id:
                        panel = p
            writer.write(annotate_frame(frame, panel, class_names, colors, here))
            if bar is not None:
                bar.update(1)


# ---------------------------------------------------------------------------------------------------------------
# One video
# ---------------------------------------------------------------------------------------------------------------


def _summary(probs: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    mean = probs.mean(axis=0)
    top = int(np.argmax(mean))
    return {"num_windows": len(probs), "mean_probabilities": {n: float(v) for n, v in zip(names, mean)},
            "top_class": names[top], "top_probability": float(mean[top])}


def predict_video(path: str, loaded: LoadedModel, forward: inference.ClipForward, out_dir: str, *,
                  stride: int | None = None, face_crop: bool = True, annotate: bool = False, timeline: bool = False,
                  tracking=None, largest_face: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Stream one video and write its outputs into ``out_dir``; returns the video's ``predictions.json`` content.

    tracking: ``data_pipelines.face_tracks.TrackingOptions`` (None: defaults). Raises VideoReadError, NoFaceFound
    or VideoTooShort (the caller records them and goes on).
    """
    from data_pipelines import progress
    from facemae_jax import video_stream

    cfg = loaded.cfg
    names = loaded.class_names
    name = os.path.basename(path)
    started = time.perf_counter()
    stream = video_stream.VideoClips(path, cfg.num_frames, loaded.sampling_rate, cfg.img_size, stride=stride,
                                     face_crop=face_crop, tracking=tracking, largest_face=largest_face)
    if face_crop:
        with progress.bar(total=stream.expected_frames(), desc=f"faces {name}", unit="frame", leave=False,
                          disable=not show_progress) as bar:
            stream.find_faces(bar.update)
            bar.set_postfix_str(f"{len(stream.tracks)} track(s)", refresh=False)
    meta: list[tuple[int, Window]] = []

    def clips():
        for item in stream.windows(frame_bar.update):
            meta.append((item.track_id, item.window))
            yield item.clip

    forward_before = forward.busy_seconds
    with progress.bar(total=stream.expected_frames(), desc=f"windows {name}", unit="frame", leave=False,
                      disable=not show_progress) as frame_bar:
        probs = forward(clips())["probs"]
    forward_seconds = forward.busy_seconds - forward_before
    num_frames = stream.num_frames
    fps = stream.fps
    span = cfg.num_frames * loaded.sampling_rate

    by_track: dict[int, list[int]] = {}
    for i, (track_id, _) in enumerate(meta):
        by_track.setdefault(track_id, []).append(i)
    if face_crop:
        spans = {t.track_id: (t.start_frame, t.end_frame, int(t.detected.sum())) for t in stream.tracks}
        main_id = max(stream.tracks, key=lambda t: t.score).track_id
    else:
        spans = {0: (0, num_frames - 1, None)}
        main_id = 0
    tracks_out: list[dict[str, Any]] = []
    notes = list(stream.notes)
    for track_id in sorted(by_track):
        rows = by_track[track_id]
        windows = [meta[i][1] for i in rows]
        track_probs = probs[rows]
        start, end, detected = spans[track_id]
        start_time, _ = Window(0, start, end, np.zeros(0, np.int64)).times(fps)
        _, end_time = Window(0, start, end, np.zeros(0, np.int64)).times(fps)
        shortness = inference.shortness_note(windows[0], end - start + 1, cfg.num_frames, loaded.sampling_rate)
        if shortness:
            notes.append(shortness if len(by_track) == 1 else f"track {track_id}: {shortness}")
        entries = window_entries(windows, track_probs, fps, names)
        for e in entries:
            e["track_id"] = track_id
        tracks_out.append({
            "track_id": track_id,
            "main": track_id == main_id,
            "start_frame": start, "end_frame": end,
            "start_time": None if start_time is None else round(start_time, 4),
            "end_time": None if end_time is None else round(end_time, 4),
            "num_frames": end - start + 1,
            "face_detected_frames": detected,
            "padded": bool(windows[0].padded),
            "windows": entries,
            "summary": _summary(track_probs, names),
        })
    main = next(t for t in tracks_out if t["track_id"] == main_id)
    note = " | ".join(notes) if notes else None
    result: dict[str, Any] = {
        "video": os.path.abspath(path),
        "num_frames": num_frames,
        "declared_frames": stream.declared_frames or None,
        "fps": fps,
        "duration_s": None if not fps else round(num_frames / fps, 4),
        "frame_size": [stream.height, stream.width],
        "model": loaded.describe(),
        "class_names": list(names),
        "face_crop": face_crop,
        "face_detected_frames": main["face_detected_frames"],
        "face_tracking": stream.tracker_stats or None,
        "window_rule": {"num_frames": cfg.num_frames, "sampling_rate": loaded.sampling_rate, "span_frames": span,
                        "stride_frames": stride if stride is not None else max(1, span // 2),
                        "last_window_aligned_to_end": True, "per_track": True},
        "padded": main["padded"],
        "truncation": stream.truncation,
        "note": note,
        "num_tracks": len(tracks_out),
        "main_track_id": main_id,
        "tracks": tracks_out,
        "windows": main["windows"],
        "summary": main["summary"],
        "timing_s": {"face_tracking": round(stream.seconds["tracking"], 3),
                     "decode_crop_window": round(stream.seconds["cropping"], 3),
                     "model": round(forward_seconds, 3)},
    }
    os.makedirs(out_dir, exist_ok=True)
    write_csv(os.path.join(out_dir, "predictions.csv"), [e for t in tracks_out for e in t["windows"]], names)
    if timeline:
        from facemae_jax import visualize

        for track in tracks_out:
            windows = [meta[i][1] for i in by_track[track["track_id"]]]
            track_probs = probs[by_track[track["track_id"]]]
            if fps:
                spans_s = np.array([[w.start_frame / fps, (w.end_frame + 1) / fps] for w in windows])
                xlabel = "time (s)"
            else:
                spans_s = np.array([[w.start_frame, w.end_frame + 1] for w in windows], np.float64)
                xlabel = "frame (the file has no frame rate)"
            file_name = "timeline.png" if track["main"] else f"timeline_track{track['track_id']}.png"
            who = f" track {track['track_id']}" if len(tracks_out) > 1 else ""
            top = track["summary"]
            visualize.probability_timeline(spans_s.mean(axis=1), track_probs, names,
                                           os.path.join(out_dir, file_name), spans=spans_s, xlabel=xlabel,
                                           title=f"{name}{who}: {top['top_class']} ({top['top_probability']:.0%} "
                                                 f"mean)")
    if annotate:
        boxes_of = {t.track_id: t.boxes for t in stream.tracks} if face_crop else {0: None}
        drawn = []
        for track in tracks_out:
            rows = by_track[track["track_id"]]
            drawn.append({"track_id": track["track_id"], "start_frame": track["start_frame"],
                          "boxes": boxes_of[track["track_id"]],
                          "per_frame": frame_probabilities([meta[i][1] for i in rows], probs[rows],
                                                           track["num_frames"], track["start_frame"])})
        with progress.bar(total=num_frames, desc=f"annotating {name}", unit="frame", leave=False,
                          disable=not show_progress) as bar:
            write_annotated_video(os.path.join(out_dir, "annotated.mp4"), path, num_frames, drawn, main_id, names,
                                  fps or 25.0, bar)
    result["seconds"] = round(time.perf_counter() - started, 3)
    _write_json(os.path.join(out_dir, "predictions.json"), result)  # last: its presence marks the video done
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


def collect_videos(inputs: Sequence[str]) -> list[str]:
    """Files as given; a folder is searched recursively for video files (sorted). Missing paths stay in the list
    (they fail with "no such file" in the summary)."""
    from data_pipelines.sources import videos as video_sources

    found: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            try:
                found += [clip.path for clip in video_sources.find_videos(item).clips]
            except video_sources.VideoSourceError as e:
                raise SystemExit(f"error: {e}") from e
        else:
            found.append(item)
    return found


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from data_pipelines.face_tracks import TrackingOptions

    defaults = TrackingOptions()
    ap = argparse.ArgumentParser(prog="python -m facemae_jax.predict", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("videos", nargs="+", metavar="VIDEO_OR_FOLDER",
                    help="video files (anything FFmpeg decodes) or folders (searched recursively)")
    ap.add_argument("--out", default="predictions", help="output directory (default: ./predictions)")
    ap.add_argument("--overwrite", action="store_true",
                    help="redo videos whose predictions.json already exists (default: skip them)")
    ap.add_argument("--stride_frames", type=int, default=None,
                    help="source frames between window starts (default: half a window span)")
    ap.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    ap.add_argument("--annotate", action="store_true", help="write annotated.mp4 (boxes, top emotion, bars)")
    ap.add_argument("--timeline", action="store_true", help="write timeline.png (probabilities over time)")
    ap.add_argument("--no_face_crop", action="store_true",
                    help="use whole frames resized to the input size (videos that are already face crops)")
    ap.add_argument("--largest_face", action="store_true",
                    help="one face per video: the largest (largest sum of face sizes over time), over the whole "
                         "video; default: every face track that lasts a window")
    ap.add_argument("--detect_every", type=int, default=defaults.detect_every,
                    help=f"re-detect each tracked face every N frames (default {defaults.detect_every})")
    ap.add_argument("--scan_every", type=int, default=defaults.scan_every,
                    help=f"search whole frames for new faces every N frames (default {defaults.scan_every})")
    ap.add_argument("--min_face", type=int, default=defaults.min_face,
                    help=f"smallest face side in pixels to find reliably (default {defaults.min_face})")
    ap.add_argument("--search_seconds", type=float, default=defaults.search_seconds,
                    help=f"give up on a video when no face appears in its first S seconds (default "
                         f"{defaults.search_seconds:g})")
    ap.add_argument("--search_whole_video", action="store_true", help="never give up early on finding a face")
    ap.add_argument("--class_names", default=None, help="comma-separated class names (override the checkpoint's)")
    loading.add_model_args(ap)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from data_pipelines import progress
    from data_pipelines.face_tracks import TrackingOptions
    from data_pipelines.faces import NoFaceFound
    from data_pipelines.video_io import VideoReadError, truncation_note

    args = build_parser().parse_args(argv)
    if args.stride_frames is not None and args.stride_frames < 1:
        raise SystemExit(f"--stride_frames must be >= 1, got {args.stride_frames}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SystemExit(f"error: --out {args.out} is a file; it must be a directory (created if missing)")
    try:
        tracking = TrackingOptions(detect_every=args.detect_every, scan_every=args.scan_every,
                                   min_face=args.min_face,
                                   search_seconds=None if args.search_whole_video else args.search_seconds)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    videos = collect_videos(args.videos)
    try:
        overrides = convert.parse_overrides(args.override)
        loaded = loading.load_model(args.checkpoint, model=args.model, class_names=args.class_names,
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
    total_frames = total_windows = reused = 0
    with progress.bar(total=len(videos), desc="videos", unit="video", disable=len(videos) < 2) as videos_bar:
        for video, out_dir in zip(videos, output_dirs(videos, args.out)):
            entry: dict[str, Any] = {"video": os.path.abspath(video), "output_dir": os.path.abspath(out_dir)}
            done_file = os.path.join(out_dir, "predictions.json")
            res = None
            if os.path.exists(done_file) and not args.overwrite:
                try:
                    with open(done_file) as f:
                        res = json.load(f)
                    reused += 1
                    progress.write(f"{video}: already done ({done_file}; --overwrite redoes it)")
                except (OSError, ValueError):
                    res = None  # a damaged earlier result is redone
            if res is None:
                try:
                    res = predict_video(video, loaded, forward, out_dir, stride=args.stride_frames,
                                        face_crop=not args.no_face_crop, annotate=args.annotate,
                                        timeline=args.timeline, tracking=tracking, largest_face=args.largest_face)
                except (VideoReadError, NoFaceFound, inference.VideoTooShort) as e:
                    kind = ("unreadable" if isinstance(e, VideoReadError)
                            else "no_face" if isinstance(e, NoFaceFound) else "too_short")
                    message = str(e) if isinstance(e, VideoReadError) else f"{video}: {e}"
                    progress.write(f"skipped ({kind}): {message}")
                    entry.update(status="failed", reason=kind, error=message, output_dir=None)
                else:
                    total_frames += res["num_frames"]
                    total_windows += sum(t["summary"]["num_windows"] for t in res["tracks"])
                    if res["truncation"] is not None:
                        progress.write(f"warning: {truncation_note(video, res['truncation'])}")
            if res is not None:
                summary = res["summary"]
                who = f"; main of {res['num_tracks']} face tracks" if res.get("num_tracks", 1) > 1 else ""
                progress.write(f"{video}: {summary['top_class']} ({summary['top_probability']:.1%} mean over "
                               f"{summary['num_windows']} windows{who})", file=sys.stdout)
                entry.update(status="ok", num_frames=res["num_frames"], fps=res["fps"], padded=res["padded"],
                             note=res["note"], truncation=res.get("truncation"), num_tracks=res.get("num_tracks", 1),
                             tracks=[{k: t[k] for k in ("track_id", "start_frame", "end_frame", "start_time",
                                                        "end_time")} | {"top_class": t["summary"]["top_class"],
                                                                        "top_probability":
                                                                            t["summary"]["top_probability"]}
                                     for t in res.get("tracks", [])],
                             **summary)
            results.append(entry)
            videos_bar.update(1)
    ok = sum(r["status"] == "ok" for r in results)
    seconds = time.time() - started
    _write_json(os.path.join(args.out, "summary.json"), {
        "checkpoint": os.path.abspath(args.checkpoint),
        "model": loaded.describe(),
        "class_names": list(loaded.class_names),
        "num_videos": len(results),
        "num_ok": ok,
        "num_failed": len(results) - ok,
        "num_reused": reused,
        "seconds": round(seconds, 2),
        "videos": results,
    })
    rate = (f"; {total_frames} frames, {total_windows} windows in {seconds:.1f} s: {total_frames / seconds:.1f} "
            f"frames/s, {total_windows / seconds:.2f} windows/s" if total_frames and seconds > 0 else "")
    print(f"{ok} of {len(results)} videos done ({reused} from an earlier run){rate}; results in {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
