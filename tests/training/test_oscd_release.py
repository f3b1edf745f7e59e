"""OSCD in its authors' release layout (13 one-band GeoTIFFs per date at 10 / 20 / 60 m, masks in
separate label folders): written fixtures, and two real cities of the shared copy rewritten in
that layout, which must load to exactly what the shared copy's loader gives."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine

from training.datasets.oscd import list_oscd, load_oscd, read_oscd_city
from training.datasets.oscd_release import BAND_CODES, BAND_NAMES, IMAGES, LABELS
from training.datasets.registry import load_dataset
from training.datasets.scenes import DatasetError, DatasetNotFound
from training.recipes import select_bands

WGS84 = CRS.from_epsg(4326)
NATIVE = {"B01": 60, "B09": 60, "B10": 60, "B05": 20, "B06": 20, "B07": 20, "B8A": 20, "B11": 20}
NATIVE["B12"] = 20  # the rest (B02, B03, B04, B08) are 10 m


def write_band(path: Path, band: np.ndarray, transform: Affine | None, crs: CRS | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    driver = "PNG" if path.suffix == ".png" else "GTiff"
    profile = {"driver": driver, "height": band.shape[0], "width": band.shape[1], "count": 1}
    if crs is not None:
        profile |= {"crs": crs, "transform": transform}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # the release's PNG masks
        with rasterio.open(path, "w", dtype=band.dtype, **profile) as ds:
            ds.write(band, 1)


def write_date(
    folder: Path,
    bands: dict[str, np.ndarray],
    transform: Affine | None,
    crs: CRS | None,
    prefix: str = "",
) -> None:
    """Each band at its native resolution over the same extent as the 10 m grid."""
    for code, band in bands.items():
        factor = NATIVE.get(code, 10) // 10
        t = None if transform is None else transform @ Affine.scale(factor)
        write_band(folder / f"{prefix}{code}.tif", band, t, crs)


def toy_bands(rng: np.random.Generator, h: int = 12, w: int = 18) -> dict[str, np.ndarray]:
    """10 m bands random; coarser bands constant, so any resampling must keep their value."""
    out = {}
    for i, code in enumerate(BAND_CODES):
        factor = NATIVE.get(code, 10) // 10
        shape = (h // factor, w // factor)
        if factor == 1:
            out[code] = rng.integers(300, 5000, shape).astype(np.uint16)
        else:
            out[code] = np.full(shape, 1000 + i, np.uint16)
    return out


def write_release(
    root: Path,
    city: str = "toy",
    split: int = 0,
    georeferenced: bool = True,
    mask_as: str = "tif",
    seed: int = 0,
) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    transform = Affine(0.001, 0, 10.0, 0, -0.001, 45.0) if georeferenced else None
    crs = WGS84 if georeferenced else None
    dates = {"t1": toy_bands(rng), "t2": toy_bands(rng)}
    images = root / IMAGES / city
    write_date(images / "imgs_1_rect", dates["t1"], transform, crs, prefix="S2A_x_")
    write_date(images / "imgs_2_rect", dates["t2"], transform, crs)
    (images / "dates.txt").write_text("date_1: 20151111\ndate_2: 20180318\n")
    change = np.zeros((12, 18), np.uint8)
    change[2:5, 3:9] = 1
    cm = root / LABELS[split] / city / "cm"
    if mask_as == "tif":
        write_band(cm / f"{city}-cm.tif", change + 1, transform, crs)  # 1 unchanged, 2 changed
    else:
        write_band(cm / "cm.png", change * 255, None, None)
    return dates


@pytest.mark.parametrize("georeferenced", [True, False])
@pytest.mark.parametrize("mask_as", ["tif", "png"])
def test_written_release_city(tmp_path: Path, georeferenced: bool, mask_as: str) -> None:
    written = write_release(tmp_path, georeferenced=georeferenced, mask_as=mask_as)
    (s,) = load_oscd(tmp_path)
    assert s.name == "toy" and s.bands == BAND_NAMES and len(BAND_NAMES) == 13
    assert s.before.shape == s.after.shape == (12, 18, 13)
    assert s.before.dtype == np.uint16
    for i, code in enumerate(BAND_CODES):
        for date, img in (("t1", s.before), ("t2", s.after)):
            if NATIVE.get(code, 10) == 10:  # on the reference grid: read as it is
                assert np.array_equal(img[..., i], written[date][code]), (date, code)
            else:  # resampled onto it, a constant stays the constant, nothing zero-filled
                assert (img[..., i] == written[date][code][0, 0]).all(), (date, code)
    assert s.mask.dtype == np.uint8 and s.mask.sum() == 18 and s.mask[2:5, 3:9].all()
    assert s.meta["date_1"] == "20151111"
    assert s.meta["t1_bands_resampled"] == "B01,B05,B06,B07,B8A,B09,B10,B11,B12"
    assert "t2_resampled" not in s.meta
    assert (s.crs == WGS84) if georeferenced else (s.crs is None and s.transform is None)
    # the shared copy's stack and the bundled model's input: red, green, blue, nir
    rgbn = select_bands(s, [4, 3, 2, 8])
    assert rgbn.bands == ("red", "green", "blue", "nir")
    assert np.array_equal(rgbn.before[..., 0], written["t1"]["B04"])


def test_train_and_test_labels_and_unlabelled_cities(tmp_path: Path) -> None:
    write_release(tmp_path, "beta", split=1)
    write_release(tmp_path, "alpha", split=0, seed=1)
    (tmp_path / IMAGES / "nolabel" / "imgs_1_rect").mkdir(parents=True)
    (tmp_path / IMAGES / "nolabel" / "imgs_2_rect").mkdir(parents=True)
    assert list_oscd(tmp_path) == ["alpha", "beta"]
    assert [s.name for s in load_dataset(f"oscd:{tmp_path}", cities=["beta"])] == ["beta"]
    with pytest.raises(DatasetNotFound, match="nolabel"):
        load_oscd(tmp_path, cities=["nolabel"])


def test_smaller_t2_grid_is_resampled_onto_t1(tmp_path: Path) -> None:
    write_release(tmp_path)
    t2 = tmp_path / IMAGES / "toy" / "imgs_2_rect"
    for path in t2.glob("*.tif"):
        path.unlink()
    width, height = 0.018, 0.012  # degrees: t1's bounds, here in larger pixels
    fine = Affine(width / 17, 0, 10.0, 0, -height / 11, 45.0)
    coarse = Affine(width / 4, 0, 10.0, 0, -height / 3, 45.0)
    for code in BAND_CODES:
        band, t = (np.full((3, 4), 2000, np.uint16), coarse) if code in NATIVE else (
            np.full((11, 17), 2000, np.uint16), fine)  # fmt: skip
        bare = code == "B05"  # one band without its georeference
        write_band(t2 / f"{code}.tif", band, None if bare else t, None if bare else WGS84)
    with pytest.raises(DatasetError, match="t2 B05 and t2 B04 differ in having a georeference"):
        load_oscd(tmp_path)
    write_band(t2 / "B05.tif", np.full((3, 4), 2000, np.uint16), coarse, WGS84)
    (s,) = load_oscd(tmp_path)
    assert s.after.shape == (12, 18, 13) and (s.after == 2000).all()
    assert s.meta["t2_resampled"] == "bilinear from 11x17 onto the t1 grid 12x18"


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("missing band", "no file ending in B8A.tif"),
        ("two files", "2 files"),
        ("float band", "float32"),
        ("mask 0/1", r"should hold \[1, 2\], found \[0, 1\]"),
        ("mask shape", "the t1 grid 12x18"),
        ("t2 off the ground", "do not cover"),
    ],
)
def test_damaged_release_is_refused(tmp_path: Path, damage: str, match: str) -> None:
    write_release(tmp_path)
    t1 = tmp_path / IMAGES / "toy" / "imgs_1_rect"
    t2 = tmp_path / IMAGES / "toy" / "imgs_2_rect"
    cm = tmp_path / LABELS[0] / "toy" / "cm" / "toy-cm.tif"
    transform = Affine(0.001, 0, 10.0, 0, -0.001, 45.0)
    if damage == "missing band":
        (t1 / "S2A_x_B8A.tif").unlink()
    elif damage == "two files":
        write_band(t1 / "B03.tif", np.zeros((12, 18), np.uint16), transform, WGS84)
    elif damage == "float band":
        write_band(t1 / "S2A_x_B02.tif", np.zeros((12, 18), np.float32), transform, WGS84)
    elif damage == "mask 0/1":
        write_band(cm, np.eye(12, 18, dtype=np.uint8), transform, WGS84)
    elif damage == "mask shape":
        write_band(cm, np.ones((11, 18), np.uint8), transform, WGS84)
    else:  # the after date half a degree east: nothing under most of t1
        moved = Affine(0.001, 0, 10.5, 0, -0.001, 45.0)
        write_date(t2, toy_bands(np.random.default_rng(0)), moved, WGS84)
    with pytest.raises(DatasetError, match=match):
        load_oscd(tmp_path)


# ------------------------------------------------------------------------------------ real data


@pytest.mark.shared_data
@pytest.mark.parametrize("city", ["bercy", "abudhabi"])  # abudhabi: t2 on a smaller grid
def test_real_city_rewritten_in_the_release_layout_loads_the_same(
    shared_data: Path, tmp_path: Path, city: str
) -> None:
    folder = shared_data / "oscd" / city
    if not folder.is_dir():
        pytest.skip(f"no oscd/{city} in {shared_data}")
    shared = read_oscd_city(folder)
    images = tmp_path / IMAGES / city
    for t, sub in ((1, "imgs_1_rect"), (2, "imgs_2_rect")):
        with rasterio.open(folder / f"{city}_t{t}_B04B03B02B08.tif") as ds:
            stack, transform, crs = ds.read(), ds.transform, ds.crs
        bands = dict(zip(("B04", "B03", "B02", "B08"), stack, strict=True))
        for code in BAND_CODES:  # the other nine: the red band again, at the 10 m grid
            write_band(images / sub / f"{code}.tif", bands.get(code, stack[0]), transform, crs)
    (images / "dates.txt").write_text((folder / "dates.txt").read_text())
    cm = tmp_path / LABELS[1] / city / "cm" / f"{city}-cm.tif"
    write_band(cm, shared.mask + 1, shared.transform, shared.crs)
    (release,) = load_oscd(tmp_path, cities=[city])
    rgbn = select_bands(release, [4, 3, 2, 8])
    assert rgbn.bands == shared.bands
    assert np.array_equal(rgbn.before, shared.before)
    assert np.array_equal(rgbn.after, shared.after)  # abudhabi: the same bilinear resampling
    assert np.array_equal(rgbn.mask, shared.mask)
    assert rgbn.transform == shared.transform and rgbn.crs == shared.crs
    assert ("t2_resampled" in release.meta) == ("t2_resampled" in shared.meta)
