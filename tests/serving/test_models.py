"""The model repository: every model of a folder for the server, or just one for a batch run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from serving.config import ServerSettings
from serving.errors import ModelLoadError, ModelNotFound
from serving.models import ModelRepository

MODELS = Path(__file__).resolve().parents[2] / "models"


def folder_of(tmp_path: Path, **models: str) -> Path:
    """``folder name -> bundled model`` copied into a models directory ("" = damaged bytes)."""
    root = tmp_path / "models"
    for name, source in models.items():
        (root / name).mkdir(parents=True)
        if source:
            shutil.copy(MODELS / source / "model.onnx", root / name / "model.onnx")
        else:
            (root / name / "model.onnx").write_bytes(b"not a model")
    return root


def settings(root: Path) -> ServerSettings:
    return ServerSettings(models_dir=root, metrics_port=-1, warmup=False)


def test_a_server_loads_every_model_a_batch_run_only_its_own(tmp_path: Path) -> None:
    root = folder_of(tmp_path, **{"synthetic-thin": "synthetic-thin", "aerial-rgb": "aerial-rgb"})
    every = ModelRepository.load(settings(root))
    assert sorted(every.models) == ["aerial-rgb", "synthetic-thin"]
    every.stop()
    one = ModelRepository.load(settings(root), only="aerial-rgb")
    assert list(one.models) == ["aerial-rgb"] and one.get().metadata.name == "aerial-rgb"
    one.stop()


def test_a_model_is_found_by_its_metadata_when_its_folder_has_another_name(
    tmp_path: Path,
) -> None:
    root = folder_of(tmp_path, renamed="synthetic-thin", broken="", other="aerial-rgb")
    with pytest.raises(ModelLoadError):  # the server loads every model or none
        ModelRepository.load(settings(root))
    # a batch run asks for one: a damaged model beside it stops nothing
    one = ModelRepository.load(settings(root), only="synthetic-thin")
    assert list(one.models) == ["synthetic-thin"]
    assert one.models["synthetic-thin"].path == root / "renamed" / "model.onnx"
    one.stop()


def test_an_unknown_model_is_named_with_what_the_folder_has(tmp_path: Path) -> None:
    root = folder_of(tmp_path, **{"aerial-rgb": "aerial-rgb"})
    with pytest.raises(ModelNotFound, match=r"no model named 'nope'.*\['aerial-rgb'\]"):
        ModelRepository.load(settings(root), only="nope")
