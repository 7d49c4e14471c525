"""The trainer: pre-training, fine-tuning and evaluation from one config (read top to bottom).

``run(config, workdir, mode)`` is what ``launch.py`` calls. One code path from one CPU to a pod:

1. mesh ('data', 'fsdp') from ``config.mesh``; parameters / optimiser state sharded by ``config.sharding_rules``;
   batches sharded over both axes, each process feeding its own rows;
2. grain pipeline for this process's share of every global batch (``data_pipelines.pipeline``);
3. state = params + optimiser state + step, created directly with its shardings (or restored by orbax onto the
   current mesh, whatever mesh it was saved from); the data iterator position is restored with it, so resuming is
   exact;
4. jit-compiled step with donated state; metrics fetched one step late (no pipeline stall) and checked for NaN;
5. asynchronous checkpoints every ``checkpoint.every_steps`` and at the end; TensorBoard scalars; eval (multi-view
   metrics) or, for pre-training, a reconstruction figure every ``eval_every_steps``;
6. at the end the model is exported to ``workdir/export`` (orbax params + model.json with class names, sampling
   rate), the format ``predict`` / ``extract`` / ``--mode=eval`` / a later fine-tuning run read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn

from data_pipelines import pipeline as pipelines
from facemae_jax import checkpoint as ckpt_lib
from data_pipelines import worker_autotune
from facemae_jax import (compilation_cache, convert, distributed, evaluate, input_timing, masking, optim, randaugment,
                         sharding, steps)
from facemae_jax.models import registry
from facemae_jax.models.config import ModelConfig


class TrainingDiverged(FloatingPointError):
    pass


# ------------------------------------------------------------------------------------------------------------
# Setup helpers
# ------------------------------------------------------------------------------------------------------------


def model_config(config) -> ModelConfig:
    return registry.get_config(config.model.name, **dict(config.model.get("overrides", {}) or {}))


def ensure_dataset(config) -> str:
    """The dataset directory, built first when the config says how (the demo's synthetic data)."""
    d = os.path.abspath(os.path.expanduser(config.data.dir))
    info_path = os.path.join(d, "dataset_info.json")
    synth = config.data.get("synthetic")
    if synth and jax.process_count() > 1:  # every process takes the barrier, whoever sees the data first
        if jax.process_index() == 0 and not os.path.exists(info_path):
            _build_synthetic(d, synth)
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("synthetic dataset written")
        if not os.path.exists(info_path):
            raise FileNotFoundError(
                f"{distributed.describe_process()}: process 0 wrote the synthetic dataset to {d!r} but this "
                "process does not see it: multi-process jobs assume a filesystem shared by all hosts for "
                "data.dir and the workdir (build the dataset on each host's disk first, or use shared storage)")
    if os.path.exists(info_path):
        return d
    if synth:
        _build_synthetic(d, synth)
        return d
    raise FileNotFoundError(
        f"dataset directory {d!r} has no dataset_info.json. Build it first, e.g.\n"
        f"  python -m data_pipelines.build {config.data.get('builder', 'NAME')} --out {d} ...\n"
        "(see README 'Data'), or point --config.data.dir at an existing one."
    )


def _build_synthetic(d: str, synth) -> None:
    from data_pipelines import synthetic

    print(f"[data] {d} not found: generating synthetic face-expression videos ({dict(synth)})", flush=True)
    t0 = time.time()
    synthetic.build_dataset(d, **dict(synth))
    print(f"[data] generated in {time.time() - t0:.0f}s", flush=True)


def dataset_info(data_dir: str) -> dict:
    from data_pipelines import records  # a damaged file gets a message naming it, not a bare JSONDecodeError

    return records.load_dataset_info(data_dir)


def loader_options(config, batch_bytes: int | None = None, log: bool = False) -> pipelines.LoaderOptions:
    d = config.data
    choice = worker_autotune.choose(d.get("worker_count", -1), d.get("prefetch_batches", -1),
                                    d.get("worker_buffer_size", -1), batch_bytes=batch_bytes)
    if log and jax.process_index() == 0:
        print(choice.describe(), flush=True)
    return pipelines.LoaderOptions(
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        worker_count=choice.worker_count,
        read_threads=config.data.get("read_threads", 1),
        prefetch_batches=choice.prefetch_batches,
        worker_buffer_size=choice.worker_buffer_size,
    )


def local_batch_size(global_batch: int, mesh) -> int:
    div = sharding.global_batch_divisor(mesh)
    if global_batch % div:
        raise ValueError(f"batch size {global_batch} is not divisible by the {div} devices of the mesh's batch axes "
                         f"{dict(mesh.shape)}: change the batch size (batch_size / eval.batch_size) or config.mesh")
    if global_batch % jax.process_count():
        raise ValueError(f"global batch {global_batch} not divisible by {jax.process_count()} processes")
    return global_batch // jax.process_count()


def train_pipeline(config, cfg: ModelConfig, data_dir: str, batch: int, mesh=None) -> pipelines.Pipeline:
    d = config.data
    opts = loader_options(config, batch_bytes=batch * d.get("num_samples", 1) * cfg.num_frames * cfg.img_size**2 * 3,
                          log=True)
    if mesh is not None:  # feed the rows of the global batch this process's devices hold (= 1-process batches)
        opts = dataclasses.replace(opts, shard_index=sharding.process_batch_block(mesh))
    if config.task == "pretrain":
        return pipelines.pretrain_pipeline(
            data_dir, d.train_split, batch_size=batch, seed=config.seed,
            geometry=pipelines.ClipGeometry(cfg.num_frames, d.sampling_rate, cfg.img_size),
            mask=masking.MaskGenerator.for_model(cfg),
            augment=pipelines.PretrainAugment(
                num_samples=d.num_samples, fixed_crop_size=d.fixed_crop_size,
                multiscale_scales=tuple(d.multiscale_scales) or None, multiscale_resize=d.multiscale_resize),
            options=opts,
        )
    return pipelines.finetune_train_pipeline(
        data_dir, d.train_split, batch_size=batch, seed=config.seed,
        geometry=pipelines.ClipGeometry(cfg.num_frames, d.sampling_rate, cfg.img_size),
        augment=pipelines.FinetuneAugment(
            rand_augment=d.rand_augment or None, crop_scale=tuple(d.crop_scale) if d.crop_scale else None,
            flip_probability=d.flip_probability, erase_probability=d.erase_probability,
            rand_augment_on=d.rand_augment_on, dct_downscale=d.jpeg_dct_downscale),
        options=opts,
    )


def eval_pipeline(config, cfg: ModelConfig, data_dir: str, split: str, mesh) -> pipelines.Pipeline:
    d = config.data
    return pipelines.eval_pipeline(
        data_dir, split, batch_size=local_batch_size(config.eval.batch_size, mesh),
        geometry=pipelines.ClipGeometry(cfg.num_frames, d.sampling_rate, cfg.img_size),
        views=pipelines.EvalViews(config.eval.num_segments, config.eval.num_crops, d.jpeg_dct_downscale),
        options=loader_options(config),
    )


def schedule_and_optimizer(config, cfg: ModelConfig, abstract_params, steps_per_epoch: int, global_batch: int):
    o = config.optim
    total = int(o.get("total_steps") or o.epochs * steps_per_epoch)
    warmup = int(o.get("warmup_steps") or o.warmup_epochs * steps_per_epoch)
    peak = optim.scaled_lr(o.base_lr, global_batch)
    min_lr = optim.scaled_lr(o.min_lr, global_batch)
    table = optim.warmup_cosine_table(peak, min_lr, warmup, total)
    rules = []
    if config.task == "pretrain" and cfg.family == "tpsbt" and cfg.svfap_reverse_ctx == "full_embedding":
        rules.append(lambda name: optim.svfap_pretrain_unused(name, cfg.stage_depths))  # Q4: no grad, no decay
    trainable = tuple(o.get("trainable", ()) or ())
    if trainable:  # e.g. a linear probe: everything else is frozen (no update, no decay, no optimiser state)
        rules.append(lambda name: not name.startswith(trainable))
    frozen = (lambda name: any(r(name) for r in rules)) if rules else None
    skip = set(o.get("skip_weight_decay", ()))
    tx, report = optim.build_optimizer(
        abstract_params, schedule=optim.schedule_from_table(table), weight_decay=o.weight_decay,
        betas=tuple(o.betas), eps=o.eps, layer_decay=o.get("layer_decay"),
        num_layers=cfg.num_blocks if o.get("layer_decay") else None, skip_weight_decay=skip, frozen=frozen,
        grad_clip=o.get("grad_clip"), corrected_region_token_decay=o.get("corrected_region_token_decay", False),
        corrected_downsampler_layer_ids=o.get("corrected_downsampler_layer_ids", False),
        stage_depths=cfg.stage_depths if cfg.family == "tpsbt" else None,
    )
    return tx, report, table, total


def initial_params(config, cfg: ModelConfig) -> dict | None:
    """Parameters to start fine-tuning from (``config.init_from``), or None for random init."""
    src = config.get("init_from")
    if not src:
        return None
    src = os.path.abspath(os.path.expanduser(src))
    if os.path.isdir(src):
        d = src if os.path.exists(os.path.join(src, convert.MODEL_JSON)) else os.path.join(src, "export")
        params, src_cfg, _ = convert.load_converted(d)
        sd = convert.flax_to_torch(params, src_cfg)
    else:
        from facemae_jax import torch_io

        sd, _ = torch_io.load_state_dict(src)
        sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    if cfg.mode == "finetune":
        params, report = convert.pretrain_to_finetune(sd, cfg, rng_seed=config.seed, source=src)
        print(f"[init] {src}: {len(report['dropped'])} keys dropped, initialised {report['initialised']}", flush=True)
    else:
        params, _ = convert.torch_to_flax(sd, cfg, source=src)
        print(f"[init] {src}: all {len(sd)} tensors loaded", flush=True)
    return params


def create_state(model, cfg: ModelConfig, tx, mesh, rules, seed: int, init_params: dict | None):
    """Fresh train state, created directly with its shardings (no full host copy for random init)."""
    abstract = registry.abstract_params(model)
    param_sh = sharding.param_shardings(registry.logical_axes(model), abstract, mesh, rules)
    example = registry.example_inputs(cfg, batch=1)

    def make(params):
        params = jax.lax.with_sharding_constraint(params, param_sh)
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    if init_params is None:
        state = jax.jit(lambda key: make(nn.meta.unbox(model.init({"params": key, "dropout": key}, *example)["params"])))(
            jax.random.key(seed))
    else:
        state = jax.jit(make)(jax.device_put(jax.tree_util.tree_map(np.asarray, init_params), param_sh))
    return state, param_sh


# ------------------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Logger:
    """TensorBoard (tensorboardX, no TensorFlow) + a JSON-lines file; only process 0 writes."""

    workdir: str

    def __post_init__(self):
        self.active = jax.process_index() == 0
        if self.active:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(self.workdir, "tb"))
            self.jsonl = open(os.path.join(self.workdir, "metrics.jsonl"), "a")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.active:
            return
        for k, v in values.items():
            self.tb.add_scalar(k, float(v), step)
        row = {"step": step, **{k: float(v) for k, v in values.items()}}
        if "train/loss" in values:  # short keys for comparing runs from outside (configs/smoke.py logs every step)
            row.update(loss=float(values["train/loss"]), num_processes=jax.process_count())
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.active:
            self.tb.close()
            self.jsonl.close()


def _finetune_kwargs(config) -> dict[str, Any]:
    f = config.finetune
    mix = None
    if f.get("mixup_alpha", 0) > 0 or f.get("cutmix_alpha", 0) > 0:
        mix = dict(mixup_alpha=f.mixup_alpha, cutmix_alpha=f.cutmix_alpha, prob=f.mixup_prob,
                   switch_prob=f.switch_prob)
    on_device = config.data.get("rand_augment_on", "host") == "device" and config.data.get("rand_augment")
    return dict(task=config.data.get("task", "classification"), label_smoothing=f.label_smoothing, mixup=mix,
                regression_loss=f.get("regression_loss", "mse"),
                rand_augment=randaugment.DeviceRandAugment.from_string(config.data.rand_augment) if on_device else None)


def make_train_step(config, model, cfg: ModelConfig, tx):
    """The (unjitted) step of this job: pre-training or fine-tuning, as ``run`` trains it (also what the parity
    tool's training-step check and benchmarks/train_step.py run)."""
    if config.task == "pretrain":
        return steps.make_pretrain_step(model, cfg, tx, config.seed, frame_diff=config.pretrain.frame_diff,
                                        diff_weight=config.pretrain.get("diff_weight"))
    return steps.make_finetune_step(model, cfg, tx, config.seed, **_finetune_kwargs(config))


def run(config, workdir: str, mode: str = "train", checkpoint: str | None = None) -> dict[str, Any]:
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    compilation_cache.enable(config.compilation_cache_dir)
    if mode == "eval":
        return run_eval_only(config, workdir, checkpoint)
    if mode != "train":
        raise ValueError(f"unknown mode {mode!r} (train | eval | kfold)")
    cfg = model_config(config)
    model = registry.create_model(cfg)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    rules = [tuple(r) for r in config.sharding_rules]
    data_dir = ensure_dataset(config)
    info = dataset_info(data_dir)
    batch = local_batch_size(config.batch_size, mesh)
    train_pipe = train_pipeline(config, cfg, data_dir, batch, mesh)
    spe = train_pipe.steps_per_epoch
    if not spe:
        raise ValueError(f"split {config.data.train_split!r} has fewer clips than one global batch")
    if config.get("final_eval", True) or config.get("eval_every_steps", 0):  # empty/missing: fail now, not at the end
        pipelines.DatasetSplit.open(data_dir, config.data.get("eval_split") or config.data.train_split)
    abstract = registry.abstract_params(model)
    tx, opt_report, lr_table, total_steps = schedule_and_optimizer(config, cfg, abstract, spe, config.batch_size)
    stop_at = int(config.optim.get("stop_after_steps") or 0) or (
        int(config.optim.stop_after_epochs * spe) if config.optim.get("stop_after_epochs") else total_steps)
    stop_at = min(stop_at, total_steps)

    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                                 async_save=config.checkpoint.get("async_save", True))
    resume_step = ckpt.latest_step()
    init = initial_params(config, cfg) if resume_step is None else None
    state, param_sh = create_state(model, cfg, tx, mesh, rules, config.seed, init)
    it = iter(train_pipe)
    if resume_step is not None:
        state_sh = jax.tree_util.tree_map(lambda x: x.sharding, state)
        target = ckpt_lib.abstract_with_shardings(jax.eval_shape(lambda: state), state_sh)
        state, data_state, resume_step = ckpt.restore(target, resume_step)  # verified; may fall back to an older one
        it.set_state(data_state)
        print(f"[resume] restored step {resume_step} from {ckpt.directory}", flush=True)
    start = int(jax.device_get(state["step"]))

    task = config.data.get("task", "classification")
    train_step = jax.jit(make_train_step(config, model, cfg, tx), donate_argnums=0)

    is_main = jax.process_index() == 0
    if is_main:
        _write_run_summary(workdir, config, cfg, mesh, opt_report, info, spe, total_steps, stop_at, abstract,
                           param_sh)
    logger = Logger(workdir)
    log_every = config.get("log_every_steps", 50)
    eval_every = config.get("eval_every_steps", 0)
    ckpt_every = config.checkpoint.every_steps
    from data_pipelines import progress  # tqdm on a terminal, a plain line every few seconds in a log

    # an explicit disable= overrides tqdm's own TQDM_DISABLE handling, so honour it here (log files stay readable)
    quiet = os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    bar = progress.bar(total=stop_at, initial=start, desc=config.task, unit="step", disable=not is_main or quiet,
               dynamic_ncols=True)
    pending: list[tuple[int, dict]] = []
    window_losses: list[float] = []
    window_zero: list[float] = []  # pre-training: the zero-prediction baseline of the same batches
    t_window, clips_window = time.time(), 0
    input_wait = input_timing.InputWaitMeter()
    result: dict[str, Any] = {}

    def drain(upto_all: bool) -> None:
        """Fetch finished steps' metrics (all, or all but the newest) and stop on a non-finite loss."""
        nonlocal pending
        keep = 0 if upto_all else 1
        while len(pending) > keep:
            s, m = pending.pop(0)
            m = jax.device_get(m)
            if not bool(m["finite"]):
                latest = ckpt.latest_step()  # the message says only what was checked (issue 18)
                kept = (f"The newest checkpoint in {ckpt.directory} is step {latest}, saved when every earlier "
                        "step's loss was finite (its checksums are verified when it is restored)" if latest is not None
                        else "No checkpoint was saved before it")
                raise TrainingDiverged(
                    f"non-finite loss/gradient/update at step {s} (loss {float(m['loss'])}, grad norm "
                    f"{float(m['grad_norm'])}): the update was skipped and training stopped. {kept}. Lower the "
                    "learning rate or check the data, then rerun the same command."
                )
            window_losses.append(float(m["loss"]))
            if "zero_loss" in m:
                window_zero.append(float(m["zero_loss"]))
            last_metrics.update({k: float(v) for k, v in m.items() if k != "finite"})

    last_metrics: dict[str, float] = {}
    preemption = distributed.PreemptionWatch()
    audit = _ClipPositionLog(workdir, config, train_pipe, batch) if config.get("log_clip_positions") else None
    try:
        for step in range(start, stop_at):
            batch_np = input_wait.next(it)
            if audit:
                audit.write(step)
            state, m = train_step(state, sharding.put_batch(batch_np, mesh))
            pending.append((step, m))
            clips_window += config.batch_size
            drain(upto_all=False)
            done = step + 1
            bar.update(1)
            if done % log_every == 0 or done == stop_at:
                drain(upto_all=True)
                dt = time.time() - t_window
                vals = {
                    "train/loss": float(np.mean(window_losses)) if window_losses else float("nan"),
                    "train/grad_norm": last_metrics.get("grad_norm", float("nan")),
                    "train/lr": float(lr_table[min(step, len(lr_table) - 1)]),
                    "perf/clips_per_s": clips_window / max(dt, 1e-9),
                    "perf/step_time_s": dt / max(len(window_losses), 1),
                    "perf/input_wait_fraction": input_wait.window(),
                }
                if window_zero:  # < 1: the model predicts masked content better than the trivial all-zero guess
                    vals["train/loss_vs_zero"] = float(np.sum(window_losses) / np.sum(window_zero))
                logger.scalars(done, vals)
                bar.set_postfix(loss=f"{vals['train/loss']:.4f}", lr=f"{vals['train/lr']:.2e}",
                                input_wait=f"{vals['perf/input_wait_fraction']:.0%}")
                warning = input_wait.warning(vals["perf/input_wait_fraction"], done, input_timing.HINT)
                if warning and is_main:
                    bar.write(warning)  # printed also when the bar itself is disabled
                window_losses.clear()
                window_zero.clear()
                t_window, clips_window = time.time(), 0
            if done % ckpt_every == 0 and done != stop_at:
                drain(upto_all=True)
                ckpt.save(done, state, it.get_state())
            if done != stop_at and preemption.reached(done):  # SIGTERM on any process: all stop at this step
                drain(upto_all=True)
                if ckpt.latest_step() != done:
                    ckpt.save(done, state, it.get_state(), force=True)
                ckpt.wait()
                logger.close()
                raise distributed.Preempted(f"checkpoint of step {done} saved in {ckpt.directory}; rerun the same "
                                            "command to resume")
            if eval_every and done % eval_every == 0 and done != stop_at:
                drain(upto_all=True)
                result = periodic_eval(config, cfg, model, state["params"], mesh, data_dir, info, workdir, done,
                                       logger)
        drain(upto_all=True)
        if ckpt.latest_step() != stop_at:  # a rerun of a finished job only re-evaluates and re-exports
            ckpt.save(stop_at, state, it.get_state(), force=True)
        ckpt.wait()
    finally:  # also on divergence / Ctrl-C: let pending asynchronous checkpoint writes finish
        preemption.close()
        if audit:
            audit.close()
        bar.close()
        it.close()
        ckpt.wait()
    if config.get("final_eval", True):
        result = periodic_eval(config, cfg, model, state["params"], mesh, data_dir, info, workdir, stop_at, logger,
                               final=True)
    export(workdir, state["params"], cfg, config, info, stop_at)
    logger.close()
    ckpt.close()
    return result


class _ClipPositionLog:
    """``log_clip_positions``: every process appends the split positions of the clips in each of its training
    batches to ``workdir/clip_positions/process<i>.jsonl`` ({"step", "positions"}), computed from the pipeline's
    index stream (nothing extra is read). An audit of the data sharding: over all processes, one epoch of the
    global stream holds every clip once."""

    def __init__(self, workdir: str, config, pipe: pipelines.Pipeline, batch_clips: int):
        self.positions = pipelines.training_clip_positions(len(pipe.record_indices), batch_size=batch_clips,
                                                           seed=config.seed, options=pipe.options)
        os.makedirs(os.path.join(workdir, "clip_positions"), exist_ok=True)
        self.file = open(os.path.join(workdir, "clip_positions", f"process{jax.process_index()}.jsonl"), "a")

    def write(self, step: int) -> None:
        self.file.write(json.dumps({"step": step, "positions": self.positions[step].tolist()}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# Periodic evals reuse one compiled step per (model, config) instead of re-jitting a new closure every time.
@functools.lru_cache(maxsize=8)
def _jitted_eval_step(model, cfg: ModelConfig):
    return jax.jit(steps.make_eval_step(model, cfg))


@functools.lru_cache(maxsize=8)
def _jitted_pretrain_eval_step(model, cfg: ModelConfig, frame_diff: bool):
    return jax.jit(steps.make_pretrain_eval_step(model, cfg, frame_diff=frame_diff))


def periodic_eval(config, cfg, model, params, mesh, data_dir, info, workdir, step, logger, final=False):
    out_dir = os.path.join(workdir, "eval")
    if config.task == "pretrain":
        return reconstruction_report(config, cfg, model, params, mesh, data_dir, out_dir, step, logger)
    task = config.data.get("task", "classification")
    pipe = eval_pipeline(config, cfg, data_dir, config.data.eval_split, mesh)
    eval_fn = _jitted_eval_step(model, cfg)
    tag = "final" if final else f"step{step}"
    res = evaluate.run_eval(eval_fn, params, pipe, mesh, task=task, class_names=info.get("class_names"),
                            target_names=info.get("target_names"), out_dir=out_dir, tag=tag)
    if task == "classification":
        logger.scalars(step, {"eval/uar": res["uar"], "eval/war": res["war"]})
        if jax.process_index() == 0:
            print(f"[eval step {step}] {config.data.eval_split}: UAR {100 * res['uar']:.2f}  "
                  f"WAR {100 * res['war']:.2f}  ({res['num_clips']} clips, "
                  f"{config.eval.num_segments}x{config.eval.num_crops} views)", flush=True)
    else:
        logger.scalars(step, {f"eval/{k}": v for k, v in res.get("mean", {}).items()})
        if jax.process_index() == 0:
            print(f"[eval step {step}] {json.dumps(res.get('mean', {}))}", flush=True)
    return res


def reconstruction_report(config, cfg, model, params, mesh, data_dir, out_dir, step, logger):
    """Eval loss on a fixed batch of the pretrain split + the MAE-DFER-paper style reconstruction figure."""
    d = config.data
    n = sharding.global_batch_divisor(mesh)
    pipe = pipelines.pretrain_pipeline(
        data_dir, d.eval_split or d.train_split, batch_size=n, seed=config.seed + 1,
        geometry=pipelines.ClipGeometry(cfg.num_frames, d.sampling_rate, cfg.img_size),
        mask=masking.MaskGenerator.for_model(cfg),
        # no augmentation, but frames stored larger than the model input (64 px clips, 32 px model) are resized:
        # the one scale 1.0 crops the whole (square) frame, a no-op resize when it already is img_size
        augment=pipelines.PretrainAugment(num_samples=1, fixed_crop_size=d.fixed_crop_size,
                                          multiscale_scales=(1.0,), multiscale_resize=d.multiscale_resize),
        options=pipelines.LoaderOptions(),
    )
    it = iter(pipe)
    batch = next(it)
    it.close()
    rows = n // jax.process_count()  # every process loads the fixed batch and feeds its block of it
    first = sharding.process_batch_block(mesh) * rows
    fd = config.pretrain.frame_diff
    loss, zero, pred = _jitted_pretrain_eval_step(model, cfg, fd)(
        params, sharding.put_batch({k: v[first:first + rows] for k, v in batch.items()}, mesh))
    loss, zero = float(loss), float(zero)
    logger.scalars(step, {"eval/recon_loss": loss, "eval/recon_loss_vs_zero": loss / zero})
    res = {"recon_loss": loss, "recon_loss_vs_zero": loss / zero}
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"reconstruction_step{step}.png")
        try:
            from facemae_jax import visualize

            visualize.reconstruction_figure(batch["video"][first], batch["mask"][first],
                                            sharding.local_rows(pred)[0], cfg, fd, path)
            res["figure"] = path
        except ImportError as e:  # the figure is a report, not part of training
            logging.warning("no reconstruction figure: %s", e)
        print(f"[eval step {step}] reconstruction loss {loss:.4f}" + (f", figure {path}" if "figure" in res else ""),
              flush=True)
    return res


def export(workdir, params, cfg: ModelConfig, config, info, step) -> None:
    """Final model in the converted format (orbax params + model.json) for predict / extract / eval / init_from."""
    host = sharding.to_host(params)  # every process: orbax's save below is collective (process 0 writes)
    # "task" is what the head predicts (inference reads it); "job" is how the model was trained
    task = "pretrain" if config.task == "pretrain" else config.data.get("task", "classification")
    meta = {"model_name": config.model.name, "step": int(step), "task": task, "job": config.task,
            "sampling_rate": int(config.data.sampling_rate), "dataset": info.get("name"),
            "class_names": info.get("class_names"), "target_names": info.get("target_names")}
    convert.save_converted(os.path.join(workdir, "export"), host, cfg, meta)


def run_eval_only(config, workdir: str, checkpoint: str | None) -> dict[str, Any]:
    """``--mode=eval --checkpoint=X``: X is a workdir (its export/), a converted dir, or an official .pth/.npz."""
    if not checkpoint:
        checkpoint = workdir
    cfg = model_config(config)
    path = os.path.abspath(os.path.expanduser(checkpoint))
    if os.path.isdir(path):
        d = path if os.path.exists(os.path.join(path, convert.MODEL_JSON)) else os.path.join(path, "export")
        params, ckpt_cfg, _ = convert.load_converted(d)
        cfg = ckpt_cfg
    else:
        from facemae_jax import torch_io

        sd, _ = torch_io.load_state_dict(path)
        params, _ = convert.torch_to_flax({k: np.asarray(v, np.float32) for k, v in sd.items()}, cfg, source=path)
    model = registry.create_model(cfg)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    rules = [tuple(r) for r in config.sharding_rules]
    sh = sharding.param_shardings(registry.logical_axes(model), registry.abstract_params(model), mesh, rules)
    params = jax.device_put(jax.tree_util.tree_map(np.asarray, params), sh)
    data_dir = ensure_dataset(config)
    info = dataset_info(data_dir)
    logger = Logger(workdir)
    res = periodic_eval(config, cfg, model, params, mesh, data_dir, info, workdir, 0, logger, final=True)
    logger.close()
    return res


def _write_run_summary(workdir, config, cfg, mesh, opt_report, info, spe, total, stop_at, abstract, param_sh):
    n = registry.count_params(abstract)
    lines = [
        f"model: {config.model.name} ({cfg.family}, {cfg.mode}) {n:,} parameters",
        f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{jax.process_count()} process(es); {sharding.describe(param_sh, abstract)}",
        f"data: {info.get('name')} split {config.data.train_split!r}, {spe} steps/epoch at global batch "
        f"{config.batch_size}",
        f"schedule: {total} steps in total, stopping at {stop_at}",
        opt_report.summary() if hasattr(opt_report, "summary") else "",
    ]
    text = "\n".join(lines)
    print(text, flush=True)
    with open(os.path.join(workdir, "run_summary.txt"), "w") as f:
        f.write(text + "\n")
