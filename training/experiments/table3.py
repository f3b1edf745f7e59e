"""The paper's Table 3: change-detection accuracy on Augmented MNIST, reproduced on the real MNIST.

Cells: {MNIST-R, MNIST-B, MNIST-R-B} x {50, 500, 32000} positive training pairs x {under-sampling,
over-sampling, VAE w/o sim., VAE w/ sim.} x seeds. Each seed draws its own training pairs (100,000
negatives and the positives); the test set (50,000 + 50,000 pairs from the test split) is the same
for every cell. Every finished cell is one small JSON file, so a killed run resumes where it
stopped and finished cells can be committed as they arrive. Pre-training (negatives only) is shared
by the three budgets of a (variant, seed) and checkpointed per epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from serving.quality import auroc
from training.data import PatchSet
from training.datasets.augmented_mnist import VARIANTS, make_pairs, texture_source
from training.model import ChangeDetector, DisentangledVAE, ModelConfig
from training.train import (
    TrainConfig,
    balanced_test_scores,
    device_of,
    finetune,
    pretrain,
    to_unit,
)

log = logging.getLogger(__name__)

BUDGETS = (50, 500, 32000)
METHODS = ("under-sampling", "over-sampling", "vae-without-sim", "vae-with-sim")
# Hamaguchi et al. 2019, Table 3 ("ours"), accuracy %, 50 / 500 / 32000 positives
PAPER_OURS = {
    "MNIST-R": (79.65, 89.73, 95.94),
    "MNIST-B": (82.16, 84.69, 96.05),
    "MNIST-R-B": (60.58, 62.68, 81.54),
}
TEST_SEED = 20190616  # one test set for every cell and seed

MNIST_MODEL = ModelConfig(
    in_channels=1,
    patch_size=28,
    widths=(32, 64),
    hidden=256,
    z_common=16,
    z_specific=16,
    classifier_hidden=64,
    likelihood="bernoulli",
)


@dataclass
class Table3Settings:
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = VARIANTS
    budgets: tuple[int, ...] = BUDGETS
    methods: tuple[str, ...] = METHODS
    n_negative: int = 100_000
    n_test_per_class: int = 50_000
    pretrain_epochs: float = 4.0
    activation_weight: float = 50.0
    # fine-tuning steps per budget: few labels are memorised quickly, many labels need longer
    finetune_steps: dict[int, int] = field(
        default_factory=lambda: {50: 300, 500: 1000, 32000: 3000}
    )
    # the encoder learns at this fraction of the classifier's rate, after a frozen warm-up
    encoder_lr_scale: dict[int, float] = field(
        default_factory=lambda: {50: 0.01, 500: 0.01, 32000: 0.1}
    )
    freeze_encoder_steps: int = 200
    baseline_steps: dict[int, int] = field(
        default_factory=lambda: {50: 300, 500: 1000, 32000: 3000}
    )
    batch_size: int = 128

    def digest(self) -> str:
        """Names the protocol a cell was computed under (seeds excluded: cells are per seed)."""
        d = asdict(self)
        for k in ("seeds", "variants", "budgets", "methods"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cell_name(variant: str, positives: int, method: str, seed: int) -> str:
    return f"{variant}_{positives}_{method}_s{seed}.json"


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def latent_distance_auroc(encoder: torch.nn.Module, test: PatchSet) -> float:
    """AUROC of |mu_c_A - mu_c_B| for change: a collapse check that needs no positives."""
    device = device_of(encoder)
    with torch.no_grad():
        d = []
        for i in range(0, len(test), 4096):
            a = encoder.common(to_unit(test.before[i : i + 4096], device))
            b = encoder.common(to_unit(test.after[i : i + 4096], device))
            d.append((a - b).norm(dim=1).cpu())
    return 100.0 * auroc(torch.cat(d).numpy(), test.changed_fraction > 0.5)


class Table3:
    def __init__(
        self,
        settings: Table3Settings,
        results_dir: Path,
        work_dir: Path,
        progress: bool = True,
        name: str = "table3",
    ) -> None:
        """``name`` keeps tables of other protocols (e.g. longer pre-training) apart:
        RESULTS/<name>.md, RESULTS/<name>.json and RESULTS/<name>_cells/."""
        self.s = settings
        self.name = name
        self.cells_dir = results_dir / f"{name}_cells"
        self.results_dir = results_dir
        self.work_dir = work_dir
        self.progress = progress
        self.digest = settings.digest()

    def done(self, name: str) -> bool:
        path = self.cells_dir / name
        return path.exists() and json.loads(path.read_text()).get("protocol") == self.digest

    def run(self) -> None:
        """Seed-major, so that a complete table with one seed exists as early as possible."""
        for seed in self.s.seeds:
            for variant in self.s.variants:
                todo = [
                    (p, m)
                    for p in self.s.budgets
                    for m in self.s.methods
                    if not self.done(cell_name(variant, p, m, seed))
                ]
                if todo:
                    self.run_variant(variant, seed, todo)
                self.write_summary()

    def run_variant(self, variant: str, seed: int, todo: list[tuple[int, str]]) -> None:
        log.info("%s seed %d: %d cells to compute", variant, seed, len(todo))
        train = make_pairs(variant, "train", self.s.n_negative, max(self.s.budgets), seed)
        test = make_pairs(
            variant, "test", self.s.n_test_per_class, self.s.n_test_per_class, TEST_SEED
        ).to_patchset()
        negatives = PatchSet(
            train.before[train.label == 0],
            train.after[train.label == 0],
            np.zeros(int((train.label == 0).sum()), np.float32),
        )
        all_pos = PatchSet(
            train.before[train.label == 1],
            train.after[train.label == 1],
            np.ones(int((train.label == 1).sum()), np.float32),
        )
        pretrained: dict[bool, DisentangledVAE] = {}
        for positives, method in todo:
            t0 = time.perf_counter()
            pos = all_pos.select(np.arange(positives))  # make_pairs shuffles: a random subset
            cfg = self.train_config(seed, positives)
            if method.startswith("vae"):
                with_sim = method == "vae-with-sim"
                if with_sim not in pretrained:
                    pretrained[with_sim] = self.pretrained(variant, seed, with_sim, negatives, test)
                detector = ChangeDetector(MNIST_MODEL)
                detector.encoder.load_state_dict(pretrained[with_sim].encoder.state_dict())
            else:  # the same network from scratch on the imbalanced pairs
                torch.manual_seed(seed)
                detector = ChangeDetector(MNIST_MODEL)
                cfg = replace(
                    cfg,
                    encoder_lr_scale=1.0,
                    freeze_encoder_steps=0,
                    finetune_steps=self.s.baseline_steps[positives],
                    balance="undersample" if method == "under-sampling" else "balanced",
                )
            finetune(detector, negatives, pos, cfg, progress=self.progress)
            result = balanced_test_scores(detector, test)
            record = {
                "variant": variant,
                "positives": positives,
                "method": method,
                "seed": seed,
                **result,
                "seconds": round(time.perf_counter() - t0, 1),
                "protocol": self.digest,
                "train_config": asdict(cfg),
            }
            write_json(self.cells_dir / cell_name(variant, positives, method, seed), record)
            log.info(
                "%s %d %s seed %d: %.2f %%", variant, positives, method, seed, result["accuracy"]
            )

    def train_config(self, seed: int, positives: int) -> TrainConfig:
        return TrainConfig(
            seed=seed,
            batch_size=self.s.batch_size,
            pretrain_epochs=self.s.pretrain_epochs,
            activation_weight=self.s.activation_weight,
            finetune_steps=self.s.finetune_steps[positives],
            encoder_lr_scale=self.s.encoder_lr_scale[positives],
            freeze_encoder_steps=self.s.freeze_encoder_steps,
            positive_fraction=0.5,
        )

    def pretrained(
        self, variant: str, seed: int, with_sim: bool, negatives: PatchSet, test: PatchSet
    ) -> DisentangledVAE:
        """Stage 1 for one (variant, seed), resumed from its per-epoch checkpoints."""
        tag = "with_sim" if with_sim else "without_sim"
        run_dir = self.work_dir / self.digest / variant / f"s{seed}" / tag
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg = replace(
            self.train_config(seed, self.s.budgets[0]), similarity="jeffrey" if with_sim else "none"
        )
        self._continue_shorter(run_dir, variant, seed, tag)
        torch.manual_seed(seed)
        vae = DisentangledVAE(MNIST_MODEL)
        t0 = time.perf_counter()
        pretrain(vae, negatives, cfg, progress=self.progress, run_dir=run_dir)
        vae.eval()
        write_json(
            self.cells_dir / f"pretrain_{variant}_{tag}_s{seed}.json",
            {
                "variant": variant,
                "similarity": cfg.similarity,
                "seed": seed,
                "seconds_this_run": round(time.perf_counter() - t0, 1),
                "latent_distance_auroc": latent_distance_auroc(vae.encoder, test),
                "protocol": self.digest,
            },
        )
        return vae

    def _continue_shorter(self, run_dir: Path, variant: str, seed: int, tag: str) -> None:
        """Start a longer pre-training from a finished shorter one of the same protocol.

        Every epoch draws its batches from (seed, stage, epoch) and the checkpoint holds the
        optimiser, so continuing 4 finished epochs to 16 gives exactly a fresh 16-epoch run.
        """
        target = run_dir / "pretrain_last.pt"
        if target.exists():
            return
        for epochs in range(math.ceil(self.s.pretrain_epochs) - 1, 0, -1):
            shorter = replace(self.s, pretrain_epochs=float(epochs)).digest()
            src = self.work_dir / shorter / variant / f"s{seed}" / tag
            if (src / "pretrain_last.pt").exists():
                log.info(
                    "%s %s seed %d: continuing the finished %d-epoch pre-training",
                    variant,
                    tag,
                    seed,
                    epochs,
                )
                shutil.copy(src / "pretrain_last.pt", target)
                if (src / "metrics.jsonl").exists():
                    shutil.copy(src / "metrics.jsonl", run_dir / "metrics.jsonl")
                return

    # ------------------------------------------------------------------ summary
    def records(self) -> list[dict]:
        if not self.cells_dir.is_dir():
            return []
        out = []
        for path in sorted(self.cells_dir.glob("MNIST-*.json")):
            rec = json.loads(path.read_text())
            if rec.get("protocol") == self.digest:
                out.append(rec)
        return out

    def write_summary(self, command: str | None = None) -> None:
        records = self.records()
        table = []
        for variant in self.s.variants:
            for positives in self.s.budgets:
                for method in self.s.methods:
                    cell = [
                        r
                        for r in records
                        if (r["variant"], r["positives"], r["method"])
                        == (variant, positives, method)
                    ]
                    if not cell:
                        continue
                    cell.sort(key=lambda r: r["seed"])
                    values = [round(r["accuracy"], 2) for r in cell]
                    table.append(
                        {
                            "variant": variant,
                            "positives": positives,
                            "method": method,
                            "mean": round(statistics.fmean(values), 2),
                            "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
                            "seeds": [r["seed"] for r in cell],
                            "values": values,
                            "auroc_mean": round(statistics.fmean(r["auroc"] for r in cell), 2),
                        }
                    )
        seconds = {
            seed: sum(r["seconds"] for r in records if r["seed"] == seed)
            for seed in sorted({r["seed"] for r in records})
        }
        pre = sorted(self.cells_dir.glob("pretrain_*.json")) if self.cells_dir.is_dir() else []
        pretrain_info = [json.loads(p.read_text()) for p in pre]
        pretrain_info = [p for p in pretrain_info if p.get("protocol") == self.digest]
        write_json(
            self.results_dir / f"{self.name}.json",
            {
                "protocol": self.digest,
                "settings": asdict(self.s),
                "texture_source": texture_source(None),
                "cells": table,
                "pretraining": pretrain_info,
            },
        )
        (self.results_dir / f"{self.name}.md").write_text(
            render_markdown(table, self.s, seconds, pretrain_info, command)
        )


def render_markdown(
    table: list[dict],
    s: Table3Settings,
    seconds: dict[int, float],
    pretrain: list[dict],
    command: str | None,
) -> str:
    by = {(r["variant"], r["positives"], r["method"]): r for r in table}
    seeds = ",".join(map(str, s.seeds))
    default_command = f"rarechange experiment table3 --seeds {seeds}"
    lines = [
        "# Table 3 reproduced: change-detection accuracy (%) on Augmented MNIST",
        "",
        "Real MNIST (`../shared/data/mnist`); MNIST-B backgrounds are grey crops of the SZTAKI "
        "aerial photographs (natural texture). Training: "
        f"{s.n_negative:,} negative pairs and {' / '.join(f'{b:,}' for b in s.budgets)} positive "
        "pairs from the training split, drawn anew per seed; test: "
        f"{s.n_test_per_class:,} + {s.n_test_per_class:,} pairs from the test split, the same for "
        "every cell. Accuracy at threshold 0.5 on that balanced test set; mean (std) over seeds.",
        "",
        f"Command: `{command or default_command}`",
        "What was reached and missed, and why: [table3_discussion.md](table3_discussion.md).",
        f"Seeds: {seeds}. Pre-training: {s.pretrain_epochs:g} epochs over the negatives. "
        f"Wall time on 2 CPU cores, all cells: {sum(seconds.values()) / 60:.0f} min ("
        + ", ".join(f"seed {k}: {v / 60:.0f} min" for k, v in seconds.items())
        + "; a VAE cell that first needs its pre-training includes it; other jobs shared the "
        "cores at times, so the least contended seed is the best estimate per seed).",
        "",
        "| variant | positives | under-sampling | over-sampling | VAE w/o sim. "
        "| VAE w/ sim. (ours) | paper (ours) |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in s.variants:
        for positives in s.budgets:
            row = [variant, f"{positives:,}"]
            for method in METHODS:
                r = by.get((variant, positives, method))
                row.append(f"{r['mean']:.2f} ({r['std']:.2f}) n={len(r['values'])}" if r else "—")
            paper = PAPER_OURS.get(variant)
            i = BUDGETS.index(positives) if positives in BUDGETS else None
            row.append(f"{paper[i]:.2f}" if paper and i is not None else "—")
            lines.append("| " + " | ".join(row) + " |")
    if pretrain:
        lines += [
            "",
            "Collapse check after pre-training (AUROC % of |mu_c_A - mu_c_B| for change on the "
            "test pairs; about 50 means the common features collapsed):",
            "",
            "| variant | similarity | seed | AUROC % |",
            "|---|---|---|---|",
        ]
        for p in sorted(pretrain, key=lambda p: (p["variant"], p["similarity"], p["seed"])):
            lines.append(
                f"| {p['variant']} | {p['similarity']} | {p['seed']} | "
                f"{p['latent_distance_auroc']:.1f} |"
            )
    return "\n".join(lines) + "\n"
