"""Run configs: presets, files, overrides, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import (
    CONFIG_DIR,
    ConfigError,
    MnistData,
    RunConfig,
    ScenesData,
    load_config,
    parse_override,
)
from training.train import InputScaling


def test_every_preset_validates() -> None:
    presets = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
    assert {"thin", "mnist", "aerial-rgb", "sentinel2-rgbn"} <= set(presets)
    for name in presets:
        load_config(preset=name)


def test_overrides_are_typed_toml_values() -> None:
    cfg = load_config(
        preset="mnist",
        overrides=[
            "train.pretrain_epochs=1.5",
            "data.n_positive=500",
            "model.widths=[8, 16]",
            "train.similarity=l2",
            'name="x"',
        ],
    )
    assert cfg.train.pretrain_epochs == 1.5
    assert isinstance(cfg.data, MnistData) and cfg.data.n_positive == 500
    assert cfg.model.widths == (8, 16)
    assert cfg.train.similarity == "l2"
    assert cfg.name == "x"


def test_file_config(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('name = "a"\n[train]\nseed = 7\n[data]\nkind = "synthetic"\nscenes = 3\n')
    cfg = load_config(path, ["data.size=64"])
    assert (cfg.name, cfg.train.seed, cfg.data.scenes, cfg.data.size) == ("a", 7, 3, 64)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.pretrain_epochs=abc", "train.pretrain_epochs"),
        ("train.similarity=cosine", "train.similarity"),
        ("model.nope=1", "model.nope"),
        ('data.kind="tiff"', "data"),
        ("data.scenes=0", "data.synthetic.scenes"),
        ("model.patch_size=30", "model"),
    ],
)
def test_invalid_settings_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(preset="thin", overrides=[override])
    assert field in str(err.value)


def test_malformed_override_and_unknown_preset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"section\.field=value"):
        parse_override("no-equals-sign")
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="nope")
    with pytest.raises(ConfigError, match="not both"):
        load_config(tmp_path / "x.toml", preset="thin")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(bad)


def test_real_data_presets() -> None:
    aerial = load_config(preset="aerial-rgb")
    assert isinstance(aerial.data, ScenesData)
    assert aerial.data.dataset == "sztaki" and aerial.data.val_pairs == ["Szada/1"]
    assert aerial.data.train_pairs is None  # the other seven pairs
    assert (aerial.model.in_channels, aerial.model.patch_size, aerial.data.stride) == (3, 32, 8)
    assert aerial.data.scaling == InputScaling()  # uint8 / 255, as before
    s2 = load_config(preset="sentinel2-rgbn")
    assert isinstance(s2.data, ScenesData)
    assert s2.data.bands == [1, 2, 3, 4] and s2.model.in_channels == 4
    assert set(s2.data.val_pairs).isdisjoint(s2.data.train_pairs or [])
    assert s2.data.scaling == InputScaling("uint16", (0.0, 10000.0), 0.0, 1 / 5000, (0.0, 1.0))


def test_scenes_config_round_trips_through_json() -> None:
    """load_run_config reads the config.json that run() wrote: it must come back equal."""
    cfg = load_config(preset="sentinel2-rgbn", overrides=["data.augment.copies=2"])
    assert RunConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_scenes_file_config_with_indices_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[data]\nkind = "scenes"\ndataset = "folder:/some/where"\nval_pairs = [0]\n')
    cfg = load_config(path)
    assert isinstance(cfg.data, ScenesData)
    assert cfg.data.val_pairs == [0] and cfg.data.bands is None and cfg.data.augment.copies == 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ('data.dataset="abcd:/x"', "not scenes"),
        ('data.dataset="nope"', "unknown dataset kind"),
        ('data.dataset="folder"', "needs a path"),
        ("data.val_pairs=[]", "data.scenes.val_pairs"),
        ('data.train_pairs=["pisa", "paris"]', "in train_pairs and val_pairs"),
        ("data.train_pairs=[]", "train_pairs is empty"),
        ("data.bands=[1, 2, 3]", "model.in_channels is 4"),
        ("data.bands=[1, 1, 2, 3]", "distinct"),
        ("data.bands=[0, 1, 2, 3]", "data.scenes.bands"),
        ("data.scaling.scale=0", "scale must be > 0"),
        ("data.scaling.clip=[1.0, 0.0]", "clip"),
        ('data.scaling.input_dtype="int8"', "data.scenes.scaling.input_dtype"),
        ("data.augment.strength=[2.0, 1.0]", "data.scenes.augment.strength"),
        ("data.augment.copies=-1", "data.scenes.augment.copies"),
    ],
)
def test_invalid_scenes_settings_say_what_is_wrong(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(preset="sentinel2-rgbn", overrides=[override])
    assert message in str(err.value)


def test_from_scratch_switch() -> None:
    cfg = load_config(preset="aerial-rgb", overrides=["train.from_scratch=true"])
    assert cfg.train.from_scratch
    assert not load_config(preset="aerial-rgb").train.from_scratch
