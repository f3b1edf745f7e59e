"""Run configs: presets, files, overrides, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import CONFIG_DIR, ConfigError, MnistData, load_config, parse_override


def test_every_preset_validates() -> None:
    presets = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
    assert {"thin", "mnist"} <= set(presets)
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
