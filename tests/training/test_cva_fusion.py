import numpy as np
import pytest

from serving.cva import cva
from training.datasets.scenes import ScenePair
from training.evaluation import pixel_counts
from training.experiments.cva_fusion import best_threshold, f1_curve, measure


def brute_f1(score: np.ndarray, truth: np.ndarray, t: float) -> float:
    return pixel_counts(score >= t, truth.astype(bool)).scores()["f1"]


def test_f1_curve_is_the_f1_at_every_distinct_threshold() -> None:
    rng = np.random.default_rng(0)
    score = rng.integers(0, 12, (9, 11)).astype(np.float64)  # many ties
    truth = rng.random((9, 11)) < 0.3
    values, f1s = f1_curve(score, truth)
    assert list(values) == sorted(set(score.ravel()), reverse=True)
    for v, f in zip(values, f1s, strict=True):
        assert f == pytest.approx(brute_f1(score, truth, v))


def test_best_threshold_pools_the_pairs() -> None:
    a = np.array([[0.9, 0.1]])
    b = np.array([[0.5, 0.4]])
    ta, tb = np.array([[1, 0]]), np.array([[1, 0]])
    t = best_threshold([a, b], [ta, tb])
    assert t == 0.5  # >= 0.5 finds both changes with no false alarm


def pair(seed: int, name: str) -> ScenePair:
    rng = np.random.default_rng(seed)
    before = rng.integers(0, 60, (40, 48, 3)).astype(np.uint8)
    after = before.copy()
    mask = np.zeros((40, 48), np.uint8)
    mask[10:18, 20:30] = 1
    after[mask == 1] += 120  # a real change
    after[30:36, 5:15] += 110  # a trivial one, bright too
    return ScenePair(name, before, after, mask, ("red", "green", "blue"))


def test_a_gate_on_the_real_change_removes_the_trivial_one() -> None:
    pairs = [pair(1, "a"), pair(2, "b")]
    gate = []
    for p in pairs:
        prob = np.full(p.mask.shape, 0.05, np.float32)
        prob[8:20, 18:32] = 0.95  # the learned model knows which bright change is real
        gate.append(prob)
    rows, alone = measure(pairs, gate, (0.0, 1.0))
    by = {(r.pair, r.exponent): r for r in rows}
    for p in pairs:
        # e = 0 is CVA itself: the same Otsu mask
        assert by[p.name, 0.0].f1_otsu == pytest.approx(alone[p.name]["cva_otsu"])
        assert alone[p.name]["cva_otsu"] == pytest.approx(
            brute_f1(cva(p.before, p.after).mask.astype(float), p.mask, 0.5)
        )
        assert alone[p.name]["cva_otsu"] < 0.9  # CVA fires on the trivial change as well
        assert by[p.name, 1.0].f1_otsu > 0.95  # the gated score does not
        assert by[p.name, 1.0].f1_oracle >= by[p.name, 1.0].f1_otsu
        assert by[p.name, 1.0].f1_cross > 0.95  # the other pair's threshold transfers here


def test_the_window_quiets_single_pixel_noise_and_window_1_is_the_raw_magnitude() -> None:
    rng = np.random.default_rng(3)
    p = pair(4, "noisy")
    after = p.after.copy()
    after[30:36, 5:15] = p.before[30:36, 5:15]  # no trivial block here: salt instead
    ys, xs = rng.integers(0, 40, 60), rng.integers(0, 48, 60)
    after[ys, xs] = np.clip(p.before[ys, xs].astype(int) + 150, 0, 255)  # isolated bright pixels
    after[p.mask == 1] = np.clip(p.before[p.mask == 1].astype(int) + 120, 0, 255)
    noisy = ScenePair("noisy", p.before, after, p.mask, p.bands)
    ones = [np.ones(p.mask.shape, np.float32)]
    rows, alone = measure([noisy], ones, (0.0,), (1, 3))
    by = {r.window: r for r in rows}
    assert by[1].f1_otsu == pytest.approx(alone["noisy"]["cva_otsu"])  # window 1: CVA itself
    assert by[3].f1_otsu > by[1].f1_otsu + 0.1  # the salt falls below the cut once averaged
