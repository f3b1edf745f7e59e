"""A few steps of both training stages, the checkpoint they write and what reads it back."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import PatchSet, synthetic_patches
from training.model import ChangeDetector, ModelConfig
from training.synthetic import SceneConfig, plant_change, render_pair
from training.train import (
    CHECKPOINT_FORMAT,
    DataInfo,
    TrainConfig,
    detector_from_checkpoint,
    evaluate_patches,
    load_checkpoint,
    pixel_threshold,
    split_validation,
    train,
)

MODEL = ModelConfig(
    patch_size=32, widths=(8, 16), hidden=32, z_common=4, z_specific=3, classifier_hidden=8
)
STEPS = TrainConfig(batch_size=8, pretrain_steps=3, finetune_steps=3)
DATA = DataInfo(name="tiny synthetic", licence="Apache-2.0", description="test run")


@pytest.fixture(scope="module")
def patches() -> PatchSet:
    return synthetic_patches(range(4), patch=32, stride=16, size=128)


@pytest.fixture(scope="module")
def run(patches: PatchSet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train(patches, MODEL, STEPS, out, DATA, progress=False)
    return out


@pytest.fixture(scope="module")
def payload(run: Path) -> dict:
    return load_checkpoint(run / "checkpoint.pt")


def fit_positives(patches: PatchSet, cfg: TrainConfig) -> int:
    fit, _ = split_validation(patches, cfg.val_fraction, cfg.seed)
    return len(fit.split(cfg.positive_fraction)[1])


def test_train_writes_checkpoint_and_metrics(run: Path, payload: dict) -> None:
    assert sorted(os.listdir(run)) == [  # no *.tmp left
        "checkpoint.pt",
        "finetune_last.pt",
        "loss_curves.png",
        "metrics.json",
        "metrics.jsonl",
        "pretrain_last.pt",
    ]
    doc = json.loads((run / "metrics.json").read_text())
    assert doc["threshold"] == payload["threshold"]
    assert 0.0 <= doc["threshold"] <= 1.0
    assert {"auroc", "f1", "balanced_accuracy", "n_positive", "train_seconds"} <= set(
        doc["metrics"]
    )
    stages = [row["stage"] for row in doc["history"]]
    assert stages[0] == "pretrain" and stages[-1] == "finetune"
    assert {"recon", "kl", "similarity", "activation"} <= set(doc["history"][0])


def test_checkpoint_is_self_describing(payload: dict, patches: PatchSet) -> None:
    assert payload["format"] == CHECKPOINT_FORMAT
    assert payload["model_config"] == MODEL.to_dict()
    assert payload["train_config"] == asdict(STEPS)
    assert payload["data"]["name"] == DATA.name
    assert payload["data"]["band_names"] == ("red", "green", "blue")
    assert payload["recommended_stride"] == MODEL.patch_size // 4
    assert payload["n_positives"] == fit_positives(patches, STEPS) > 0
    assert payload["n_negatives"] > 0
    assert "validation patches" in payload["threshold_method"]
    assert not any(k.startswith("decoder") for k in payload["detector_state"])
    assert any(k.startswith("decoder") for k in payload["vae_state"])


def _garbage(path: Path) -> None:
    path.write_bytes(b"definitely not a checkpoint")


@pytest.mark.parametrize(
    "write",
    [
        lambda p: torch.save({"format": "someone-else/1", "weights": torch.zeros(2)}, p),
        lambda p: torch.save({"detector_state": {}}, p),
        lambda p: torch.save(torch.zeros(3), p),
        lambda p: torch.save([1, 2, 3], p),
        _garbage,
        lambda p: p.write_bytes(b""),
    ],
    ids=["other-format", "no-format", "tensor", "list", "garbage", "empty"],
)
def test_load_checkpoint_rejects_foreign_files(tmp_path: Path, write) -> None:
    path = tmp_path / "foreign.pt"
    write(path)
    with pytest.raises(ValueError, match="not a rarechange checkpoint"):
        load_checkpoint(path)


def test_detector_from_checkpoint_alone_reproduces_the_run(
    payload: dict, patches: PatchSet
) -> None:
    detector = detector_from_checkpoint(payload)
    assert isinstance(detector, ChangeDetector)
    assert not detector.training
    assert detector.cfg == MODEL  # rebuilt from the payload, not from MODEL
    state = detector.state_dict()
    for k, v in payload["detector_state"].items():
        assert torch.equal(state[k], v), k
    # the same scores: the validation metrics stored in the checkpoint come out again
    _, val = split_validation(patches, STEPS.val_fraction, STEPS.seed)
    again = evaluate_patches(detector, val, STEPS.positive_fraction, payload["threshold"])
    for k, v in again.items():
        stored = payload["metrics"][k]
        assert v == stored or (math.isnan(v) and math.isnan(stored)), k


def test_pixel_threshold(payload: dict) -> None:
    detector = detector_from_checkpoint(payload)
    scene = SceneConfig(height=64, width=64, n_changes=0)
    pairs = []
    for seed in (900, 901):
        p = plant_change(render_pair(seed, scene), (16, 16, 40, 40), seed=seed)
        pairs.append((p.before, p.after, p.mask))
    threshold, metrics = pixel_threshold(detector, pairs, stride=16)
    assert 0.0 <= threshold <= 1.0
    expected = {
        "pixel_precision",
        "pixel_recall",
        "pixel_f1",
        "pixel_iou",
        "pixel_accuracy",
        "pixel_balanced_accuracy",
        "pixel_auroc",
    }
    assert set(metrics) == expected
    assert all(0.0 <= v <= 1.0 for v in metrics.values()), metrics
    # at its own threshold something is flagged: recall of the planted change is not zero
    assert metrics["pixel_recall"] > 0


def test_max_positives_caps_the_label_budget(patches: PatchSet, tmp_path: Path) -> None:
    available = fit_positives(patches, STEPS)
    assert available >= 2
    cfg = TrainConfig(**{**asdict(STEPS), "max_positives": 1})
    scene = SceneConfig(height=64, width=64, change_rate=20.0)
    val = [render_pair(1_000_000 + i, scene) for i in range(2)]
    result = train(
        patches,
        MODEL,
        cfg,
        tmp_path,
        DATA,
        progress=False,
        validation_pairs=[(p.before, p.after, p.mask) for p in val],
        stride=16,
    )
    payload = load_checkpoint(result.checkpoint)
    assert payload["n_positives"] == 1
    assert payload["train_config"]["max_positives"] == 1
    # with validation scenes, the threshold is chosen on their stitched maps
    assert "held-out scenes" in payload["threshold_method"]
    assert payload["recommended_stride"] == 16
    assert "pixel_f1" in payload["metrics"]
    assert result.threshold == payload["threshold"]


def test_finetune_needs_positives(patches: PatchSet, tmp_path: Path) -> None:
    negatives_only = patches.select(np.flatnonzero(patches.changed_fraction == 0))
    with pytest.raises(ValueError, match="at least one positive"):
        train(negatives_only, MODEL, STEPS, tmp_path, DATA, progress=False)


def test_split_validation_partitions() -> None:
    ps = PatchSet(
        np.zeros((10, 1, 2, 2), np.uint8),
        np.zeros((10, 1, 2, 2), np.uint8),
        np.arange(10, dtype=np.float32),
    )
    fit, val = split_validation(ps, 0.3, seed=0)
    assert len(val) == 3 and len(fit) == 7
    together = np.sort(np.r_[fit.changed_fraction, val.changed_fraction])
    assert together.tolist() == list(range(10))
    again = split_validation(ps, 0.3, seed=0)[1]
    assert np.array_equal(again.changed_fraction, val.changed_fraction)
