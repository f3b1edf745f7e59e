"""Finished blocks on disk, and the Cloud-Optimized GeoTIFFs assembled from them.

A run keeps every finished block as its own ``.npy`` file, written to a temporary name and renamed,
so a run killed at any instant (SIGKILL included) leaves only whole blocks behind and ``--resume``
scores just the missing ones. The rasters are assembled from the blocks at the end, one block in
memory at a time: a tiled, compressed GeoTIFF first, then GDAL's COG driver (overviews, header
layout), each to a temporary name renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rasterio
import rasterio.shutil

from serving.scoring.blocks import Block
from serving.scoring.rasters import Grid

PROBABILITY_NODATA = -1.0  # float32 probability rasters
UINT8_NODATA = 255  # scaled probability (0..254 = 0..1) and mask (0/1) rasters
UINT8_SCALE = 254
COG_BLOCK = 512

ProbabilityType = Literal["float32", "uint8"]


class BlockStore:
    """``folder/<index>.npy``: the float32 probability of one finished block, NaN = nodata."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        return self.folder / f"{index:07d}.npy"

    def has(self, index: int) -> bool:
        return self.path(index).exists()

    def save(self, index: int, prob: np.ndarray) -> None:
        final = self.path(index)
        tmp = final.with_name(f".{final.name}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, prob.astype(np.float32, copy=False))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)

    def load(self, index: int) -> np.ndarray:
        return np.load(self.path(index))


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def probability_pixels(prob: np.ndarray, dtype: ProbabilityType) -> np.ndarray:
    invalid = np.isnan(prob)
    if dtype == "float32":
        return np.where(invalid, np.float32(PROBABILITY_NODATA), prob).astype(np.float32)
    scaled = np.rint(np.nan_to_num(prob) * UINT8_SCALE).astype(np.uint8)
    scaled[invalid] = UINT8_NODATA
    return scaled


def mask_pixels(prob: np.ndarray, threshold: float) -> np.ndarray:
    out = (np.nan_to_num(prob, nan=-1.0) >= threshold).astype(np.uint8)
    out[np.isnan(prob)] = UINT8_NODATA
    return out


def write_cog(
    path: Path,
    grid: Grid,
    blocks: Iterable[Block],
    pixels: Callable[[Block], np.ndarray],
    dtype: str,
    nodata: float,
    resampling: str,
    tags: dict[str, str] | None = None,
    scale: float | None = None,
    description: str = "",
    work: Path | None = None,
) -> Path:
    """Assemble ``pixels(block)`` for every block into a COG at ``path`` (atomic)."""
    work = work or path.parent
    work.mkdir(parents=True, exist_ok=True)
    staged = work / f".{path.stem}.staging.tif"
    final_tmp = path.with_name(f".{path.name}.tmp")
    profile = {
        "driver": "GTiff",
        "height": grid.height,
        "width": grid.width,
        "count": 1,
        "dtype": dtype,
        "crs": grid.crs,
        "transform": grid.transform,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": COG_BLOCK,
        "blockysize": COG_BLOCK,
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }
    with rasterio.open(staged, "w", **profile) as dst:
        for block in blocks:
            dst.write(pixels(block), 1, window=block.window)
        if tags:
            dst.update_tags(**tags)
        if scale is not None:
            dst.scales = (scale,)
            dst.offsets = (0.0,)
        if description:
            dst.set_band_description(1, description)
    rasterio.shutil.copy(
        staged,
        final_tmp,
        driver="COG",
        COMPRESS="DEFLATE",
        PREDICTOR="YES" if dtype == "float32" else "NO",
        BLOCKSIZE=COG_BLOCK,
        OVERVIEWS="AUTO",
        OVERVIEW_RESAMPLING=resampling.upper(),
        BIGTIFF="IF_SAFER",
    )
    staged.unlink()
    os.replace(final_tmp, path)
    return path


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
