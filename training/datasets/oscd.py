"""Onera Satellite Change Detection (OSCD): Sentinel-2 pairs of cities at 10 m, urban change masks.

Layout (the shared copy, bands already stacked; the authors' full release, one file per band,
is read by :mod:`training.datasets.oscd_release` when ``root`` holds it):
``<oscd>/<city>/<city>_t1_B04B03B02B08.tif`` and ``_t2_`` (4-band uint16 GeoTIFF: B04 red,
B03 green, B02 blue, B08 near-infrared), ``<city>_cm.tif`` (uint8 0/1 change mask on the t1
grid), ``dates.txt``.

Pixels are kept as uint16: Sentinel-2 L1C digital numbers, top-of-atmosphere reflectance times
10,000. On the shared copy (10 cities, t1 and t2) values run from 1 to 28,000, the 99.9th
percentile per image between about 2,900 and 5,400 (bright roofs and clouds go higher).
The model's metadata states how it scales its input, so the loader does not divide.

The grids: in ``abudhabi`` (t1 799x785, t2 795x782) and ``saclay_e`` (t1 639x688, t2 631x679)
the t2 raster covers the same bounds with slightly larger pixels. t2 is resampled onto the t1
grid (the grid of the mask) with ``rasterio.warp.reproject``, **bilinear**: the pixel sizes differ
by under 1.5 %, so each output is a blend of the four nearest t2 pixels, which keeps radiometry
smooth where nearest neighbour would duplicate or drop whole rows and columns (a striping the
model could learn as "change"). Where the grids already agree t2 is read as it is. Changed
fraction per city on the shared copy: 0.3 % (paris) to 3.8 % (abudhabi).

Licence: modified Copernicus Sentinel-2 data; labels CC BY-NC-SA 4.0 (Caye Daudt et al.,
IGARSS 2018).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import rasterio
from rasterio.coords import BoundingBox
from rasterio.crs import CRS
from rasterio.transform import Affine
from rasterio.warp import Resampling, reproject

from training.datasets.scenes import DatasetError, DatasetNotFound, ScenePair, data_root

__all__ = ["BANDS", "RESAMPLING", "list_oscd", "load_oscd", "read_oscd_city", "resample_onto"]

BANDS: tuple[str, ...] = ("red", "green", "blue", "nir")  # Sentinel-2 B04, B03, B02, B08
STACK = "B04B03B02B08"
RESAMPLING = Resampling.bilinear  # t2 onto the t1 grid; see the module docstring


def list_oscd(root: Path | str | None = None) -> list[str]:
    """The cities (folders holding ``<city>_t1_B04B03B02B08.tif``; in the authors' release, the
    labelled cities), sorted."""
    release = _release_dir(root)
    if release is not None:
        from training.datasets.oscd_release import list_release

        return list_release(release)
    folder = _oscd_dir(root)
    return sorted(p.name for p in folder.iterdir() if (p / _t(p.name, 1)).is_file())


def load_oscd(
    root: Path | str | None = None, cities: Sequence[str] | None = None
) -> list[ScenePair]:
    """All cities (or ``cities``) as (H, W, 4) uint16 scenes on their t1 grid.

    ``root`` is the oscd folder or the data folder holding it; default: the shared data. A
    folder holding the authors' release gives its labelled cities with all 13 bands
    (:mod:`training.datasets.oscd_release`)."""
    release = _release_dir(root)
    if release is not None:
        from training.datasets.oscd_release import read_release_city

        folder, read = release, partial(read_release_city, release)
    else:
        folder = _oscd_dir(root)
        read = partial(_read_city_in, folder)
    have = list_oscd(folder)
    if cities is None:
        cities = have
    unknown = [c for c in cities if c not in have]
    if unknown:
        raise DatasetNotFound(f"oscd: no city {', '.join(unknown)} in {folder}; have {have}")
    if not cities:
        raise DatasetNotFound(f"oscd: no city in {folder}")
    return [read(c) for c in cities]


def _read_city_in(folder: Path, city: str) -> ScenePair:
    return read_oscd_city(folder / city)


def read_oscd_city(folder: Path) -> ScenePair:
    """One city: t1 before, t2 after (resampled onto the t1 grid when the grids differ)."""
    folder = Path(folder)
    city = folder.name
    paths = {
        "t1": folder / _t(city, 1),
        "t2": folder / _t(city, 2),
        "cm": folder / f"{city}_cm.tif",
    }
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise DatasetError(f"oscd {city}: missing {', '.join(missing)} in {folder}")
    meta = _dates(folder / "dates.txt")
    with rasterio.open(paths["t1"]) as t1, rasterio.open(paths["t2"]) as t2:
        for ds in (t1, t2):
            if ds.count != len(BANDS) or set(ds.dtypes) != {"uint16"}:
                raise DatasetError(
                    f"oscd {city}: {ds.name} has {ds.count} bands of {set(ds.dtypes)}; expected "
                    f"{len(BANDS)} uint16 bands ({STACK})"
                )
        before = t1.read()  # (C, H, W)
        if _same_grid(t1, t2):
            after = t2.read()
        else:
            _check_covers(city, t2, t1)
            after = resample_onto(t2.read(), t2.transform, t2.crs, t1.shape, t1.transform, t1.crs)
            meta["t2_resampled"] = (
                f"{RESAMPLING.name} from {t2.height}x{t2.width} onto the t1 grid "
                f"{t1.height}x{t1.width}"
            )
        with rasterio.open(paths["cm"]) as cm:
            if not _same_grid(t1, cm):
                raise DatasetError(
                    f"oscd {city}: the change mask ({cm.height}x{cm.width}) is not on the t1 grid "
                    f"({t1.height}x{t1.width})"
                )
            raw = cm.read(1)
        crs, transform = t1.crs, t1.transform
    values = np.unique(raw)
    if not set(values.tolist()) <= {0, 1}:
        raise DatasetError(f"oscd {city}: {paths['cm'].name} should hold 0/1, found {values[:10]}")
    return ScenePair(
        city,
        np.ascontiguousarray(np.moveaxis(before, 0, -1)),  # (H, W, C)
        np.ascontiguousarray(np.moveaxis(after, 0, -1)),  # (H, W, C)
        raw.astype(np.uint8),
        BANDS,
        crs=crs,
        transform=transform,
        meta=meta,
    )


def resample_onto(
    source: np.ndarray,
    src_transform: Affine,
    src_crs: CRS,
    dst_shape: tuple[int, int],
    dst_transform: Affine,
    dst_crs: CRS,
) -> np.ndarray:
    """(C, h, w) raster resampled onto another (H, W) grid with :data:`RESAMPLING`, same dtype.

    Destination pixels the source does not cover come out 0, so check coverage first."""
    out = np.zeros((source.shape[0], *dst_shape), dtype=source.dtype)  # (C, H, W)
    reproject(
        source,
        out,
        src_transform=src_transform,
        src_crs=src_crs,
        dst_transform=dst_transform,
        dst_crs=dst_crs,
        resampling=RESAMPLING,
    )
    return out


def _same_grid(a: rasterio.io.DatasetReader, b: rasterio.io.DatasetReader) -> bool:
    return a.shape == b.shape and a.crs == b.crs and a.transform.almost_equals(b.transform)


def _check_covers(
    city: str, src: rasterio.io.DatasetReader, dst: rasterio.io.DatasetReader
) -> None:
    check_covers(city, src.bounds, src.transform, src.crs, dst.bounds, dst.crs)


def check_covers(
    city: str,
    s: BoundingBox,
    src_transform: Affine,
    src_crs: CRS,
    d: BoundingBox,
    dst_crs: CRS,
    what: str = "t2",
    onto: str = "t1",
) -> None:
    """Refuse to resample when ``what`` does not cover ``onto`` (up to half a source pixel): the
    uncovered part would come out as zeros, which look like a dramatic change."""
    if src_crs != dst_crs:
        raise DatasetError(f"oscd {city}: {onto} is in {dst_crs}, {what} in {src_crs}")
    tol_x, tol_y = abs(src_transform.a) / 2, abs(src_transform.e) / 2
    if (
        s.left > d.left + tol_x
        or s.right < d.right - tol_x
        or s.bottom > d.bottom + tol_y
        or s.top < d.top - tol_y
    ):
        raise DatasetError(
            f"oscd {city}: {what} bounds {tuple(s)} do not cover {onto} bounds {tuple(d)}"
        )


def _dates(path: Path) -> dict[str, str]:
    """``date_1: 20160120`` lines of dates.txt (absent: no dates)."""
    if not path.is_file():
        return {}
    meta = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            meta[key.strip()] = value.strip()
    return meta


def _release_dir(root: Path | str | None) -> Path | None:
    """``root`` (or ``root/oscd``) when it holds the authors' release, else None."""
    if root is None:
        return None
    from training.datasets.oscd_release import is_release

    for candidate in (Path(root), Path(root) / "oscd"):
        if candidate.is_dir() and is_release(candidate):
            return candidate
    return None


def _oscd_dir(root: Path | str | None) -> Path:
    return data_root(root, "oscd", _has_city, f"<city>/<city>_t1_{STACK}.tif")


def _has_city(folder: Path) -> bool:
    return any((p / _t(p.name, 1)).is_file() for p in folder.iterdir() if p.is_dir())


def _t(city: str, t: int) -> str:
    return f"{city}_t{t}_{STACK}.tif"
