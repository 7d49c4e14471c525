"""Metrics: hand-computed classification numbers, view aggregation, regression, reports."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from facemae_jax import metrics

# 3 classes, 6 samples:  true 0 0 0 1 1 2  /  pred 0 0 1 1 2 2
Y_TRUE = [0, 0, 0, 1, 1, 2]
Y_PRED = [0, 0, 1, 1, 2, 2]
CM = [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_confusion_matrix_rows_are_truth_columns_are_predictions():
    cm = metrics.confusion_matrix(Y_TRUE, Y_PRED, 3)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, CM)
    with pytest.raises(ValueError, match="outside"):
        metrics.confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="length"):
        metrics.confusion_matrix([0, 1], [0], 3)


def test_hand_computed_war_uar_recall_and_f1():
    cm = np.array(CM)
    assert metrics.war(cm) == pytest.approx(4 / 6)
    np.testing.assert_allclose(metrics.per_class_recall(cm), [2 / 3, 1 / 2, 1.0])
    assert metrics.uar(cm) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # precision = [2/2, 1/2, 1/2]; F1 = 2tp / (support + predicted) = [4/5, 2/4, 2/3]
    f1 = metrics.f1_scores(cm)
    assert f1["macro"] == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)
    assert f1["weighted"] == pytest.approx((3 * 4 / 5 + 2 * 1 / 2 + 1 * 2 / 3) / 6)
    assert f1["micro"] == pytest.approx(4 / 6)


# DFEW-like imbalance (7 classes, disgust rare): per class (support, correct); every error goes to "neutral",
# neutral's own errors go to "sad".
DFEW_LIKE = [(500, 464), (400, 308), (450, 340), (350, 270), (250, 165), (30, 3), (100, 39)]


def _dfew_like_labels():
    y_true, y_pred = [], []
    for c, (support, correct) in enumerate(DFEW_LIKE):
        wrong = 1 if c == 2 else 2
        y_true += [c] * support
        y_pred += [c] * correct + [wrong] * (support - correct)
    return np.array(y_true), np.array(y_pred)


def test_imbalanced_split_has_uar_well_below_war():
    y_true, y_pred = _dfew_like_labels()
    report = metrics.classification_report(
        y_true, y_pred, 7, ["happy", "sad", "neutral", "angry", "surprise", "disgust", "fear"]
    )
    expected_war = (464 + 308 + 340 + 270 + 165 + 3 + 39) / 2080
    expected_uar = (464 / 500 + 308 / 400 + 340 / 450 + 270 / 350 + 165 / 250 + 3 / 30 + 39 / 100) / 7
    assert report["num_samples"] == 2080
    assert report["war"] == pytest.approx(expected_war)  # 0.7639
    assert report["uar"] == pytest.approx(expected_uar)  # 0.6250
    assert report["war"] - report["uar"] > 0.13
    assert report["per_class_recall"]["disgust"] == pytest.approx(0.1)
    assert report["support"]["neutral"] == 450
    assert report["f1_micro"] == pytest.approx(expected_war)
    assert report["f1_weighted"] > report["f1_macro"]  # rare classes are the bad ones
    # neutral: tp 340, support 450, predicted = 340 + all errors of the other classes
    predicted_neutral = 340 + sum(s - c for i, (s, c) in enumerate(DFEW_LIKE) if i != 2)
    cm = np.array(report["confusion_matrix"])
    assert cm[:, 2].sum() == predicted_neutral
    f1_neutral = 2 * 340 / (450 + predicted_neutral)
    f1_all = [2 * c / (s + cm[:, i].sum()) for i, (s, c) in enumerate(DFEW_LIKE)]
    assert f1_all[2] == pytest.approx(f1_neutral)
    assert report["f1_macro"] == pytest.approx(np.mean(f1_all))


def test_classes_absent_from_the_truth_are_left_out_of_uar_and_macro_f1():
    # class 2 never occurs in the truth but is predicted once; class 3 occurs nowhere
    y_true = [0, 0, 1, 1]
    y_pred = [0, 2, 1, 1]
    cm = metrics.confusion_matrix(y_true, y_pred, 4)
    recall = metrics.per_class_recall(cm)
    assert recall[0] == 0.5 and recall[1] == 1.0 and np.isnan(recall[2]) and np.isnan(recall[3])
    assert metrics.uar(cm) == pytest.approx(0.75)
    f1 = metrics.f1_scores(cm)
    # F1: class0 2*1/(2+1), class1 2*2/(2+2), class2 0 (predicted, never true); class3 excluded
    assert f1["macro"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert f1["weighted"] == pytest.approx((2 * 2 / 3 + 2 * 1) / 4)
    report = metrics.classification_report(y_true, y_pred, 4)
    assert report["per_class_recall"]["3"] is None
    with pytest.raises(ValueError, match="empty"):
        metrics.war(np.zeros((3, 3)))


def test_top_k_accuracy():
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
    y = np.array([2, 1, 2])
    assert metrics.top_k_accuracy(probs, y, 1) == pytest.approx(1 / 3)
    assert metrics.top_k_accuracy(probs, y, 2) == pytest.approx(2 / 3)
    assert metrics.top_k_accuracy(probs, y, 3) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# View aggregation
# ---------------------------------------------------------------------------------------------------------------

LN3 = math.log(3.0)


def test_aggregate_views_averages_softmax_probabilities_and_drops_duplicates_and_padding():
    # clip 7: four views (segment, crop), one repeated with different logits (padding duplicate, must be ignored)
    # clip 3: two views; plus one padded row marked invalid
    clip = [7, 7, 3, 7, 7, 3, 7, 3]
    view = [(0, 0), (0, 1), (0, 0), (1, 0), (1, 1), (1, 0), (1, 1), (0, 0)]
    logits = np.array([
        [0.0, LN3],   # clip 7: p = [1/4, 3/4]
        [0.0, LN3],   # clip 7: same (the two spatial crops are identical views)
        [LN3, 0.0],   # clip 3: [3/4, 1/4]
        [0.0, 0.0],   # clip 7: [1/2, 1/2]
        [LN3, 0.0],   # clip 7: [3/4, 1/4]
        [0.0, 0.0],   # clip 3: [1/2, 1/2]
        [50.0, 0.0],  # clip 7, duplicate key (1, 1): ignored
        [0.0, 50.0],  # clip 3, padding: invalid
    ])
    valid = [True] * 7 + [False]
    labels = [1, 1, 0, 1, 1, 0, 1, 1]  # the padded row's label is garbage and must not matter
    out = metrics.aggregate_views(clip, np.array(view), logits, valid=valid, labels=labels)
    np.testing.assert_array_equal(out.clip_ids, [3, 7])
    np.testing.assert_array_equal(out.num_views, [2, 4])
    np.testing.assert_allclose(out.probs[0], [(3 / 4 + 1 / 2) / 2, (1 / 4 + 1 / 2) / 2])
    np.testing.assert_allclose(out.probs[1], [(1 / 4 + 1 / 4 + 1 / 2 + 3 / 4) / 4, (3 / 4 + 3 / 4 + 1 / 2 + 1 / 4) / 4])
    np.testing.assert_array_equal(out.predictions, [0, 1])
    np.testing.assert_array_equal(out.labels, [0, 1])
    np.testing.assert_allclose(out.probs.sum(1), 1.0)


def test_aggregate_views_uses_tuple_keys_that_string_concatenation_would_merge():
    # reference keys "1"+"11" and "11"+"1" are both "111" (Q20); tuples keep them apart
    out = metrics.aggregate_views([0, 0], np.array([(1, 11), (11, 1)]), np.array([[0.0, LN3], [LN3, 0.0]]))
    assert out.num_views.tolist() == [2]
    np.testing.assert_allclose(out.probs[0], [0.5, 0.5])
    # 1-D view ids work too
    out = metrics.aggregate_views([5, 5, 5], [0, 1, 0], np.array([[0.0, LN3], [LN3, 0.0], [9.0, 0.0]]))
    np.testing.assert_allclose(out.probs[0], [0.5, 0.5])


def test_aggregate_views_rejects_inconsistent_labels_and_bad_shapes():
    with pytest.raises(ValueError, match="different labels"):
        metrics.aggregate_views([0, 0], [0, 1], np.zeros((2, 3)), labels=[1, 2])
    with pytest.raises(ValueError, match="rows"):
        metrics.aggregate_views([0, 0, 1], [0, 1], np.zeros((3, 3)))
    with pytest.raises(ValueError, match="no valid rows"):
        metrics.aggregate_views([0], [0], np.zeros((1, 3)), valid=[False])


# ---------------------------------------------------------------------------------------------------------------
# Regression
# ---------------------------------------------------------------------------------------------------------------


def test_ccc_pcc_mae_known_values():
    t = np.array([1.0, 2.0, 3.0, 4.0, 5.0])  # population variance 2
    assert metrics.ccc(t, t) == pytest.approx(1.0)
    assert metrics.ccc(t, t + 1.0) == pytest.approx(2 * 2 / (2 * 2 + 1.0))  # 0.8: shift penalised
    assert metrics.pcc(t, t + 1.0) == pytest.approx(1.0)  # ... but not by PCC
    assert metrics.ccc(t, 2 * t) == pytest.approx(2 * 4 / (2 + 8 + 9))  # cov 4, var_p 8, mean gap 3
    assert metrics.ccc(t, -t) == pytest.approx(-2 * 2 / (2 + 2 + 36))
    assert metrics.pcc(t, -t) == pytest.approx(-1.0)
    assert metrics.mae(t, t + 1.0) == pytest.approx(1.0)
    assert metrics.one_minus_mae(t / 10, t / 10 + 0.05) == pytest.approx(0.95)
    assert np.isnan(metrics.pcc(t, np.ones(5)))


def test_regression_report_per_target_and_mean():
    t = np.stack([np.arange(5.0), np.arange(5.0) ** 2], axis=1)
    p = t + np.array([0.0, 1.0])
    ccc = metrics.ccc(t, p)
    assert ccc.shape == (2,) and ccc[0] == pytest.approx(1.0)
    var1 = np.var(t[:, 1])
    assert ccc[1] == pytest.approx(2 * var1 / (2 * var1 + 1))
    report = metrics.regression_report(t, p, ["valence", "arousal"])
    assert report["ccc"]["per_target"]["arousal"] == pytest.approx(ccc[1])
    assert report["ccc"]["mean"] == pytest.approx(ccc.mean())
    assert report["mae"]["per_target"] == {"valence": 0.0, "arousal": 1.0}
    assert report["one_minus_mae"]["mean"] == pytest.approx(0.5)
    assert report["pcc"]["mean"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------


def test_save_confusion_matrix_writes_readable_png_and_csv(tmp_path):
    from matplotlib import image

    y_true, y_pred = _dfew_like_labels()
    cm = metrics.confusion_matrix(y_true, y_pred, 7)
    names = ["happy", "sad", "neutral", "angry", "surprise", "disgust", "fear"]
    png, csv_path = tmp_path / "out" / "cm.png", tmp_path / "out" / "cm.csv"
    metrics.save_confusion_matrix(cm, names, png, csv_path)

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(png)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels[..., :3].std() > 0.05  # not a blank canvas

    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true\\pred", *names, "support", "recall_%"]
    counts = np.array([[int(x) for x in r[1:8]] for r in rows[1:]])
    np.testing.assert_array_equal(counts, cm)
    assert [r[0] for r in rows[1:]] == names
    assert int(rows[6][8]) == 30 and float(rows[6][9]) == pytest.approx(10.0)
    assert float(rows[1][9]) == pytest.approx(100 * 464 / 500, abs=0.005)


def test_kfold_table_reproduces_the_published_totals():
    # FINETUNING §7: the "Total" is the mean of per-fold UAR and WAR (%)
    published = [  # MAE-DFER DFEW, MAE-DFER MAFW (reproduced), SVFAP DFEW (reproduced)
        ([(62.59, 74.88), (61.96, 72.49), (64.00, 74.91), (63.07, 74.05), (65.42, 75.81)], (63.41, 74.43)),
        ([(36.11, 46.71), (42.37, 54.82), (46.25, 58.87), (45.42, 59.50), (41.66, 55.27)], (42.36, 55.03)),
        ([(63.63, 75.31), (58.82, 71.68), (64.88, 74.96), (63.73, 74.65), (68.39, 77.44)], (63.89, 74.81)),
    ]
    for folds, total in published:
        table = metrics.kfold_table([{"uar": u, "war": w} for u, w in folds])
        assert [r["fold"] for r in table["rows"]] == [1, 2, 3, 4, 5]
        assert table["rows"][2]["uar"] == folds[2][0]
        assert (round(table["mean"]["uar"], 2), round(table["mean"]["war"], 2)) == total
    # SVFAP MAFW: the mean of the printed folds is 43.512 / 56.318 but the README says 43.51 / 56.31 — the
    # README total was evidently taken from unrounded fold values (or truncated). Check the plain mean only.
    svfap_mafw = [(38.40, 49.10), (40.94, 53.95), (46.27, 59.68), (47.78, 61.30), (44.17, 57.56)]
    mean = metrics.kfold_table([{"uar": u, "war": w} for u, w in svfap_mafw])["mean"]
    assert mean["uar"] == pytest.approx(43.512) and mean["war"] == pytest.approx(56.318)
    with pytest.raises(KeyError, match="fold 2"):
        metrics.kfold_table([{"uar": 1.0, "war": 1.0}, {"uar": 1.0}])
