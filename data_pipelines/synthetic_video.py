"""An mp4 of one synthetic person showing a sequence of expressions, to try ``facemae_jax.predict`` without a
video of your own (and the source of the README's example timeline).

    python -m data_pipelines.synthetic_video --out demo.mp4 --expressions neutral,happy,surprise,sad,angry

Each expression is one generated clip (onset -> apex -> offset) of the same identity; scenes change between clips
(background, lighting and head pose are drawn per clip), which also exercises the face tracker. ``--scenario``
picks the recording conditions (data_pipelines.synthetic.SCENARIOS): the demo model is trained on ``posed`` clips,
so a video meant for it should be posed too.
"""

from __future__ import annotations

import argparse

import numpy as np

from data_pipelines import synthetic, synthetic_identities, video_io


def render(expressions: list[str], *, frames_per_expression: int, size: int, seed: int,
           scenario: str = "wild") -> np.ndarray:
    """-> uint8 [len(expressions) * frames_per_expression, size, size, 3]."""
    unknown = [e for e in expressions if e not in synthetic.CLASS_NAMES]
    if unknown:
        raise ValueError(f"unknown expressions {unknown}; choose from {list(synthetic.CLASS_NAMES)}")
    rng = np.random.default_rng(seed)
    person = synthetic_identities.sample_identity(rng, name=f"video-{seed}")
    clips = [synthetic.generate_clip(rng, synthetic.CLASS_NAMES.index(e), frames=frames_per_expression, size=size,
                                     identity=person, scenario=scenario)[0] for e in expressions]
    return np.concatenate(clips)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output .mp4")
    ap.add_argument("--expressions", default="neutral,happy,surprise,sad,angry",
                    help=f"comma-separated, from {','.join(synthetic.CLASS_NAMES)}")
    ap.add_argument("--frames_per_expression", type=int, default=32)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenario", default="wild", choices=sorted(synthetic.SCENARIOS),
                    help="recording conditions (the demo model is trained on posed)")
    args = ap.parse_args(argv)
    frames = render(args.expressions.split(","), frames_per_expression=args.frames_per_expression, size=args.size,
                    seed=args.seed, scenario=args.scenario)
    video_io.write_video(args.out, frames, fps=args.fps)
    print(f"wrote {args.out}: {len(frames)} frames at {args.fps:g} fps ({args.expressions}, {args.scenario})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
