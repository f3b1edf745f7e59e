"""Reduced-precision variants of an exported model (fp16, int8), each judged on held-out patches.

A variant is only worth serving if it decides like the fp32 model it came from. Export scores both
on the same labelled held-out patch pairs, at the fp32 model's decision threshold, and refuses a
variant whose balanced accuracy drops by more than a margin (default 1 point). The numbers go into
the variant's metadata and model card.

int8 is static QDQ quantization with ONNX Runtime (weights per channel int8, activations uint8,
MinMax ranges calibrated on patch pairs from the run's own training distribution); fp16 converts
weights and activations to float16 with float inputs and outputs kept, so serving feeds it the
same uint8 patches.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort

from export.onnx_export import ExportResult, write_model_card
from serving.integrity import weights_sha256
from serving.metadata import INPUT_NAMES, OUTPUT_NAME, ModelMetadata
from serving.quality import auroc
from training.data import PatchSet

log = logging.getLogger(__name__)

Precision = Literal["fp16", "int8"]
DEFAULT_MAX_ACCURACY_LOSS = 1.0  # points of accuracy


class VariantRejected(RuntimeError):
    """The variant decides too differently from fp32 to be served in its place."""

    def __init__(self, report: VariantReport) -> None:
        self.report = report
        super().__init__(
            f"{report.precision} variant refused: accuracy {report.accuracy:.2f} % vs fp32 "
            f"{report.reference_accuracy:.2f} % ({report.accuracy_change:+.2f} points, "
            f"allowed -{report.max_accuracy_loss:g}); AUROC {report.auroc:.2f} % vs "
            f"{report.reference_auroc:.2f} %"
        )


@dataclass(frozen=True)
class HeldOut:
    """Unambiguous labelled patch pairs: unchanged, or changed by at least the positive fraction."""

    before: np.ndarray
    after: np.ndarray
    labels: np.ndarray  # bool

    @classmethod
    def from_patches(cls, patches: PatchSet, positive_fraction: float) -> HeldOut:
        neg, pos = patches.split(positive_fraction)
        if len(neg) == 0 or len(pos) == 0:
            raise ValueError(
                f"held-out set needs both classes: {len(neg)} unchanged, {len(pos)} changed"
            )
        both = PatchSet.concat([neg, pos])
        return cls(
            both.before, both.after, np.r_[np.zeros(len(neg), bool), np.ones(len(pos), bool)]
        )

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Scores:
    auroc: float  # %
    accuracy: float  # balanced, % at the threshold


@dataclass(frozen=True)
class VariantReport:
    precision: Precision
    accuracy: float
    auroc: float
    reference_accuracy: float
    reference_auroc: float
    max_accuracy_loss: float
    n_held_out: int
    path: Path | None  # None when refused

    @property
    def accuracy_change(self) -> float:
        return self.accuracy - self.reference_accuracy

    @property
    def auroc_change(self) -> float:
        return self.auroc - self.reference_auroc

    @property
    def accepted(self) -> bool:
        return self.accuracy_change >= -self.max_accuracy_loss


def probabilities(model: onnx.ModelProto | bytes, held: HeldOut, batch: int = 1024) -> np.ndarray:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    out = [
        session.run(
            [OUTPUT_NAME],
            {INPUT_NAMES[0]: held.before[i : i + batch], INPUT_NAMES[1]: held.after[i : i + batch]},
        )[0]
        for i in range(0, len(held), batch)
    ]
    return np.concatenate(out).astype(np.float32).reshape(-1)


def score(model: onnx.ModelProto | bytes, held: HeldOut, threshold: float) -> Scores:
    """AUROC and balanced accuracy (mean of the two per-class accuracies) at ``threshold``.

    Balanced, because held-out patches are mostly unchanged: plain accuracy would let a variant
    that misses every change score 99 %.
    """
    p = probabilities(model, held)
    said = p >= threshold
    per_class = [float((said[held.labels == c] == c).mean()) for c in (False, True)]
    return Scores(auroc=100.0 * auroc(p, held.labels), accuracy=50.0 * sum(per_class))


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_float_to_float16(model, keep_io_types=True)


class _Calibration:
    """Feeds calibration batches to the quantizer (its CalibrationDataReader protocol)."""

    def __init__(self, patches: PatchSet, batch: int = 64) -> None:
        self._batches = iter(
            [
                {
                    INPUT_NAMES[0]: patches.before[i : i + batch],
                    INPUT_NAMES[1]: patches.after[i : i + batch],
                }
                for i in range(0, len(patches), batch)
            ]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def to_int8(model: onnx.ModelProto, calibration: PatchSet) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise ValueError("int8 calibration needs at least one patch pair")
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src, pre, dst = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(model, src)
        quant_pre_process(str(src), str(pre))
        quantize_static(
            str(pre),
            str(dst),
            _Calibration(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        return onnx.load(dst)


def quantization_details(precision: Precision, n_calibration: int) -> dict[str, object]:
    if precision == "fp16":
        return {"method": "float16 weights and activations; uint8 inputs, float32 output kept"}
    return {
        "method": "onnxruntime static QDQ: int8 per-channel weights, uint8 activations",
        "calibration": "MinMax",
        "calibration_patch_pairs": n_calibration,
    }


def write_variant(
    model: onnx.ModelProto,
    reference: ModelMetadata,
    precision: Precision,
    report: VariantReport,
    details: dict[str, object],
    out_dir: Path,
) -> ModelMetadata:
    """Write ``out_dir/model.onnx`` with the reference metadata, renamed and re-measured."""
    metrics = dict(reference.metrics)
    metrics.update(
        heldout_accuracy=report.accuracy,
        heldout_auroc=report.auroc,
        fp32_heldout_accuracy=report.reference_accuracy,
        fp32_heldout_auroc=report.reference_auroc,
        accuracy_change_vs_fp32=report.accuracy_change,
        auroc_change_vs_fp32=report.auroc_change,
    )
    meta = reference.model_copy(
        update={
            "name": f"{reference.name}-{precision}",
            "description": f"{precision} variant of {reference.name}. {reference.description}",
            "precision": precision,
            "quantization": details,
            "metrics": metrics,
            "weights_sha256": weights_sha256(model),
            "created_at": datetime.now(UTC),
        }
    )
    meta = ModelMetadata.model_validate(meta.model_dump())  # model_copy does not validate
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta.to_props())
    model.producer_name = "rarechange"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    tmp = path.with_suffix(".onnx.tmp")
    onnx.save(model, tmp)
    tmp.replace(path)
    return meta


def judge(
    precision: Precision,
    variant: Scores,
    reference: Scores,
    n_held_out: int,
    max_accuracy_loss: float = DEFAULT_MAX_ACCURACY_LOSS,
    path: Path | None = None,
) -> VariantReport:
    return VariantReport(
        precision=precision,
        accuracy=variant.accuracy,
        auroc=variant.auroc,
        reference_accuracy=reference.accuracy,
        reference_auroc=reference.auroc,
        max_accuracy_loss=max_accuracy_loss,
        n_held_out=n_held_out,
        path=path,
    )


def make_variant(
    reference_path: Path,
    precision: Precision,
    out_dir: Path,
    held: HeldOut,
    calibration: PatchSet | None = None,
    max_accuracy_loss: float = DEFAULT_MAX_ACCURACY_LOSS,
) -> tuple[VariantReport, ModelMetadata]:
    """Convert, score beside fp32 on ``held``, and write only if within the margin.

    Raises VariantRejected (carrying the report) when the variant loses too much accuracy.
    """
    reference = onnx.load(reference_path)
    ref_meta = ModelMetadata.from_props({p.key: p.value for p in reference.metadata_props})
    if precision == "int8":
        if calibration is None:
            raise ValueError("int8 needs calibration patch pairs")
        model, n_cal = to_int8(reference, calibration), len(calibration)
    elif precision == "fp16":
        model, n_cal = to_fp16(reference), 0
    else:
        raise ValueError(f"unknown precision {precision!r} (fp16 or int8)")
    threshold = ref_meta.default_threshold
    ref_scores = score(reference, held, threshold)
    var_scores = score(model, held, threshold)
    report = judge(precision, var_scores, ref_scores, len(held), max_accuracy_loss)
    log.info(
        "%s: accuracy %.2f %% (fp32 %.2f %%), AUROC %.2f %% (fp32 %.2f %%) on %d held-out pairs",
        precision,
        report.accuracy,
        report.reference_accuracy,
        report.auroc,
        report.reference_auroc,
        len(held),
    )
    if not report.accepted:
        raise VariantRejected(report)
    meta = write_variant(
        model, ref_meta, precision, report, quantization_details(precision, n_cal), out_dir
    )
    return VariantReport(**{**report.__dict__, "path": out_dir / "model.onnx"}), meta


def export_variants(
    result: ExportResult,
    precisions: list[Precision],
    held: HeldOut,
    calibration: PatchSet | None,
    max_accuracy_loss: float = DEFAULT_MAX_ACCURACY_LOSS,
) -> list[VariantReport]:
    """Each variant into ``<out>-<precision>/`` with its card; the fp32 card lists them all.

    A refused variant is reported (accepted False, path None) and not written.
    """
    reports = []
    out = result.path.parent
    for precision in precisions:
        target = out.with_name(f"{out.name}-{precision}")
        try:
            report, meta = make_variant(
                result.path, precision, target, held, calibration, max_accuracy_loss
            )
        except VariantRejected as exc:
            log.warning("%s", exc)
            reports.append(exc.report)
            continue
        commands = result.card_inputs.get("commands", {})
        write_model_card(target, meta, None, result.card_inputs.get("payload"), commands, [report])
        reports.append(report)
    result.rewrite_card(reports)
    return reports
