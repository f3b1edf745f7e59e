"""Checkpoint -> self-describing ONNX model: the only place that knows both torch and ONNX.

The graph takes the raw patches as serving holds them ((N, C, P, P) per date, in the dtype the
checkpoint's input scaling names: uint8 photos, uint16 reflectance) and does the scaling itself,
exactly as training did, so no pre-processing is duplicated outside the model. Only the
common-feature path of the encoder and the classifier are exported; the decoder is not needed to
score pairs.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import torch
from torch import nn

from serving.cva import GATE_FLOOR, GATE_SPREAD, GATE_WINDOW
from serving.integrity import weights_sha256
from serving.metadata import INPUT_NAMES, OUTPUT_NAME, ModelMetadata, TrainingData
from training.model import ChangeDetector
from training.train import InputScaling, detector_from_checkpoint, load_checkpoint

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-5
OPSET = 18


class ExportError(RuntimeError):
    """The export cannot produce a model that serving may trust."""


class RawInputDetector(nn.Module):
    """Wraps the detector with the input scaling: (x - offset) * scale, clipped to ``clip`` when
    set (training's :func:`training.train.to_unit`), inside the graph."""

    def __init__(
        self,
        detector: ChangeDetector,
        offset: float,
        scale: float,
        clip: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        self.detector = detector
        self.offset = offset
        self.scale = scale
        self.clip = clip

    def forward(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        b = (before.to(torch.float32) - self.offset) * self.scale  # (N, C, P, P)
        a = (after.to(torch.float32) - self.offset) * self.scale  # (N, C, P, P)
        if self.clip is not None:
            b, a = b.clamp(*self.clip), a.clamp(*self.clip)
        return self.detector(b, a)  # (N,)


class VariantRow(Protocol):
    """What the card shows of a variant (export.variants.VariantReport)."""

    precision: str
    accuracy: float
    auroc: float
    accuracy_change: float
    auroc_change: float
    accepted: bool
    n_held_out: int
    max_accuracy_loss: float


@dataclass(frozen=True)
class ExportResult:
    path: Path
    metadata: ModelMetadata
    parity_max_abs_diff: float
    # what the model card was written from, so that it can be rewritten with the variants
    card_inputs: dict[str, Any] = field(default_factory=dict, repr=False)

    def rewrite_card(self, variants: list[VariantRow]) -> Path:
        return write_model_card(
            self.path.parent,
            self.metadata,
            self.parity_max_abs_diff,
            self.card_inputs.get("payload"),
            self.card_inputs.get("commands", {}),
            variants,
        )


def source_commit(root: Path | None = None) -> str:
    """The git commit the exporting code came from, marked ``-dirty`` with uncommitted changes."""
    root = root or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


# ONNX input element types; the torch exporter cannot trace uint16, so those graphs are traced
# with int32 (the first op is a Cast to float either way) and their inputs retyped afterwards
_EXAMPLE_DTYPES = {"uint8": torch.uint8, "uint16": torch.int32, "float32": torch.float32}
_ONNX_TYPES = {
    "uint8": onnx.TensorProto.UINT8,
    "uint16": onnx.TensorProto.UINT16,
    "float32": onnx.TensorProto.FLOAT,
}


def to_onnx_bytes(
    wrapper: RawInputDetector, channels: int, patch: int, input_dtype: str = "uint8"
) -> bytes:
    """The wrapper as ONNX with (batch, C, P, P) inputs of ``input_dtype``."""
    example = torch.zeros(2, channels, patch, patch, dtype=_EXAMPLE_DTYPES[input_dtype])
    buf = io.BytesIO()
    torch.onnx.export(
        wrapper,
        (example, example),
        buf,
        input_names=list(INPUT_NAMES),
        output_names=[OUTPUT_NAME],
        dynamic_axes={
            INPUT_NAMES[0]: {0: "batch"},
            INPUT_NAMES[1]: {0: "batch"},
            OUTPUT_NAME: {0: "batch"},
        },
        opset_version=OPSET,
        dynamo=False,
    )
    if input_dtype != "uint16":
        return buf.getvalue()
    model = onnx.load_from_string(buf.getvalue())
    for inp in model.graph.input:
        consumers = [n for n in model.graph.node if inp.name in n.input]
        if any(n.op_type != "Cast" for n in consumers):
            raise ExportError(f"input {inp.name!r} feeds more than a Cast; cannot retype it")
        inp.type.tensor_type.elem_type = _ONNX_TYPES[input_dtype]
    return model.SerializeToString()


def check_parity(
    wrapper: RawInputDetector,
    onnx_bytes: bytes,
    inputs: list[tuple[np.ndarray, np.ndarray]],
    tolerance: float = PARITY_TOLERANCE,
) -> float:
    """Max |ORT - torch| over (before, after) batches; ExportError above the tolerance."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    worst = 0.0
    wrapper.eval()
    for before, after in inputs:
        with torch.no_grad():
            ref = wrapper(_torch_input(before), _torch_input(after)).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAMES[0]: before, INPUT_NAMES[1]: after})[0]
        if got.shape != ref.shape:
            raise ExportError(f"ONNX output shape {got.shape} differs from PyTorch {ref.shape}")
        worst = max(worst, float(np.max(np.abs(got - ref))) if ref.size else 0.0)
    if not worst <= tolerance:
        raise ExportError(
            f"ONNX Runtime and PyTorch disagree: max abs difference {worst:.3g} > {tolerance:g}"
        )
    return worst


def _torch_input(x: np.ndarray) -> torch.Tensor:
    """numpy patches for the PyTorch side; uint16 widened (torch has no uint16 arithmetic)."""
    return torch.from_numpy(x.astype(np.int32) if x.dtype == np.uint16 else x)


def parity_inputs(
    channels: int,
    patch: int,
    real: list[tuple[np.ndarray, np.ndarray]] | None,
    seed: int = 0,
    scaling: InputScaling | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random batches of several sizes over the input range (uint8: 0-255), plus real patch
    pairs when given."""
    rng = np.random.default_rng(seed)
    scaling = scaling or InputScaling()
    lo, hi = scaling.input_range

    def draw(n: int) -> np.ndarray:
        shape = (n, channels, patch, patch)
        if scaling.input_dtype == "float32":
            return rng.uniform(lo, hi, shape).astype(np.float32)
        dtype = np.dtype(scaling.input_dtype)
        return rng.integers(int(lo), int(hi) + 1, shape, dtype=dtype)

    return [(draw(n), draw(n)) for n in (1, 7, 64)] + list(real or [])


_MASK_RULE_TEXT = {
    "threshold": "threshold: probability >= the default threshold",
    "cva-gated": f"cva-gated: change vector analysis' magnitude ({GATE_WINDOW} x {GATE_WINDOW} "
    f"mean) x probability, cut at the outliers of its bulk (median + {GATE_SPREAD:g} robust SD of "
    f"Otsu's lower class, at "
    f"least {GATE_FLOOR:g}; the threshold applies when a request sets one)",
}


def export_checkpoint(
    checkpoint: Path,
    out_dir: Path,
    *,
    name: str,
    version: str,
    description: str = "",
    real_inputs: list[tuple[np.ndarray, np.ndarray]] | None = None,
    recommended_stride: int | None = None,
    commands: dict[str, str] | None = None,
    default_mask_rule: str = "threshold",
) -> ExportResult:
    """Write ``out_dir/model.onnx`` with its metadata, after the parity check passes.

    ``commands`` ({"train": ..., "export": ...}) go into the model card, so that anyone can
    reproduce the model.
    """
    payload = load_checkpoint(checkpoint)
    detector = detector_from_checkpoint(payload)
    cfg = detector.cfg
    data = payload["data"]
    scaling = InputScaling.from_payload(payload.get("input_scaling"))  # older: uint8 / 255
    wrapper = RawInputDetector(detector, scaling.offset, scaling.scale, scaling.clip).eval()

    onnx_bytes = to_onnx_bytes(wrapper, cfg.in_channels, cfg.patch_size, scaling.input_dtype)
    parity = check_parity(
        wrapper,
        onnx_bytes,
        parity_inputs(cfg.in_channels, cfg.patch_size, real_inputs, scaling=scaling),
    )

    model = onnx.load_from_string(onnx_bytes)
    metadata = ModelMetadata(
        name=name,
        version=version,
        description=description,
        patch_size=cfg.patch_size,
        channels=cfg.in_channels,
        band_names=tuple(data["band_names"]),
        input_dtype=scaling.input_dtype,
        input_range=scaling.input_range,
        offset=scaling.offset,
        scale=scaling.scale,
        recommended_stride=recommended_stride
        or payload.get("recommended_stride")
        or max(1, cfg.patch_size // 4),
        default_threshold=float(np.clip(payload["threshold"], 1e-4, 1 - 1e-4)),
        threshold_method=payload["threshold_method"],
        default_mask_rule=default_mask_rule,
        training_data=(
            TrainingData(
                name=data["name"], licence=data["licence"], description=data.get("description", "")
            ),
        ),
        metrics={k: float(v) for k, v in payload["metrics"].items() if np.isfinite(v)},
        weights_sha256=weights_sha256(model),
        created_at=datetime.now(UTC),
        source_commit=source_commit(),
    )
    onnx.helper.set_model_props(model, metadata.to_props())
    model.producer_name = "rarechange"
    onnx.checker.check_model(model)

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    tmp = path.with_suffix(".onnx.tmp")
    onnx.save(model, tmp)
    os.replace(tmp, path)
    write_model_card(out_dir, metadata, parity, payload, commands or {})
    log.info("exported %s (parity %.2g)", path, parity)
    card = {
        "payload": {k: payload.get(k) for k in ("n_positives", "n_negatives", "input_scaling")},
        "commands": commands or {},
    }
    return ExportResult(path, metadata, parity, card)


def write_model_card(
    out_dir: Path,
    meta: ModelMetadata,
    parity: float | None,
    payload: dict[str, Any] | None,
    commands: dict[str, str],
    variants: list[VariantRow] | None = None,
) -> Path:
    """A human-readable card beside the model; the ONNX metadata stays the source of truth."""
    metrics = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(meta.metrics.items()))
    data = "\n".join(
        f"- **{d.name}** — licence: {d.licence}. {d.description}" for d in meta.training_data
    )
    lo, hi = meta.input_range
    scaling = f"(x - {meta.offset:g}) * {meta.scale:.6g}"
    clip = ((payload or {}).get("input_scaling") or {}).get("clip")
    if clip:  # the metadata schema has no clip field: say it here
        scaling += f", clipped to [{clip[0]:g}, {clip[1]:g}]"
    rows = [
        ("precision", meta.precision),
        ("patch size", f"{meta.patch_size} px"),
        ("channels", f"{meta.channels} ({', '.join(meta.band_names)})"),
        ("input", f"{meta.input_dtype} in [{lo:g}, {hi:g}], scaled inside the graph by {scaling}"),
        ("output", "probability that the patch pair changed, float32 [N]"),
        ("recommended stride", f"{meta.recommended_stride} px"),
        ("default threshold", f"{meta.default_threshold:.4f} ({meta.threshold_method})"),
        ("default mask rule", _MASK_RULE_TEXT[meta.default_mask_rule]),
        ("calibration", str(meta.calibration.get("method", "none"))),
    ]
    if meta.precision != "fp32":
        rows.append(("quantization", "; ".join(f"{k}: {v}" for k, v in meta.quantization.items())))
    if payload is not None:
        rows.append(
            (
                "positives / negatives seen",
                f"{payload.get('n_positives', '?')} / {payload.get('n_negatives', '?')} "
                "patch pairs",
            )
        )
    if parity is not None:
        rows.append(("ONNX vs PyTorch max abs diff", f"{parity:.2g}"))
    rows += [
        ("weights sha256", f"`{meta.weights_sha256}`"),
        ("created", f"{meta.created_at.isoformat()} from commit `{meta.source_commit}`"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    how = (
        "\n".join(f"{step}:\n\n```\n{cmd}\n```\n" for step, cmd in commands.items() if cmd)
        or "Not recorded (exported without its run folder).\n"
    )
    variant_text = ""
    if variants:
        lines = "\n".join(
            f"| {v.precision} | {v.accuracy:.2f} | {v.accuracy_change:+.2f} | {v.auroc:.2f} | "
            f"{v.auroc_change:+.2f} | {'written' if v.accepted else 'refused'} |"
            for v in variants
        )
        variant_text = f"""
## Reduced-precision variants
Scored beside this fp32 model on {variants[0].n_held_out} held-out patch pairs at its
threshold; a variant losing more than {variants[0].max_accuracy_loss:g} point(s) of balanced
accuracy is refused.

| precision | balanced accuracy % | change | AUROC % | change | |
|---|---|---|---|---|---|
{lines}
"""
    mask_sentence = (
        f"thresholds it at {meta.default_threshold:.4f}"
        if meta.default_mask_rule == "threshold"
        else "makes the mask by the cva-gated rule (change vector analysis' magnitude, averaged "
        f"over {GATE_WINDOW} x {GATE_WINDOW} pixels, times the probability, cut at each pair's "
        f"outliers: median + {GATE_SPREAD:g} robust SD of that score's bulk (Otsu's lower class), "
        f"at least {GATE_FLOOR:g}; "
        "a request that sets a threshold gets "
        f"probability >= threshold instead, {meta.default_threshold:.4f} by default)"
    )
    text = f"""# Model card: {meta.name} {meta.version}

{meta.description}

## Intended use
Score co-registered before/after image pairs of the kind described under *Training data* and
report where something changed, through `rarechange serve` (gRPC `DetectChange`) or
`rarechange detect`. Serving tiles the pair into {meta.patch_size} px patches at stride
{meta.recommended_stride}, blends the patch probabilities into a map and {mask_sentence}.
Imagery unlike the training data (other sensors, resolutions, band orders) is out of scope
until measured; check the held-out metrics below before trusting a mask.

| field | value |
|---|---|
{table}

## Training data
{data}

## Held-out metrics
| metric | value |
|---|---|
{metrics}
{variant_text}
## How it was produced
{how}"""
    path = out_dir / "README.md"
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
