"""What differs between a pre-training and a fine-tuning job, in one object each, so the trainer has no branches.

A task owns, for its kind of job:

* the training pipeline (``train_pipeline``): masked clips for pre-training, augmented labelled clips for
  fine-tuning, built from the config's ``data`` block (the one place the config's "off" spellings — ``""`` for
  strings, ``()`` for tuples — become the pipelines' ``None``);
* the training step (``train_step``, from :mod:`facemae_jax.steps`);
* the parameters the optimiser must leave alone (``frozen_rules``: SVFAP's dead pre-training tensors, Q4; a
  linear probe's frozen backbone);
* the evaluation (``evaluate``): multi-view UAR/WAR (or regression metrics) for fine-tuning, the reconstruction
  loss and figure for pre-training;
* what the exported model says it predicts (``export_task``).

``for_config(config)`` picks the task from ``config.task``. The trainer (:mod:`facemae_jax.train`), the parity tool's
step check and ``benchmarks/train_step.py`` all get their step from here, so they train the same thing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable

import jax
from absl import logging
from ml_collections import ConfigDict

from data_pipelines import pipeline as pipelines
from data_pipelines import worker_autotune
from facemae_jax import evaluate, masking, optim, randaugment, sharding, steps
from facemae_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Task:
    config: ConfigDict
    cfg: ModelConfig  # the job's model

    name = ""

    def train_pipeline(self, data_dir: str, batch_size: int, options: pipelines.LoaderOptions) -> pipelines.Pipeline:
        raise NotImplementedError

    def train_step(self, model, tx) -> Callable:
        """The unjitted ``(state, batch) -> (state, metrics)`` of this job."""
        raise NotImplementedError

    def frozen_rules(self) -> list[Callable[[str], bool]]:
        """Predicates on torch parameter names: True = no update, no decay, no optimiser state."""
        trainable = tuple(self.config.optim.trainable)
        if trainable:  # e.g. a linear probe: everything else is frozen
            return [lambda name: not name.startswith(trainable)]
        return []

    def evaluate(self, model, params, mesh, data_dir: str, info: dict, out_dir: str, step: int, logger,
                 tag: str) -> dict[str, Any]:
        """Metrics of ``params`` at ``step``; files in ``out_dir`` are named by ``tag`` ('step<N>', 'final' at the
        end of training, 'eval_only' for ``--mode=eval``, which so never overwrites a run's final metrics)."""
        raise NotImplementedError

    def export_task(self) -> str:
        """What the exported model's head predicts (inference reads it)."""
        raise NotImplementedError

    def clip_bytes(self) -> int:
        """Bytes of one clip's frames in a batch (sizes the loader's buffers)."""
        c = self.cfg
        return c.num_frames * c.img_size**2 * 3

    @property
    def geometry(self) -> pipelines.ClipGeometry:
        return pipelines.ClipGeometry(self.cfg.num_frames, self.config.data.sampling_rate, self.cfg.img_size)


class PretrainTask(Task):
    name = "pretrain"

    def mask(self) -> masking.MaskGenerator:
        return masking.MaskGenerator.for_model(self.cfg)

    def _pipeline(self, data_dir: str, split: str, batch_size: int, seed: int, options, num_samples: int,
                  multiscale_scales) -> pipelines.Pipeline:
        d = self.config.data
        augment = pipelines.PretrainAugment(num_samples=num_samples, fixed_crop_size=d.fixed_crop_size,
                                            multiscale_scales=multiscale_scales, multiscale_resize=d.multiscale_resize)
        return pipelines.pretrain_pipeline(data_dir, split, batch_size=batch_size, seed=seed, geometry=self.geometry,
                                           mask=self.mask(), augment=augment, options=options)

    def train_pipeline(self, data_dir, batch_size, options):
        d = self.config.data
        return self._pipeline(data_dir, d.train_split, batch_size, self.config.seed, options, d.num_samples,
                              tuple(d.multiscale_scales) or None)

    def clip_bytes(self) -> int:
        return self.config.data.num_samples * super().clip_bytes()

    def train_step(self, model, tx):
        p = self.config.pretrain
        return steps.make_pretrain_step(model, self.cfg, tx, self.config.seed, frame_diff=p.frame_diff,
                                        diff_weight=p.diff_weight)

    def frozen_rules(self):
        c = self.cfg
        rules = super().frozen_rules()
        if c.family == "tpsbt" and c.svfap_reverse_ctx == "full_embedding":
            rules.append(lambda name: optim.svfap_pretrain_unused(name, c.stage_depths))  # Q4: no grad, no decay
        return rules

    def evaluate(self, model, params, mesh, data_dir, info, out_dir, step, logger, tag):
        """Eval loss on a fixed batch of the eval split + the MAE-DFER-paper style reconstruction figure."""
        d = self.config.data
        n = sharding.global_batch_divisor(mesh)
        # no augmentation, but frames stored larger than the model input (64 px clips, 32 px model) are resized:
        # the one scale 1.0 crops the whole (square) frame, a no-op resize when it already is img_size
        pipe = self._pipeline(data_dir, d.eval_split or d.train_split, n, self.config.seed + 1,
                              pipelines.LoaderOptions(), 1, (1.0,))
        it = iter(pipe)
        batch = next(it)
        it.close()
        rows = n // jax.process_count()  # every process loads the fixed batch and feeds its block of it
        first = sharding.process_batch_block(mesh) * rows
        fd = self.config.pretrain.frame_diff
        loss, zero, pred = _jitted_pretrain_eval_step(model, self.cfg, fd)(
            params, sharding.put_batch({k: v[first:first + rows] for k, v in batch.items()}, mesh))
        loss, zero = float(loss), float(zero)
        logger.scalars(step, {"eval/recon_loss": loss, "eval/recon_loss_vs_zero": loss / zero})
        res: dict[str, Any] = {"recon_loss": loss, "recon_loss_vs_zero": loss / zero}
        if jax.process_index() == 0:
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, f"reconstruction_step{step}.png")
            try:
                from facemae_jax import visualize

                visualize.reconstruction_figure(batch["video"][first], batch["mask"][first],
                                                sharding.local_rows(pred, mesh)[0], self.cfg, fd, path)
                res["figure"] = path
            except ImportError as e:  # the figure is a report, not part of training
                logging.warning("no reconstruction figure: %s", e)
            print(f"[eval step {step}] reconstruction loss {loss:.4f}" + (f", figure {path}" if "figure" in res
                                                                          else ""), flush=True)
        return res

    def export_task(self) -> str:
        return "pretrain"


class FinetuneTask(Task):
    name = "finetune"

    def train_pipeline(self, data_dir, batch_size, options):
        d = self.config.data
        augment = pipelines.FinetuneAugment(
            rand_augment=d.rand_augment or None, crop_scale=tuple(d.crop_scale) or None,
            flip_probability=d.flip_probability, erase_probability=d.erase_probability,
            rand_augment_on=d.rand_augment_on, dct_downscale=d.jpeg_dct_downscale)
        return pipelines.finetune_train_pipeline(data_dir, d.train_split, batch_size=batch_size, seed=self.config.seed,
                                                 geometry=self.geometry, augment=augment, options=options)

    def train_step(self, model, tx):
        f, d = self.config.finetune, self.config.data
        mixup = None
        if f.mixup_alpha > 0 or f.cutmix_alpha > 0:
            mixup = dict(mixup_alpha=f.mixup_alpha, cutmix_alpha=f.cutmix_alpha, prob=f.mixup_prob,
                         switch_prob=f.switch_prob)
        device_ra = (randaugment.DeviceRandAugment.from_string(d.rand_augment)
                     if d.rand_augment_on == "device" and d.rand_augment else None)
        return steps.make_finetune_step(model, self.cfg, tx, self.config.seed, task=d.task,
                                        label_smoothing=f.label_smoothing, mixup=mixup,
                                        regression_loss=f.regression_loss, rand_augment=device_ra)

    def evaluate(self, model, params, mesh, data_dir, info, out_dir, step, logger, tag):
        """Multi-view metrics on the eval split (FINETUNING §4.2)."""
        config, d = self.config, self.config.data
        views = pipelines.EvalViews(config.eval.num_segments, config.eval.num_crops, d.jpeg_dct_downscale)
        pipe = pipelines.eval_pipeline(data_dir, d.eval_split,
                                       batch_size=sharding.local_batch_size(config.eval.batch_size, mesh),
                                       geometry=self.geometry, views=views, options=loader_options(config))
        res = evaluate.run_eval(_jitted_eval_step(model, self.cfg), params, pipe, mesh, task=d.task,
                                class_names=info.get("class_names"), target_names=info.get("target_names"),
                                out_dir=out_dir, tag=tag)
        if d.task == "classification":
            logger.scalars(step, {"eval/uar": res["uar"], "eval/war": res["war"]})
            if jax.process_index() == 0:
                print(f"[eval step {step}] {d.eval_split}: UAR {100 * res['uar']:.2f}  WAR {100 * res['war']:.2f}  "
                      f"({res['num_clips']} clips, {config.eval.num_segments}x{config.eval.num_crops} views)",
                      flush=True)
        else:
            logger.scalars(step, {f"eval/{k}": v for k, v in res.get("mean", {}).items()})
            if jax.process_index() == 0:
                print(f"[eval step {step}] {json.dumps(res.get('mean', {}))}", flush=True)
        return res

    def export_task(self) -> str:
        return self.config.data.task


TASKS = {"pretrain": PretrainTask, "finetune": FinetuneTask}


def for_config(config: ConfigDict, cfg: ModelConfig | None = None) -> Task:
    """The task of ``config.task`` for the job's model (``cfg``, default: the config's model)."""
    if config.task not in TASKS:
        raise ValueError(f"config.task must be one of {sorted(TASKS)}, got {config.task!r}")
    if cfg is None:
        from facemae_jax.models import registry

        cfg = registry.get_config(config.model.name, **dict(config.model.overrides))
    return TASKS[config.task](config, cfg)


def loader_options(config, batch_bytes: int | None = None, log: bool = False) -> pipelines.LoaderOptions:
    d = config.data
    choice = worker_autotune.choose(d.worker_count, d.prefetch_batches, d.worker_buffer_size, batch_bytes=batch_bytes)
    if log and jax.process_index() == 0:
        print(choice.describe(), flush=True)
    return pipelines.LoaderOptions(
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        worker_count=choice.worker_count,
        read_threads=d.read_threads,
        prefetch_batches=choice.prefetch_batches,
        worker_buffer_size=choice.worker_buffer_size,
    )


# Periodic evals reuse one compiled step per (model, config) instead of re-jitting a new closure every time.
@functools.lru_cache(maxsize=8)
def _jitted_eval_step(model, cfg: ModelConfig):
    return jax.jit(steps.make_eval_step(model, cfg))


@functools.lru_cache(maxsize=8)
def _jitted_pretrain_eval_step(model, cfg: ModelConfig, frame_diff: bool):
    return jax.jit(steps.make_pretrain_eval_step(model, cfg, frame_diff=frame_diff))
