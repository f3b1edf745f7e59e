"""PCD loader on written panoramas in the real layout (t0/, t1/, mask/, 1024x224), masks drawn
black on white as in the raw release."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.datasets.pcd import load_pcd
from training.datasets.scenes import DatasetError, DatasetNotFound

W, H = 1024, 224
BOX = (slice(50, 150), slice(300, 500))  # the changed region: 100 x 200 px


def write_subset(folder: Path, n: int = 2, size: tuple[int, int] = (W, H)) -> None:
    for sub in ("t0", "t1", "mask"):
        (folder / sub).mkdir(parents=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        stem = f"{i:08d}"
        for sub in ("t0", "t1"):
            image = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(image).save(folder / sub / f"{stem}.jpg", quality=90)
        mask = np.full((size[1], size[0]), 255, np.uint8)  # white: unchanged
        mask[BOX] = 0  # black: changed
        Image.fromarray(mask).save(folder / "mask" / f"{stem}.png")


@pytest.fixture
def pcd(tmp_path: Path) -> Path:
    write_subset(tmp_path / "TSUNAMI", n=3)
    write_subset(tmp_path / "GSV", n=2)
    return tmp_path


def test_both_subsets_shapes_and_names(pcd: Path) -> None:
    scenes = load_pcd(pcd)
    assert [s.name for s in scenes] == [f"TSUNAMI/{i:08d}" for i in range(3)] + [
        f"GSV/{i:08d}" for i in range(2)
    ]
    for s in scenes:
        assert s.before.shape == s.after.shape == (224, 1024, 3)  # 1024x224 as W x H
        assert s.before.dtype == np.uint8 and s.mask.dtype == np.uint8
        assert s.crs is None and s.bands == ("red", "green", "blue")


def test_default_polarity_black_is_change(pcd: Path) -> None:
    s = load_pcd(pcd / "TSUNAMI")[0]
    expected = np.zeros((H, W), np.uint8)
    expected[BOX] = 1
    assert np.array_equal(s.mask, expected)
    assert s.changed_fraction == pytest.approx(100 * 200 / (W * H))
    ps = s.patches(64, 64, positive_fraction=0.5)
    assert ps.labels(0.5).sum() > 0 and (ps.changed_fraction[ps.labels(0.5) == 0] == 0).all()


def test_white_polarity_inverts(pcd: Path) -> None:
    black = load_pcd(pcd / "GSV")[1]
    white = load_pcd(pcd / "GSV", change_is="white")[1]
    assert np.array_equal(white.mask, 1 - black.mask)


def test_jpeg_noise_in_masks_is_thresholded(tmp_path: Path) -> None:
    write_subset(tmp_path, n=1)
    mask = np.asarray(Image.open(tmp_path / "mask" / "00000000.png"))
    (tmp_path / "mask" / "00000000.png").unlink()
    Image.fromarray(mask).save(tmp_path / "mask" / "00000000.jpg", quality=75)
    s = load_pcd(tmp_path)[0]
    assert s.mask.sum() == pytest.approx(100 * 200, rel=0.02)


def test_missing_counterpart_and_size_mismatch(tmp_path: Path) -> None:
    write_subset(tmp_path / "a", n=2)
    (tmp_path / "a" / "t1" / "00000001.jpg").unlink()
    with pytest.raises(DatasetError, match=r"t1 has no file for 00000001"):
        load_pcd(tmp_path / "a")
    write_subset(tmp_path / "b", n=1)
    Image.new("L", (W, H - 1), 255).save(tmp_path / "b" / "mask" / "00000000.png")
    with pytest.raises(DatasetError, match="sizes differ"):
        load_pcd(tmp_path / "b")


def test_bad_arguments(pcd: Path) -> None:
    with pytest.raises(ValueError, match="change_is"):
        load_pcd(pcd, change_is="grey")  # type: ignore[arg-type]
    with pytest.raises(DatasetNotFound, match="TSUNAMI"):
        load_pcd(pcd / "TSUNAMI" / "t0")
