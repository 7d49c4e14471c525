"""The trainer: pre-training, fine-tuning and evaluation from one config (read top to bottom).

``run(config, workdir, mode)`` is what ``launch.py`` calls. One code path from one CPU to a pod, and one for both
kinds of job: what differs between pre-training and fine-tuning (pipeline, step, frozen tensors, evaluation, what
the export predicts) is the job's :class:`~facemae_jax.tasks.Task`.

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
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from data_pipelines import dataset_info
from data_pipelines import pipeline as pipelines
from facemae_jax import checkpoint as ckpt_lib
from facemae_jax import compilation_cache, convert, distributed, input_timing, loading, optim, sharding, tasks
from facemae_jax.models import registry
from facemae_jax.models.config import ModelConfig


class TrainingDiverged(FloatingPointError):
    pass


# ------------------------------------------------------------------------------------------------------------
# Setup helpers
# ------------------------------------------------------------------------------------------------------------


def model_config(config) -> ModelConfig:
    return registry.get_config(config.model.name, **dict(config.model.overrides))


def ensure_dataset(config) -> str:
    """The dataset directory, built first when the config says how (the demo's synthetic data)."""
    d = os.path.abspath(os.path.expanduser(config.data.dir))
    info_path = dataset_info.path(d)
    synth = config.data.synthetic
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
        f"  python -m data_pipelines.build {config.data.builder or 'NAME'} --out {d} ...\n"
        "(see README 'Data'), or point --config.data.dir at an existing one."
    )


def _build_synthetic(d: str, synth) -> None:
    from data_pipelines import synthetic

    print(f"[data] {d} not found: generating synthetic face-expression videos ({dict(synth)})", flush=True)
    t0 = time.time()
    synthetic.build_dataset(d, **dict(synth))
    print(f"[data] generated in {time.time() - t0:.0f}s", flush=True)


def train_pipeline(task: tasks.Task, data_dir: str, batch: int, mesh) -> pipelines.Pipeline:
    """This process's share of every global batch: the rows its devices hold (= the 1-process batch row for row)."""
    opts = tasks.loader_options(task.config, batch_bytes=batch * task.clip_bytes(), log=True)
    opts = dataclasses.replace(opts, shard_index=sharding.process_batch_block(mesh))
    return task.train_pipeline(data_dir, batch, opts)


def schedule_and_optimizer(task: tasks.Task, abstract_params, steps_per_epoch: int, global_batch: int):
    cfg, o = task.cfg, task.config.optim
    total = int(o.total_steps or o.epochs * steps_per_epoch)
    warmup = int(o.warmup_steps or o.warmup_epochs * steps_per_epoch)
    peak = optim.scaled_lr(o.base_lr, global_batch)
    min_lr = optim.scaled_lr(o.min_lr, global_batch)
    table = optim.warmup_cosine_table(peak, min_lr, warmup, total)
    rules = task.frozen_rules()
    frozen = (lambda name: any(r(name) for r in rules)) if rules else None
    tx, report = optim.build_optimizer(
        abstract_params, schedule=optim.schedule_from_table(table), weight_decay=o.weight_decay,
        betas=tuple(o.betas), eps=o.eps, layer_decay=o.layer_decay,
        num_layers=cfg.num_blocks if o.layer_decay else None, skip_weight_decay=set(o.skip_weight_decay),
        frozen=frozen, grad_clip=o.grad_clip, corrected_region_token_decay=o.corrected_region_token_decay,
        corrected_downsampler_layer_ids=o.corrected_downsampler_layer_ids,
        stage_depths=cfg.stage_depths if cfg.family == "tpsbt" else None,
    )
    return tx, report, table, total


def initial_params(config, cfg: ModelConfig) -> dict | None:
    """Parameters to start from (``config.init_from``: any source :mod:`facemae_jax.loading` reads), or None for
    random init."""
    if not config.init_from:
        return None
    params, report = loading.load_params_into(config.init_from, cfg, seed=config.seed)
    print(f"[init] {report}", flush=True)
    return params


def create_state(model, cfg: ModelConfig, tx, mesh, rules, seed: int, init_params: dict | None):
    """Fresh train state, created under jit with explicit ``out_shardings`` (parameters by the rules, optimiser
    moments like their parameters): no host ever holds the whole state, nothing is left to propagation."""
    abstract = registry.abstract_params(model)
    param_sh = sharding.param_shardings(registry.logical_axes(model), abstract, mesh, rules)
    state_sh = sharding.state_shardings(tx, abstract, param_sh, mesh)
    example = registry.example_inputs(cfg, batch=1)

    def make(params):
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    if init_params is None:
        def init(key):
            return make(nn.meta.unbox(model.init({"params": key, "dropout": key}, *example)["params"]))

        state = jax.jit(init, out_shardings=state_sh)(jax.random.key(seed))
    else:
        params = jax.device_put(jax.tree_util.tree_map(np.asarray, init_params), param_sh)
        state = jax.jit(make, out_shardings=state_sh)(params)
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


def run(config, workdir: str, mode: str = "train", checkpoint: str | None = None) -> dict[str, Any]:
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    compilation_cache.enable(config.compilation_cache_dir)
    if mode == "eval":
        return run_eval_only(config, workdir, checkpoint)
    if mode != "train":
        raise ValueError(f"unknown mode {mode!r} (train | eval | kfold)")
    cfg = model_config(config)
    task = tasks.for_config(config, cfg)
    model = registry.create_model(cfg)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    rules = [tuple(r) for r in config.sharding_rules]
    data_dir = ensure_dataset(config)
    info = dataset_info.load(data_dir)
    batch = sharding.local_batch_size(config.batch_size, mesh)
    train_pipe = train_pipeline(task, data_dir, batch, mesh)
    spe = train_pipe.steps_per_epoch
    if not spe:
        raise ValueError(f"split {config.data.train_split!r} has fewer clips than one global batch")
    if config.final_eval or config.eval_every_steps:  # empty/missing: fail now, not at the end
        pipelines.DatasetSplit.open(data_dir, config.data.eval_split or config.data.train_split)
    abstract = registry.abstract_params(model)
    tx, opt_report, lr_table, total_steps = schedule_and_optimizer(task, abstract, spe, config.batch_size)
    stop_at = int(config.optim.stop_after_steps) or int(config.optim.stop_after_epochs * spe) or total_steps
    stop_at = min(stop_at, total_steps)

    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                                 async_save=config.checkpoint.async_save)
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

    train_step = jax.jit(task.train_step(model, tx), donate_argnums=0)

    is_main = jax.process_index() == 0
    if is_main:
        _write_run_summary(workdir, config, cfg, mesh, opt_report, info, spe, total_steps, stop_at, abstract,
                           param_sh)
    logger = Logger(workdir)
    log_every, eval_every = config.log_every_steps, config.eval_every_steps
    ckpt_every = config.checkpoint.every_steps
    from data_pipelines import progress  # tqdm on a terminal, a plain line every few seconds in a log

    # an explicit disable= overrides tqdm's own TQDM_DISABLE handling, so honour it here (log files stay readable)
    quiet = os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    bar = progress.bar(total=stop_at, initial=start, desc=task.name, unit="step", disable=not is_main or quiet,
               dynamic_ncols=True)
    pending: list[tuple[int, dict]] = []
    window_losses: list[float] = []
    window_zero: list[float] = []  # pre-training: the zero-prediction baseline of the same batches
    t_window, clips_window = time.time(), 0
    input_wait = input_timing.InputWaitMeter()
    eval_dir = os.path.join(workdir, "eval")
    result: dict[str, Any] = {}

    def drain(upto_all: bool) -> None:
        """Fetch finished steps' metrics (all, or all but the newest) and stop on a non-finite loss."""
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
    audit = _ClipPositionLog(workdir, config, train_pipe, batch) if config.log_clip_positions else None
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
                result = task.evaluate(model, state["params"], mesh, data_dir, info, eval_dir, done, logger,
                                       f"step{done}")
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
    if config.final_eval:
        result = task.evaluate(model, state["params"], mesh, data_dir, info, eval_dir, stop_at, logger, "final")
    export(workdir, state["params"], task, info, stop_at)
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


def export(workdir, params, task: tasks.Task, info, step) -> None:
    """Final model in the converted format (orbax params + model.json) for predict / extract / eval / init_from."""
    config = task.config
    host = sharding.to_host(params)  # every process: orbax's save below is collective (process 0 writes)
    # "task" is what the head predicts (inference reads it); "job" is how the model was trained
    meta = {"model_name": config.model.name, "step": int(step), "task": task.export_task(), "job": task.name,
            "sampling_rate": int(config.data.sampling_rate), "dataset": info.get("name"),
            "class_names": info.get("class_names"), "target_names": info.get("target_names")}
    convert.save_converted(os.path.join(workdir, "export"), host, task.cfg, meta)


def run_eval_only(config, workdir: str, checkpoint: str | None) -> dict[str, Any]:
    """``--mode=eval --checkpoint=X``: X is any source :mod:`facemae_jax.loading` reads (default: this workdir)."""
    path = os.path.abspath(os.path.expanduser(checkpoint or workdir))
    is_file = not os.path.isdir(path)
    loaded = loading.load_model(path, model=config.model.name,
                                overrides=dict(config.model.overrides) if is_file else None)
    task = tasks.for_config(config, loaded.cfg)
    model = registry.create_model(loaded.cfg)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    rules = [tuple(r) for r in config.sharding_rules]
    sh = sharding.param_shardings(registry.logical_axes(model), registry.abstract_params(model), mesh, rules)
    params = jax.device_put(jax.tree_util.tree_map(np.asarray, loaded.params), sh)
    data_dir = ensure_dataset(config)
    logger = Logger(workdir)
    res = task.evaluate(model, params, mesh, data_dir, dataset_info.load(data_dir), os.path.join(workdir, "eval"), 0,
                        logger, "eval_only")
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
