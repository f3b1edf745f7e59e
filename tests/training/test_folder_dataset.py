"""The generic A/, B/, label/ folder loader (LEVIR-CD style) on written files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import Affine

from training.datasets.folder import load_folder
from training.datasets.scenes import DatasetError, DatasetNotFound

RNG = np.random.default_rng(0)


def rgb(h: int = 32, w: int = 48) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def label(h: int = 32, w: int = 48, high: int = 255) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[4:12, 8:24] = high
    return m


def write_levir(root: Path, stems: tuple[str, ...] = ("train_2", "train_10")) -> Path:
    for sub in ("A", "B", "label"):
        (root / sub).mkdir(parents=True)
    for stem in stems:
        Image.fromarray(rgb()).save(root / "A" / f"{stem}.png")
        Image.fromarray(rgb()).save(root / "B" / f"{stem}.png")
        Image.fromarray(label()).save(root / "label" / f"{stem}.png")
    return root


def test_png_pairs_with_0_255_masks(tmp_path: Path) -> None:
    scenes = load_folder(write_levir(tmp_path))
    assert [s.name for s in scenes] == ["train_2", "train_10"]  # natural order
    for s in scenes:
        assert s.before.shape == s.after.shape == (32, 48, 3) and s.before.dtype == np.uint8
        assert s.mask.dtype == np.uint8 and s.mask.sum() == 8 * 16
        assert np.array_equal(s.mask, label(high=1))
    before = np.asarray(Image.open(tmp_path / "A" / "train_2.png"))
    assert np.array_equal(scenes[0].before, before)


def test_jpeg_images_0_1_masks_and_custom_folder_names(tmp_path: Path) -> None:
    for sub in ("im1", "im2", "gt"):
        (tmp_path / sub).mkdir()
    Image.fromarray(rgb()).save(tmp_path / "im1" / "3.jpg")
    Image.fromarray(rgb()).save(tmp_path / "im2" / "3.jpeg")
    Image.fromarray(label(high=1)).save(tmp_path / "gt" / "3.png")
    (s,) = load_folder(tmp_path, before="im1", after="im2", label="gt")
    assert s.name == "3" and s.before.shape == (32, 48, 3)
    assert np.array_equal(s.mask, label(high=1))


def test_georeferenced_multiband_tiff(tmp_path: Path) -> None:
    for sub in ("A", "B", "label"):
        (tmp_path / sub).mkdir()
    transform = Affine(10, 0, 500000, 0, -10, 4000000)
    profile = {"driver": "GTiff", "width": 48, "height": 32, "crs": "EPSG:32631"}
    for sub in ("A", "B"):
        data = RNG.integers(0, 10000, (4, 32, 48)).astype(np.uint16)
        with rasterio.open(
            tmp_path / sub / "s.tif", "w", count=4, dtype="uint16", transform=transform, **profile
        ) as ds:
            ds.write(data)
    with rasterio.open(
        tmp_path / "label" / "s.tif", "w", count=1, dtype="uint8", transform=transform, **profile
    ) as ds:
        ds.write(label(high=1)[None])
    (s,) = load_folder(tmp_path)
    assert s.before.shape == (32, 48, 4) and s.before.dtype == np.uint16
    assert s.bands == ("band1", "band2", "band3", "band4")
    assert s.crs is not None and s.crs.to_epsg() == 32631 and s.transform == transform
    assert s.mask.sum() == 8 * 16


def test_missing_counterpart_is_named(tmp_path: Path) -> None:
    write_levir(tmp_path, ("a", "b", "c"))
    (tmp_path / "label" / "b.png").unlink()
    (tmp_path / "A" / "c.png").unlink()
    with pytest.raises(DatasetError, match="missing counterpart") as err:
        load_folder(tmp_path)
    assert "label has no file for b" in str(err.value)
    assert "A has no file for c" in str(err.value)


@pytest.mark.parametrize(
    ("sub", "image", "match"),
    [
        ("B", rgb(32, 47), r"sizes differ \(before 32x48, after 32x47, mask 32x48"),
        ("label", label(30, 48), r"mask 30x48"),
        ("B", rgb()[..., 0], "bands"),
    ],
)
def test_size_or_band_mismatch(tmp_path: Path, sub: str, image: np.ndarray, match: str) -> None:
    write_levir(tmp_path, ("x",))
    Image.fromarray(image).save(tmp_path / sub / "x.png")
    with pytest.raises(DatasetError, match=match):
        load_folder(tmp_path)


def test_layout_errors(tmp_path: Path) -> None:
    write_levir(tmp_path / "train")
    write_levir(tmp_path / "test")
    with pytest.raises(DatasetNotFound, match="its test, train folders have that layout"):
        load_folder(tmp_path)
    with pytest.raises(DatasetNotFound, match="not a folder"):
        load_folder(tmp_path / "nowhere")
    (tmp_path / "empty" / "A").mkdir(parents=True)
    (tmp_path / "empty" / "B").mkdir()
    (tmp_path / "empty" / "label").mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        load_folder(tmp_path / "empty")
