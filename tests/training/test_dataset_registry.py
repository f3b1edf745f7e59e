"""load_dataset("KIND:PATH"): parsing, defaults to the shared data folder, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import Affine

import serving.config
from training.datasets.registry import KINDS, load_dataset, parse_spec
from training.datasets.scenes import DatasetNotFound, PatchPairs, ScenePair


def write_images(folder: Path, names: dict[str, str], h: int = 8, w: int = 8) -> None:
    """Before/after RGB PNGs and a 0/255 mask under the given file names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for role, name in names.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if role == "mask":
            mask = np.zeros((h, w), np.uint8)
            mask[:2, :2] = 255
            Image.fromarray(mask).save(folder / name)
        else:
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)


@pytest.mark.parametrize(
    ("spec", "kind", "path"),
    [
        ("sztaki", "sztaki", None),
        ("oscd:", "oscd", None),
        ("OSCD:/data/oscd", "oscd", Path("/data/oscd")),
        ("folder:/data/a:b", "folder", Path("/data/a:b")),  # only the first colon splits
        ("pcd: rel/TSUNAMI ", "pcd", Path("rel/TSUNAMI")),
    ],
)
def test_parse_spec(spec: str, kind: str, path: Path | None) -> None:
    assert parse_spec(spec) == (kind, path)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("levir:/x", "unknown dataset kind 'levir'.*sztaki, oscd, abcd, pcd, folder"),
        ("", "unknown dataset kind ''"),
        ("abcd", "abcd needs a path"),
        ("folder:", "folder needs a path"),
    ],
)
def test_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_dataset(spec)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match="does not exist"):
        load_dataset(f"pcd:{tmp_path / 'nowhere'}")
    with pytest.raises(DatasetNotFound, match="neither"):
        load_dataset(f"oscd:{tmp_path}")


def test_default_path_is_the_shared_data_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_images(
        tmp_path / "sztaki" / "Szada" / "1", {"b": "im1.png", "a": "im2.png", "mask": "gt.png"}
    )
    monkeypatch.setenv("RARECHANGE_DATA", str(tmp_path))
    (scene,) = load_dataset("sztaki")
    assert isinstance(scene, ScenePair) and scene.name == "Szada/1" and scene.mask.sum() == 4
    monkeypatch.setattr(serving.config, "shared_data_dir", lambda: None)
    with pytest.raises(DatasetNotFound, match="RARECHANGE_DATA"):
        load_dataset("oscd")


def test_options_reach_the_loader(tmp_path: Path) -> None:
    write_images(tmp_path / "lv", {"b": "A/1.png", "a": "B/1.png", "mask": "label/1.png"})
    (scene,) = load_dataset(f"folder:{tmp_path / 'lv'}")
    assert scene.mask.sum() == 4
    write_images(tmp_path / "pcd", {"b": "t0/0.jpg", "a": "t1/0.jpg", "mask": "mask/0.png"})
    (black,) = load_dataset(f"pcd:{tmp_path / 'pcd'}")
    (white,) = load_dataset(f"pcd:{tmp_path / 'pcd'}", change_is="white")
    assert black.mask.sum() == 64 - 4 and white.mask.sum() == 4
    with pytest.raises(TypeError, match="fold"):
        load_dataset(f"pcd:{tmp_path / 'pcd'}", fold=1)


def test_abcd_gives_patch_pairs(tmp_path: Path) -> None:
    folder = tmp_path / "fixed-scale"
    (folder / "patch-pairs").mkdir(parents=True)
    (folder / "5fold-list").mkdir()
    with rasterio.open(
        folder / "patch-pairs" / "patch-pair_1.tif", "w", driver="GTiff", width=16, height=16,
        count=6, dtype="uint8", crs="EPSG:32654", transform=Affine(0.4, 0, 0, 0, -0.4, 0),
    ) as ds:  # fmt: skip
        ds.write(np.zeros((6, 16, 16), np.uint8))
    (folder / "5fold-list" / "cv2-test.csv").write_text("patch-pair_1.tif,1\n")
    pairs = load_dataset(f"abcd:{tmp_path}", fold=2, split="test")
    assert isinstance(pairs, PatchPairs) and pairs.label.tolist() == [1]


@pytest.mark.shared_data
def test_real_oscd_and_sztaki_by_kind(shared_data: Path) -> None:
    if not (shared_data / "oscd").is_dir() or not (shared_data / "sztaki").is_dir():
        pytest.skip("oscd/ or sztaki/ missing from the shared data")
    (paris,) = load_dataset("oscd", cities=["paris"])
    assert isinstance(paris, ScenePair) and paris.before.dtype == np.uint16
    scenes = load_dataset(f"sztaki:{shared_data / 'sztaki'}", names=["Szada/2"])
    assert isinstance(scenes, list) and scenes[0].before.shape == (640, 952, 3)


def test_package_exports_lazily() -> None:
    import training.datasets as pkg

    assert pkg.load_dataset is load_dataset
    assert set(KINDS) == {"sztaki", "oscd", "abcd", "pcd", "folder"}
    with pytest.raises(AttributeError):
        _ = pkg.nothing_here
