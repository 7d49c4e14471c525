"""Evaluation metrics of the reference protocol (FINETUNING §4), in plain numpy.

Classification is computed from a confusion matrix over *video-level* predictions: every test video is seen in
several views (2 temporal segments x 2 identical crops), each view's logits go through a softmax, the
probabilities are averaged per video and the argmax is the prediction (``aggregate_views``). The reported
numbers are WAR (overall accuracy) and UAR (mean per-class recall), plus weighted/macro/micro F1; multi-fold
datasets report the plain mean of per-fold UAR and WAR (``kfold_table``).

Regression metrics (CCC, PCC, MAE, 1 - MAE) serve the dimensional-emotion / personality heads.
No jax here: metrics run on host arrays gathered after evaluation.
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib
from typing import Mapping, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------------------


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """``cm[i, j]`` = number of samples of true class i predicted as j (int64, ``[K, K]``)."""
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {y_true.size} vs {y_pred.size}")
    for label, arr in (("y_true", y_true), ("y_pred", y_pred)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{label} has labels outside [0, {num_classes}): min {arr.min()}, max {arr.max()}")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def _check_cm(cm) -> np.ndarray:
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    if cm.sum() == 0:
        raise ValueError("confusion matrix is empty (no samples)")
    return cm


def war(cm) -> float:
    """Weighted average recall = overall accuracy = trace / total."""
    cm = _check_cm(cm)
    return float(np.trace(cm) / cm.sum())


def per_class_recall(cm) -> np.ndarray:
    """Diagonal / row sum; NaN for a class with no true samples (its recall is undefined, not zero)."""
    cm = _check_cm(cm)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def uar(cm) -> float:
    """Unweighted average recall = mean of per-class recall over the classes present in the ground truth.

    Every published test split contains every class, so the choice below only matters for small or partial
    sets: a class without true samples has no defined recall and is left out of the mean (the convention of
    balanced accuracy), rather than counted as 0, which would punish a subset for classes it cannot contain.
    Predictions *of* such a class still lower the recall of the true classes they were taken from.
    """
    return float(np.nanmean(per_class_recall(cm)))


def f1_scores(cm) -> dict[str, float]:
    """Weighted, macro and micro F1 with scikit-learn's conventions.

    Classes that appear neither in the truth nor in the predictions are left out of the macro average; a class
    with zero precision and recall has F1 0. Weighted = support-weighted mean; micro = accuracy (single-label).
    """
    cm = _check_cm(cm).astype(np.float64)
    tp = np.diag(cm)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    seen = denom > 0
    return {
        "weighted": float(np.sum(f1 * support) / support.sum()),
        "macro": float(f1[seen].mean()),
        "micro": float(tp.sum() / cm.sum()),
    }


def top_k_accuracy(probs, y_true, k: int) -> float:
    """Fraction of samples whose true class is among the k highest scores (the reference's acc@5 monitor)."""
    probs = np.asarray(probs)
    y_true = np.asarray(y_true).reshape(-1)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == y_true[:, None], axis=1)))


def classification_report(y_true, y_pred, num_classes: int, class_names: Sequence[str] | None = None) -> dict:
    """All reported classification numbers for one split, as a JSON-friendly dict (fractions, not %)."""
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    cm = confusion_matrix(y_true, y_pred, num_classes)
    recall = per_class_recall(cm)
    f1 = f1_scores(cm)
    return {
        "num_samples": int(cm.sum()),
        "war": war(cm),
        "uar": uar(cm),
        "per_class_recall": {n: (None if np.isnan(r) else float(r)) for n, r in zip(names, recall)},
        "support": {n: int(s) for n, s in zip(names, cm.sum(axis=1))},
        "f1_weighted": f1["weighted"],
        "f1_macro": f1["macro"],
        "f1_micro": f1["micro"],
        "confusion_matrix": cm.tolist(),
        "class_names": names,
    }


# ---------------------------------------------------------------------------------------------------------------
# Multi-view aggregation (FINETUNING §4.2, QUIRKS Q20 / Q28)
# ---------------------------------------------------------------------------------------------------------------


def softmax(logits, axis: int = -1) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


@dataclasses.dataclass(frozen=True)
class ClipPredictions:
    """Video-level results: ``probs[i]`` is the mean view probability of clip ``clip_ids[i]``."""

    clip_ids: np.ndarray  # [V] sorted clip indices
    probs: np.ndarray  # [V, K] float64
    num_views: np.ndarray  # [V] distinct views that were averaged
    labels: np.ndarray | None  # [V] per-clip label, when labels were given

    @property
    def predictions(self) -> np.ndarray:
        return np.argmax(self.probs, axis=1)


def _view_keys(view, n: int) -> list[tuple]:
    """Per-row hashable view key: a tuple, so (segment 1, crop 11) and (segment 11, crop 1) stay distinct (Q20)."""
    v = np.asarray(view)
    if v.shape[0] != n:
        raise ValueError(f"view has {v.shape[0]} rows, logits have {n}")
    if v.ndim == 1:
        return [(x.item(),) for x in v]
    return [tuple(x.item() for x in row) for row in v.reshape(n, -1)]


def aggregate_views(clip_index, view, logits, valid=None, labels=None) -> ClipPredictions:
    """Average per-view softmax probabilities per clip, counting every (clip, view) key once.

    Args:
      clip_index: ``[N]`` int, which test video each row belongs to.
      view: ``[N]`` view id, or ``[N, k]`` e.g. (temporal segment, spatial crop) pairs.
      logits: ``[N, K]`` raw scores.
      valid: optional ``[N]`` bool; False rows (batch padding) are dropped before anything else.
      labels: optional ``[N]`` int; returned per clip, and must agree across the views of a clip.

    Repeated keys come from the distributed sampler's padding (and from the identical spatial crops being
    separate views with distinct keys, which are *not* duplicates). As in the reference merge, the first row of a
    repeated key is kept and later ones are ignored; their logits are the same forward pass anyway.
    """
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, K], got shape {logits.shape}")
    n = logits.shape[0]
    clip_index = np.asarray(clip_index).reshape(-1)
    if clip_index.size != n:
        raise ValueError(f"clip_index has {clip_index.size} rows, logits have {n}")
    keep = np.ones(n, bool) if valid is None else np.asarray(valid, bool).reshape(-1)
    if keep.size != n:
        raise ValueError(f"valid has {keep.size} rows, logits have {n}")
    label_arr = None if labels is None else np.asarray(labels).reshape(-1)
    if label_arr is not None and label_arr.size != n:
        raise ValueError(f"labels has {label_arr.size} rows, logits have {n}")

    probs = softmax(logits, axis=1)
    views = _view_keys(view, n)
    seen: set[tuple] = set()
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    clip_label: dict[int, int] = {}
    for i in range(n):
        if not keep[i]:
            continue
        clip = int(clip_index[i])
        key = (clip, *views[i])
        if key in seen:
            continue
        seen.add(key)
        sums[clip] = sums.get(clip, 0.0) + probs[i]
        counts[clip] = counts.get(clip, 0) + 1
        if label_arr is not None:
            lab = int(label_arr[i])
            if clip_label.setdefault(clip, lab) != lab:
                raise ValueError(f"clip {clip} has views with different labels: {clip_label[clip]} and {lab}")
    if not sums:
        raise ValueError("no valid rows to aggregate")
    ids = np.array(sorted(sums), dtype=np.int64)
    num_views = np.array([counts[c] for c in ids], dtype=np.int64)
    mean = np.stack([sums[c] for c in ids]) / num_views[:, None]
    out_labels = np.array([clip_label[c] for c in ids], dtype=np.int64) if label_arr is not None else None
    return ClipPredictions(ids, mean, num_views, out_labels)


# ---------------------------------------------------------------------------------------------------------------
# Regression
# ---------------------------------------------------------------------------------------------------------------


def _as_columns(y_true, y_pred) -> tuple[np.ndarray, np.ndarray, bool]:
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} differ in shape")
    if t.ndim not in (1, 2) or t.shape[0] == 0:
        raise ValueError(f"expected [N] or [N, targets] with N > 0, got {t.shape}")
    single = t.ndim == 1
    return (t[:, None], p[:, None], single) if single else (t, p, single)


def _per_target(values: np.ndarray, single: bool):
    return float(values[0]) if single else values


def ccc(y_true, y_pred):
    """Lin's concordance correlation per target (population moments): 2 cov / (var_t + var_p + (mu_t - mu_p)^2).

    Unlike PCC it penalises bias and scale errors: a prediction shifted by d from a series of variance s^2 has
    CCC = 2 s^2 / (2 s^2 + d^2). Float for [N] input, array for [N, targets].
    """
    t, p, single = _as_columns(y_true, y_pred)
    mt, mp = t.mean(0), p.mean(0)
    cov = ((t - mt) * (p - mp)).mean(0)
    denom = t.var(0) + p.var(0) + (mt - mp) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return _per_target(2 * cov / denom, single)


def pcc(y_true, y_pred):
    """Pearson correlation per target (NaN when either series is constant)."""
    t, p, single = _as_columns(y_true, y_pred)
    tc, pc = t - t.mean(0), p - p.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (tc * pc).sum(0) / np.sqrt((tc**2).sum(0) * (pc**2).sum(0))
    return _per_target(r, single)


def mae(y_true, y_pred):
    """Mean absolute error per target."""
    t, p, single = _as_columns(y_true, y_pred)
    return _per_target(np.abs(t - p).mean(0), single)


def one_minus_mae(y_true, y_pred):
    """``1 - MAE`` per target: the "accuracy" used for personality traits scored in [0, 1]."""
    t, p, single = _as_columns(y_true, y_pred)
    return _per_target(1.0 - np.abs(t - p).mean(0), single)


def regression_report(y_true, y_pred, target_names: Sequence[str] | None = None) -> dict:
    """CCC, PCC, MAE and 1-MAE per target plus their mean over targets."""
    t, p, _ = _as_columns(y_true, y_pred)
    names = list(target_names) if target_names is not None else [str(i) for i in range(t.shape[1])]
    if len(names) != t.shape[1]:
        raise ValueError(f"{len(names)} target names for {t.shape[1]} targets")
    out: dict = {}
    for metric in (ccc, pcc, mae, one_minus_mae):
        values = np.atleast_1d(metric(t, p))
        out[metric.__name__] = {"per_target": dict(zip(names, map(float, values))), "mean": float(values.mean())}
    return out


# ---------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------


def save_confusion_matrix(cm, class_names: Sequence[str], png_path, csv_path) -> None:
    """Write the matrix as CSV (counts, support, recall %) and as a PNG heat map of row-normalised percentages.

    Rows are true classes, columns predictions; each PNG cell shows the row percentage and the count, so the
    recall of every class is on the diagonal.
    """
    # Agg canvas on a bare Figure: no pyplot global state, no GUI backend, safe in any process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = _check_cm(cm).astype(np.int64)
    k = cm.shape[0]
    if len(class_names) != k:
        raise ValueError(f"{len(class_names)} class names for a {k}x{k} matrix")
    support = cm.sum(axis=1)
    pct = np.divide(100.0 * cm, support[:, None], out=np.zeros(cm.shape), where=support[:, None] > 0)

    csv_path = pathlib.Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true\\pred", *class_names, "support", "recall_%"])
        for i, name in enumerate(class_names):
            w.writerow([name, *cm[i].tolist(), int(support[i]), f"{pct[i, i]:.2f}" if support[i] else ""])

    png_path = pathlib.Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    size = max(4.0, 0.8 * k + 2.0)
    fig = Figure(figsize=(size, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(pct, cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(k), labels=class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"UAR {100 * uar(cm):.2f}  WAR {100 * war(cm):.2f}  (n={int(cm.sum())})")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{pct[i, j]:.1f}%\n{cm[i, j]}", ha="center", va="center", fontsize=7,
                    color="white" if pct[i, j] > 50 else "black")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


def kfold_table(per_fold: Sequence[Mapping[str, float]], keys: Sequence[str] = ("uar", "war")) -> dict:
    """Per-fold rows and their arithmetic mean, as the papers report a multi-fold "Total".

    The reference total is the mean of the per-fold UAR and WAR (not metrics of the pooled predictions);
    ``keys`` selects the columns (all folds must have them).
    """
    if not per_fold:
        raise ValueError("no folds")
    rows = []
    for i, fold in enumerate(per_fold, start=1):
        missing = [k for k in keys if k not in fold]
        if missing:
            raise KeyError(f"fold {i} lacks {missing}")
        rows.append({"fold": i, **{k: float(fold[k]) for k in keys}})
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    return {"rows": rows, "mean": mean}
