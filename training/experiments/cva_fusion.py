"""Would a per-pixel fusion of change vector analysis with a learned model beat CVA?

A measurement, not a serving feature. The learned models score 16-32 px patches, so their masks
are blurred at the scale of OSCD's few-pixel changes, while CVA localises to the pixel but cannot
tell a real change from a trivial one. The fused score is CVA's magnitude (z-score units of the
per-date standardised spectral difference), averaged over each pixel's ``window`` x ``window``
neighbourhood (1: the raw magnitude), times the served probability map raised to ``exponent``:
the learned model as a gate on where CVA may fire. Each pair is thresholded three ways: Otsu on
its own fused score (a per-pair rule, as CVA uses), the best threshold of the *other* pairs pooled
(cross-pair, like the scene study's cross-fold F1), and its own best (oracle, for reference).
``--held-out`` names the pairs the model never saw: the others are its training pairs, where a
setting of the rule (window, exponent) may be chosen; the held-out means only report it. Usage
(writes ``docs/results/cva_fusion_<model>[_<tag>].{json,md}``):

    python -m training.experiments.cva_fusion --model sentinel2-rgbn --dataset oscd \
        --pairs pisa,rennes --stride 4
    python -m training.experiments.cva_fusion --model sentinel2-rgbn --dataset oscd \
        --pairs all --held-out pisa,rennes --windows 1,3,5 --exponents 0,1 --tag windows
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from serving.config import ServerSettings
from serving.cva import box_mean, change_magnitude, cva, otsu_threshold
from training.datasets.registry import load_dataset
from training.datasets.scenes import ScenePair
from training.evaluation import pixel_counts, served_scorer, write_atomic

ROOT = Path(__file__).resolve().parents[2]
EXPONENTS = (0.0, 0.5, 1.0, 2.0)  # 0: CVA's magnitude alone, thresholded the same three ways
WINDOWS = (1,)  # the magnitude's box mean before gating; 1: the raw magnitude
FIELDS = ("f1_otsu", "f1_cross", "f1_oracle")


def f1(pred: np.ndarray, truth: np.ndarray) -> float:
    return pixel_counts(pred, truth.astype(bool)).scores()["f1"]


def f1_curve(score: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """F1 of ``score >= t`` at every distinct value ``t`` of ``score`` (descending); exact,
    because the oracle is what the fused score could give at best."""
    s = score.ravel()
    t = truth.ravel().astype(bool)
    order = np.argsort(-s, kind="stable")
    s, t = s[order], t[order]
    last = np.r_[s[1:] != s[:-1], True]  # the last position of each run of equal scores
    tp = np.cumsum(t)[last]
    predicted = np.flatnonzero(last) + 1
    f1s = 2 * tp / (predicted + t.sum())
    return s[last], f1s


def best_threshold(scores: Sequence[np.ndarray], truths: Sequence[np.ndarray]) -> float:
    """The threshold of the best pooled F1 over several pairs (their pixels counted together)."""
    pooled = np.concatenate([s.ravel() for s in scores])
    values, f1s = f1_curve(pooled, np.concatenate([t.ravel() for t in truths]))
    return float(values[int(np.argmax(f1s))])


@dataclass(frozen=True)
class Row:
    pair: str
    exponent: float
    window: int
    f1_otsu: float
    f1_cross: float
    cross_threshold: float
    f1_oracle: float


def fused_score(magnitude: np.ndarray, probability: np.ndarray, exponent: float) -> np.ndarray:
    return magnitude * probability.astype(np.float64) ** exponent


def measure(
    pairs: Sequence[ScenePair],
    probabilities: Sequence[np.ndarray],
    exponents: Sequence[float],
    windows: Sequence[int] = WINDOWS,
) -> tuple[list[Row], dict[str, dict[str, float]]]:
    """Rows per (pair, window, exponent), and per pair CVA's own F1 for comparison."""
    raw = [change_magnitude(p.before, p.after) for p in pairs]
    rows = []
    for k in windows:
        magnitudes = [box_mean(m, size=k) for m in raw]  # once per window, for every exponent
        for e in exponents:
            fused = [fused_score(m, p, e) for m, p in zip(magnitudes, probabilities, strict=True)]
            rows += _rows(pairs, fused, k, e)
    alone = {p.name: {"cva_otsu": f1(cva(p.before, p.after).mask, p.mask)} for p in pairs}
    return rows, alone


def _rows(pairs: Sequence[ScenePair], fused: list[np.ndarray], window: int, e: float) -> list[Row]:
    """Each pair's F1 on its fused score: Otsu on its own, the other pairs' best, its own best."""
    rows = []
    for i, (pair, score) in enumerate(zip(pairs, fused, strict=True)):
        others = [j for j in range(len(pairs)) if j != i]
        cross = (
            best_threshold([fused[j] for j in others], [pairs[j].mask for j in others])
            if others
            else float("nan")
        )
        _, f1s = f1_curve(score, pair.mask)
        rows.append(
            Row(
                pair=pair.name,
                exponent=e,
                window=window,
                f1_otsu=f1(score > otsu_threshold(score), pair.mask),
                f1_cross=f1(score >= cross, pair.mask) if others else float("nan"),
                cross_threshold=cross,
                f1_oracle=float(f1s.max()),
            )
        )
    return rows


def _means(rows: list[Row], names: set[str]) -> list[str]:
    lines = ["| window | e | Otsu | cross | oracle |", "|---|---|---|---|---|"]
    for k, e in sorted({(r.window, r.exponent) for r in rows}):
        sel = [r for r in rows if (r.window, r.exponent) == (k, e) and r.pair in names]
        otsu, cross, best = (np.mean([getattr(r, f) for r in sel]) for f in FIELDS)
        lines.append(f"| {k} | {e:g} | {otsu:.3f} | {cross:.3f} | {best:.3f} |")
    return lines


def _markdown(
    command: str, model: str, rows: list[Row], alone: dict, own: dict, held_out: set[str]
) -> str:
    lines = [
        f"# CVA x learned model, per pixel: `{model}`",
        "",
        "Generated by `training/experiments/cva_fusion.py`:",
        "",
        f"```\n{command}\n```",
        "",
        "Fused score = box mean of the CVA magnitude over window x window pixels x probability^e "
        "(e = 0: CVA alone). Otsu: per pair on its own score; cross: the best pooled threshold of "
        "the other pairs; oracle: the pair's own best. The model's F1 is at its threshold "
        "(the threshold mask rule); CVA + Otsu is the classic baseline (raw magnitude).",
        "",
        "| pair | role | model F1 (its threshold) | CVA + Otsu F1 | window | e | fused F1, Otsu "
        "| fused F1, cross | fused F1, oracle |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    role = {name: "held out" if name in held_out else "training" for name in own}
    for r in rows:
        lines.append(
            f"| {r.pair} | {role[r.pair]} | {own[r.pair]:.3f} | {alone[r.pair]['cva_otsu']:.3f} "
            f"| {r.window} | {r.exponent:g} | {r.f1_otsu:.3f} | {r.f1_cross:.3f} "
            f"| {r.f1_oracle:.3f} |"
        )
    groups = [("held-out", held_out), ("training", set(own) - held_out)]
    if not held_out or held_out == set(own):
        groups = [("", set(own))]
    for label, names in groups:
        if not names:
            continue
        title = f"Means over the {len(names)} {label} pairs" if label else "Means over pairs"
        lines += ["", f"{title}:", "", *_means(rows, names)]
        model_mean = np.mean([own[n] for n in names])
        cva_mean = np.mean([alone[n]["cva_otsu"] for n in names])
        lines += ["", f"Model alone at its threshold: {model_mean:.3f}; CVA + Otsu: {cva_mean:.3f}"]
    return "\n".join([*lines, ""])


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True, help="KIND[:PATH], as rarechange evaluate")
    parser.add_argument("--pairs", required=True, help="comma-separated pair names, or all")
    parser.add_argument("--held-out", default="", help="the pairs the model never trained on")
    parser.add_argument("--stride", type=int, default=0, help="0: the model's")
    parser.add_argument("--exponents", type=_floats, default=EXPONENTS, help="e.g. 0,1")
    parser.add_argument("--windows", default=",".join(map(str, WINDOWS)), help="odd, e.g. 1,3,5")
    parser.add_argument("--tag", default="", help="suffix of the output files")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args(argv)
    loaded = load_dataset(args.dataset)
    wanted = [p.name for p in loaded] if args.pairs == "all" else args.pairs.split(",")
    pairs = [p for name in wanted for p in loaded if p.name == name]
    if len(pairs) != len(wanted):
        parser.error(f"--pairs {args.pairs}: {args.dataset} has {[p.name for p in loaded]}")
    held_out = set(filter(None, args.held_out.split(",")))
    if held_out - set(wanted):
        parser.error(f"--held-out {args.held_out}: not among --pairs")
    windows = tuple(int(v) for v in args.windows.split(","))
    settings = ServerSettings(models_dir=args.models_dir, metrics_port=-1)
    with served_scorer(settings, args.model, stride=args.stride, mask_rule="threshold") as scorer:
        scored = [scorer.score(p.before, p.after) for p in pairs]
        info = scorer.info
    own = {p.name: f1(s.mask, p.mask) for p, s in zip(pairs, scored, strict=True)}
    rows, alone = measure(pairs, [s.probability for s in scored], args.exponents, windows)
    command = " ".join(
        ["python -m training.experiments.cva_fusion", *(argv if argv is not None else sys.argv[1:])]
    )
    payload = {
        "command": command,
        "model": f"{info.name} {info.version}",
        "stride": info.stride,
        "threshold": info.threshold,
        "held_out": sorted(held_out),
        "model_f1": own,
        "cva": alone,
        "rows": [asdict(r) for r in rows],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"cva_fusion_{args.model}{'_' + args.tag if args.tag else ''}"
    write_atomic(stem.with_suffix(".json"), (json.dumps(payload, indent=1) + "\n").encode())
    title = f"{info.name} {info.version}, stride {info.stride}"
    md = _markdown(command, title, rows, alone, own, held_out)
    write_atomic(stem.with_suffix(".md"), md.encode())
    print(md)


if __name__ == "__main__":
    main()
