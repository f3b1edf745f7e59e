"""The export/serving metadata contract: round trip, and refusals that name the field."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from serving.errors import ModelLoadError, RareChangeError
from serving.metadata import KEY_PREFIX, ModelMetadata, TrainingData


def valid() -> ModelMetadata:
    return ModelMetadata(
        name="synthetic-thin",
        version="1.2.3",
        description="a test model",
        patch_size=32,
        channels=3,
        band_names=("red", "green", "blue"),
        input_dtype="uint8",
        input_range=(0.0, 255.0),
        offset=0.0,
        scale=1.0 / 255.0,
        recommended_stride=8,
        default_threshold=0.37,
        threshold_method="max pixel F1",
        calibration={"method": "none"},
        training_data=(TrainingData(name="synthetic", licence="Apache-2.0"),),
        metrics={"auroc": 0.91, "f1": 0.5},
        weights_sha256="ab" * 32,
        created_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        source_commit="0123abc-dirty",
    )


def props_with(**changes: object) -> dict[str, str]:
    """Valid props with some fields' JSON values replaced; None removes the field."""
    props = valid().to_props()
    for key, value in changes.items():
        if value is None:
            del props[KEY_PREFIX + key]
        else:
            props[KEY_PREFIX + key] = json.dumps(value)
    return props


def test_round_trip() -> None:
    meta = valid()
    props = meta.to_props()
    assert all(k.startswith(KEY_PREFIX) for k in props)
    assert all(isinstance(v, str) for v in props.values())
    assert json.loads(props[KEY_PREFIX + "patch_size"]) == 32
    back = ModelMetadata.from_props(props)
    assert back == meta
    assert back.scale == 1.0 / 255.0  # floats survive JSON exactly
    assert back.created_at == meta.created_at
    assert back.to_props() == props


def test_foreign_props_are_ignored() -> None:
    props = {**valid().to_props(), "producer": "someone", "rarechange": "not prefixed"}
    assert ModelMetadata.from_props(props) == valid()


@pytest.mark.parametrize("props", [{}, {"author": "x", "onnx.version": "1"}])
def test_no_rarechange_metadata(props: dict[str, str]) -> None:
    with pytest.raises(ModelLoadError, match="no rarechange metadata"):
        ModelMetadata.from_props(props, source="foo.onnx")


def test_errors_are_rarechange_errors() -> None:
    assert issubclass(ModelLoadError, RareChangeError)


@pytest.mark.parametrize(
    "field", ["patch_size", "default_threshold", "weights_sha256", "band_names", "name"]
)
def test_missing_required_field(field: str) -> None:
    with pytest.raises(ModelLoadError) as exc:
        ModelMetadata.from_props(props_with(**{field: None}), source="m.onnx")
    msg = str(exc.value)
    assert f"'{field}'" in msg
    assert msg.startswith("m.onnx:")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"band_names": ["red", "green"]}, "band_names"),
        ({"recommended_stride": 64}, "recommended_stride"),
        ({"default_threshold": 1.5}, "default_threshold"),
        ({"default_threshold": 0.0}, "default_threshold"),
        ({"patch_size": 4}, "patch_size"),
        ({"input_dtype": "int8"}, "input_dtype"),
        ({"input_range": [255.0, 0.0]}, "input_range"),
        ({"weights_sha256": "xyz"}, "weights_sha256"),
        ({"name": "Has Spaces"}, "name"),
        ({"schema_version": 2}, "schema_version"),
        ({"training_data": []}, "training_data"),
        ({"training_data": [{"name": "x"}]}, "licence"),
    ],
)
def test_invalid_value_names_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ModelLoadError) as exc:
        ModelMetadata.from_props(props_with(**changes))
    assert field in str(exc.value)


def test_non_json_value_names_the_field() -> None:
    props = valid().to_props()
    props[KEY_PREFIX + "patch_size"] = "thirty-two"
    with pytest.raises(ModelLoadError, match=r"'patch_size' is not valid JSON"):
        ModelMetadata.from_props(props)


def test_unknown_field_rejected() -> None:
    props = {**valid().to_props(), KEY_PREFIX + "colour_space": json.dumps("srgb")}
    with pytest.raises(ModelLoadError, match="colour_space"):
        ModelMetadata.from_props(props)


def test_default_mask_rule_reads_as_threshold_when_absent_and_round_trips() -> None:
    assert ModelMetadata.from_props(props_with(default_mask_rule=None)).default_mask_rule == (
        "threshold"
    )
    gated = ModelMetadata.from_props(props_with(default_mask_rule="cva-gated"))
    assert gated.default_mask_rule == "cva-gated"
    assert ModelMetadata.from_props(gated.to_props()) == gated
    with pytest.raises(ModelLoadError, match="default_mask_rule"):
        ModelMetadata.from_props(props_with(default_mask_rule="otsu"))
