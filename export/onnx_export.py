"""Checkpoint -> self-describing ONNX model: the only place that knows both torch and ONNX.

The graph takes the raw patches as serving holds them (uint8, (N, C, P, P) per date) and does the
scaling itself, so no pre-processing is duplicated outside the model. Only the common-feature path
of the encoder and the classifier are exported; the decoder is not needed to score pairs.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from serving.metadata import INPUT_NAMES, OUTPUT_NAME, ModelMetadata, TrainingData
from training.model import ChangeDetector
from training.train import detector_from_checkpoint, load_checkpoint

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-5
OPSET = 18


class ExportError(RuntimeError):
    """The export cannot produce a model that serving may trust."""


class RawInputDetector(nn.Module):
    """Wraps the detector with the input scaling: (x - offset) * scale, inside the graph."""

    def __init__(self, detector: ChangeDetector, offset: float, scale: float) -> None:
        super().__init__()
        self.detector = detector
        self.offset = offset
        self.scale = scale

    def forward(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        b = (before.to(torch.float32) - self.offset) * self.scale  # (N, C, P, P)
        a = (after.to(torch.float32) - self.offset) * self.scale  # (N, C, P, P)
        return self.detector(b, a)  # (N,)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    metadata: ModelMetadata
    parity_max_abs_diff: float


def weights_sha256(module: nn.Module) -> str:
    """A digest of the weights alone (sorted names, raw bytes), stable across export runs."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


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


def to_onnx_bytes(wrapper: RawInputDetector, channels: int, patch: int) -> bytes:
    example = torch.zeros(2, channels, patch, patch, dtype=torch.uint8)
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
    return buf.getvalue()


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
            ref = wrapper(torch.from_numpy(before), torch.from_numpy(after)).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAMES[0]: before, INPUT_NAMES[1]: after})[0]
        if got.shape != ref.shape:
            raise ExportError(f"ONNX output shape {got.shape} differs from PyTorch {ref.shape}")
        worst = max(worst, float(np.max(np.abs(got - ref))) if ref.size else 0.0)
    if not worst <= tolerance:
        raise ExportError(
            f"ONNX Runtime and PyTorch disagree: max abs difference {worst:.3g} > {tolerance:g}"
        )
    return worst


def parity_inputs(
    channels: int, patch: int, real: list[tuple[np.ndarray, np.ndarray]] | None, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random uint8 batches of several sizes, plus real patch pairs when given."""
    rng = np.random.default_rng(seed)
    out = [
        (
            rng.integers(0, 256, (n, channels, patch, patch), dtype=np.uint8),
            rng.integers(0, 256, (n, channels, patch, patch), dtype=np.uint8),
        )
        for n in (1, 7, 64)
    ]
    return out + list(real or [])


def export_checkpoint(
    checkpoint: Path,
    out_dir: Path,
    *,
    name: str,
    version: str,
    description: str = "",
    real_inputs: list[tuple[np.ndarray, np.ndarray]] | None = None,
    recommended_stride: int | None = None,
) -> ExportResult:
    """Write ``out_dir/model.onnx`` with its metadata, after the parity check passes."""
    payload = load_checkpoint(checkpoint)
    detector = detector_from_checkpoint(payload)
    cfg = detector.cfg
    data = payload["data"]
    wrapper = RawInputDetector(detector, offset=0.0, scale=1.0 / 255.0).eval()

    onnx_bytes = to_onnx_bytes(wrapper, cfg.in_channels, cfg.patch_size)
    parity = check_parity(
        wrapper, onnx_bytes, parity_inputs(cfg.in_channels, cfg.patch_size, real_inputs)
    )

    metadata = ModelMetadata(
        name=name,
        version=version,
        description=description,
        patch_size=cfg.patch_size,
        channels=cfg.in_channels,
        band_names=tuple(data["band_names"]),
        input_dtype="uint8",
        input_range=(0.0, 255.0),
        offset=0.0,
        scale=1.0 / 255.0,
        recommended_stride=recommended_stride
        or payload.get("recommended_stride")
        or max(1, cfg.patch_size // 4),
        default_threshold=float(np.clip(payload["threshold"], 1e-4, 1 - 1e-4)),
        threshold_method=payload["threshold_method"],
        training_data=(
            TrainingData(
                name=data["name"], licence=data["licence"], description=data.get("description", "")
            ),
        ),
        metrics={k: float(v) for k, v in payload["metrics"].items() if np.isfinite(v)},
        weights_sha256=weights_sha256(detector),
        created_at=datetime.now(UTC),
        source_commit=source_commit(),
    )
    model = onnx.load_from_string(onnx_bytes)
    onnx.helper.set_model_props(model, metadata.to_props())
    model.producer_name = "rarechange"
    onnx.checker.check_model(model)

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    tmp = path.with_suffix(".onnx.tmp")
    onnx.save(model, tmp)
    os.replace(tmp, path)
    write_model_card(out_dir, metadata, parity, payload)
    log.info("exported %s (parity %.2g)", path, parity)
    return ExportResult(path, metadata, parity)


def write_model_card(
    out_dir: Path, meta: ModelMetadata, parity: float, payload: dict[str, Any]
) -> Path:
    """A human-readable card beside the model; the ONNX metadata stays the source of truth."""
    metrics = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(meta.metrics.items()))
    data = "\n".join(
        f"- **{d.name}** — licence: {d.licence}. {d.description}" for d in meta.training_data
    )
    lo, hi = meta.input_range
    scaling = f"(x - {meta.offset:g}) * {meta.scale:.6g}"
    seen = f"{payload.get('n_positives', '?')} / {payload.get('n_negatives', '?')}"
    text = f"""# Model card: {meta.name} {meta.version}

{meta.description}

| field | value |
|---|---|
| patch size | {meta.patch_size} px |
| channels | {meta.channels} ({", ".join(meta.band_names)}) |
| input | {meta.input_dtype} in [{lo:g}, {hi:g}], scaled inside the graph by {scaling} |
| recommended stride | {meta.recommended_stride} px |
| default threshold | {meta.default_threshold:.4f} ({meta.threshold_method}) |
| calibration | {meta.calibration.get("method", "none")} |
| positives / negatives seen | {seen} patch pairs |
| ONNX vs PyTorch max abs diff | {parity:.2g} |
| weights sha256 | `{meta.weights_sha256}` |
| created | {meta.created_at.isoformat()} from commit `{meta.source_commit}` |

## Training data
{data}

## Held-out metrics (validation patches)
| metric | value |
|---|---|
{metrics}
"""
    path = out_dir / "README.md"
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
