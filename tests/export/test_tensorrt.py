"""TensorRT engines: built on an NVIDIA GPU only; elsewhere, a refusal naming what is missing."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from export.tensorrt import (
    PROVIDER,
    TensorRTUnavailable,
    build_engine,
    provider_options,
    require_tensorrt,
)
from serving.metadata import ModelMetadata

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "synthetic-thin" / "model.onnx"
HAS_TRT = PROVIDER in ort.get_available_providers()


def metadata() -> ModelMetadata:
    return ModelMetadata.from_props({p.key: p.value for p in onnx.load(BUNDLED).metadata_props})


def test_profile_spans_the_batch_sizes_serving_sends(tmp_path: Path) -> None:
    opts = provider_options(tmp_path, metadata(), (1, 16, 64))
    assert opts["trt_fp16_enable"] == "True"
    assert opts["trt_engine_cache_enable"] == "True"
    assert opts["trt_engine_cache_path"] == str(tmp_path)
    assert opts["trt_profile_min_shapes"] == "before:1x3x32x32,after:1x3x32x32"
    assert opts["trt_profile_max_shapes"] == "before:64x3x32x32,after:64x3x32x32"


@pytest.mark.skipif(HAS_TRT, reason="this machine has TensorRT")
def test_without_tensorrt_the_refusal_names_what_is_missing() -> None:
    with pytest.raises(TensorRTUnavailable, match=r"TensorrtExecutionProvider.*NVIDIA GPU"):
        require_tensorrt()


@pytest.mark.skipif(
    not HAS_TRT,
    reason="needs an NVIDIA GPU with TensorRT and onnxruntime-gpu "
    f"(ONNX Runtime here offers {ort.get_available_providers()}); run bench/gpu_check.sh there",
)
def test_engine_builds_and_agrees_with_cpu(tmp_path: Path) -> None:
    build = build_engine(BUNDLED, tmp_path / "cache", batch_sizes=(1, 7, 64))
    assert any((tmp_path / "cache").iterdir())
    assert build.max_abs_diff_vs_cpu < 1e-2  # FP16 against fp32 on probabilities
