"""fp16 and int8 variants of the bundled model: scored beside fp32, refused when too lossy."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.onnx_export import ExportResult
from export.variants import (
    HeldOut,
    Scores,
    VariantRejected,
    judge,
    make_variant,
    probabilities,
    score,
    to_int8,
)
from serving.backends.onnxruntime import OnnxRuntimeBackend
from serving.integrity import weights_sha256
from serving.metadata import ModelMetadata
from training.config import load_config
from training.data import PatchSet
from training.recipes import calibration_patches, held_out_patches

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "synthetic-thin" / "model.onnx"


@pytest.fixture(scope="module")
def held() -> HeldOut:
    patches, positive_fraction = held_out_patches(load_config(preset="thin"))
    return HeldOut.from_patches(patches, positive_fraction)


@pytest.fixture(scope="module")
def calibration() -> PatchSet:
    return calibration_patches(load_config(preset="thin"), n=256)


@pytest.fixture()
def reference(tmp_path: Path) -> ExportResult:
    out = tmp_path / "thin"
    out.mkdir()
    shutil.copy(BUNDLED, out / "model.onnx")
    meta = ModelMetadata.from_props({p.key: p.value for p in onnx.load(BUNDLED).metadata_props})
    return ExportResult(out / "model.onnx", meta, 0.0)


def test_held_out_set_has_both_classes_and_is_unseen(held: HeldOut) -> None:
    assert held.labels.sum() > 20 and (~held.labels).sum() > 1000
    assert held.before.dtype == np.uint8 and held.before.shape[1:] == (3, 32, 32)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_variant_is_written_measured_and_servable(
    precision: str, reference: ExportResult, held: HeldOut, calibration: PatchSet, tmp_path: Path
) -> None:
    target = tmp_path / f"thin-{precision}"
    report, meta = make_variant(
        reference.path, precision, target, held, calibration, max_accuracy_loss=1.0
    )
    assert report.accepted and report.path == target / "model.onnx"
    assert report.accuracy_change >= -1.0
    assert report.reference_accuracy > 95 and report.reference_auroc > 97
    assert meta.name == f"{reference.metadata.name}-{precision}"
    assert meta.precision == precision and meta.quantization["method"] != "none"
    assert meta.metrics["accuracy_change_vs_fp32"] == pytest.approx(report.accuracy_change)
    assert meta.default_threshold == reference.metadata.default_threshold
    # serving loads it: metadata valid, digest of its own (quantized) weights
    with OnnxRuntimeBackend(report.path) as backend:
        assert backend.metadata == meta
        assert meta.weights_sha256 == weights_sha256(onnx.load(report.path))
        assert meta.weights_sha256 != reference.metadata.weights_sha256
        got = backend.infer(held.before[:256], held.after[:256])
    ref = probabilities(onnx.load(reference.path), HeldOut(held.before, held.after, held.labels))
    assert np.mean(np.abs(got - ref[:256])) < 0.02
    if precision == "int8":
        ops = {n.op_type for n in onnx.load(report.path).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_too_lossy_variant_is_refused_and_not_written(
    reference: ExportResult, held: HeldOut, calibration: PatchSet, tmp_path: Path
) -> None:
    # calibrating on blank patches squeezes every activation range to nothing: a broken int8
    blank = PatchSet(
        np.zeros_like(calibration.before[:64]),
        np.zeros_like(calibration.after[:64]),
        calibration.changed_fraction[:64],
    )
    broken = score(to_int8(onnx.load(reference.path), blank), held, 0.9462)
    assert broken.accuracy < 90  # constructed to be lossy
    target = tmp_path / "thin-int8"
    with pytest.raises(VariantRejected, match="int8 variant refused") as exc:
        make_variant(reference.path, "int8", target, held, blank, max_accuracy_loss=1.0)
    assert not exc.value.report.accepted and exc.value.report.accuracy_change < -1.0
    assert not target.exists()


def test_margin_is_configurable() -> None:
    ref, var = Scores(auroc=99.0, accuracy=95.0), Scores(auroc=98.0, accuracy=93.5)
    assert not judge("int8", var, ref, 100, max_accuracy_loss=1.0).accepted
    assert judge("int8", var, ref, 100, max_accuracy_loss=2.0).accepted
    assert judge("fp16", ref, ref, 100, max_accuracy_loss=0.0).accepted


def test_int8_without_calibration_is_an_error(reference: ExportResult, held: HeldOut) -> None:
    with pytest.raises(ValueError, match="calibration"):
        make_variant(reference.path, "int8", reference.path.parent / "x", held, None)
