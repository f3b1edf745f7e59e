"""Quality metrics in plain numpy, shared by training (threshold choice), export and evaluation.

They live in serving because serving cannot import torch or training, while both of those can
import serving: one implementation for every side of the contract.
"""

from __future__ import annotations

import numpy as np


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the rank statistic (ties get their average rank)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def confusion(pred: np.ndarray, labels: np.ndarray) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) of boolean predictions against boolean labels."""
    pred = np.asarray(pred).ravel().astype(bool)
    labels = np.asarray(labels).ravel().astype(bool)
    tp = int(np.count_nonzero(pred & labels))
    fp = int(np.count_nonzero(pred & ~labels))
    fn = int(np.count_nonzero(~pred & labels))
    tn = int(np.count_nonzero(~pred & ~labels))
    return tp, fp, fn, tn


def binary_scores(pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Precision, recall, F1, IoU, accuracy and balanced accuracy; empty ratios are 0 (or 1 for
    IoU/precision when there is nothing to find and nothing was found)."""
    tp, fp, fn, tn = confusion(pred, labels)
    nothing = tp + fp + fn == 0
    precision = tp / (tp + fp) if tp + fp else float(nothing)
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    iou = tp / (tp + fp + fn) if not nothing else 1.0
    tpr = recall
    tnr = tn / (tn + fp) if tn + fp else 1.0
    total = tp + fp + fn + tn
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "iou": iou,
        "accuracy": (tp + tn) / total if total else float("nan"),
        "balanced_accuracy": 0.5 * (tpr + tnr),
    }


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold that maximises F1 of the change class on validation scores.

    F1 rather than accuracy or balanced accuracy because changes are rare: plain accuracy is best
    when nothing is ever flagged, and balanced accuracy accepts a false-alarm rate that, over the
    many unchanged patches of a scene, paints far more false change than true change.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if not labels.any():
        return 0.5
    # exact: every distinct score is a candidate; counts by cumulative sums over sorted scores
    order = np.argsort(-scores, kind="mergesort")
    s_sorted, l_sorted = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]  # end of each tie group
    tp = np.cumsum(l_sorted)[last]
    fp = (last + 1) - tp
    fn = labels.sum() - tp
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    return float(s_sorted[last[int(np.argmax(f1))]])
