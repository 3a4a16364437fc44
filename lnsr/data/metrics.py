"""GLUE metrics in numpy (no scikit-learn / scipy needed)."""
from __future__ import annotations

import numpy as np


def accuracy(pred, label) -> float:
    pred, label = np.asarray(pred), np.asarray(label)
    return float((pred == label).mean()) if label.size else 0.0


def f1(pred, label, positive=1) -> float:
    """Binary F1 of the positive class; 0 when there is no true or predicted positive (sklearn's default)."""
    pred, label = np.asarray(pred) == positive, np.asarray(label) == positive
    tp = float(np.sum(pred & label))
    denom = float(np.sum(pred) + np.sum(label))
    return 2 * tp / denom if denom else 0.0


def f1_macro(pred, label) -> float:
    """Unweighted mean of the per-class F1 over the classes present in labels or predictions
    (sklearn's ``f1_score(average="macro")``)."""
    pred, label = np.asarray(pred), np.asarray(label)
    classes = np.union1d(pred, label)
    return float(np.mean([f1(pred, label, positive=c) for c in classes])) if classes.size else 0.0


def matthews(pred, label) -> float:
    """Matthews correlation, multi-class (Gorodkin's R_K; the binary formula for two classes); 0 when
    it is undefined (sklearn's convention)."""
    pred, label = np.asarray(pred), np.asarray(label)
    classes, inv = np.unique(np.concatenate([label, pred]), return_inverse=True)
    k, n = len(classes), len(label)
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (inv[:n], inv[n:]), 1.0)   # rows: true class, columns: predicted class
    t, p = conf.sum(1), conf.sum(0)
    c, s = np.trace(conf), conf.sum()
    denom = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denom) if denom else 0.0


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt(np.sum(xc * xc) * np.sum(yc * yc))
    return float(np.sum(xc * yc) / denom) if denom else 0.0


def rankdata(x) -> np.ndarray:
    """Ranks 1..n, ties get the average of their ranks (as scipy.stats.rankdata's default)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y) -> float:
    return pearson(rankdata(x), rankdata(y))


METRIC_FUNCS = {"accuracy": accuracy, "f1": f1, "f1_macro": f1_macro, "mcc": matthews, "pearson": pearson, "spearman": spearman}


def compute_metrics(names, pred, label) -> dict:
    """``{name: value}`` for the task's metric names, from predictions (class ids or scores) and labels."""
    return {n: METRIC_FUNCS[n](pred, label) for n in names}
