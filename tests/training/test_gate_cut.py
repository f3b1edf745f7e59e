import math

import numpy as np
import pytest

from serving.cva import gate_cut
from training.experiments.gate_cut import (
    Form,
    Map,
    Result,
    Rule,
    choose,
    choose_form,
    large_change,
    measure,
    pooled_false_alarm,
    robust_cut,
    rules,
    unchanged_windows,
)


def test_robust_cut_is_the_servers_cut_or_the_floor_alone() -> None:
    score = np.random.default_rng(0).exponential(size=(300, 200)).astype(np.float32)
    assert robust_cut(6.0, 0.0)(score) == gate_cut(score, 6.0, 0.0)
    assert robust_cut(math.inf, 1.5)(score) == 1.5
    # over the whole scene: the formula with exact lower medians
    v = np.sort(score.ravel().astype(np.float64))
    median = v[(v.size - 1) // 2]
    mad = np.sort(np.abs(v - median))[(v.size - 1) // 2]
    assert robust_cut(6.0, 0.0, "scene")(score) == median + 6.0 * 1.4826 * mad


def test_unchanged_windows_keep_their_margin() -> None:
    truth = np.zeros((300, 300), bool)
    truth[140, 60] = True  # inside window (128, 0); 12 px below window (0, 0)
    assert unchanged_windows(truth) == [(0, 128), (128, 128)]


def test_measure_and_choose_follow_the_stated_criterion() -> None:
    rng = np.random.default_rng(1)
    score = rng.exponential(0.15, (256, 256)).astype(np.float32)
    truth = np.zeros((256, 256), bool)
    truth[10:30, 10:30] = True
    score[truth] += 5.0
    m = Map("model:pair", score, truth)
    results = measure([m], rules())
    by = {r.rule: r for r in results}
    assert by["median + 4 SD of the bulk, floor 1.25"].f1["model:pair"] > 0.95
    assert by["top 2.0%"].eligible is False and by["otsu"].eligible
    # the whole scene's median is change once most of a scene changed: that rule misses it all
    assert by["median + 4 SD of the scene, floor 1.25"].large_change_recall < 0.1
    assert not by["median + 4 SD of the scene, floor 1.25"].eligible
    assert by["median + 4 SD of the bulk, floor 1.25"].large_change_recall > 0.99
    # the unchanged windows are the three away from the change: the floor keeps them empty
    assert by["median + 4 SD of the bulk, floor 1.25"].windows["model:pair"] == 3
    assert by["median + 4 SD of the bulk, floor 1.25"].false_alarm["model:pair"] < 0.001
    # a fixed fraction flags its share of an unchanged window whatever it holds
    assert by["top 2.0%"].false_alarm["model:pair"] == pytest.approx(0.02, abs=1e-3)
    chosen = choose(results, ["model:pair"], 0.01)
    assert chosen.eligible and pooled_false_alarm(chosen, ["model:pair"]) <= 0.01
    best = max(
        r.f1["model:pair"]
        for r in results
        if r.eligible and pooled_false_alarm(r, ["model:pair"]) <= 0.01
    )
    assert chosen.f1["model:pair"] == best


def test_false_alarm_pools_windows_not_maps() -> None:
    r = Result("x", True, {"a": 0.5, "b": 0.5}, {"a": 0.10, "b": 0.0}, {"a": 1, "b": 9}, 1.0)
    assert pooled_false_alarm(r, ["a", "b"]) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="no eligible"):
        choose([r], ["a", "b"], 0.001)
    assert Rule("otsu", True, float).eligible


def test_a_form_fuses_the_large_change_as_it_fuses_the_maps() -> None:
    server, truth = large_change()
    assert np.array_equal(server, large_change(form=Form(5, 1.0))[0])
    squared, _ = large_change(form=Form(5, 2.0))
    wide, _ = large_change(form=Form(9, 1.0))
    # p < 1 everywhere: squaring it lowers every score by p, most where the model says no change
    assert (squared < server).all()
    ratio = squared / server
    assert np.allclose(ratio[truth], 0.9) and ratio[76:].max() <= 0.2 + 1e-6
    assert not np.array_equal(wide, server)


def test_choose_form_takes_the_best_allowed_rule_of_any_form() -> None:
    def result(name: str, f1: float, alarm: float, eligible: bool = True) -> Result:
        return Result(
            name, eligible, {"v": f1, "h": 0.9}, {"v": alarm, "h": 0.0}, {"v": 4, "h": 4}, 1.0
        )

    by_form = {
        Form(5, 1.0): [result("a", 0.30, 0.005), result("b", 0.40, 0.02)],
        Form(3, 2.0): [result("c", 0.35, 0.009), result("d", 0.50, 0.001, eligible=False)],
        Form(9, 1.0): [result("e", 0.60, 0.05)],  # nothing allowed: skipped, not an error
    }
    form, chosen = choose_form(by_form, ["v"], 0.01)
    assert (form, chosen.rule) == (Form(3, 2.0), "c")
    with pytest.raises(ValueError, match="any form"):
        choose_form({Form(9, 1.0): by_form[Form(9, 1.0)]}, ["v"], 0.01)
