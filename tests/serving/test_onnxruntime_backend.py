"""The ONNX Runtime backend refuses any model file it cannot trust, naming what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from serving.backends.onnxruntime import OnnxRuntimeBackend
from serving.config import ServerSettings
from serving.errors import ModelLoadError
from serving.metadata import KEY_PREFIX
from serving.models import ModelRepository

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "synthetic-thin" / "model.onnx"


def bundled() -> onnx.ModelProto:
    return onnx.load(BUNDLED)


def save(model: onnx.ModelProto, tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return path


def set_prop(model: onnx.ModelProto, key: str, value: object) -> None:
    for p in model.metadata_props:
        if p.key == KEY_PREFIX + key:
            p.value = json.dumps(value)
            return
    raise KeyError(key)


def test_the_bundled_model_loads_and_scores() -> None:
    with OnnxRuntimeBackend(BUNDLED) as backend:
        meta = backend.metadata
        x = np.zeros((3, meta.channels, meta.patch_size, meta.patch_size), np.uint8)
        out = backend.infer(x, x)
    assert out.shape == (3,) and out.dtype == np.float32


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.97])
def test_truncated_file_is_refused(tmp_path: Path, fraction: float) -> None:
    data = BUNDLED.read_bytes()
    path = tmp_path / "model.onnx"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelLoadError, match=str(path)):
        OnnxRuntimeBackend(path)


def test_not_an_onnx_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(ModelLoadError, match=r"model\.onnx"):
        OnnxRuntimeBackend(path)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot read"):
        OnnxRuntimeBackend(tmp_path / "absent.onnx")


def test_weights_changed_after_export_are_refused(tmp_path: Path) -> None:
    model = bundled()
    init = model.graph.initializer[0]
    array = numpy_helper.to_array(init).copy()
    array.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    with pytest.raises(ModelLoadError, match="weights_sha256"):
        OnnxRuntimeBackend(save(model, tmp_path))


def test_metadata_digest_of_another_model_is_refused(tmp_path: Path) -> None:
    model = bundled()
    set_prop(model, "weights_sha256", "0" * 64)
    with pytest.raises(ModelLoadError, match=r"weights_sha256.*re-export"):
        OnnxRuntimeBackend(save(model, tmp_path))


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        ("patch_size", "big", "patch_size"),
        ("default_threshold", 1.5, "default_threshold"),
        ("band_names", ["red"], "band_names"),
        ("input_dtype", "int64", "input_dtype"),
    ],
)
def test_invalid_metadata_is_refused_naming_the_field(
    tmp_path: Path, key: str, value: object, field: str
) -> None:
    model = bundled()
    set_prop(model, key, value)
    with pytest.raises(ModelLoadError, match=field):
        OnnxRuntimeBackend(save(model, tmp_path))


def test_missing_metadata_is_refused(tmp_path: Path) -> None:
    model = bundled()
    del model.metadata_props[:]
    with pytest.raises(ModelLoadError, match="no rarechange metadata"):
        OnnxRuntimeBackend(save(model, tmp_path))


def test_a_missing_metadata_field_is_named(tmp_path: Path) -> None:
    model = bundled()
    keep = [p for p in model.metadata_props if p.key != KEY_PREFIX + "recommended_stride"]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    with pytest.raises(ModelLoadError, match="recommended_stride"):
        OnnxRuntimeBackend(save(model, tmp_path))


def test_metadata_that_contradicts_the_graph_is_refused(tmp_path: Path) -> None:
    model = bundled()
    set_prop(model, "patch_size", 64)
    set_prop(model, "recommended_stride", 16)
    with pytest.raises(ModelLoadError, match="shape"):
        OnnxRuntimeBackend(save(model, tmp_path))


# ---------------------------------------------------------------------- execution providers
AVAILABLE = ort.get_available_providers()


def test_cpu_provider() -> None:
    with OnnxRuntimeBackend(BUNDLED, providers="cpu") as backend:
        assert backend.provider == "CPUExecutionProvider"


def test_auto_takes_the_best_provider_available() -> None:
    best = next(
        p
        for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
        if p in AVAILABLE
    )
    with OnnxRuntimeBackend(BUNDLED, providers="auto") as backend:
        assert backend.provider == best


@pytest.mark.parametrize(
    ("choice", "provider"),
    [("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")],
)
def test_a_gpu_provider_asked_for_but_missing_fails_loudly(choice: str, provider: str) -> None:
    if provider in AVAILABLE:
        pytest.skip(f"{provider} is available here")
    with pytest.raises(ModelLoadError, match=provider) as err:
        OnnxRuntimeBackend(BUNDLED, providers=choice)
    assert "rarechange[gpu]" in str(err.value)


def test_the_repository_passes_the_providers_setting_through(tmp_path: Path) -> None:
    if "CUDAExecutionProvider" in AVAILABLE:
        pytest.skip("CUDA is available here")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(BUNDLED.read_bytes())
    settings = ServerSettings(models_dir=tmp_path, providers="cuda", metrics_port=-1)
    with pytest.raises(ModelLoadError, match="providers=cuda needs ONNX Runtime's CUDA"):
        ModelRepository.load(settings)
