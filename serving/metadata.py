"""The contract between export and serving: the metadata inside every exported ONNX file.

Export writes it into the model's ``metadata_props`` (one entry per field, JSON-encoded values, keys
prefixed ``rarechange.``); serving reads it back and refuses a model whose metadata is missing or
invalid, naming the field. One schema, used on both sides, so the two can never disagree.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from serving.errors import ModelLoadError

SCHEMA_VERSION = 1
KEY_PREFIX = "rarechange."
INPUT_NAMES = ("before", "after")
OUTPUT_NAME = "probability"
# how a mask is made from the probability map: probability >= threshold, or change vector
# analysis' magnitude times the probability, cut at the pair's outliers (serving.cva.gated_mask)
MASK_RULES = ("threshold", "cva-gated")
MaskRule = Literal["threshold", "cva-gated"]


def _field_error(field: str, message: str) -> PydanticCustomError:
    """A cross-field error that still names its field, so that load errors can say which."""
    return PydanticCustomError("field", "{field}: {message}", {"field": field, "message": message})


class TrainingData(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    licence: str
    description: str = ""


class ModelMetadata(BaseModel):
    """Everything serving needs to run a model without guessing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    version: str = Field(min_length=1, max_length=64)
    description: str = ""
    patch_size: int = Field(ge=8, le=1024)
    channels: int = Field(ge=1, le=64)
    band_names: tuple[str, ...]
    input_dtype: Literal["uint8", "uint16", "float32"]
    input_range: tuple[float, float]
    # the graph computes (x - offset) * scale itself: stated for people, not to be redone
    offset: float = 0.0
    scale: float = Field(gt=0)
    recommended_stride: int = Field(ge=1)
    default_threshold: float = Field(gt=0, lt=1)
    threshold_method: str
    # the mask rule a request gets unless it names one or sets a threshold; added to schema 1
    # with a default, so models exported before it read as "threshold"
    default_mask_rule: MaskRule = "threshold"
    calibration: dict[str, Any] = Field(default_factory=lambda: {"method": "none"})
    # fp32 as trained, or a reduced-precision variant of the fp32 model with the same name stem
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    quantization: dict[str, Any] = Field(default_factory=lambda: {"method": "none"})
    training_data: tuple[TrainingData, ...] = Field(min_length=1)
    metrics: dict[str, float] = Field(default_factory=dict)
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created_at: datetime
    source_commit: str = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> ModelMetadata:
        if len(self.band_names) != self.channels:
            raise _field_error(
                "band_names", f"{len(self.band_names)} names for {self.channels} channels"
            )
        if self.recommended_stride > self.patch_size:
            raise _field_error(
                "recommended_stride", "must not exceed patch_size (pixels would be missed)"
            )
        lo, hi = self.input_range
        if not lo < hi:
            raise _field_error(
                "input_range", f"must be (min, max) with min < max, got ({lo}, {hi})"
            )
        return self

    def to_props(self) -> dict[str, str]:
        """metadata_props entries: one per field, values JSON."""
        data = self.model_dump(mode="json")
        return {KEY_PREFIX + k: json.dumps(v) for k, v in data.items()}

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "model") -> ModelMetadata:
        """Parse and validate; every problem becomes a ModelLoadError that names the field."""
        ours = {k[len(KEY_PREFIX) :]: v for k, v in props.items() if k.startswith(KEY_PREFIX)}
        if not ours:
            raise ModelLoadError(
                f"{source}: no rarechange metadata in the ONNX file; export it with "
                "`rarechange export` so that serving knows its patch size, bands and scaling"
            )
        data: dict[str, Any] = {}
        for key, raw in ours.items():
            try:
                data[key] = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ModelLoadError(
                    f"{source}: metadata field {key!r} is not valid JSON ({exc.msg})"
                ) from exc
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or first.get("ctx", {}).get(
                "field", "(model)"
            )
            raise ModelLoadError(
                f"{source}: invalid metadata field {field!r}: {first['msg']} "
                f"({exc.error_count()} problem(s) in all); re-export the model"
            ) from exc
