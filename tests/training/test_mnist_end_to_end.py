"""A tiny run of the whole method on real MNIST pairs: it must learn, and resume exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.config import load_config
from training.datasets.augmented_mnist import MnistNotFound, load_mnist
from training.recipes import run

TINY = [
    'data.variant="MNIST-B"',
    "data.n_negative=3000",
    "data.n_positive=300",
    "data.n_test_per_class=1000",
    "train.pretrain_epochs=2",
    "train.finetune_steps=300",
    "train.freeze_encoder_steps=100",
    "train.encoder_lr_scale=0.1",
    "train.batch_size=64",
    'train.device="cpu"',
]


@pytest.fixture(scope="module", autouse=True)
def mnist() -> None:
    try:
        load_mnist("test")
    except MnistNotFound as exc:
        pytest.skip(str(exc))


@pytest.mark.slow
def test_tiny_run_learns_on_real_mnist(tmp_path: Path) -> None:
    result = run(load_config(preset="mnist", overrides=TINY), tmp_path, progress=False)
    assert result is not None
    # a balanced test set from the test split: chance is 50 %
    assert result.metrics["test_accuracy"] > 65, result.metrics
    assert result.metrics["test_auroc"] > 70, result.metrics
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"pretrain", "finetune"}
    assert (tmp_path / "loss_curves.png").stat().st_size > 0


def test_killed_pretraining_resumes_to_the_same_weights(tmp_path: Path, monkeypatch) -> None:
    """Kill stage 1 mid-way (an exception in epoch 2), run again: same weights as uninterrupted."""
    import training.losses as losses

    overrides = [*TINY, "data.n_negative=600", "data.n_positive=20", "train.pretrain_epochs=3"]
    config = load_config(preset="mnist", overrides=overrides)
    run(config, tmp_path / "whole", stage="pretrain", progress=False)

    real = losses.activation_loss
    calls = {"n": 0}
    steps_per_epoch = 600 // config.train.batch_size

    def dies_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > steps_per_epoch + 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, "activation_loss", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path / "killed", stage="pretrain", progress=False)
    monkeypatch.setattr(losses, "activation_loss", real)
    assert torch.load(tmp_path / "killed" / "pretrain_last.pt", weights_only=False)["epoch"] == 1
    run(config, tmp_path / "killed", stage="pretrain", progress=False)

    whole = torch.load(tmp_path / "whole" / "pretrain_last.pt", weights_only=False)
    resumed = torch.load(tmp_path / "killed" / "pretrain_last.pt", weights_only=False)
    assert whole["epoch"] == resumed["epoch"] == 3
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


def test_finetune_stage_needs_pretraining(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pretrain stage first"):
        run(load_config(preset="mnist", overrides=TINY), tmp_path, stage="finetune")


def test_resuming_with_another_config_is_refused(tmp_path: Path) -> None:
    from training.recipes import ConfigMismatch, remember_config

    remember_config(load_config(preset="mnist", overrides=TINY), tmp_path)
    with pytest.raises(ConfigMismatch):
        remember_config(load_config(preset="mnist", overrides=[*TINY, "train.seed=5"]), tmp_path)


def test_resuming_a_run_from_before_a_new_setting_is_the_same_run(tmp_path: Path) -> None:
    """A config.json written before a field existed resumes when the field keeps its default,
    and is refused when the resumed run sets it otherwise; a file that no longer validates is
    another run."""
    from training.recipes import ConfigMismatch, remember_config

    config = load_config(preset="mnist", overrides=TINY)
    stored = json.loads(config.model_dump_json())
    del stored["model"]["classifier"], stored["train"]["threshold"]  # as written before them
    (tmp_path / "config.json").write_text(json.dumps(stored))
    remember_config(config, tmp_path)
    with pytest.raises(ConfigMismatch):
        remember_config(
            load_config(preset="mnist", overrides=[*TINY, "train.threshold=0.3"]), tmp_path
        )
    stored["model"]["retired_setting"] = 1
    (tmp_path / "config.json").write_text(json.dumps(stored))
    with pytest.raises(ConfigMismatch):
        remember_config(config, tmp_path)
