"""Own-video inference at real length: a 3-minute 640x480 video through ``facemae_jax.predict``.

Generates (once, cached in ``--workdir``) a 3-minute, 25 fps, 640x480 H.264 video of a real face photo (scikit-
image's astronaut, Haar face box ~100 px) drifting over a textured background (the brick photo, panning), and the same
video without the face. Then runs the real command line in fresh subprocesses and reports, per run:

* wall time (process start to exit, model loading and compilation included) and peak RSS (``ru_maxrss``);
* face tracking frames/s: video frames / (pass 1: decode luma + detect + track, pass 2: decode RGB + crop +
  window) as recorded in ``predictions.json["timing_s"]``;
* model windows/s: windows / time inside the batched forward pass.

Runs: with face cropping (default settings), without (``--no_face_crop``), and the face-free video (time until
predict gives up: ``search_seconds``). The machine is shared, so the run also measures a fixed calibration
workload (full-frame Haar search on one 640x480 frame, median of 15) at the start and the end, and records
``uptime``: compare numbers across machines through ``calibration_ms``.

The model: ``--checkpoint`` (any form predict accepts) or, by default, a randomly initialised model of the demo's
geometry (``configs/demo.py``: LGI-Former tiny, 16 frames at 32 px, patch 8, sampling rate 2; windows/s do not
depend on the weights). Usage::

    python -m benchmarks.predict_video --out results/predict_video_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

FPS = 25
SECONDS = 180
HEIGHT, WIDTH = 480, 640

RUNNER = """
import json, resource, runpy, sys
sys.argv = ["facemae_jax.predict"] + sys.argv[1:]
code = 0
try:
    runpy.run_module("facemae_jax.predict", run_name="__main__")
except SystemExit as e:
    code = e.code or 0
print("BENCH " + json.dumps({"peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "code": code}))
"""


def texture(height: int, width: int) -> np.ndarray:
    import cv2
    import skimage.data

    brick = skimage.data.brick()  # grey 512x512
    tiled = np.tile(brick, (int(np.ceil(height / 512)) + 1, int(np.ceil(width / 512)) + 1))
    rgb = cv2.cvtColor(tiled, cv2.COLOR_GRAY2RGB)
    return rgb


def write_video(path: str, with_face: bool) -> None:
    """3 minutes of a panning brick wall; with the face photo drifting on a slow Lissajous path."""
    import skimage.data

    from data_pipelines import video_io

    background = texture(HEIGHT, WIDTH)
    face = skimage.data.astronaut()[0:300, 100:380]  # head and shoulders, 280 x 300
    fh, fw = face.shape[:2]
    tmp = path + ".tmp.mp4"
    with video_io.VideoWriter(tmp, FPS, crf=23) as writer:
        for t in range(SECONDS * FPS):
            ox, oy = (t // 2) % 512, (t // 5) % 512
            frame = background[oy : oy + HEIGHT, ox : ox + WIDTH].copy()
            if with_face:
                x = int((WIDTH - fw) / 2 * (1 + np.sin(2 * np.pi * t / (FPS * 20))))
                y = int((HEIGHT - fh) / 2 * (1 + np.sin(2 * np.pi * t / (FPS * 13))))
                frame[y : y + fh, x : x + fw] = face
            writer.write(frame)
    os.replace(tmp, path)


def demo_model(directory: str) -> str:
    """A random-weight model of the demo's fine-tune geometry, saved as a converted dir."""
    import jax

    from configs.study import common
    from facemae_jax import convert
    from facemae_jax.models import registry

    geometry = {k: v for k, v in common.LGI.items() if not k.startswith("decoder")}
    cfg = registry.get_config("lgi_tiny_finetune", **geometry)
    params = jax.device_get(registry.init_params(registry.create_model(cfg), jax.random.key(0)))
    convert.save_converted(directory, params, cfg, {"model_name": "lgi_tiny_finetune", "sampling_rate": 2})
    return directory


def calibration_ms() -> float:
    """Median time of one full-frame Haar search on a fixed 640x480 frame (the tracker's most expensive step)."""
    import cv2

    from data_pipelines import face_tracks

    frame = cv2.cvtColor(texture(HEIGHT, WIDTH)[:HEIGHT, :WIDTH], cv2.COLOR_RGB2GRAY)
    face_tracks._detect_frontal(frame, 0.5, 30)  # load the cascade
    times = []
    for _ in range(15):
        started = time.perf_counter()
        face_tracks._detect_frontal(frame, 0.5, 30)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def run_predict(video: str, checkpoint: str, out: str, extra: list[str]) -> dict:
    argv = [sys.executable, "-c", RUNNER, video, "--checkpoint", checkpoint, "--out", out, "--overwrite", *extra]
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    wall = time.perf_counter() - started
    line = next((out for out in proc.stdout.splitlines() if out.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"predict failed:\n{proc.stdout}\n{proc.stderr}")
    info = json.loads(line[6:])
    row = {"wall_s": round(wall, 1), "peak_rss_gib": round(info["peak_rss_kb"] / 2**20, 3), "exit_code": info["code"]}
    stem = os.path.splitext(os.path.basename(video))[0]
    result_file = os.path.join(out, stem, "predictions.json")
    if os.path.exists(result_file):
        with open(result_file) as f:
            res = json.load(f)
        timing = res["timing_s"]
        windows = sum(t["summary"]["num_windows"] for t in res["tracks"])
        crop_s = timing["face_tracking"] + timing["decode_crop_window"]
        row.update(frames=res["num_frames"], windows=windows, tracks=res["num_tracks"],
                   face_tracking_s=timing["face_tracking"], decode_crop_window_s=timing["decode_crop_window"],
                   model_s=timing["model"],
                   tracking_and_cropping_fps=round(res["num_frames"] / crop_s, 1) if crop_s else None,
                   model_windows_per_s=round(windows / timing["model"], 1) if timing["model"] else None,
                   end_to_end_fps=round(res["num_frames"] / wall, 1), face_tracking=res["face_tracking"])
    else:
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        row.update(status=summary["videos"][0]["status"], error=summary["videos"][0].get("error"))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "facemae_predict_bench"),
                    help="videos are generated here once and reused")
    ap.add_argument("--checkpoint", default=None, help="model to run (default: random demo-geometry model)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--skip_no_face", action="store_true", help="skip the face-free video")
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    load_before = os.getloadavg()
    calibration_before = calibration_ms()
    videos = {"face": os.path.join(args.workdir, "face_640x480_3min.mp4"),
              "no_face": os.path.join(args.workdir, "no_face_640x480_3min.mp4")}
    for kind, path in videos.items():
        if not os.path.exists(path) and not (kind == "no_face" and args.skip_no_face):
            started = time.perf_counter()
            write_video(path, with_face=kind == "face")
            print(f"wrote {path} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    checkpoint = args.checkpoint or demo_model(os.path.join(args.workdir, "demo_model"))
    runs = {}
    runs["face_crop"] = run_predict(videos["face"], checkpoint, os.path.join(args.workdir, "out_face"), [])
    runs["no_face_crop"] = run_predict(videos["face"], checkpoint, os.path.join(args.workdir, "out_plain"),
                                       ["--no_face_crop"])
    if not args.skip_no_face:
        runs["face_free_video"] = run_predict(videos["no_face"], checkpoint, os.path.join(args.workdir, "out_none"),
                                              [])
    result = {
        "command": "python -m benchmarks.predict_video" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "calibration_ms": {"before": round(calibration_before, 1), "after": round(calibration_ms(), 1),
                           "what": "median of 15 full-frame Haar searches on one 640x480 frame (scale 0.5)"},
        "video": {"seconds": SECONDS, "fps": FPS, "size": [WIDTH, HEIGHT], "frames": SECONDS * FPS},
        "model": checkpoint if args.checkpoint else "random lgi_tiny_finetune at the demo geometry "
                                                     "(16 frames, 32 px, patch 8, sampling rate 2)",
        "runs": runs,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
