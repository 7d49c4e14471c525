"""Which stages does a pre-trained SVFAP (TPSBT) decoder rely on? The fusion hypothesis of the study (issue 19).

    python -m benchmarks.svfap_stage_share pre/tpsbt_corrected_2x pre/tpsbt_faithful [--clips 64]

The SVFAP pre-training encoder feeds its decoder the sum of every stage's output, each coarse stage up-sampled to
the full frame rate (multi-scale fusion, ARCHITECTURE §4.6): ``fused = out_0 + up(out_1) + up(out_2)``, then the
final LayerNorm. The fine-tune model reads the last stage only. The study found that the corrected encoder
(QUIRKS Q3/Q5 fixed) pre-trains but transfers nothing, and the hypothesis is that its reconstruction is carried by
the shallow stage-0 term, leaving the later stages weakly trained. This measures it, for each pre-training job of
the study (``workdirs/synthetic_study/<job>``), on one fixed batch of the unlabelled pool with the training mask:

* each stage's term relative to the fused input: ``rms`` = ||term_s|| / ||fused||, and ``projection`` =
  <term_s, fused> / ||fused||^2 (a decomposition: the projections sum to 1), both also after removing each token's
  channel mean (``centered``: what the LayerNorm passes on);
* the reconstruction loss / the zero-prediction loss (1 = nothing reconstructed) with the trained fusion, with one
  stage's term zeroed or replaced by its batch mean (same position, same channel: the sample-specific content
  removed, the statistics the decoder saw kept), and with only one stage's term kept (the others zeroed or
  replaced by their batch mean).

No model option is involved: the terms are read and edited with ``flax.linen.intercept_methods`` around the
unchanged model (the encoder's ``run_stages`` returns the stage outputs, its ``upsample`` the coarse terms, its
final ``norm`` receives the fused sum). Output: ``results/svfap_stage_share.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

EDITS = ("zero", "mean")  # what replaces a stage's term: zeros, or its batch mean


def edit_coefficients(num_stages: int, edits=()) -> tuple[np.ndarray, np.ndarray]:
    """((stage, 'zero' | 'mean'), ...) -> (keep, mean) float32 [S]: term_s becomes keep_s * term_s + mean_s *
    (its batch mean). Coefficients rather than a static edit, so that every edit runs through one compile."""
    keep, mean = np.ones(num_stages, np.float32), np.zeros(num_stages, np.float32)
    for s, how in edits:
        if how not in EDITS:
            raise ValueError(f"stage edit must be one of {EDITS}, got {how!r}")
        if not 0 <= s < num_stages:
            raise ValueError(f"stage edit {s}: the encoder has stages 0..{num_stages - 1}")
        keep[s], mean[s] = 0.0, float(how == "mean")
    return keep, mean


def fused_terms_apply(model, params, x, mask, keep=None, mean=None):
    """The pre-training model's predictions with the fusion's stage terms edited, and the terms themselves.

    keep, mean: [S] (:func:`edit_coefficients`; default: no edit). Returns (pred [B, Nm, D], terms: S arrays
    [B, T0*P, C], fused [B, T0*P, C]: what the encoder's final LayerNorm received). The edit applies to each
    stage's output after the stage loop, so it changes only that stage's term of the sum, not the later stages
    that read it (up-sampling repeats frames, so it commutes with the batch mean)."""
    import flax.linen as nn

    from facemae_jax.models.mae import TPSBTPretrainEncoder

    seen: dict = {"upsampled": []}

    def intercept(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, TPSBTPretrainEncoder) and context.method_name == "run_stages":
            outs = list(next_fun(*args, **kwargs))
            if keep is not None:
                if len(keep) != len(outs) or len(mean) != len(outs):
                    raise ValueError(f"{len(keep)} stage coefficients for an encoder with {len(outs)} stages")
                outs = [keep[s] * o + mean[s] * o.mean(axis=0, keepdims=True) for s, o in enumerate(outs)]
            seen["stage0"] = outs[0]
            return outs
        out = next_fun(*args, **kwargs)
        if isinstance(mod, TPSBTPretrainEncoder) and context.method_name == "upsample":
            seen["upsampled"].append(out)
        elif isinstance(mod.parent, TPSBTPretrainEncoder) and mod.name == "norm":
            seen["fused"] = args[0]
        return out

    with nn.intercept_methods(intercept):
        pred = model.apply({"params": params}, x, mask, train=False)
    if "stage0" not in seen or "fused" not in seen:
        raise ValueError(f"{type(model).__name__}: not a TPSBT pre-training model (no multi-scale fusion seen)")
    return pred, [seen["stage0"], *seen["upsampled"]], seen["fused"]


def term_shares(terms, fused) -> dict:
    """Each term's size relative to the fused sum (see the module docstring), raw and channel-centred."""
    import jax.numpy as jnp

    out = {}
    for key, center in (("raw", False), ("centered", True)):
        ts = [t - t.mean(-1, keepdims=True) if center else t for t in terms]
        f = fused - fused.mean(-1, keepdims=True) if center else fused
        f2 = float(jnp.sum(jnp.square(f)))
        out[key] = dict(rms=[float(jnp.sqrt(jnp.sum(jnp.square(t)) / f2)) for t in ts],
                        projection=[float(jnp.sum(t * f) / f2) for t in ts])
    return out


def stage_edits(num_stages: int) -> dict[str, tuple[tuple[int, str], ...]]:
    """Named edits: none, each stage removed, each stage kept alone, all removed; each as zeros and batch means."""
    out = {"trained fusion": ()}
    for how in EDITS:
        for s in range(num_stages):
            out[f"stage {s} {how}"] = ((s, how),)
        for s in range(num_stages):
            out[f"only stage {s} (others {how})"] = tuple((o, how) for o in range(num_stages) if o != s)
        out[f"all stages {how}"] = tuple((o, how) for o in range(num_stages))
    return out


def analyse(model, cfg, params, batch, *, frame_diff: bool, diff_weight=None) -> dict:
    """Shares and loss / zero-prediction loss of every edit of :func:`stage_edits` on one batch (one compile)."""
    import jax

    from facemae_jax import steps, targets

    x, tgt = steps.pretrain_inputs(batch, cfg, frame_diff)
    zero = float(steps.zero_prediction_loss(tgt, diff_weight))
    num_stages = len(cfg.stage_depths)

    @jax.jit
    def run(params, x, mask, tgt, keep, mean):
        pred, terms, fused = fused_terms_apply(model, params, x, mask, keep, mean)
        return targets.reconstruction_loss(pred, tgt, diff_weight), terms, fused

    run = functools.partial(run, params, x, batch["mask"], tgt)  # arguments, not constants: no constant folding
    loss, terms, fused = run(*edit_coefficients(num_stages))
    res = dict(zero_prediction_loss=zero, loss=float(loss), shares=term_shares(terms, fused),
               term_rms=[float(np.sqrt(np.mean(np.square(t)))) for t in terms],
               fused_rms=float(np.sqrt(np.mean(np.square(fused)))), loss_vs_zero={})
    for name, edits in stage_edits(num_stages).items():
        res["loss_vs_zero"][name] = float(run(*edit_coefficients(num_stages, edits))[0]) / zero
    return res


def fixed_pool_batch(job_config: dict, cfg, clips: int, seed: int):
    """``clips`` clips of the job's pre-training split, with its mask generator and no augmentation (one crop of
    the whole frame, resized to the model input): the same for every job of one dataset."""
    from data_pipelines import pipeline as pipelines
    from facemae_jax import masking

    d = job_config["data"]
    geometry = pipelines.ClipGeometry(cfg.num_frames, d["sampling_rate"], cfg.img_size)
    augment = pipelines.PretrainAugment(num_samples=1, fixed_crop_size=d["fixed_crop_size"],
                                        multiscale_scales=(1.0,), multiscale_resize=d["multiscale_resize"])
    pipe = pipelines.pretrain_pipeline(d["dir"], d["train_split"], batch_size=clips, seed=seed, geometry=geometry,
                                       mask=masking.MaskGenerator.for_model(cfg), augment=augment,
                                       options=pipelines.LoaderOptions())
    it = iter(pipe)
    try:
        return next(it)
    finally:
        it.close()


def analyse_job(workdir: str, clips: int, seed: int) -> dict:
    from facemae_jax import loading

    path = os.path.join(workdir, "study_result.json")
    if not os.path.exists(path):
        raise SystemExit(f"{workdir}: no study_result.json; run the pre-training job first "
                         "(python -m benchmarks.synthetic_study --only <job>)")
    with open(path) as f:
        job = json.load(f)
    loaded = loading.load_model(workdir)
    cfg = loaded.cfg
    if cfg.family != "tpsbt" or cfg.mode != "pretrain":
        raise SystemExit(f"{workdir}: a {cfg.family} {cfg.mode} model; this analysis needs a TPSBT pre-training one")
    from facemae_jax.models import registry

    model = registry.create_model(cfg)
    batch = fixed_pool_batch(job["config"], cfg, clips, seed)
    p = job["config"]["pretrain"]
    res = analyse(model, cfg, loaded.params, batch, frame_diff=p["frame_diff"], diff_weight=p.get("diff_weight"))
    res.update(workdir=workdir, steps=job["config"]["optim"]["total_steps"], clips=clips, batch_seed=seed,
               options=dict(svfap_reverse_ctx=cfg.svfap_reverse_ctx, svfap_upsample=cfg.svfap_upsample),
               pretraining=dict(wall_s=job.get("wall_s"), cpu_s=job.get("cpu_s"),
                                final_train_loss_vs_zero=job.get("final_loss_vs_zero"),
                                eval_recon_loss_vs_zero=job["result"].get("recon_loss_vs_zero")))
    return res


def table(results: dict) -> str:
    names = list(next(iter(results.values()))["loss_vs_zero"])
    jobs = list(results)
    lines = ["| loss ÷ zero prediction | " + " | ".join(jobs) + " |", "|---|" + "---|" * len(jobs)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{results[j]['loss_vs_zero'][n]:.3f}" for j in jobs) + " |")
    lines += ["", "| share of the fused input (centred): rms / projection | " + " | ".join(jobs) + " |",
              "|---|" + "---|" * len(jobs)]
    for s in range(len(results[jobs[0]]["term_rms"])):
        cells = [f"{results[j]['shares']['centered']['rms'][s]:.2f} / "
                 f"{results[j]['shares']['centered']['projection'][s]:.2f}" for j in jobs]
        lines.append(f"| stage {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jobs", nargs="+", help="pre-training jobs of the study, e.g. pre/tpsbt_corrected_2x")
    p.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "synthetic_study"))
    p.add_argument("--out", default=os.path.join(ROOT, "results", "svfap_stage_share.json"))
    p.add_argument("--clips", type=int, default=64, help="clips of the fixed batch of the unlabelled pool")
    p.add_argument("--seed", type=int, default=1, help="seed of the batch's clip order and masks")
    a = p.parse_args(argv)
    t0, results = time.time(), {}
    for job in a.jobs:
        t = time.time()
        results[job] = analyse_job(os.path.join(a.workdir, job), a.clips, a.seed)
        results[job]["wall_s"] = time.time() - t
        print(f"[stage share] {job}: {time.time() - t:.0f}s", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    out = dict(command="python -m benchmarks.svfap_stage_share " + " ".join(argv or sys.argv[1:]),
               wall_s=time.time() - t0, load_average=list(os.getloadavg()), results=results)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print("\n" + table(results), flush=True)
    print(f"\nwritten {a.out}", flush=True)


if __name__ == "__main__":
    main()
