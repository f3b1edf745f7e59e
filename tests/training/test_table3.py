"""The Table 3 driver on a tiny real-MNIST protocol: cells, summary, resume, longer pre-training."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from training.experiments.table3 import METHODS, Table3, Table3Settings, cell_name

pytestmark = pytest.mark.slow


def tiny(**kw: object) -> Table3Settings:
    base = Table3Settings(
        seeds=(0,),
        variants=("MNIST-R",),
        budgets=(5,),
        n_negative=256,
        n_test_per_class=64,
        pretrain_epochs=1.0,
        finetune_steps={5: 4},
        encoder_lr_scale={5: 0.01},
        freeze_encoder_steps=2,
        baseline_steps={5: 4},
        batch_size=32,
    )
    return replace(base, **kw)


def test_cells_summary_and_resume(shared_data: Path, tmp_path: Path) -> None:
    results, work = tmp_path / "results", tmp_path / "work"
    table = Table3(tiny(), results, work, progress=False)
    table.run()
    table.write_summary(command="rarechange experiment table3 --tiny")
    for method in METHODS:
        cell = json.loads(
            (results / "table3_cells" / cell_name("MNIST-R", 5, method, 0)).read_text()
        )
        assert cell["protocol"] == table.digest
        assert 0.0 <= cell["accuracy"] <= 100.0 and 0.0 <= cell["auroc"] <= 100.0
    summary = json.loads((results / "table3.json").read_text())
    records = {(c["variant"], c["positives"], c["method"]): c for c in summary["cells"]}
    assert set(records) == {("MNIST-R", 5, m) for m in METHODS}
    assert all(c["seeds"] == [0] and len(c["values"]) == 1 for c in records.values())
    md = (results / "table3.md").read_text()
    assert "rarechange experiment table3 --tiny" in md
    assert "| MNIST-R | 5 |" in md and "256 negative pairs" in md

    # resume: finished cells are skipped, not recomputed
    stamps = {p.name: p.stat().st_mtime_ns for p in (results / "table3_cells").glob("*.json")}
    Table3(tiny(), results, work, progress=False).run()
    assert stamps == {
        p.name: p.stat().st_mtime_ns for p in (results / "table3_cells").glob("*.json")
    }

    # another protocol (longer pre-training) has its own table and continues the shorter run
    longer = Table3(
        tiny(pretrain_epochs=2.0, methods=("vae-with-sim",)),
        results,
        work,
        progress=False,
        name="table3-pre2",
    )
    longer.run()
    longer.write_summary()
    assert (results / "table3-pre2.md").exists()
    assert (results / "table3-pre2_cells" / cell_name("MNIST-R", 5, "vae-with-sim", 0)).exists()
    assert (
        stamps["MNIST-R_5_vae-with-sim_s0.json"]
        == (results / "table3_cells" / "MNIST-R_5_vae-with-sim_s0.json").stat().st_mtime_ns
    )  # the main table's cell is untouched


def test_continuing_a_shorter_pretraining_equals_a_fresh_one(
    shared_data: Path, tmp_path: Path
) -> None:
    from training.data import PatchSet
    from training.datasets.augmented_mnist import make_pairs

    train = make_pairs("MNIST-R", "train", 256, 5, 0)
    neg = train.label == 0
    negatives = PatchSet(train.before[neg], train.after[neg], train.label[neg].astype("float32"))
    test = make_pairs("MNIST-R", "test", 32, 32, 1).to_patchset()

    short = Table3(tiny(), tmp_path / "r", tmp_path / "continued", progress=False)
    short.pretrained("MNIST-R", 0, True, negatives, test)
    continued = Table3(
        tiny(pretrain_epochs=2.0), tmp_path / "r", tmp_path / "continued", progress=False
    ).pretrained("MNIST-R", 0, True, negatives, test)
    fresh = Table3(
        tiny(pretrain_epochs=2.0), tmp_path / "r2", tmp_path / "fresh", progress=False
    ).pretrained("MNIST-R", 0, True, negatives, test)
    for (name, a), b in zip(
        continued.state_dict().items(), fresh.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
