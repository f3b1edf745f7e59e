"""Changed areas as polygons: GDAL's polygonize over the mask raster, streamed, never the whole
scene in memory; each polygon with its area in square metres and the max and mean probability of
its pixels (read from the probability raster over the polygon's own bounding window only)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.features
import shapely
import shapely.affinity
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform_geom
from rasterio.windows import Window
from shapely.geometry import mapping, shape

WGS84 = CRS.from_epsg(4326)
METRES_PER_DEGREE = 111_320.0  # along a meridian; only to turn a --simplify in metres to degrees
# GDAL's block cache beyond one row of the mask's tiles: the probability windows under polygons
WINDOW_CACHE = 8 * 1024 * 1024
ZONAL_PIXELS = 1024 * 1024  # the most probability pixels read at once under a polygon
# WGS84 ellipsoid, for the area of small polygons on a geographic grid
WGS84_A = 6_378_137.0
WGS84_E2 = 6.694379990141317e-3
# below this extent (degrees) a polygon's area is the local ellipsoidal scale times its area in
# square degrees: for pixel polygons (edges along meridians and parallels) the equal-area
# projection it replaces agrees to < 1e-7 relative up to 84 degrees of latitude (a test checks)
SMALL_DEGREES = 0.01


@dataclass(frozen=True)
class PolygonOptions:
    min_area_m2: float = 0.0
    simplify_m: float = 0.0  # Douglas-Peucker tolerance, in metres on the ground
    wgs84: bool = False  # write EPSG:4326 (RFC 7946) instead of the raster's CRS
    connectivity: int = 8


def write_geojson(
    path: Path, mask_path: Path, probability_path: Path, options: PolygonOptions
) -> dict[str, Any]:
    """Polygons of the changed pixels into ``path`` (atomic); returns counts and total area."""
    tmp = path.with_name(f".{path.name}.tmp")
    n, area_total, dropped = 0, 0.0, 0
    with (
        rasterio.open(mask_path) as mask_ds,
        rasterio.Env(GDAL_CACHEMAX=line_cache(mask_ds)),
        rasterio.open(probability_path) as prob_ds,
        open(tmp, "w") as out,
    ):
        crs = mask_ds.crs
        to_m = metres_per_unit(crs)
        out_crs = WGS84 if options.wgs84 and crs is not None else crs
        header: dict[str, Any] = {"type": "FeatureCollection"}
        if out_crs is not None and out_crs != WGS84:
            header["crs"] = {"type": "name", "properties": {"name": _crs_name(out_crs)}}
        out.write(json.dumps(header)[:-1] + ', "features": [\n')
        for world, p_max, p_mean, pixels in changed_areas(mask_ds, prob_ds, options.connectivity):
            area = _area_m2(world, crs, to_m)
            if area < options.min_area_m2:
                dropped += 1
                continue
            if options.simplify_m > 0:
                world = world.simplify(options.simplify_m / to_m, preserve_topology=True)
            geometry = mapping(world)
            if out_crs is not None and out_crs != crs:
                geometry = transform_geom(crs, out_crs, geometry)
            feature = {
                "type": "Feature",
                "id": n,
                "geometry": geometry,
                "properties": {
                    "area_m2": round(area, 3),
                    "pixels": pixels,
                    "max_probability": round(p_max, 6),
                    "mean_probability": round(p_mean, 6),
                },
            }
            out.write(("" if n == 0 else ",\n") + json.dumps(feature))
            n += 1
            area_total += area
        out.write("\n]}\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    return {
        "polygons": n,
        "polygons_below_min_area": dropped,
        "changed_area_m2_in_polygons": area_total,
        "crs": _crs_name(out_crs) if out_crs else None,
    }


def line_cache(mask_ds: Any) -> int:
    """GDAL's block cache for polygonizing ``mask_ds``: GDAL reads the mask line by line, and
    every line of a tiled raster touches a whole row of tiles; with less cache than that row, each
    line decompresses the row again (a 16k x 16k mask with 512-pixel tiles: 80 s at 8 MB, 4.6 s
    at 12 MB). The cache follows the scene's width, not its area."""
    tile_rows = mask_ds.block_shapes[0][0]
    return int(mask_ds.width * tile_rows * np.dtype(mask_ds.dtypes[0]).itemsize) + WINDOW_CACHE


def changed_areas(
    mask_ds: Any, prob_ds: Any, connectivity: int = 8
) -> Iterator[tuple[Any, float, float, int]]:
    """(polygon in the raster's CRS, max and mean probability, pixels) per connected change.

    GDAL polygonizes the mask band line by line (memory follows the open polygons' rings, not
    the scene); each change polygon then reads the probability under its own bounding window.
    Passing the band as its own mask would skip the unchanged polygon but reads the raster
    through another path, about 100x slower; its one polygon (with the changes as holes) is
    skipped here instead."""
    to_pixels = ~mask_ds.transform
    affine = [to_pixels.a, to_pixels.b, to_pixels.d, to_pixels.e, to_pixels.c, to_pixels.f]
    band = rasterio.band(mask_ds, 1)
    for geom, value in rasterio.features.shapes(band, connectivity=connectivity):
        if value != 1:
            continue  # unchanged (0) and nodata (255)
        world = shape(geom)
        pixel_poly = shapely.affinity.affine_transform(world, affine)
        p_max, p_mean, pixels = _zonal(prob_ds, pixel_poly, mask_ds)
        yield world, p_max, p_mean, pixels


def _zonal(prob_ds: Any, pixel_poly: Any, mask_ds: Any = None) -> tuple[float, float, int]:
    """(max, mean, count) of the probabilities under a polygon given in pixel coordinates.

    Read in strips of at most ZONAL_PIXELS of the polygon's bounding window, each with the part
    of the polygon inside it: one change may span the scene (a flood), and its window whole would
    be a scene's worth of memory. The polygon is one connected change of ``mask_ds``: where the
    changed pixels of its window are exactly as many as its area, they are its pixels (its own
    pixels lie among them), and rasterising it (most of the cost of a speck) is skipped."""
    minx, miny, maxx, maxy = pixel_poly.bounds  # pixel edges: whole numbers up to rounding
    c0, r0 = max(0, math.floor(minx + 1e-6)), max(0, math.floor(miny + 1e-6))
    c1 = min(prob_ds.width, math.ceil(maxx - 1e-6))
    r1 = min(prob_ds.height, math.ceil(maxy - 1e-6))
    nodata = prob_ds.nodata
    rows = max(1, ZONAL_PIXELS // max(1, c1 - c0))
    top, total, count = -math.inf, 0.0, 0
    for r in range(r0, r1, rows):
        h = min(rows, r1 - r)
        part = pixel_poly if h == r1 - r0 else shapely.clip_by_rect(pixel_poly, c0, r, c1, r + h)
        if part.is_empty:
            continue
        window = Window(c0, r, c1 - c0, h)
        values = prob_ds.read(1, window=window)
        inside = _pixels_of(part, window, mask_ds)
        if nodata is not None:
            inside &= values != nodata
        chosen = values[inside]
        if len(chosen):
            top = max(top, float(chosen.max()))
            total += float(chosen.sum(dtype=np.float64))
            count += len(chosen)
    if not count:
        return float("nan"), float("nan"), 0
    scale = prob_ds.scales[0]  # a uint8 map carries its scale
    return top * scale, total / count * scale, count


def _pixels_of(part: Any, window: Window, mask_ds: Any) -> np.ndarray:
    """Which pixels of ``window`` the pixel-edged polygon ``part`` covers."""
    shape_ = (round(window.height), round(window.width))
    if abs(part.area - shape_[0] * shape_[1]) < 1e-6:  # the polygon is its window (a speck)
        return np.ones(shape_, bool)
    if mask_ds is not None:
        changed = mask_ds.read(1, window=window) == 1
        if abs(part.area - np.count_nonzero(changed)) < 1e-6:
            return changed  # no other change reaches into the window: these are its pixels
    return rasterio.features.geometry_mask(
        [part],
        out_shape=shape_,
        transform=Affine.translation(window.col_off, window.row_off),
        invert=True,
    )


def metres_per_unit(crs: CRS | None) -> float:
    """Metres per CRS unit for projected CRSs; for geographic ones, metres per degree (used only
    to scale a --simplify tolerance); 1 for rasters without a CRS (pixels)."""
    if crs is None:
        return 1.0
    if crs.is_geographic:
        return METRES_PER_DEGREE
    factor = crs.linear_units_factor[1] if crs.linear_units_factor else 1.0
    return float(factor)


def _area_m2(world: Any, crs: CRS | None, to_m: float) -> float:
    """Projected CRS: planar area times the unit factor squared. Geographic CRS: the area after
    projecting the polygon to a Lambert azimuthal equal-area projection centred on it."""
    if crs is None or not crs.is_geographic:
        return float(world.area) * to_m * to_m
    minx, miny, maxx, maxy = world.bounds
    if crs == WGS84 and max(maxx - minx, maxy - miny) < SMALL_DEGREES:
        # the ellipsoid's meridional (M) and normal (N) radii at the centroid's latitude:
        # dA = M N cos(lat) dlat dlon; 10 m pixels make thousands of specks, and projecting
        # each one costs ~0.5 ms
        lat = math.radians(world.centroid.y)
        w = 1.0 - WGS84_E2 * math.sin(lat) ** 2
        m, n = WGS84_A * (1.0 - WGS84_E2) / w**1.5, WGS84_A / math.sqrt(w)
        return float(world.area) * math.radians(1.0) ** 2 * m * n * math.cos(lat)
    c = world.centroid
    laea = CRS.from_proj4(f"+proj=laea +lat_0={c.y} +lon_0={c.x} +units=m +datum=WGS84")
    return float(shape(transform_geom(crs, laea, mapping(world))).area)


def _crs_name(crs: CRS) -> str:
    epsg = crs.to_epsg()
    return f"urn:ogc:def:crs:EPSG::{epsg}" if epsg else crs.to_wkt()
