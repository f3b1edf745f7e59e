"""OSCD loader: the real 10 cities (t2 resampled onto t1 where the grids differ), written
GeoTIFFs for the error cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from training.datasets.oscd import BANDS, list_oscd, load_oscd, read_oscd_city, resample_onto
from training.datasets.scenes import DatasetError, DatasetNotFound, ScenePair, unchanged_patches

# changed fraction of each real city (1s in <city>_cm.tif), measured once
REAL_FRACTIONS = {
    "abudhabi": 0.0376,
    "aguasclaras": 0.0164,
    "beirut": 0.0269,
    "bercy": 0.0074,
    "bordeaux": 0.0100,
    "mumbai": 0.0256,
    "paris": 0.0029,
    "pisa": 0.0164,
    "rennes": 0.0258,
    "saclay_e": 0.0099,
}
MISMATCHED = {"abudhabi": ((799, 785), (795, 782)), "saclay_e": ((639, 688), (631, 679))}


@pytest.fixture(scope="module")
def oscd_dir(shared_data: Path) -> Path:
    if not (shared_data / "oscd").is_dir():
        pytest.skip(f"no oscd/ in {shared_data}")
    return shared_data / "oscd"


@pytest.fixture(scope="module")
def real(oscd_dir: Path) -> dict[str, ScenePair]:
    return {s.name: s for s in load_oscd(oscd_dir)}


def tif(city_dir: Path, name: str) -> Path:
    return city_dir / f"{city_dir.name}_{name}.tif"


# ------------------------------------------------------------------------------------ real data


@pytest.mark.shared_data
def test_real_cities_counts_shapes_dtypes(real: dict[str, ScenePair], oscd_dir: Path) -> None:
    assert list(real) == list(REAL_FRACTIONS) == list_oscd(oscd_dir)
    for city, s in real.items():
        with rasterio.open(tif(oscd_dir / city, "t1_B04B03B02B08")) as t1:
            assert s.before.shape == (t1.height, t1.width, 4)
            assert s.transform == t1.transform and s.crs == t1.crs
        assert s.after.shape == s.before.shape
        assert s.before.dtype == s.after.dtype == np.uint16
        assert s.mask.dtype == np.uint8 and set(np.unique(s.mask).tolist()) == {0, 1}
        assert s.bands == BANDS == ("red", "green", "blue", "nir")
        assert s.crs is not None and s.crs.to_epsg() == 4326
        assert s.meta["date_1"] < s.meta["date_2"]  # yyyymmdd: t1 is the earlier image


@pytest.mark.shared_data
def test_real_changed_fractions(real: dict[str, ScenePair]) -> None:
    fractions = {c: s.changed_fraction for c, s in real.items()}
    for city, f in fractions.items():
        assert f == pytest.approx(REAL_FRACTIONS[city], abs=5e-4)
        assert 0.002 < f < 0.05  # rare: "about 1-5 %", a few cities below 1 %
    assert 0.01 < float(np.mean(list(fractions.values()))) < 0.03


@pytest.mark.shared_data
def test_real_reflectance_range(real: dict[str, ScenePair]) -> None:
    """Sentinel-2 L1C reflectance x 10,000, kept as uint16: nothing rescaled to 0..255."""
    for s in real.values():
        for image in (s.before, s.after):
            assert image.min() >= 1 and image.max() <= 28000
            assert 2500 < np.percentile(image, 99.9) < 6000
            assert image.max() > 255


@pytest.mark.shared_data
def test_real_mask_is_cm_tif(real: dict[str, ScenePair], oscd_dir: Path) -> None:
    with rasterio.open(tif(oscd_dir / "beirut", "cm")) as cm:
        assert np.array_equal(real["beirut"].mask, cm.read(1))


@pytest.mark.shared_data
def test_real_patches_keep_uint16_and_follow_the_mask(real: dict[str, ScenePair]) -> None:
    s = real["beirut"]
    ps = s.patches(32, 32, positive_fraction=0.05)
    assert ps.before.dtype == np.uint16 and ps.before.shape[1:] == (4, 32, 32)
    neg, pos = ps.split(0.05)
    assert len(pos) > 20 and len(neg) > 500
    changed_px = (ps.changed_fraction * 32 * 32).round()
    assert changed_px.sum() <= s.mask.sum()
    assert len(unchanged_patches(s, 32, 32)) == len(neg)


# ----------------------------------------------------------------------------------- resampling


@pytest.mark.shared_data
@pytest.mark.parametrize("city", list(MISMATCHED))
def test_mismatched_t2_is_resampled_onto_t1(
    real: dict[str, ScenePair], oscd_dir: Path, city: str
) -> None:
    (t1_shape, t2_shape) = MISMATCHED[city]
    s = real[city]
    with rasterio.open(tif(oscd_dir / city, "t2_B04B03B02B08")) as t2:
        assert t2.shape == t2_shape  # the real mismatch is still there
        direct, t2_transform = t2.read().astype(np.float64), t2.transform  # (C, h, w)
    assert s.after.shape == (*t1_shape, 4) == s.before.shape
    assert "bilinear" in s.meta["t2_resampled"]
    after = np.moveaxis(s.after, -1, 0).astype(np.float64)  # (C, H, W)

    # t1 pixel centres in t2 pixel coordinates (same bounds, slightly larger t2 pixels)
    t1 = s.transform
    assert t1 is not None
    x = t1.c + (np.arange(t1_shape[1]) + 0.5) * t1.a
    y = t1.f + (np.arange(t1_shape[0]) + 0.5) * t1.e
    col = (x - t2_transform.c) / t2_transform.a - 0.5
    row = (y - t2_transform.f) / t2_transform.e - 0.5
    assert row.min() > -0.01 and row.max() < t2_shape[0] - 0.99  # inside: no edge fill

    # where the grids coincide (centre within 0.003 px of a t2 centre) the values are t2's own,
    # up to a 0.3 % bilinear blend with the neighbours (each way) and rounding
    near_r = np.flatnonzero(np.abs(row - np.round(row)) < 0.003)
    near_c = np.flatnonzero(np.abs(col - np.round(col)) < 0.003)
    assert len(near_r) and len(near_c)
    rr, cc = np.round(row[near_r]).astype(int), np.round(col[near_c]).astype(int)
    got = after[:, near_r][:, :, near_c]
    own = direct[:, rr][:, :, cc]
    padded = np.pad(direct, ((0, 0), (1, 1), (1, 1)), mode="edge")
    spread = np.zeros_like(own)
    for dr in (0, 1, 2):
        for dc in (0, 1, 2):
            spread = np.maximum(spread, np.abs(padded[:, rr + dr][:, :, cc + dc] - own))
    assert (np.abs(got - own) <= 0.006 * spread + 1).all()

    # and everywhere: bilinear interpolation of t2 at the t1 centres, computed independently
    r0 = np.clip(np.floor(row).astype(int), 0, t2_shape[0] - 2)
    c0 = np.clip(np.floor(col).astype(int), 0, t2_shape[1] - 2)
    fr = np.clip(row - r0, 0, 1)[:, None]
    fc = np.clip(col - c0, 0, 1)[None, :]
    expected = (
        direct[:, r0][:, :, c0] * (1 - fr) * (1 - fc)
        + direct[:, r0 + 1][:, :, c0] * fr * (1 - fc)
        + direct[:, r0][:, :, c0 + 1] * (1 - fr) * fc
        + direct[:, r0 + 1][:, :, c0 + 1] * fr * fc
    )
    assert np.abs(after - expected).max() <= 1  # uint16 rounding


@pytest.mark.shared_data
def test_same_grid_resample_is_the_direct_read(oscd_dir: Path) -> None:
    with rasterio.open(tif(oscd_dir / "bercy", "t2_B04B03B02B08")) as t2:
        direct = t2.read()
        same = resample_onto(direct, t2.transform, t2.crs, t2.shape, t2.transform, t2.crs)
    assert same.dtype == np.uint16 and np.array_equal(same, direct)


@pytest.mark.shared_data
def test_cities_select(oscd_dir: Path) -> None:
    scenes = load_oscd(oscd_dir.parent, cities=["paris"])  # the data folder works too
    assert [s.name for s in scenes] == ["paris"] and "t2_resampled" not in scenes[0].meta
    with pytest.raises(DatasetNotFound, match="atlantis"):
        load_oscd(oscd_dir, cities=["atlantis"])


# ------------------------------------------------------------------------------- written files

T1 = Affine(0.001, 0, 10.0, 0, -0.001, 45.0)  # 20 x 24 pixels of 0.001 degree


def write_city(
    root: Path,
    city: str = "toy",
    t2_shape: tuple[int, int] = (20, 24),
    t2_origin: tuple[float, float] = (10.0, 45.0),
    cm_shape: tuple[int, int] = (20, 24),
    bands: int = 4,
) -> Path:
    folder = root / city
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def write(name: str, data: np.ndarray, transform: Affine) -> None:
        c, h, w = data.shape
        with rasterio.open(
            folder / f"{city}_{name}.tif", "w", driver="GTiff", width=w, height=h, count=c,
            dtype=data.dtype, crs="EPSG:4326", transform=transform,
        ) as ds:  # fmt: skip
            ds.write(data)

    write("t1_B04B03B02B08", rng.integers(300, 5000, (bands, 20, 24)).astype(np.uint16), T1)
    h, w = t2_shape
    t2 = Affine(0.024 / w, 0, t2_origin[0], 0, -0.020 / h, t2_origin[1])  # same bounds as t1
    write("t2_B04B03B02B08", rng.integers(300, 5000, (bands, h, w)).astype(np.uint16), t2)
    cm = np.zeros((1, *cm_shape), np.uint8)
    cm[0, 2:6, 3:9] = 1
    write("cm", cm, T1)
    (folder / "dates.txt").write_text("date_1: 20160120\ndate_2: 20180328\n")
    return folder


def test_written_city_same_grid(tmp_path: Path) -> None:
    write_city(tmp_path)
    (s,) = load_oscd(tmp_path)
    assert s.name == "toy" and s.before.shape == (20, 24, 4) and s.mask.sum() == 24
    assert s.meta == {"date_1": "20160120", "date_2": "20180328"}
    with rasterio.open(tif(tmp_path / "toy", "t2_B04B03B02B08")) as t2:
        assert np.array_equal(s.after, np.moveaxis(t2.read(), 0, -1))


def test_written_city_smaller_t2_is_resampled(tmp_path: Path) -> None:
    write_city(tmp_path, t2_shape=(18, 22))
    s = read_oscd_city(tmp_path / "toy")
    assert s.after.shape == (20, 24, 4) and s.after.dtype == np.uint16
    assert s.after.min() >= 300  # every t1 pixel covered: no zero fill
    assert s.meta["t2_resampled"] == "bilinear from 18x22 onto the t1 grid 20x24"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"t2_shape": (18, 22), "t2_origin": (10.005, 45.0)}, "do not cover"),
        ({"cm_shape": (19, 24)}, "not on the t1 grid"),
        ({"bands": 3}, "3 bands"),
    ],
)
def test_written_city_errors(tmp_path: Path, kwargs: dict, match: str) -> None:
    write_city(tmp_path, **kwargs)
    with pytest.raises(DatasetError, match=match):
        load_oscd(tmp_path)


def test_missing_files_and_folders(tmp_path: Path) -> None:
    folder = write_city(tmp_path)
    (folder / "toy_cm.tif").unlink()
    with pytest.raises(DatasetError, match="toy_cm"):
        read_oscd_city(folder)
    with pytest.raises(DatasetNotFound, match="t1_B04B03B02B08"):
        load_oscd(tmp_path / "toy")
