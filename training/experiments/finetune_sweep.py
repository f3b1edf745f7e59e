"""Choose Table 3's fine-tuning settings on validation pairs, never on the test split.

Takes a finished pre-training of the Table 3 driver (one variant, one seed, with similarity) and
fine-tunes it with each candidate (steps, encoder learning-rate scale) at one budget of positives,
scoring on validation pairs drawn from the *training* split with their own seed. Each candidate is
one small JSON file in ``docs/results/finetune_sweep/``, so the sweep resumes and can be committed
as it goes. Usage:

    python -m training.experiments.finetune_sweep --variant MNIST-R --positives 500 \
        --candidates 1000:0.01,3000:0.01,1000:0.1,3000:0.1,3000:1.0
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from training.data import PatchSet
from training.datasets.augmented_mnist import make_pairs
from training.experiments.table3 import MNIST_MODEL, Table3, Table3Settings, write_json
from training.model import ChangeDetector, DisentangledVAE
from training.train import balanced_test_scores, finetune, pretrain

log = logging.getLogger(__name__)

VALIDATION_SEED = 4242  # validation pairs: training split, a seed no Table 3 cell uses
ROOT = Path(__file__).resolve().parents[2]


def split_pairs(variant: str, seed: int, n_negative: int, n_positive: int) -> tuple[PatchSet, ...]:
    train = make_pairs(variant, "train", n_negative, n_positive, seed)
    neg, pos = train.label == 0, train.label == 1
    return (
        PatchSet(train.before[neg], train.after[neg], np.zeros(int(neg.sum()), np.float32)),
        PatchSet(train.before[pos], train.after[pos], np.ones(int(pos.sum()), np.float32)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", default="MNIST-R")
    parser.add_argument("--positives", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidates", default="1000:0.01,3000:0.01,1000:0.1,3000:0.1,3000:1.0")
    parser.add_argument("--n-validation", type=int, default=5000, help="per class")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "table3")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "finetune_sweep")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--pretrain-epochs",
        type=float,
        default=Table3Settings.pretrain_epochs,
        help="longer than the table's: continues its finished pre-training (same result as a "
        "fresh run, since epochs are deterministic and checkpoints hold the optimiser)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    settings = Table3Settings(seeds=(args.seed,), pretrain_epochs=args.pretrain_epochs)
    table = Table3(settings, ROOT / "docs" / "results", args.work, progress=False)
    negatives, all_pos = split_pairs(
        args.variant, args.seed, settings.n_negative, max(settings.budgets)
    )
    positives = all_pos.select(np.arange(args.positives))  # exactly the Table 3 cell's positives
    val = make_pairs(
        args.variant, "train", args.n_validation, args.n_validation, VALIDATION_SEED
    ).to_patchset()
    # the driver's own stage-1 run folder: resumed, so a finished pre-training is just loaded
    run_dir = args.work / table.digest / args.variant / f"s{args.seed}" / "with_sim"
    table_dir = args.work / Table3Settings().digest() / args.variant / f"s{args.seed}" / "with_sim"
    if not (run_dir / "pretrain_last.pt").exists() and (table_dir / "pretrain_last.pt").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(table_dir / "pretrain_last.pt", run_dir / "pretrain_last.pt")
    torch.manual_seed(args.seed)
    vae = DisentangledVAE(MNIST_MODEL)
    stage1 = replace(table.train_config(args.seed, settings.budgets[0]), similarity="jeffrey")
    pretrain(vae, negatives, stage1, False, run_dir)
    vae.eval()

    for item in args.candidates.split(","):
        steps_text, scale_text = item.split(":")
        steps, scale = int(steps_text), float(scale_text)
        name = f"{args.variant}_{args.positives}_s{args.seed}_steps{steps}_enc{scale:g}"
        if args.pretrain_epochs != Table3Settings.pretrain_epochs:
            name += f"_pre{args.pretrain_epochs:g}"
        name += ".json"
        path = args.out / name
        if path.exists():
            log.info("%s done: %s", name, json.loads(path.read_text())["validation_accuracy"])
            continue
        t0 = time.perf_counter()
        cfg = replace(
            table.train_config(args.seed, args.positives),
            finetune_steps=steps,
            encoder_lr_scale=scale,
        )
        detector = ChangeDetector(MNIST_MODEL)
        detector.encoder.load_state_dict(vae.encoder.state_dict())
        torch.manual_seed(args.seed)
        finetune(detector, negatives, positives, cfg, progress=False)
        scores = balanced_test_scores(detector, val)
        write_json(
            path,
            {
                "variant": args.variant,
                "positives": args.positives,
                "seed": args.seed,
                "finetune_steps": steps,
                "encoder_lr_scale": scale,
                "validation_accuracy": scores["accuracy"],
                "validation_auroc": scores["auroc"],
                "n_validation_per_class": args.n_validation,
                "validation_seed": VALIDATION_SEED,
                "pretrain_epochs": args.pretrain_epochs,
                "seconds": round(time.perf_counter() - t0, 1),
                "train_config": asdict(cfg),
            },
        )
        log.info("%s: validation accuracy %.2f %%", name, scores["accuracy"])


if __name__ == "__main__":
    main()
