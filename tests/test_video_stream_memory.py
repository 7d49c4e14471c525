"""Streaming own-video inference keeps memory bounded: peak RSS does not grow with the video's length.

Two generated videos (PyAV, H.264, 208x160 at 5 fps) of 1 and 3 minutes run through the whole stream (decode,
face tracking, crops, windows) in fresh subprocesses; the peak resident memory of both must agree within a few
MB, while holding the decoded frames (as the commands did before) would take 57 MB more for the longer one. The
forward batch that follows has a fixed shape, so it adds the same amount to both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import skimage.data

from data_pipelines import video_io

FPS = 5  # minutes of video at few frames: the test stays quick, the length still triples
SIZE = (160, 208)  # H, W
FACE = skimage.data.astronaut()[0:300, 100:380][::2, ::2]  # 150 x 140: the Haar face box is about 50 px


def write_long_video(path, num_frames: int) -> None:
    """The astronaut's head drifting back and forth over a grey, slightly noisy canvas, frame by frame."""
    rng = np.random.default_rng(0)
    canvas = np.clip(128 + rng.normal(0, 8, SIZE + (3,)), 0, 255).astype(np.uint8)
    h, w = FACE.shape[:2]
    with video_io.VideoWriter(path, FPS, crf=28) as writer:
        for t in range(num_frames):
            frame = canvas.copy()
            x = int(round((SIZE[1] - w) / 2 * (1 + np.sin(t / 50))))
            frame[10 : 10 + h, x : x + w] = FACE
            writer.write(frame)


PROBE = textwrap.dedent("""
    import json, resource, sys
    from data_pipelines.face_tracks import TrackingOptions
    from facemae_jax import video_stream

    path, face_crop = sys.argv[1], sys.argv[2] == "1"
    clips = video_stream.VideoClips(path, 16, 4, 64, face_crop=face_crop,
                                    tracking=TrackingOptions(min_face=40, search_seconds=None))
    clips.find_faces()
    windows = sum(1 for _ in clips.windows())
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "frames": clips.num_frames, "windows": windows, "tracks": len(clips.tracks)}))
""")


def peak_rss(path, face_crop: bool) -> dict:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), "1" if face_crop else "0"], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_memory_does_not_grow_with_video_length(tmp_path):
    short, long = tmp_path / "one_minute.mp4", tmp_path / "three_minutes.mp4"
    write_long_video(short, 60 * FPS)
    write_long_video(long, 180 * FPS)
    raw_mb = [minutes * 60 * FPS * SIZE[0] * SIZE[1] * 3 / 2**20 for minutes in (1, 3)]  # 29 and 86 MB
    a, b = peak_rss(short, face_crop=True), peak_rss(long, face_crop=True)
    assert (a["frames"], b["frames"]) == (60 * FPS, 180 * FPS)
    assert a["tracks"] == b["tracks"] == 1 and b["windows"] > 2.9 * a["windows"] > 0
    growth = b["peak_rss_mb"] - a["peak_rss_mb"]
    # holding the decoded frames (the old read_video path) would grow by raw_mb[1] - raw_mb[0] = 57 MB
    assert growth < 5, f"peak RSS {a['peak_rss_mb']:.0f} MB (1 min) -> {b['peak_rss_mb']:.0f} MB (3 min)"
    assert growth < (raw_mb[1] - raw_mb[0]) / 10
