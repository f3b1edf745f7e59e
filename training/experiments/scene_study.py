"""Few labels on real pairs: leave-one-pair-out (or one city/pair per fold) over a scenes preset.

Cells: {every pair held out once} x {ours, ours-distance, siamese from scratch} x {5, 50, all
positives} x seeds, plus change vector analysis per fold. Each cell is exactly `rarechange train
--preset P` with a few ``--set`` overrides (recorded in the cell), exported to ONNX and scored on
its held-out pair by the one evaluation (:mod:`training.evaluation`: tiler, batcher, ONNX
Runtime, stitch).

Pre-training (negatives only, never the held-out pair) is shared by every cell of a fold and
checkpointed per epoch; every finished cell is one small JSON file, so a killed study resumes
where it stopped and cells can be committed as they arrive.

Thresholds. ``train`` picks the mask threshold on the held-out pair itself (max pixel F1), which
flatters F1 (reported as "oracle"). The honest number uses a cross-fold threshold: for fold f the
threshold maximising pooled F1 over the *other* folds' held-out maps of the same method, budget
and seed, applied to fold f. Cells keep per-class histograms of their map (``HIST_BINS`` bins),
which is all either choice needs. AUROC does not depend on a threshold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shlex
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.config import CONFIG_DIR, RunConfig, ScenesData, load_config
from training.experiments.table3 import write_json

log = logging.getLogger(__name__)

# each method is the preset plus these overrides; methods are per cell, outside the digest
METHOD_OVERRIDES: dict[str, tuple[str, ...]] = {
    "ours": (),
    # the fold's pre-trained encoder, frozen; two parameters on the common-feature distance
    "ours-distance": (
        "model.classifier=distance",
        "train.encoder_lr_scale=0",
        "train.finetune_steps=300",
        "train.finetune_steps_per_epoch=300",
    ),
    # the same head untrained (learning rate 0): no label is used, whatever the budget says
    "ours-no-labels": (
        "model.classifier=distance",
        "train.encoder_lr_scale=0",
        "train.finetune_lr=0",
        "train.finetune_steps=1",
        "train.finetune_steps_per_epoch=1",
    ),
    "siamese": ("train.from_scratch=true",),
}
METHODS = tuple(METHOD_OVERRIDES)
HIST_BINS = 200  # threshold grid of the cross-fold choice: 0.005


def budget_name(budget: int | None) -> str:
    return "all" if budget is None else str(budget)


@dataclass
class StudySettings:
    preset: str = "aerial-rgb"
    folds: tuple[str, ...] = ()  # held-out pairs; () = every pair of the dataset
    budgets: tuple[int | None, ...] = (5, 50, None)  # None: every positive patch
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    # fine-tuning steps per budget (None: the preset's); few labels are memorised quickly
    finetune_steps: dict[str, int] = field(default_factory=lambda: {"5": 500, "50": 1000})
    extra: tuple[str, ...] = ()  # further overrides for every cell, e.g. data.augment.copies=1
    # the seed of each fold's one pre-training, which every cell of the fold shares: the seeds
    # above vary only the fine-tuning (a head on fixed features barely depends on it)
    pretrain_seed: int = 0

    def digest(self) -> str:
        """Names the protocol (the preset's text included); seeds, folds, budgets, methods are
        per cell and excluded, so adding more of them keeps the finished cells."""
        text = (CONFIG_DIR / f"{self.preset}.toml").read_text()
        d: dict[str, object] = {
            "preset": text,
            "steps": self.finetune_steps,
            "extra": list(self.extra),
        }
        if self.pretrain_seed:  # absent at 0: the studies run before it keep their digests
            d["pretrain_seed"] = self.pretrain_seed
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def is_preset_protocol(self) -> bool:
        """The preset as it is: its cells and summary carry no digest."""
        return not self.extra and not self.pretrain_seed


def cell_name(fold: str, method: str, budget: int | None, seed: int) -> str:
    return f"{fold.replace('/', '-')}_{method}_{budget_name(budget)}_s{seed}.json"


def histograms(probability: np.ndarray, truth: np.ndarray) -> dict[str, list[int]]:
    index = np.clip((probability.ravel() * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1)
    t = truth.ravel().astype(bool)
    return {
        "positive": np.bincount(index[t], minlength=HIST_BINS).tolist(),
        "negative": np.bincount(index[~t], minlength=HIST_BINS).tolist(),
    }


def counts_at(hist: dict[str, list[int]], k: int) -> tuple[int, int, int]:
    """(tp, fp, fn) when every pixel of bin >= k is called changed."""
    pos, neg = np.asarray(hist["positive"]), np.asarray(hist["negative"])
    tp, fp = int(pos[k:].sum()), int(neg[k:].sum())
    return tp, fp, int(pos.sum()) - tp


def f1_of(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def best_bin(hists: list[dict[str, list[int]]]) -> int:
    """The threshold bin maximising pooled F1 over ``hists`` (the lowest bin on ties)."""
    pos = np.sum([h["positive"] for h in hists], axis=0)
    neg = np.sum([h["negative"] for h in hists], axis=0)
    tp = np.cumsum(pos[::-1])[::-1]
    fp = np.cumsum(neg[::-1])[::-1]
    fn = pos.sum() - tp
    f1 = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    return int(np.argmax(f1))


class SceneStudy:
    def __init__(
        self, settings: StudySettings, results_dir: Path, work_dir: Path, progress: bool = True
    ) -> None:
        self.s = settings
        self.digest = settings.digest()
        # another protocol (extra overrides, another pre-training seed) gets its own cells and
        # summary, never the preset's
        suffix = "" if settings.is_preset_protocol else f"_{self.digest}"
        self.name = f"study-{settings.preset}{suffix}"
        self.cells_dir = results_dir / f"{self.name}_cells"
        self.results_dir = results_dir
        self.work_dir = work_dir / self.digest
        self.progress = progress
        base = load_config(preset=settings.preset, overrides=list(settings.extra))
        if not isinstance(base.data, ScenesData):
            raise ValueError(f"preset {settings.preset} is not a scenes preset")
        self.base = base

    # ------------------------------------------------------------------ cells
    def folds(self) -> list[str]:
        if self.s.folds:
            return list(self.s.folds)
        from training.datasets.registry import load_dataset

        return [p.name for p in load_dataset(self.base.data.dataset)]

    def overrides(self, fold: str, method: str, budget: int | None, seed: int) -> list[str]:
        out = [*self.s.extra, f"data.val_pairs={json.dumps([fold])}", f"train.seed={seed}"]
        if budget is not None:
            out.append(f"train.max_positives={budget}")
        steps = self.s.finetune_steps.get(budget_name(budget))
        if steps is not None:
            per_epoch = min(steps, self.base.train.finetune_steps_per_epoch)
            out += [f"train.finetune_steps={steps}", f"train.finetune_steps_per_epoch={per_epoch}"]
        return out + list(METHOD_OVERRIDES[method])

    def config(self, fold: str, method: str, budget: int | None, seed: int) -> RunConfig:
        return load_config(
            preset=self.s.preset, overrides=self.overrides(fold, method, budget, seed)
        )

    def command(self, fold: str, method: str, budget: int | None, seed: int) -> str:
        sets = " ".join(
            f"--set {shlex.quote(o)}" for o in self.overrides(fold, method, budget, seed)
        )
        command = f"rarechange train --preset {self.s.preset} {sets} --out RUN"
        if method != "siamese" and seed != self.s.pretrain_seed:  # a fold's one pre-training
            command += (
                f"  # pre-training from the fold's run with train.seed={self.s.pretrain_seed}"
            )
        return command

    def done(self, name: str) -> bool:
        path = self.cells_dir / name
        return path.exists() and json.loads(path.read_text()).get("protocol") == self.digest

    def todo(self, fold: str) -> list[tuple[str, int | None, int]]:
        """A fold's cells, the ones the bundled model and the headline need first."""
        order = []
        for seed in self.s.seeds:
            for budget in sorted(self.s.budgets, key=lambda b: (b is not None, b or 0)):
                order += [(m, budget, seed) for m in self.s.methods]
        order.sort(key=lambda c: (c[2] != self.s.seeds[0] or c[1] is not None, c[2]))
        return [c for c in order if not self.done(cell_name(fold, *c))]

    def run(self) -> None:
        for fold in self.folds():
            self.run_cva(fold)
            for method, budget, seed in self.todo(fold):
                self.run_cell(fold, method, budget, seed)
                self.write_summary()
        self.write_summary()

    def run_cva(self, fold: str) -> None:
        from training.evaluation import CvaScorer

        name = f"{fold.replace('/', '-')}_cva.json"
        if self.done(name):
            return
        pair = self.held_out(fold)
        scored = CvaScorer().score(pair.before, pair.after)
        self.write_cell(
            name,
            fold,
            "cva",
            None,
            0,
            pair,
            scored,
            {},
            0.0,
            f"rarechange evaluate --model cva --dataset {self.base.data.dataset} --pairs {fold}",
        )

    def held_out(self, fold: str) -> Any:
        from training.recipes import load_scene_split

        _, val = load_scene_split(self.config(fold, "ours", None, self.s.seeds[0]))
        return val[0]

    def run_cell(self, fold: str, method: str, budget: int | None, seed: int) -> None:
        from training.recipes import run

        log.info("%s: %s, %s positives, seed %d", fold, method, budget_name(budget), seed)
        fold_dir = self.work_dir / fold.replace("/", "-")
        cell_dir = fold_dir / f"{method}_{budget_name(budget)}_s{seed}"
        t0 = time.perf_counter()
        if method != "siamese":  # pre-trained methods share the fold's pre-training
            pre = fold_dir / "pretrain"
            pre_config = self.config(fold, "ours", None, self.s.pretrain_seed)
            run(pre_config, pre, stage="pretrain", progress=self.progress)
            cell_dir.mkdir(parents=True, exist_ok=True)
            if not (cell_dir / "pretrain_last.pt").exists():
                for f in ("pretrain_last.pt", "metrics.jsonl"):
                    shutil.copy(pre / f, cell_dir / f)
        result = run(self.config(fold, method, budget, seed), cell_dir, progress=self.progress)
        assert result is not None
        seconds = time.perf_counter() - t0
        pair = self.held_out(fold)
        scored = self.score_served(result.checkpoint, pair)
        gated = gated_scores(pair, scored.probability)
        import torch

        payload = torch.load(result.checkpoint, map_location="cpu", weights_only=False)
        train_info = {
            "n_positives": payload.get("n_positives"),
            "n_negatives": payload.get("n_negatives"),
        }
        self.write_cell(
            cell_name(fold, method, budget, seed),
            fold,
            method,
            budget,
            seed,
            pair,
            scored,
            train_info,
            seconds,
            self.command(fold, method, budget, seed),
            gated,
        )
        for f in ("finetune_last.pt", "checkpoint.pt"):  # the fold's pre-training is kept
            (cell_dir / f).unlink(missing_ok=True)

    def score_served(self, checkpoint: Path, pair: Any) -> Any:
        """Export to ONNX and score the held-out pair through the serving path."""
        from export.onnx_export import export_checkpoint
        from serving.config import ServerSettings
        from training.evaluation import served_scorer

        stride = self.base.data.stride
        with tempfile.TemporaryDirectory() as tmp:
            export_checkpoint(
                checkpoint, Path(tmp) / "cell", name="cell", version="0", recommended_stride=stride
            )
            settings = ServerSettings(models_dir=Path(tmp), metrics_port=-1)
            with served_scorer(settings, "cell") as scorer:
                return scorer.score(pair.before, pair.after)

    def write_cell(
        self,
        name: str,
        fold: str,
        method: str,
        budget: int | None,
        seed: int,
        pair: Any,
        scored: Any,
        train_info: dict[str, Any],
        seconds: float,
        command: str,
        gated: dict[str, float] | None = None,
    ) -> None:
        from serving.quality import auroc
        from training.evaluation import pixel_counts

        path = self.cells_dir / name
        if path.exists() and json.loads(path.read_text()).get("protocol") != self.digest:
            raise FileExistsError(f"{path} holds a cell of another protocol; not overwriting it")
        truth = pair.mask.astype(bool)
        counts = pixel_counts(scored.mask, truth)
        write_json(
            path,
            {
                "fold": fold,
                "method": method,
                "budget": budget_name(budget),
                "seed": seed,
                "protocol": self.digest,
                "command": command,
                **train_info,
                "seconds": round(seconds, 1),
                "own_threshold": float(scored.threshold),
                "own": counts.scores(),
                "auroc": auroc(scored.probability, truth),
                "hist": histograms(scored.probability, truth),
                **({"gated": gated} if gated is not None else {}),
            },
        )

    # ---------------------------------------------------------------- summary
    def records(self) -> list[dict[str, Any]]:
        if not self.cells_dir.is_dir():
            return []
        recs = [json.loads(p.read_text()) for p in sorted(self.cells_dir.glob("*.json"))]
        return [r for r in recs if r.get("protocol") == self.digest]

    def summary(self) -> dict[str, Any]:
        recs = self.records()
        cva = {r["fold"]: r for r in recs if r["method"] == "cva"}
        groups: dict[tuple[str, str, int], dict[str, dict]] = {}
        for r in recs:
            if r["method"] != "cva":
                groups.setdefault((r["method"], r["budget"], r["seed"]), {})[r["fold"]] = r
        rows = []
        for (method, budget, seed), by_fold in sorted(groups.items()):
            folds = sorted(by_fold)
            per_fold, total = {}, np.zeros(3, np.int64)
            for f in folds:
                others = [by_fold[g]["hist"] for g in folds if g != f]
                if not others:
                    continue
                k = best_bin(others)
                tp, fp, fn = counts_at(by_fold[f]["hist"], k)
                total += (tp, fp, fn)
                per_fold[f] = {"threshold": k / HIST_BINS, "f1": f1_of(tp, fp, fn)}
            rows.append(
                {
                    "method": method,
                    "budget": budget,
                    "seed": seed,
                    "folds": folds,
                    "cross_fold": per_fold,
                    "pooled_f1": f1_of(*total.tolist()) if per_fold else math.nan,
                    "mean_f1": statistics.fmean(v["f1"] for v in per_fold.values())
                    if per_fold
                    else math.nan,
                    "mean_auroc": statistics.fmean(by_fold[f]["auroc"] for f in folds),
                    "mean_oracle_f1": statistics.fmean(by_fold[f]["own"]["f1"] for f in folds),
                    # the serving path's cva-gated mask rule: cut per pair, no threshold to carry
                    "mean_gated_f1": statistics.fmean(by_fold[f]["gated"]["f1"] for f in folds)
                    if all("gated" in by_fold[f] for f in folds)
                    else math.nan,
                    "per_fold": {
                        f: {
                            "auroc": by_fold[f]["auroc"],
                            "oracle_f1": by_fold[f]["own"]["f1"],
                            "gated_f1": by_fold[f].get("gated", {}).get("f1", math.nan),
                            "n_positives": by_fold[f].get("n_positives"),
                        }
                        for f in folds
                    },
                }
            )
        return {
            "protocol": self.digest,
            "settings": asdict(self.s),
            "cva": {f: {"f1": r["own"]["f1"], "auroc": r["auroc"]} for f, r in sorted(cva.items())},
            "rows": rows,
        }

    def write_summary(self) -> None:
        data = self.summary()
        write_json(self.results_dir / f"{self.name}.json", data)
        md = render_markdown(data, self.s)
        tmp = self.results_dir / f".{self.name}.md.tmp"
        tmp.write_text(md)
        tmp.replace(self.results_dir / f"{self.name}.md")


def gated_scores(pair: Any, probability: np.ndarray) -> dict[str, float]:
    """Pixel scores of the serving path's cva-gated mask rule on the held-out pair, and its cut:
    computed from the served map exactly as the server does (serving.cva.gated_mask)."""
    from serving.cva import gated_mask
    from training.evaluation import pixel_counts

    mask, cut = gated_mask(pair.before, pair.after, probability)
    return {**pixel_counts(mask, pair.mask.astype(bool)).scores(), "cut": cut}


def _ms(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def render_markdown(data: dict[str, Any], s: StudySettings) -> str:
    cva = data["cva"]
    lines = [
        f"# Few labels on real pairs: preset `{s.preset}`, one held-out pair per fold",
        "",
        "Generated by `rarechange experiment scenes` (training/experiments/scene_study.py); "
        f"protocol `{data['protocol']}`. Every number is the one evaluation (tiler, batcher, ONNX "
        "Runtime, Hann stitch) on the held-out pair of its fold. **F1 (cross-fold)**: threshold "
        "chosen on the other folds' held-out maps (honest); **oracle F1**: threshold chosen on the "
        "fold itself (optimistic, for reference). CVA: change vector analysis, Otsu per pair.",
        "",
        "Means ± standard deviations over seeds; a seed counts once it has every fold.",
        "",
        "| method | positives | seeds | folds | pooled F1 (cross-fold) | mean F1 (cross-fold) "
        "| mean AUROC | mean oracle F1 | mean F1 (CVA-gated) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by: dict[tuple[str, str], list[dict]] = {}
    for r in data["rows"]:
        by.setdefault((r["method"], r["budget"]), []).append(r)
    order = {"5": 0, "50": 1, "all": 2}
    for (method, budget), rows in sorted(
        by.items(), key=lambda kv: (order.get(kv[0][1], 9), kv[0][0])
    ):
        folds = sorted({f for r in rows for f in r["folds"]})
        # a seed still running has fewer folds: its means would not be comparable
        done = [r for r in rows if sorted(r["folds"]) == folds]
        seeds = str(len(done)) + (
            f" (+{len(rows) - len(done)} partial)" if len(done) < len(rows) else ""
        )
        lines.append(
            f"| {method} | {budget} | {seeds} | {len(folds)} | "
            f"{_ms([r['pooled_f1'] for r in done])} | {_ms([r['mean_f1'] for r in done])} | "
            f"{_ms([r['mean_auroc'] for r in done])} | {_ms([r['mean_oracle_f1'] for r in done])} "
            f"| {_ms([r.get('mean_gated_f1', math.nan) for r in done])} |"
        )
    if cva:
        lines.append(
            f"| CVA + Otsu | none | - | {len(cva)} | - | "
            f"{_ms([v['f1'] for v in cva.values()])} | {_ms([v['auroc'] for v in cva.values()])} "
            "| - | - |"
        )
    first = min((r["seed"] for r in data["rows"]), default=0)
    lines += [
        "",
        f"## Per fold, seed {first}",
        "",
        "| held-out pair | method | positives | positives used | F1 (cross-fold) | "
        "threshold | oracle F1 | AUROC | F1 (CVA-gated) | CVA F1 | CVA AUROC |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        if r["seed"] != first:
            continue
        for f in r["folds"]:
            cf = r["cross_fold"].get(f, {})
            pf = r["per_fold"][f]
            c = cva.get(f, {})
            lines.append(
                f"| {f} | {r['method']} | {r['budget']} | {pf['n_positives']} | "
                f"{cf.get('f1', math.nan):.3f} | {cf.get('threshold', math.nan):.3f} | "
                f"{pf['oracle_f1']:.3f} | {pf['auroc']:.3f} | "
                f"{pf.get('gated_f1', math.nan):.3f} | {c.get('f1', math.nan):.3f} | "
                f"{c.get('auroc', math.nan):.3f} |"
            )
    return "\n".join(lines) + "\n"
