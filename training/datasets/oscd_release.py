"""OSCD as its authors release it: all 24 cities, 13 Sentinel-2 bands, one GeoTIFF per band.

The shared copy (:mod:`training.datasets.oscd`) holds 10 cities with four bands stacked; a user
with the full release points ``oscd:PATH`` at the folder holding its three unpacked zips:

    PATH/Onera Satellite Change Detection dataset - Images/<city>/imgs_1_rect/B01.tif ... B12.tif
                                                                 /imgs_2_rect/..., dates.txt
    PATH/Onera Satellite Change Detection dataset - Train Labels/<city>/cm/<city>-cm.tif, cm.png
    PATH/Onera Satellite Change Detection dataset - Test Labels/<city>/cm/...

Band files may carry a prefix before ``B04.tif``. The 20 m and 60 m bands (smaller rasters over
the same ground) are resampled bilinearly onto the grid of the 10 m red band, by their
georeference when both files have one, else by the ratio of their sizes (same extent), and the
after date onto the before date's grid the same way (two cities' grids differ by a few pixels).
The mask is ``<city>-cm.tif`` (1 unchanged, 2 changed), else ``cm.png`` (0 / 255).

Bands come in the release's order, B01 ... B08, B8A, B09 ... B12, named as :data:`BAND_NAMES`, so
``data.bands = [4, 3, 2, 8]`` (or ``evaluate --bands 4,3,2,8``) gives red, green, blue and
near-infrared, the shared copy's stack and the bundled ``sentinel2-rgbn`` model's input.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.coords import BoundingBox
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine

from training.datasets.oscd import RESAMPLING, _dates, check_covers, resample_onto
from training.datasets.scenes import DatasetError, ScenePair

__all__ = ["BAND_NAMES", "IMAGES", "LABELS", "is_release", "list_release", "read_release_city"]

IMAGES = "Onera Satellite Change Detection dataset - Images"
LABELS = (
    "Onera Satellite Change Detection dataset - Train Labels",
    "Onera Satellite Change Detection dataset - Test Labels",
)
BAND_CODES: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12",
)  # fmt: skip
BAND_NAMES: tuple[str, ...] = (
    "coastal", "blue", "green", "red", "red-edge-1", "red-edge-2", "red-edge-3", "nir",
    "nir-narrow", "water-vapour", "cirrus", "swir-1", "swir-2",
)  # fmt: skip
REFERENCE = "B04"  # a 10 m band: the grid every band of a date is put on
_LOCAL = CRS.from_epsg(3857)  # stands in for a missing CRS: same on both sides, pure resampling


def is_release(folder: Path) -> bool:
    return (folder / IMAGES).is_dir()


def list_release(root: Path) -> list[str]:
    """The cities with both dates' images and a change mask, sorted."""
    images = root / IMAGES
    return sorted(
        p.name
        for p in images.iterdir()
        if p.is_dir()
        and (p / "imgs_1_rect").is_dir()
        and (p / "imgs_2_rect").is_dir()
        and _labels_dir(root, p.name) is not None
    )


def read_release_city(root: Path, city: str) -> ScenePair:
    """One city: t1 before, t2 after, every band on t1's 10 m grid."""
    folder = root / IMAGES / city
    before, grid, notes = _read_date(folder / "imgs_1_rect", city, "t1")
    after, grid2, notes2 = _read_date(folder / "imgs_2_rect", city, "t2")
    meta = _dates(folder / "dates.txt") | notes | notes2
    if after.shape != before.shape or not _same_place(grid, grid2):
        after = _onto(after, grid2, grid, city, "t2", "t1")
        meta["t2_resampled"] = (
            f"{RESAMPLING.name} from {grid2[0]}x{grid2[1]} onto the t1 grid "
            f"{before.shape[1]}x{before.shape[2]}"
        )
    labels = _labels_dir(root, city)
    assert labels is not None  # list_release kept only labelled cities
    mask = _read_mask(labels, city, before.shape[1:])
    _, _, transform, crs = grid
    return ScenePair(
        city,
        np.ascontiguousarray(np.moveaxis(before, 0, -1)),  # (H, W, 13)
        np.ascontiguousarray(np.moveaxis(after, 0, -1)),  # (H, W, 13)
        mask,
        BAND_NAMES,
        crs=crs,
        transform=transform if crs is not None else None,
        meta=meta,
    )


# A raster's grid: (height, width, transform, crs); crs None when the file has no georeference.
Grid = tuple[int, int, Affine, CRS | None]


def _read_date(folder: Path, city: str, date: str) -> tuple[np.ndarray, Grid, dict[str, str]]:
    """(13, H, W) uint16 on the red band's grid, that grid, and which bands were resampled."""
    if not folder.is_dir():
        raise DatasetError(f"oscd {city}: no folder {folder}")
    paths = {code: _band_file(folder, code, city) for code in BAND_CODES}
    ref, grid = _read_band(paths[REFERENCE], city)
    h, w = ref.shape
    out = np.empty((len(BAND_CODES), h, w), np.uint16)
    resampled = []
    for i, code in enumerate(BAND_CODES):
        band, g = (ref, grid) if code == REFERENCE else _read_band(paths[code], city)
        if band.shape != (h, w):
            band = _onto(band[None], g, grid, city, f"{date} {code}", f"{date} {REFERENCE}")[0]
            resampled.append(code)
        out[i] = band
    notes = {f"{date}_bands_resampled": ",".join(resampled)} if resampled else {}
    return out, grid, notes


def _band_file(folder: Path, code: str, city: str) -> Path:
    found = sorted({*folder.glob(f"*{code}.tif"), *folder.glob(f"*{code}.TIF")})
    if len(found) != 1:
        names = ", ".join(p.name for p in found)
        what = f"{len(found)} files ({names})" if found else "no file"
        raise DatasetError(f"oscd {city}: {what} ending in {code}.tif in {folder}")
    return found[0]


def _read_band(path: Path, city: str) -> tuple[np.ndarray, Grid]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as ds:
            if ds.count != 1:
                raise DatasetError(f"oscd {city}: {path.name} has {ds.count} bands; expected 1")
            band = ds.read(1)
            grid = (ds.height, ds.width, ds.transform, ds.crs)
    if not np.issubdtype(band.dtype, np.integer):
        raise DatasetError(
            f"oscd {city}: {path.name} holds {band.dtype}; expected integer reflectance x 10,000"
        )
    if band.size and (band.min() < 0 or band.max() > np.iinfo(np.uint16).max):
        raise DatasetError(
            f"oscd {city}: {path.name} holds values {band.min()}..{band.max()}, outside uint16"
        )
    return band.astype(np.uint16, copy=False), grid


def _same_place(a: Grid, b: Grid) -> bool:
    return a[:2] == b[:2] and a[3] == b[3] and a[2].almost_equals(b[2])


def _onto(source: np.ndarray, src: Grid, dst: Grid, city: str, what: str, onto: str) -> np.ndarray:
    """(C, h, w) onto ``dst``'s (H, W) grid: by georeference when both have one, else over the
    same extent (the transforms the sizes imply)."""
    shape = dst[:2]
    if src[3] is not None and dst[3] is not None:
        check_covers(city, _bounds(src), src[2], src[3], _bounds(dst), dst[3], what, onto)
        return resample_onto(source, src[2], src[3], shape, dst[2], dst[3])
    if src[3] is not None or dst[3] is not None:
        raise DatasetError(f"oscd {city}: {what} and {onto} differ in having a georeference")
    h, w = source.shape[1:]
    scale = Affine.scale(shape[1] / w, shape[0] / h)
    return resample_onto(source, scale, _LOCAL, shape, Affine.identity(), _LOCAL)


def _bounds(g: Grid) -> BoundingBox:
    return BoundingBox(*rasterio.transform.array_bounds(g[0], g[1], g[2]))


def _labels_dir(root: Path, city: str) -> Path | None:
    for labels in LABELS:
        cm = root / labels / city / "cm"
        if (cm / f"{city}-cm.tif").is_file() or (cm / "cm.png").is_file():
            return cm
    return None


def _read_mask(cm: Path, city: str, shape: tuple[int, int]) -> np.ndarray:
    """0/1 uint8 from ``<city>-cm.tif`` (1 / 2) or ``cm.png`` (0 / 255)."""
    tif, png = cm / f"{city}-cm.tif", cm / "cm.png"
    path, coding = (tif, {1: 0, 2: 1}) if tif.is_file() else (png, {0: 0, 255: 1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as ds:
            raw = ds.read(1)
    if raw.shape != shape:
        raise DatasetError(
            f"oscd {city}: {path.name} is {raw.shape[0]}x{raw.shape[1]}, the t1 grid "
            f"{shape[0]}x{shape[1]}"
        )
    values = set(np.unique(raw).tolist())
    if not values <= set(coding):
        raise DatasetError(
            f"oscd {city}: {path.name} should hold {sorted(coding)}, found {sorted(values)[:10]}"
        )
    lookup = np.zeros(max(coding) + 1, np.uint8)
    for value, label in coding.items():
        lookup[value] = label
    return lookup[raw]
