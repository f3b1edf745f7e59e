"""serving.quality against small examples worked out by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from serving.quality import auroc, best_threshold, binary_scores, confusion


def _pairwise_auroc(scores: list[float], labels: list[int]) -> float:
    """P(score of a positive > score of a negative), ties counting one half."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


# --------------------------------------------------------------------------------------------
# auroc


@pytest.mark.parametrize(
    ("scores", "labels", "expected"),
    [
        # the classic: 3 of 4 (positive, negative) pairs ordered correctly
        ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),
        ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], 1.0),
        ([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1], 0.0),
        # a tie between a positive and a negative counts one half: (0.5 + 1 + 1 + 1) / 4
        ([0.2, 0.5, 0.5, 0.9], [0, 0, 1, 1], 0.875),
        ([0.5, 0.5], [0, 1], 0.5),
        # every score equal: every pair is a tie
        ([0.3] * 7, [0, 1, 0, 0, 1, 1, 0], 0.5),
        # positives 0.7, 0.7 against negatives 0.1, 0.8: (1 + 0 + 1 + 0) / 4
        ([0.7, 0.7, 0.1, 0.8], [1, 1, 0, 0], 0.5),
        ([1, 2, 3], [True, False, True], 0.5),
    ],
)
def test_auroc_hand_examples(scores: list[float], labels: list[int], expected: float) -> None:
    assert auroc(np.array(scores), np.array(labels)) == pytest.approx(expected, abs=1e-12)
    assert _pairwise_auroc(scores, labels) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1], []])
def test_auroc_single_class_is_nan(labels: list[int]) -> None:
    assert math.isnan(auroc(np.linspace(0, 1, len(labels)), np.array(labels, dtype=int)))


def test_auroc_matches_pairwise_with_many_ties() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        n = int(rng.integers(2, 30))
        scores = rng.integers(0, 4, n) / 4.0  # few distinct values: lots of ties
        labels = rng.integers(0, 2, n)
        if labels.all() or not labels.any():
            continue
        assert auroc(scores, labels) == pytest.approx(
            _pairwise_auroc(list(scores), list(labels)), abs=1e-12
        )


def test_auroc_accepts_2d_inputs_and_nonbool_labels() -> None:
    scores = np.array([[0.1, 0.4], [0.35, 0.8]])
    labels = np.array([[0, 0], [2, 5]])  # nonzero = positive
    assert auroc(scores, labels) == pytest.approx(0.75)


# --------------------------------------------------------------------------------------------
# confusion and binary_scores


def test_binary_scores_hand_example() -> None:
    pred = np.array([1, 1, 0, 0, 1], bool)
    labels = np.array([1, 0, 1, 0, 1], bool)
    assert confusion(pred, labels) == (2, 1, 1, 1)  # tp, fp, fn, tn
    s = binary_scores(pred, labels)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["iou"] == pytest.approx(2 / 4)
    assert s["accuracy"] == pytest.approx(3 / 5)
    assert s["balanced_accuracy"] == pytest.approx(0.5 * (2 / 3 + 1 / 2))


def test_binary_scores_nothing_to_find_and_nothing_found() -> None:
    s = binary_scores(np.zeros(4, bool), np.zeros(4, bool))
    assert s == {
        "precision": 1.0,
        "recall": 1.0,
        "f1": 1.0,
        "iou": 1.0,
        "accuracy": 1.0,
        "balanced_accuracy": 1.0,
    }


def test_binary_scores_missed_everything() -> None:
    s = binary_scores(np.zeros(4, bool), np.array([1, 1, 0, 0], bool))
    assert s["precision"] == 0.0 and s["recall"] == 0.0 and s["f1"] == 0.0 and s["iou"] == 0.0
    assert s["accuracy"] == 0.5 and s["balanced_accuracy"] == 0.5


def test_binary_scores_only_false_alarms() -> None:
    s = binary_scores(np.array([1, 0, 0], bool), np.zeros(3, bool))
    assert s["precision"] == 0.0 and s["recall"] == 1.0 and s["f1"] == 0.0 and s["iou"] == 0.0
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert s["balanced_accuracy"] == pytest.approx(0.5 * (1.0 + 2 / 3))


def test_binary_scores_empty_accuracy_is_nan() -> None:
    assert math.isnan(binary_scores(np.zeros(0, bool), np.zeros(0, bool))["accuracy"])


# --------------------------------------------------------------------------------------------
# best_threshold


def test_best_threshold_hand_example() -> None:
    # pred = score >= t. F1 per candidate threshold:
    #   0.9: tp1 fp0 fn2 -> 2/4   0.8: tp2 fp0 fn1 -> 4/5   0.7: tp2 fp1 fn1 -> 4/6
    #   0.6: tp3 fp1 fn0 -> 6/7   0.3: tp3 fp2 fn0 -> 6/8   0.2: tp3 fp3 fn0 -> 6/9
    scores = np.array([0.3, 0.9, 0.6, 0.2, 0.8, 0.7])
    labels = np.array([0, 1, 1, 0, 1, 0])
    assert best_threshold(scores, labels) == 0.6
    assert binary_scores(scores >= 0.6, labels)["f1"] == pytest.approx(6 / 7)


def test_best_threshold_keeps_tie_groups_together() -> None:
    # 0.5 flags both tied patches (tp1 fp1 -> F1 2/3); 0.1 adds a false alarm (2/4)
    assert best_threshold(np.array([0.5, 0.5, 0.1]), np.array([1, 0, 0])) == 0.5
    # a tie group is taken whole: at 0.4 three tied negatives come with the second positive
    scores, labels = np.array([0.9, 0.4, 0.4, 0.4, 0.4]), np.array([1, 1, 0, 0, 0])
    assert binary_scores(scores >= 0.9, labels)["f1"] == pytest.approx(2 / 3)
    assert binary_scores(scores >= 0.4, labels)["f1"] == pytest.approx(4 / 7)
    assert best_threshold(scores, labels) == 0.9
    # equal F1 (2/3 at 0.9, 4/6 at 0.4): the higher threshold, the one that flags less, wins
    assert best_threshold(scores[:4], labels[:4]) == 0.9


def test_best_threshold_is_the_f1_maximiser_brute_force() -> None:
    rng = np.random.default_rng(11)
    for _ in range(100):
        n = int(rng.integers(1, 15))
        scores = rng.integers(0, 6, n) / 5.0
        labels = rng.integers(0, 2, n)
        if not labels.any():
            continue
        t = best_threshold(scores, labels)
        assert t in scores
        best = max(binary_scores(scores >= c, labels)["f1"] for c in np.unique(scores))
        assert binary_scores(scores >= t, labels)["f1"] == pytest.approx(best)


@pytest.mark.parametrize("scores", [[0.1, 0.9, 0.4], [0.5], []])
def test_best_threshold_without_positives_is_half(scores: list[float]) -> None:
    assert best_threshold(np.array(scores), np.zeros(len(scores), int)) == 0.5


def test_best_threshold_all_positive_takes_everything() -> None:
    scores = np.array([0.2, 0.7, 0.4])
    assert best_threshold(scores, np.ones(3, int)) == 0.2


def test_pairwise_helper_sanity() -> None:
    for labels in itertools.product([0, 1], repeat=4):
        if 0 < sum(labels) < 4:
            assert _pairwise_auroc([0.1, 0.2, 0.3, 0.4], list(labels)) == pytest.approx(
                auroc(np.array([0.1, 0.2, 0.3, 0.4]), np.array(labels))
            )
