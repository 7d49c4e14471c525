"""Evaluation: the multi-view test protocol (FINETUNING.md §4.2) and its metrics files.

Every (clip, view) of the split is run once (the pipeline pads the last batch with ``valid=False`` rows);
per-view softmax probabilities are averaged per clip; UAR/WAR, per-class recall, F1 and the confusion matrix (PNG
+ CSV) are written to ``out_dir``. Regression heads get CCC/PCC/MAE instead.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import numpy as np

from facemae_jax import metrics, sharding


def _gather(x: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def run_eval(eval_fn, params, pipeline, mesh, *, task: str, class_names: Sequence[str] | None = None,
             target_names: Sequence[str] | None = None, out_dir: str | None = None, tag: str = "eval",
             progress: bool = True) -> dict[str, Any]:
    """Run ``eval_fn(params, batch) -> per-row logits (or regression outputs)`` over the whole eval pipeline and
    compute the metrics."""
    rows: dict[str, list[np.ndarray]] = {"out": [], "clip": [], "view": [], "valid": [], "label": []}
    it = iter(pipeline)
    total = pipeline.num_batches
    bar = None
    if progress and jax.process_index() == 0:
        from data_pipelines import progress as progress_bars  # plain lines when not a terminal

        bar = progress_bars.bar(total=total, desc=tag, leave=False, unit="batch")
    try:
        for _ in range(total):
            batch = next(it)
            dev = sharding.put_batch({"video": batch["video"]}, mesh)
            out = sharding.local_rows(eval_fn(params, dev), mesh)
            rows["out"].append(out)
            rows["clip"].append(batch["clip_index"])
            rows["view"].append(batch["view"])
            rows["valid"].append(batch["valid"])
            rows["label"].append(batch["label"])
            if bar:
                bar.update(1)
    finally:
        it.close()
        if bar:
            bar.close()
    cat = {k: _gather(np.concatenate(v)) for k, v in rows.items()}
    if task == "classification":
        agg = metrics.aggregate_views(cat["clip"], cat["view"], cat["out"], valid=cat["valid"], labels=cat["label"])
        pred = agg.probs.argmax(axis=1)
        k = agg.probs.shape[1]
        report = metrics.classification_report(agg.labels, pred, k, class_names)
        result = {"num_clips": int(len(agg.labels)), **report}
        if out_dir and jax.process_index() == 0:
            os.makedirs(out_dir, exist_ok=True)
            cm = metrics.confusion_matrix(agg.labels, pred, k)
            names = list(class_names) if class_names else [str(i) for i in range(k)]
            metrics.save_confusion_matrix(cm, names, os.path.join(out_dir, f"{tag}_confusion.png"),
                                          os.path.join(out_dir, f"{tag}_confusion.csv"))
            np.savez(os.path.join(out_dir, f"{tag}_predictions.npz"), clip_index=agg.clip_ids, probs=agg.probs,
                     labels=agg.labels)
    else:
        valid = cat["valid"].astype(bool)
        clip, out, lab = cat["clip"][valid], cat["out"][valid], cat["label"][valid]
        order = np.unique(clip)
        mean_out = np.stack([out[clip == c].mean(axis=0) for c in order])
        labels = np.stack([lab[clip == c][0] for c in order])
        result = {"num_clips": int(len(order)), **metrics.regression_report(labels, mean_out, target_names)}
    if out_dir and jax.process_index() == 0:
        with open(os.path.join(out_dir, f"{tag}_metrics.json"), "w") as f:
            json.dump(result, f, indent=2, default=_json_default)
    return result


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))
