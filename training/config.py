"""One validated description of a run: model, training and data, from a TOML file plus overrides.

The model and training sections are the plain dataclasses the code uses (``ModelConfig``,
``TrainConfig``); pydantic validates them here, once, with messages that name the field. Named
presets are TOML files in ``training/configs/``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from training.model import ModelConfig
from training.train import InputScaling, TrainConfig

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


class NuisanceAugment(BaseModel):
    """Extra negatives: copies of the training pairs with synthetic nuisances on both dates.

    Each copy redraws, per date, the renderer's trivial differences (training/synthetic.py:
    smooth illumination field, gain, colour balance, gamma, blur on one date, noise, a sub-pixel
    shift of the after date) on top of the real ones; the change mask is kept, and only the
    copies' unchanged patches are added (to pre-training and to the fine-tuning negatives)."""

    model_config = ConfigDict(extra="forbid")
    copies: int = Field(0, ge=0)  # augmented copies of every training pair; 0: off
    strength: tuple[float, float] = (0.5, 1.5)  # NuisanceConfig.strength, drawn per copy

    @field_validator("strength")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] <= v[1]:
            raise ValueError(f"must be (low, high) with 0 <= low <= high, got {v}")
        return v


PairRef = str | Annotated[int, Field(ge=0)]  # a pair's name, or its 0-based index in load order
SCENE_KINDS = ("sztaki", "oscd", "pcd", "folder")  # loaders that give ScenePairs (not abcd)


class ScenesData(BaseModel):
    """Real full-scene pairs with change masks (training/datasets), split by whole pairs.

    Pre-training negatives: the unchanged patches of ``train_pairs``; fine-tuning positives:
    their changed patches (``train.positive_fraction``; the label budget is
    ``train.max_positives``, drawn with the seed); the mask threshold: max pixel F1 on the
    stitched maps of ``val_pairs``, which also give the held-out patch metrics."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["scenes"] = "scenes"
    dataset: str  # load_dataset spec: "sztaki", "oscd", "sztaki:PATH", "folder:PATH", ...
    train_pairs: list[PairRef] | None = None  # None: every pair not in val_pairs
    val_pairs: list[PairRef] = Field(min_length=1)  # choose the threshold, give the metrics
    stride: int = Field(8, ge=1)  # patch stride for training patches and the served map
    bands: list[Annotated[int, Field(ge=1)]] | None = None  # 1-based, in the model's order
    scaling: InputScaling = InputScaling()  # raw pixels -> network input, also in the graph
    augment: NuisanceAugment = NuisanceAugment()
    licence: str | None = None  # for folder datasets, whose terms rarechange cannot know
    options: dict[str, str] = Field(default_factory=dict)  # loader keywords, e.g. change_is (pcd)

    @field_validator("dataset")
    @classmethod
    def _known_spec(cls, v: str) -> str:
        from training.datasets.registry import parse_spec

        kind, _ = parse_spec(v)  # checks the kind and that folder/pcd name a path; no disk access
        if kind not in SCENE_KINDS:
            raise ValueError(f"{kind} gives labelled patch pairs, not scenes with masks")
        return v

    @field_validator("bands")
    @classmethod
    def _distinct(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError(f"give distinct 1-based band numbers, got {v}")
        return v

    @model_validator(mode="after")
    def _disjoint(self) -> ScenesData:
        if self.train_pairs is not None:
            if not self.train_pairs:
                raise ValueError("train_pairs is empty; leave it out to train on the rest")
            both = set(self.train_pairs) & set(self.val_pairs)
            if both:
                raise ValueError(f"pairs {sorted(map(str, both))} are in train_pairs and val_pairs")
        return self


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "run"
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    data: Annotated[SyntheticData | MnistData | ScenesData, Field(discriminator="kind")] = (
        SyntheticData()
    )

    @model_validator(mode="after")
    def _bands_fit_model(self) -> RunConfig:
        t = self.train.threshold
        if t is not None and not 0 < t < 1:
            raise ValueError(f"train.threshold must be in (0, 1), got {t}")
        d = self.data
        if isinstance(d, ScenesData) and d.bands and len(d.bands) != self.model.in_channels:
            raise ValueError(
                f"data.bands selects {len(d.bands)} bands, model.in_channels is "
                f"{self.model.in_channels}"
            )
        return self


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
