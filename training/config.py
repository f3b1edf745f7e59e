"""One validated description of a run: model, training and data, from a TOML file plus overrides.

The model and training sections are the plain dataclasses the code uses (``ModelConfig``,
``TrainConfig``); pydantic validates them here, once, with messages that name the field. Named
presets are TOML files in ``training/configs/``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from training.model import ModelConfig
from training.train import TrainConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class SyntheticData(BaseModel):
    """Generated aerial-like scene pairs (training/synthetic.py)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["synthetic"] = "synthetic"
    scenes: int = Field(60, ge=1)
    size: int = Field(256, ge=32)
    stride: int = Field(8, ge=1)  # patch stride for training patches and the served map
    val_scenes: int = Field(8, ge=1)  # held-out scenes that choose the mask threshold
    change_rate: float = Field(6.0, ge=0)
    nuisance_strength: tuple[float, float] = (0.5, 2.0)
    max_change_px: int = Field(96, ge=4)


class MnistData(BaseModel):
    """Augmented MNIST pairs (the paper's benchmark), from the real MNIST."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["mnist"] = "mnist"
    variant: Literal["MNIST-R", "MNIST-B", "MNIST-R-B"] = "MNIST-R"
    n_negative: int = Field(100_000, ge=10)
    n_positive: int = Field(50, ge=1)
    n_test_per_class: int = Field(5000, ge=10)


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "run"
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    data: Annotated[SyntheticData | MnistData, Field(discriminator="kind")] = SyntheticData()


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the field."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.pretrain_epochs=2' -> (['train', 'pretrain_epochs'], 2); values are TOML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.field=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word: a string
    return key.strip().split("."), value


def load_config(
    path: Path | None = None, overrides: list[str] | tuple[str, ...] = (), preset: str | None = None
) -> RunConfig:
    """A preset or a file (or defaults), then ``section.field=value`` overrides, then validation."""
    if preset is not None and path is not None:
        raise ConfigError("give a config file or a preset, not both")
    if preset is not None:
        path = CONFIG_DIR / f"{preset}.toml"
        if not path.is_file():
            names = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
            raise ConfigError(f"unknown preset {preset!r}; choose one of {names}")
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid config{f' {path}' if path else ''}: {problems}") from exc
