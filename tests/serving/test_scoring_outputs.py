"""The COGs assembled from finished blocks: full resolution, the overview levels made here
(nodata-aware means of 2 x 2 cells, or the first valid pixel for masks), metadata, layout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS

from serving.scoring.blocks import plan
from serving.scoring.outputs import (
    COG_BLOCK,
    PROBABILITY_NODATA,
    UINT8_NODATA,
    CogWriter,
    _halve_array,
    mask_pixels,
    probability_pixels,
)
from serving.scoring.rasters import Grid


def write_cog(
    path: Path, grid: Grid, blocks: list, pixels: Callable, *args: Any, **kw: Any
) -> Path:
    """Every block's ``pixels`` through a ``CogWriter``, as the scoring run adds them."""
    with CogWriter(path, grid, blocks, *args, **kw) as cog:
        for block in blocks:
            cog.add(block, pixels(block))
        return cog.finish()


def test_halving_is_a_nodata_aware_mean_or_the_first_valid_pixel() -> None:
    # two 2 x 2 cells side by side, then a last column and row past the edge (nodata)
    probs = np.array([[0.2, 0.4, -1.0, -1.0, 0.8], [-1.0, 0.6, -1.0, -1.0, 0.1]], np.float32)
    mean = _halve_array(probs, -1.0, "average")
    assert mean.shape == (1, 3)
    assert mean[0, 0] == pytest.approx(0.4) and mean[0, 1] == -1.0
    assert mean[0, 2] == pytest.approx(0.45)
    masks = np.array([[255, 1, 255, 255, 0], [0, 0, 255, 255, 255], [1, 1, 1, 1, 1]], np.uint8)
    # first valid in the cell's order (top-left, top-right, bottom-left, bottom-right)
    assert _halve_array(masks, 255, "nearest").tolist() == [[1, 255, 0], [1, 1, 1]]
    ints = np.array([[1, 2], [255, 255]], np.uint8)
    assert _halve_array(ints, 255, "average").tolist() == [[2]]  # 1.5 rounds to even: 2
    assert _halve_array(ints, 255, "average").dtype == np.float32  # cast by the caller


def test_halving_matches_the_mean_of_each_cell() -> None:
    rng = np.random.default_rng(3)
    probs = rng.random((37, 52)).astype(np.float32)
    probs[rng.random(probs.shape) < 0.3] = -1.0
    padded = np.full((38, 52), -1.0, np.float32)
    padded[:37] = probs
    cells = padded.reshape(19, 2, 26, 2).transpose(0, 2, 1, 3).reshape(19, 26, 4)
    valid = cells != -1.0
    expect = np.where(
        valid.any(2), np.where(valid, cells, 0).sum(2) / np.maximum(valid.sum(2), 1), -1.0
    )
    np.testing.assert_allclose(_halve_array(probs, -1.0, "average"), expect, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_cog_levels_metadata_and_layout(tmp_path: Path, dtype: str) -> None:
    h, w = 1100, 1300  # odd halvings: 550 x 650, then 275 x 325
    rng = np.random.default_rng(0)
    prob = rng.random((h, w)).astype(np.float32)
    prob[:300, :200] = np.nan  # nodata
    grid = Grid(CRS.from_epsg(32633), Affine(2.0, 0, 400_000.0, 0, -2.0, 5_000_000.0), h, w)
    blocks = plan(h, w, 256)

    def pixels(b):  # type: ignore[no-untyped-def]
        return probability_pixels(prob[b.row : b.row + b.height, b.col : b.col + b.width], dtype)

    nodata = PROBABILITY_NODATA if dtype == "float32" else UINT8_NODATA
    path = write_cog(
        tmp_path / "p.tif",
        grid,
        blocks,
        pixels,
        dtype,
        nodata,
        "average",
        tags={"model": "m 1"},
        scale=None if dtype == "float32" else 1 / 254,
        description="change probability",
        work=tmp_path / "work",
    )
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == []  # staging removed
    full = probability_pixels(prob, dtype)
    with rasterio.open(path) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert ds.profile["blockxsize"] == COG_BLOCK and ds.overviews(1) == [2, 4]
        assert ds.crs == grid.crs and ds.transform == grid.transform and ds.nodata == nodata
        assert ds.tags()["model"] == "m 1" and ds.descriptions == ("change probability",)
        assert np.array_equal(ds.read(1), full)
    with rasterio.open(path, overview_level=0) as ov:
        assert (ov.height, ov.width) == (550, 650)
        got = ov.read(1)
    cells = full.reshape(550, 2, 650, 2).transpose(0, 2, 1, 3).reshape(550, 650, 4)
    valid = cells != nodata
    want = np.where(valid, cells.astype(np.float64), 0).sum(2) / np.maximum(valid.sum(2), 1)
    if dtype == "uint8":
        want = np.rint(want)
    want = np.where(valid.any(2), want, nodata)
    np.testing.assert_allclose(got, want.astype(dtype), rtol=1e-6)
    assert (got[:150, :100] == nodata).all()  # nodata stays nodata in the overviews


def test_mask_overview_keeps_zero_one_nodata(tmp_path: Path) -> None:
    h = w = 700
    prob = np.zeros((h, w), np.float32)
    prob[100:140, 100:140] = 0.9
    prob[600:, 600:] = np.nan
    grid = Grid(CRS.from_epsg(32633), Affine(1.0, 0, 0.0, 0, -1.0, 700.0), h, w)
    path = write_cog(
        tmp_path / "m.tif",
        grid,
        plan(h, w, 512),
        lambda b: mask_pixels(prob[b.row : b.row + b.height, b.col : b.col + b.width], 0.5),
        "uint8",
        UINT8_NODATA,
        "nearest",
    )
    with rasterio.open(path, overview_level=0) as ov:
        values = set(np.unique(ov.read(1)).tolist())
    assert values == {0, 1, 255}


@pytest.mark.parametrize(("dtype", "resampling"), [("float32", "average"), ("uint8", "nearest")])
def test_levels_halved_from_blocks_equal_levels_read_back(
    tmp_path: Path, dtype: str, resampling: str
) -> None:
    """Overview levels made from each block in memory (as many as the block size allows) are
    the levels made from the level below: block sizes aligned to 0, 2 and 10 levels give the
    same COG, pixel for pixel, on a scene whose sides halve to odd sizes."""
    h, w = 2100, 1150  # 1050 x 575, 525 x 288, 263 x 144
    rng = np.random.default_rng(3)
    prob = rng.random((h, w)).astype(np.float32)
    prob[500:1333, 77:300] = np.nan
    grid = Grid(CRS.from_epsg(32633), Affine(1.0, 0, 400_000.0, 0, -1.0, 5_000_000.0), h, w)

    def pixels(b):  # type: ignore[no-untyped-def]
        p = prob[b.row : b.row + b.height, b.col : b.col + b.width]
        return probability_pixels(p, dtype) if resampling == "average" else mask_pixels(p, 0.5)

    nodata = PROBABILITY_NODATA if dtype == "float32" else UINT8_NODATA
    read = {}
    for size in (333, 300, 1024):  # 0, 2 and (capped at DIRECT_LEVELS) 2 levels from the blocks
        path = write_cog(
            tmp_path / f"{size}.tif", grid, plan(h, w, size), pixels, dtype, nodata, resampling
        )
        with rasterio.open(path) as ds:
            n = len(ds.overviews(1))
        read[size] = []
        for level in range(n):
            with rasterio.open(path, overview_level=level) as ov:
                read[size].append(ov.read(1))
    assert len(read[1024]) == 3
    for size in (333, 300):
        for a, b in zip(read[size], read[1024], strict=True):
            assert np.array_equal(a, b)
