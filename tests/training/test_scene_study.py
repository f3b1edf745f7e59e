"""The few-label study driver: cells, cross-fold thresholds, resume, on a written folder dataset."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.experiments.scene_study import (
    HIST_BINS,
    SceneStudy,
    StudySettings,
    best_bin,
    counts_at,
    f1_of,
    histograms,
)
from training.synthetic import SceneConfig, render_pair

TINY = (
    "model.widths=[8, 16]",
    "model.hidden=32",
    "model.z_common=4",
    "model.z_specific=3",
    "model.classifier_hidden=8",
    "train.batch_size=8",
    "train.pretrain_steps=3",
    "train.finetune_steps=3",
    "train.finetune_steps_per_epoch=3",
    "train.freeze_encoder_steps=0",
    "train.device='cpu'",
    "data.stride=16",
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    for sub in ("A", "B", "label"):
        (root / sub).mkdir()
    for i in range(3):
        p = render_pair(i, SceneConfig(height=96, width=96, change_rate=40.0))
        Image.fromarray(p.before).save(root / "A" / f"p{i}.png")
        Image.fromarray(p.after).save(root / "B" / f"p{i}.png")
        Image.fromarray(p.mask * 255).save(root / "label" / f"p{i}.png")
    return root


def test_histograms_and_threshold_choice() -> None:
    prob = np.array([0.0, 0.1, 0.5, 0.9, 0.95, 1.0])
    truth = np.array([0, 0, 1, 1, 0, 1], bool)
    h = histograms(prob, truth)
    assert sum(h["positive"]) == 3 and sum(h["negative"]) == 3
    assert h["positive"][HIST_BINS - 1] == 1  # 1.0 lands in the last bin
    k = int(0.5 * HIST_BINS)
    assert counts_at(h, k) == (3, 1, 0)  # >= 0.5: three hits, 0.95 a false alarm
    assert f1_of(3, 1, 0) == pytest.approx(6 / 7)
    # every threshold in (0.1, 0.5] gives that F1: the lowest bin above 0.1's wins
    assert best_bin([h]) == int(0.1 * HIST_BINS) + 1
    assert f1_of(0, 5, 3) == 0.0


def test_cells_cross_fold_thresholds_and_resume(folder: Path, tmp_path: Path) -> None:
    settings = StudySettings(
        preset="aerial-rgb",
        budgets=(1, None),
        seeds=(0,),
        finetune_steps={"1": 2},
        extra=(f"data.dataset='folder:{folder}'", *TINY),
    )
    results, work = tmp_path / "results", tmp_path / "work"
    study = SceneStudy(settings, results, work, progress=False)
    assert study.folds() == ["p0", "p1", "p2"]
    assert "train.max_positives=1" in study.command("p1", "ours", 1, 0)
    assert "train.from_scratch=true" in study.command("p1", "siamese", None, 0)
    assert "train.finetune_steps=2" in study.command("p1", "siamese", 1, 0)
    # the headline cells (first seed, every positive) come first
    assert study.todo("p0")[:4] == [
        ("ours", None, 0),
        ("ours-distance", None, 0),
        ("ours-no-labels", None, 0),
        ("siamese", None, 0),
    ]
    distance = study.command("p1", "ours-distance", 1, 0)
    assert "model.classifier=distance" in distance and "train.encoder_lr_scale=0" in distance
    study.run()

    cells = sorted(p.name for p in study.cells_dir.glob("*.json"))
    assert len(cells) == 3 * (1 + 4 * 2)  # per fold: cva + 4 methods x {1, all}
    cell = json.loads((study.cells_dir / "p1_ours_1_s0.json").read_text())
    assert cell["n_positives"] == 1 and cell["fold"] == "p1"
    assert sum(cell["hist"]["positive"]) + sum(cell["hist"]["negative"]) == 96 * 96
    assert 0.0 <= cell["auroc"] <= 1.0
    # the cva-gated mask rule, scored on the same map: Otsu's cut and the F1 it gives
    assert cell["gated"]["cut"] >= 0 and 0.0 <= cell["gated"]["f1"] <= 1.0
    assert "gated" not in json.loads((study.cells_dir / "p1_cva.json").read_text())

    summary = json.loads((results / f"{study.name}.json").read_text())
    row = next(r for r in summary["rows"] if (r["method"], r["budget"]) == ("ours", "1"))
    # fold p0's threshold is the best pooled F1 of p1 and p2's maps, never of p0's own
    recs = {
        f: json.loads((study.cells_dir / f"{f}_ours_1_s0.json").read_text())
        for f in ("p0", "p1", "p2")
    }
    k = best_bin([recs["p1"]["hist"], recs["p2"]["hist"]])
    assert row["cross_fold"]["p0"]["threshold"] == k / HIST_BINS
    assert row["cross_fold"]["p0"]["f1"] == pytest.approx(f1_of(*counts_at(recs["p0"]["hist"], k)))
    assert set(summary["cva"]) == {"p0", "p1", "p2"}
    md = (results / f"{study.name}.md").read_text()
    assert "| ours | 1 | 1 | 3 |" in md and "CVA + Otsu" in md
    gated = [recs[f]["gated"]["f1"] for f in ("p0", "p1", "p2")]
    assert row["mean_gated_f1"] == pytest.approx(np.mean(gated))
    assert row["per_fold"]["p2"]["gated_f1"] == recs["p2"]["gated"]["f1"]

    # resume: nothing left to do, and no cell is rewritten
    before = {p: p.stat().st_mtime_ns for p in study.cells_dir.iterdir()}
    assert all(not study.todo(f) for f in study.folds())
    study.run()
    after = {p: p.stat().st_mtime_ns for p in study.cells_dir.iterdir()}
    assert before == after

    # another protocol (one more override) writes elsewhere and never over these cells
    other = SceneStudy(
        StudySettings(**{**settings.__dict__, "extra": (*settings.extra, "train.seed=3")}),
        results,
        work,
        progress=False,
    )
    untrained = json.loads((study.cells_dir / "p1_ours-no-labels_1_s0.json").read_text())
    assert "train.finetune_lr=0" in untrained["command"]
    assert other.digest != study.digest and other.cells_dir != study.cells_dir
    assert study.name == "study-aerial-rgb_" + study.digest  # its extra overrides: its own name
    with pytest.raises(FileExistsError, match="another protocol"):
        other.cells_dir = study.cells_dir
        other.write_cell("p1_ours_1_s0.json", "p1", "ours", 1, 0, None, None, {}, 0.0, "")


def test_pretraining_seed_is_a_protocol_of_its_own(tmp_path: Path) -> None:
    """Seed 0 keeps the digests of the studies run before the option existed (their committed
    cells stay theirs); another pre-training seed gets its own cells and says so in commands."""
    sixty = StudySettings(preset="sentinel2-rgbn", extra=("train.pretrain_steps=60000",))
    assert sixty.digest() == "c49a3d999d14"  # docs/results/study-sentinel2-rgbn_c49a3d999d14*
    plain = SceneStudy(StudySettings(preset="sentinel2-rgbn"), tmp_path, tmp_path, progress=False)
    assert plain.name == "study-sentinel2-rgbn"
    seeded = SceneStudy(
        StudySettings(preset="sentinel2-rgbn", pretrain_seed=1), tmp_path, tmp_path, progress=False
    )
    assert seeded.digest != plain.digest and seeded.name == f"study-sentinel2-rgbn_{seeded.digest}"
    assert "train.seed=1" in seeded.command("pisa", "ours", None, 1)
    assert "# pre-training" not in seeded.command("pisa", "ours", None, 1)
    assert "with train.seed=1" in seeded.command("pisa", "ours", None, 0)
    assert "# pre-training" not in seeded.command("pisa", "siamese", None, 0)  # none to share
