"""Where should the cva-gated rule cut its score? Chosen on validation maps, reported held out.

A measurement behind :func:`serving.cva.gate_cut`. The gated score ``m5 * p`` (CVA's magnitude
averaged over :data:`~serving.cva.GATE_WINDOW` pixels square, times the served probability) is
unimodal and heavy-tailed, so Otsu splits it near its bulk: on a city with 1.6 % of its pixels
changed it flagged a fifth. Candidate cuts, each per scene:

* ``otsu``: the rule's first cut;
* ``top Q %``: a fixed fraction (shown for comparison; never eligible: it caps a large change
  and fills an unchanged pair);
* ``median + k SD of the scene, floor f``: ``max(f, median + k * 1.4826 * MAD)`` over the whole
  scene, its outliers, never below an absolute floor in score units (``k = inf``: the floor
  alone);
* ``median + k SD of the bulk, floor f``: the same over Otsu's lower class (the server's
  :func:`~serving.cva.gate_cut`), so that a change over much of the scene does not become the
  median.

Each cut is tried on each *fusion form* ``--windows`` x ``--exponents``: the score
``m_w * p ** e``, CVA's magnitude averaged over ``w`` pixels square times the probability to the
``e`` (the server's form is ``w = 5, e = 1``), so that the window and the weight of the model
are chosen with the cut, on the same maps.

Each candidate is scored on every map: pixel F1, and the share of pixels it flags inside
*unchanged windows* (128 x 128 windows with no change within 16 px, cut as scenes of their own):
what an unchanged pair would get; and its recall on a synthetic scene with 60 % of its rows
changed (:func:`large_change`): a rule that misses it (recall under 0.9) is not eligible. The
chosen form and rule are the best mean F1 over the ``validation`` maps among the eligible rules
(of every form) whose false-alarm share is at most ``--max-false-alarm``; ``held-out`` maps only
report it (every candidate's held-out F1 is written too, and each form's best, so nothing is
hidden). A map is ``MODEL:PAIR``: the pair's probability map served by that model of
``--models-dir``. Usage (writes ``docs/results/gate_cut_<tag>.{json,md}``):

    python -m training.experiments.gate_cut --dataset oscd --models-dir runs/gate-cut-models \\
        --models-dir models --validation bordeaux-val:bordeaux,loo-abudhabi:abudhabi,... \\
        --held-out sentinel2-rgbn:pisa,sentinel2-rgbn:rennes --windows 1,3,5,7,9 \\
        --exponents 0.5,1,1.5,2,3 --tag sentinel2-rgbn

(the validation models: ``docs/results/aerial.md``, "Cutting at the outliers of the score's
bulk").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from serving.config import ServerSettings
from serving.cva import (
    GATE_WINDOW,
    MAD_TO_SD,
    gate_cut,
    gate_magnitude,
    lower_median_of,
    otsu_threshold,
)
from training.datasets.registry import load_dataset
from training.evaluation import pixel_counts, served_scorer, write_atomic

ROOT = Path(__file__).resolve().parents[2]
SPREADS = (3.0, 4.0, 5.0, 6.0, 8.0)
FLOORS = (0.0, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25)
FRACTIONS = (0.02, 0.025, 0.03)
WINDOW, MARGIN = 128, 16
MIN_LARGE_CHANGE_RECALL = 0.9


@dataclass(frozen=True)
class Form:
    """How the score fuses CVA and the model: ``m_window * p ** exponent``."""

    window: int = GATE_WINDOW
    exponent: float = 1.0

    def __str__(self) -> str:
        return f"{self.window} x {self.window} mean x p^{self.exponent:g}"


@dataclass(frozen=True)
class Map:
    """One pair's gated score under one model and one form, with its truth."""

    name: str  # MODEL:PAIR
    score: np.ndarray  # (H, W) float32, m_w * p ** e
    truth: np.ndarray  # (H, W) bool


@dataclass(frozen=True)
class Rule:
    name: str
    eligible: bool  # per scene, not a fixed fraction (recall on a large change is measured too)
    cut: Callable[[np.ndarray], float]


def robust_cut(
    spread: float, floor: float, reference: str = "bulk"
) -> Callable[[np.ndarray], float]:
    """``max(floor, median + spread * 1.4826 * MAD)`` of the ``bulk`` (the server's
    :func:`~serving.cva.gate_cut`) or of the whole ``scene``; ``spread = inf``: the floor alone."""
    if math.isinf(spread):
        return lambda score: floor
    if reference == "bulk":
        return lambda score: gate_cut(score, spread, floor)

    def scene_cut(score: np.ndarray) -> float:
        flat = score.reshape(-1)
        median = lower_median_of(lambda: [flat])
        mad = lower_median_of(lambda: [np.abs(flat.astype(np.float64) - median)])
        return max(floor, median + spread * MAD_TO_SD * mad)

    return scene_cut


def rules() -> list[Rule]:
    out = [Rule("otsu", True, otsu_threshold)]
    out += [
        Rule(f"top {q:.1%}", False, lambda s, q=q: float(np.quantile(s, 1 - q))) for q in FRACTIONS
    ]
    for f in FLOORS[1:]:
        out.append(Rule(f"floor {f:g}", True, robust_cut(math.inf, f)))
    for reference in ("scene", "bulk"):
        for k in SPREADS:
            for f in FLOORS:
                name = f"median + {k:g} SD of the {reference}, floor {f:g}"
                out.append(Rule(name, True, robust_cut(k, f, reference)))
    return out


def large_change(
    changed: float = 0.6, seed: int = 0, form: Form = Form()
) -> tuple[np.ndarray, np.ndarray]:
    """The gated score and truth of a synthetic 4-band pair, 120 x 120, with ``changed`` of its
    rows changed (the model's probability high there and four rows beyond) and noise elsewhere:
    a flood over most of a tile, which a rule must not miss."""
    rng = np.random.default_rng(seed)
    before = rng.integers(900, 1100, (120, 120, 4)).astype(np.uint16)
    after = (before + rng.integers(-60, 60, before.shape)).astype(np.uint16)
    rows = round(120 * changed)
    after[:rows] += 400
    truth = np.zeros((120, 120), bool)
    truth[:rows] = True
    probability = rng.uniform(0.02, 0.2, (120, 120)).astype(np.float32)
    probability[: rows + 4] = 0.9
    fused = gate_magnitude(before, after, window=form.window) * probability**form.exponent
    return fused, truth


def unchanged_windows(truth: np.ndarray) -> list[tuple[int, int]]:
    """Top-left corners of the WINDOW-square windows with no change within MARGIN pixels."""
    h, w = truth.shape
    corners = []
    for y in range(0, h - WINDOW + 1, WINDOW):
        for x in range(0, w - WINDOW + 1, WINDOW):
            near = truth[
                max(0, y - MARGIN) : y + WINDOW + MARGIN, max(0, x - MARGIN) : x + WINDOW + MARGIN
            ]
            if not near.any():
                corners.append((y, x))
    return corners


@dataclass(frozen=True)
class Result:
    rule: str
    eligible: bool
    f1: dict[str, float]  # per map
    false_alarm: dict[str, float]  # per map: mean flagged share of its unchanged windows
    windows: dict[str, int]  # per map: how many unchanged windows it has (0: false alarm nan)
    large_change_recall: float  # on :func:`large_change`'s scene


def f1(pred: np.ndarray, truth: np.ndarray) -> float:
    return pixel_counts(pred, truth).scores()["f1"]


def measure(maps: Sequence[Map], candidates: Sequence[Rule], form: Form = Form()) -> list[Result]:
    """Every candidate on ``maps`` (made with ``form``, which the large change is made with)."""
    windows = {m.name: unchanged_windows(m.truth) for m in maps}
    big, big_truth = large_change(form=form)
    results = []
    for rule in candidates:
        recall = float((big > rule.cut(big))[big_truth].mean())
        scores, alarms = {}, {}
        for m in maps:
            scores[m.name] = f1(m.score > rule.cut(m.score), m.truth)
            shares = []
            for y, x in windows[m.name]:
                crop = m.score[y : y + WINDOW, x : x + WINDOW]
                shares.append(float((crop > rule.cut(crop)).mean()))
            alarms[m.name] = float(np.mean(shares)) if shares else float("nan")
        counts = {m.name: len(windows[m.name]) for m in maps}
        eligible = rule.eligible and recall >= MIN_LARGE_CHANGE_RECALL
        results.append(Result(rule.name, eligible, scores, alarms, counts, recall))
    return results


def mean_over(values: dict[str, float], names: Sequence[str]) -> float:
    picked = [values[n] for n in names if not math.isnan(values[n])]
    return float(np.mean(picked)) if picked else float("nan")


def pooled_false_alarm(result: Result, names: Sequence[str]) -> float:
    """The flagged share over all the maps' unchanged windows together: each window an
    unchanged pair of its own, weighted alike."""
    n = sum(result.windows[m] for m in names)
    if not n:
        return float("nan")
    return sum(result.false_alarm[m] * result.windows[m] for m in names if result.windows[m]) / n


def choose(results: Sequence[Result], validation: Sequence[str], max_false_alarm: float) -> Result:
    """The eligible rule of best mean validation F1 whose pooled false-alarm share is allowed."""
    allowed = [
        r for r in results if r.eligible and pooled_false_alarm(r, validation) <= max_false_alarm
    ]
    if not allowed:
        raise ValueError(
            f"no eligible rule flags at most {max_false_alarm:.1%} of unchanged windows"
        )
    return max(allowed, key=lambda r: mean_over(r.f1, validation))


def best_allowed(
    results: Sequence[Result], validation: Sequence[str], max_false_alarm: float
) -> Result | None:
    """:func:`choose`, or None where no rule is allowed (a form may have none)."""
    try:
        return choose(results, validation, max_false_alarm)
    except ValueError:
        return None


def choose_form(
    by_form: dict[Form, list[Result]], validation: Sequence[str], max_false_alarm: float
) -> tuple[Form, Result]:
    """:func:`choose` over every form's rules together (first form wins a tie)."""
    best: tuple[Form, Result] | None = None
    for form, results in by_form.items():
        r = best_allowed(results, validation, max_false_alarm)
        if r is None:
            continue
        if best is None or mean_over(r.f1, validation) > mean_over(best[1].f1, validation):
            best = (form, r)
    if best is None:
        raise ValueError(
            f"no eligible rule of any form flags at most {max_false_alarm:.1%} of unchanged windows"
        )
    return best


def forms_table(
    by_form: dict[Form, list[Result]],
    validation: Sequence[str],
    held_out: Sequence[str],
    max_false_alarm: float,
) -> list[str]:
    """Each form's own best allowed rule, so that the form's part in the choice shows."""
    lines = [
        "| form | its best allowed rule | validation F1 | validation false alarm "
        "| held-out F1 " + "".join(f"| {n} " for n in held_out) + "|",
        "|---|---|---|---|---|" + "---|" * len(held_out),
    ]
    for form, results in by_form.items():
        r = best_allowed(results, validation, max_false_alarm)
        if r is None:
            lines.append(f"| {form} | none allowed |" + " |" * (3 + len(held_out)))
            continue
        lines.append(
            f"| {form} | {r.rule} | {mean_over(r.f1, validation):.3f} "
            f"| {pooled_false_alarm(r, validation):.2%} | {mean_over(r.f1, held_out):.3f} "
            + "".join(f"| {r.f1[n]:.3f} " for n in held_out)
            + "|"
        )
    return lines


def markdown(
    command: str,
    results: Sequence[Result],
    chosen: Result,
    validation: Sequence[str],
    held_out: Sequence[str],
    max_false_alarm: float,
    form: Form = Form(),
    by_form: dict[Form, list[Result]] | None = None,
) -> str:
    lines = [
        "# Where the cva-gated rule cuts its score",
        "",
        "Generated by `training/experiments/gate_cut.py`:",
        "",
        f"```\n{command}\n```",
        "",
        f"Score = CVA magnitude (w x w mean) x probability^e; the rules below are the chosen "
        f"form's, {form}. F1 per map; *false alarm*: the share of "
        "pixels flagged inside unchanged 128 px windows (no change within 16 px), each cut as a "
        "scene of its own, pooled over the maps' windows; *recall, 60 % changed*: on a synthetic "
        "scene with most of its rows changed (under 0.9: not eligible). The rule is chosen on the "
        "validation "
        "maps: best mean F1 among the eligible rules whose false alarm is at most "
        f"{max_false_alarm:.1%} "
        "(fixed fractions are never eligible). Held-out maps only report it.",
        "",
        f"**Chosen: {chosen.rule}, on {form}**.",
        "",
        "| rule | eligible | recall, 60 % changed | validation F1 | validation false alarm "
        "| held-out F1 " + "".join(f"| {n} " for n in held_out) + "|",
        "|---|---|---|---|---|---|" + "---|" * len(held_out),
    ]
    for r in sorted(results, key=lambda r: -mean_over(r.f1, validation)):
        mark = "**" if r is chosen else ""
        lines.append(
            f"| {mark}{r.rule}{mark} | {'yes' if r.eligible else 'no'} "
            f"| {r.large_change_recall:.2f} "
            f"| {mean_over(r.f1, validation):.3f} | {pooled_false_alarm(r, validation):.2%} "
            f"| {mean_over(r.f1, held_out):.3f} "
            + "".join(f"| {r.f1[n]:.3f} " for n in held_out)
            + "|"
        )
    lines += ["", "Per validation map (F1 / false alarm) of the chosen rule and Otsu:", ""]
    otsu = next(r for r in results if r.rule == "otsu")
    lines += [
        "| map | unchanged windows | chosen F1 | chosen false alarm | Otsu F1 | Otsu false alarm |",
        "|---|---|---|---|---|---|",
    ]
    for n in [*validation, *held_out]:
        lines.append(
            f"| {n} | {chosen.windows[n]} | {chosen.f1[n]:.3f} | {chosen.false_alarm[n]:.2%} "
            f"| {otsu.f1[n]:.3f} "
            f"| {otsu.false_alarm[n]:.2%} |"
        )
    if by_form and len(by_form) > 1:
        lines += [
            "",
            "The fusion forms, each with its own best allowed rule (the same criterion):",
            "",
            *forms_table(by_form, validation, held_out, max_false_alarm),
        ]
    return "\n".join([*lines, ""])


def load_maps(
    spec: Sequence[str], dataset: str, models_dir: Path, forms: Sequence[Form] = (Form(),)
) -> dict[Form, list[Map]]:
    """Each ``MODEL:PAIR``'s served probability, fused by every form."""
    pairs = {p.name: p for p in load_dataset(dataset)}
    settings = ServerSettings(models_dir=models_dir, metrics_port=-1)
    maps: dict[Form, list[Map]] = {f: [] for f in forms}
    for model in dict.fromkeys(s.split(":", 1)[0] for s in spec):
        with served_scorer(settings, model, mask_rule="threshold") as scorer:
            for s in spec:
                name, pair_name = s.split(":", 1)
                if name != model:
                    continue
                pair = pairs[pair_name]
                prob = scorer.score(pair.before, pair.after).probability
                magnitude = {
                    w: gate_magnitude(pair.before, pair.after, window=w)
                    for w in {f.window for f in forms}
                }
                truth = pair.mask.astype(bool)  # one array shared by every form's map
                for f in forms:
                    maps[f].append(Map(s, magnitude[f.window] * prob**f.exponent, truth))
    return maps


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, help="KIND[:PATH], as rarechange evaluate")
    parser.add_argument("--validation", required=True, help="MODEL:PAIR,... the rule is chosen on")
    parser.add_argument("--held-out", default="", help="MODEL:PAIR,... only reported")
    parser.add_argument("--max-false-alarm", type=float, default=0.01)
    parser.add_argument(
        "--windows", default=str(GATE_WINDOW), help="odd CVA windows to try, comma-separated"
    )
    parser.add_argument("--exponents", default="1", help="probability exponents to try")
    parser.add_argument("--tag", required=True, help="suffix of the output files")
    parser.add_argument(
        "--models-dir",
        type=Path,
        action="append",
        default=None,
        help="model folders (repeatable; default: models/)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args(argv)
    validation = [s for s in args.validation.split(",") if s]
    held_out = [s for s in args.held_out.split(",") if s]
    for s in validation + held_out:
        if ":" not in s:
            parser.error(f"{s!r}: expected MODEL:PAIR")
    forms = [
        Form(int(w), float(e)) for w in args.windows.split(",") for e in args.exponents.split(",")
    ]
    maps: dict[Form, list[Map]] = {f: [] for f in forms}
    for models_dir in args.models_dir or [ROOT / "models"]:
        present = {p.name for p in models_dir.iterdir() if (p / "model.onnx").is_file()}
        wanted = [s for s in validation + held_out if s.split(":", 1)[0] in present]
        for f, loaded in load_maps(wanted, args.dataset, models_dir, forms).items():
            maps[f] += loaded
    missing = set(validation + held_out) - {m.name for m in maps[forms[0]]}
    if missing:
        parser.error(f"no model for {sorted(missing)} in {args.models_dir}")
    by_form = {f: measure(maps[f], rules(), f) for f in forms}
    form, chosen = choose_form(by_form, validation, args.max_false_alarm)
    results = by_form[form]
    command = " ".join(
        ["python -m training.experiments.gate_cut", *(argv if argv is not None else sys.argv[1:])]
    )

    payload = {
        "command": command,
        "validation": validation,
        "held_out": held_out,
        "max_false_alarm": args.max_false_alarm,
        "chosen": chosen.rule,
        "chosen_form": asdict(form),
        "results": [asdict(r) for r in results],
        # every form's own best allowed rule (the forms table); its other rules stay unsaved
        "forms": [
            {**asdict(f), "best": asdict(r) if r else None}
            for f in forms
            for r in [best_allowed(by_form[f], validation, args.max_false_alarm)]
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"gate_cut_{args.tag}"
    write_atomic(stem.with_suffix(".json"), (json.dumps(payload, indent=1) + "\n").encode())
    md = markdown(
        command, results, chosen, validation, held_out, args.max_false_alarm, form, by_form
    )
    write_atomic(stem.with_suffix(".md"), md.encode())
    print(md)


if __name__ == "__main__":
    main()
