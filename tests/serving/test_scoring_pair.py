"""serving.scoring.pair end to end: real GeoTIFFs (written with rasterio into tmp_path, and the
shared real data) scored by the bundled ``aerial-rgb`` model through ONNX Runtime.

Covered:
- the batch path equals the in-memory service path (``ChangeDetectionCore``) on the same arrays
  to float32 tolerance, with many blocks, some narrower than the tiles' mirrored padding; a
  warped pair scored in small blocks equals it scored as one block, exactly; GDAL's block cache
  while scoring is megabytes, not bytes;
- outputs: both rasters are COGs (tiled, deflate, overviews on a 1100 px scene) on the before
  image's CRS and transform with nodata set; the uint8 probability option (scale 1/254, nodata
  255); mask == probability >= threshold; polygons (areas in m2, pixel counts, max/mean
  probability, min-area filter, simplify, connectivity, WGS84 output, geographic grids), drawn by
  hand, as the connected changes of a mask of several blocks, and from a run; the quicklook is a
  PNG with nodata grey; summary.json counts agree with the rasters;
- grid alignment: OSCD pairs whose t2 is on another grid come out on the t1 grid (pixel F1 against
  the truth is printed, not asserted); an after image in another CRS or on an offset grid is
  warped, and an offset one (plain, nodata value, internal mask or alpha band) equals the same
  pixels given on the before grid with a mask; pairs that do not overlap, or are ungeoreferenced
  with different shapes, are refused;
- bands and pixel types: --bands picks and orders bands; wrong band counts and uint16/float32
  rasters without --rescale are usage problems naming the flag; with --rescale they give the
  uint8 result exactly; an alpha band is a mask, not a channel;
- nodata: a nodata value, an internal mask, the .msk sidecar of RGB2.byte.tif, NaN, and the
  after image's footprint, in either date, are nodata in both outputs and never change; striped
  and tiled inputs give identical outputs;
- resume: a run stopped in-process after some blocks, and one SIGKILLed in a subprocess, resume to
  the same pixels as an uninterrupted run; resuming an unfinished run with other settings, or
  writing over a finished run without --overwrite/--resume, are usage problems; resuming a
  finished run says so; a run without --resume starts over;
- real data smoke runs: Taizhou Landsat (bands 3,2,1), RGB.byte.tif against a shifted and painted
  copy of itself, shade.tif (EPSG:3857, one band read as 1,1,1).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import rasterio.env
import rasterio.warp
import shapely
import shapely.geometry
from affine import Affine
from PIL import Image
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.warp import Resampling, reproject, transform_bounds

from serving import cva
from serving.config import ServerSettings
from serving.detector import ChangeDetectionCore, DetectRequest
from serving.metadata import ModelMetadata
from serving.scoring import polygons
from serving.scoring.outputs import COG_BLOCK, PROBABILITY_NODATA, UINT8_NODATA, UINT8_SCALE
from serving.scoring.pair import PARTIAL, ModelScorer, ScoreOptions, score_pair
from serving.scoring.polygons import WINDOW_CACHE, PolygonOptions, line_cache, write_geojson
from serving.scoring.quicklook import NODATA_GREY, heat
from serving.scoring.rasters import PairError, UsageProblem

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ServerSettings(models_dir=ROOT / "models", metrics_port=-1, warmup=False)
MODEL = "aerial-rgb"  # 3 bands uint8, patch 32, stride 8
UTM = CRS.from_epsg(32633)
PIXEL = 10.0  # metres: a pixel is 100 m2
ORIGIN = (500_000.0, 4_000_000.0)

ungeoreferenced = pytest.mark.filterwarnings(
    f"ignore::{NotGeoreferencedWarning.__module__}.{NotGeoreferencedWarning.__name__}"
)


@pytest.fixture(scope="module")
def scorer() -> Iterator[ModelScorer]:
    with ModelScorer(SETTINGS, MODEL) as s:
        yield s


# --------------------------------------------------------------------------------------------
# helpers


def from_origin(west: float, north: float, xsize: float, ysize: float) -> Affine:
    """rasterio.transform.from_origin without its ``Affine * Affine`` (a pending deprecation)."""
    return Affine(xsize, 0.0, west, 0.0, -ysize, north)


def grid_at(row: float = 0, col: float = 0, pixel: float = PIXEL) -> Affine:
    """The test grid's transform, its origin moved by (row, col) pixels."""
    return from_origin(ORIGIN[0] + col * pixel, ORIGIN[1] - row * pixel, pixel, pixel)


def write_tif(
    path: Path,
    data: np.ndarray,
    *,
    crs: CRS | str | None = UTM,
    transform: Affine | None = None,
    nodata: float | None = None,
    mask: np.ndarray | None = None,
    tiled: bool = True,
    **profile: Any,
) -> Path:
    """(C, H, W) -> a GeoTIFF; ``mask`` (H, W) bool (True = valid) becomes an internal mask."""
    count, height, width = data.shape
    opts: dict[str, Any] = {"tiled": tiled}
    if tiled:
        opts.update(blockxsize=64, blockysize=64)
    if crs is not None:
        opts.update(crs=crs, transform=grid_at() if transform is None else transform)
    with (
        rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True),
        rasterio.open(
            path,
            "w",
            driver="GTiff",
            height=height,
            width=width,
            count=count,
            dtype=data.dtype,
            nodata=nodata,
            **opts,
            **profile,
        ) as dst,
    ):
        dst.write(data)
        if mask is not None:
            dst.write_mask(np.where(mask, 255, 0).astype(np.uint8))
    return path


def synthetic_pair(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(3, H, W) uint8 before/after, values 1..255: smooth texture, noise, and changed squares."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack(
        [
            128 + 60 * np.sin(xx / 7.0) + 30 * np.cos(yy / 11.0),
            100 + 50 * np.cos(xx / 9.0 + yy / 13.0),
            90 + 40 * np.sin((xx + yy) / 5.0),
        ]
    )
    before = np.clip(base + rng.normal(0, 8, base.shape), 1, 255).astype(np.uint8)
    after = np.clip(base + rng.normal(0, 8, base.shape), 1, 255).astype(np.uint8)
    for _ in range(max(1, height * width // 12_000)):
        h, w = rng.integers(20, 50, 2)
        r, c = rng.integers(0, max(1, height - h)), rng.integers(0, max(1, width - w))
        after[:, r : r + h, c : c + w] = rng.integers(180, 250, (3, 1, 1))
    return before, after


def reprojected_after(tmp_path: Path, after: np.ndarray, crs: CRS, pixel: float = PIXEL) -> Path:
    """``after`` (on the test grid, ``pixel`` m) reprojected into ``crs``, about as fine."""
    height, width = after.shape[1:]
    bounds = (ORIGIN[0], ORIGIN[1] - height * pixel, ORIGIN[0] + width * pixel, ORIGIN[1])
    west, south, east, north = transform_bounds(UTM, crs, *bounds)
    res = (east - west) / width
    w, h = math.ceil((east - west) / res), math.ceil((north - south) / res)
    t = from_origin(west, north, res, res)
    moved = np.zeros((3, h, w), np.uint8)
    reproject(
        after,
        moved,
        src_transform=grid_at(pixel=pixel),
        src_crs=UTM,
        dst_transform=t,
        dst_crs=crs,
        resampling=Resampling.bilinear,
        dst_nodata=0,
    )
    return write_tif(tmp_path / "after_reprojected.tif", moved, crs=crs, transform=t, nodata=0)


def write_pair(
    folder: Path, height: int, width: int, seed: int = 0, **kw: Any
) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    before, after = synthetic_pair(height, width, seed)
    b = write_tif(folder / "before.tif", before, **kw)
    a = write_tif(folder / "after.tif", after, **kw)
    return b, a, before, after


def score(
    scorer: ModelScorer | Any, before: Path, after: Path, out: Path, **options: Any
) -> dict[str, Any]:
    options.setdefault("block_size", 64)
    return score_pair(before, after, out, scorer, ScoreOptions(**options), progress=False)


def band(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


def outputs(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """(probability, mask) as written."""
    return band(out / "change_probability.tif"), band(out / "change_mask.tif")


def same_outputs(a: Path, b: Path) -> bool:
    pa, ma = outputs(a)
    pb, mb = outputs(b)
    return np.array_equal(pa, pb) and np.array_equal(ma, mb)


def nodata_of(out: Path) -> np.ndarray:
    """Pixels that are nodata in the probability raster; asserts the mask agrees."""
    prob, mask = outputs(out)
    missing = prob == PROBABILITY_NODATA
    assert np.array_equal(missing, mask == UINT8_NODATA)
    return missing


def features_of(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["features"]


def features(out: Path) -> list[dict[str, Any]]:
    """The polygons of a run."""
    return features_of(out / "changes.geojson")


def pixel_f1(predicted: np.ndarray, truth: np.ndarray) -> float:
    tp = int((predicted & truth).sum())
    fp, fn = int((predicted & ~truth).sum()), int((~predicted & truth).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


# --------------------------------------------------------------------------------------------
# 2. the batch path equals the service path


@pytest.mark.parametrize("block_size", [32, 40, 64, 1024])
def test_score_pair_equals_the_in_memory_service(
    tmp_path: Path, scorer: ModelScorer, block_size: int
) -> None:
    # 201 x 163: the last block row/column is narrower than the mirrored padding it needs
    b, a, before, after = write_pair(tmp_path, 201, 163, seed=1)
    summary = score(scorer, b, a, tmp_path / "out", block_size=block_size)
    detection = ChangeDetectionCore(scorer.repository).detect(
        DetectRequest(before.transpose(1, 2, 0), after.transpose(1, 2, 0), model=MODEL)
    )
    prob, mask = outputs(tmp_path / "out")
    np.testing.assert_allclose(prob, detection.probability, rtol=0, atol=1e-6)
    clear = np.abs(detection.probability - summary["threshold"]) > 1e-6
    assert np.array_equal(mask[clear] == 1, detection.mask[clear])
    assert detection.mask.any() and not detection.mask.all()  # the scene has change and not
    assert summary["counts"]["blocks"] == len(range(0, 201, block_size)) * len(
        range(0, 163, block_size)
    )


@pytest.mark.parametrize("floor", [None, 0.0])
@pytest.mark.parametrize("block_size", [40, 1024])
def test_cva_gated_mask_equals_the_services(
    tmp_path: Path,
    scorer: ModelScorer,
    block_size: int,
    floor: float | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Block by block (moments merged, the cut's medians over blocks kept on disk) the gated mask
    is the service's, whose moments and cut see the whole pair at once: with the rule's floor,
    and without one, where the scene's median and MAD alone decide."""
    if floor is not None:
        monkeypatch.setattr(cva, "GATE_FLOOR", floor)
    b, a, before, after = write_pair(tmp_path, 201, 163, seed=1)
    summary = score(scorer, b, a, tmp_path / "out", block_size=block_size, mask_rule="cva-gated")
    detection = ChangeDetectionCore(scorer.repository).detect(
        DetectRequest(
            before.transpose(1, 2, 0), after.transpose(1, 2, 0), model=MODEL, mask_rule="cva-gated"
        )
    )
    assert summary["mask_rule"] == "cva-gated" and "threshold" not in summary
    assert summary["gated_cut"] == pytest.approx(detection.gated_cut, rel=1e-5)
    assert summary["gated_cut"] >= cva.GATE_FLOOR and summary["gated_cut"] > 0
    assert (summary["gate_spread"], summary["gate_floor"]) == (cva.GATE_SPREAD, cva.GATE_FLOOR)
    _, mask = outputs(tmp_path / "out")
    score_map = (
        cva.gate_magnitude(before.transpose(1, 2, 0), after.transpose(1, 2, 0))
        * detection.probability
    )
    clear = np.abs(score_map - detection.gated_cut) > 1e-4 * detection.gated_cut
    assert np.array_equal(mask[clear] == 1, detection.mask[clear])
    assert detection.mask.any() and not np.array_equal(detection.mask, score_map > 0)
    assert summary["counts"]["changed_pixels"] == int((mask == 1).sum())
    with rasterio.open(tmp_path / "out" / "change_mask.tif") as ds:
        assert ds.tags()["mask_rule"] == "cva-gated"
    # the threshold rule's run of the same pair is another product, never "already complete"
    plain = score(scorer, b, a, tmp_path / "plain", block_size=block_size)
    assert plain["mask_rule"] == "threshold" and plain["pixels"] != summary["pixels"]
    with pytest.raises(UsageProblem, match="threshold"):
        score(scorer, b, a, tmp_path / "x", mask_rule="cva-gated", threshold=0.5)


def test_cva_gated_nodata_stays_nodata_and_out_of_the_statistics(
    tmp_path: Path, scorer: ModelScorer
) -> None:
    before, after = synthetic_pair(128, 112, seed=9)
    before[:, 10:30, 5:45] = 0  # nodata in the before
    b = write_tif(tmp_path / "b.tif", before, nodata=0)
    a = write_tif(tmp_path / "a.tif", after)
    summary = score(scorer, b, a, tmp_path / "out", mask_rule="cva-gated")
    expected = (before == 0).any(axis=0)
    assert np.array_equal(nodata_of(tmp_path / "out"), expected)
    # the moments are the valid pixels' (zeros would drag the before's mean down)
    valid = ~expected
    moments = (cva.Moments(3), cva.Moments(3))
    moments[0].add(before.transpose(1, 2, 0)[valid])
    moments[1].add(after.transpose(1, 2, 0)[valid])
    prob, mask = outputs(tmp_path / "out")
    fused = cva.gate_magnitude(
        before.transpose(1, 2, 0), after.transpose(1, 2, 0), moments, valid
    ) * np.where(valid, prob, np.nan)
    assert summary["gated_cut"] == pytest.approx(cva.gate_cut(fused), rel=1e-5)
    clear = valid & (np.abs(fused - summary["gated_cut"]) > 1e-4 * summary["gated_cut"])
    assert np.array_equal(mask[clear] == 1, fused[clear] > summary["gated_cut"])


def test_cva_gated_resume_gives_the_same_pixels(tmp_path: Path, scorer: ModelScorer) -> None:
    b, a, _, _ = write_pair(tmp_path, 256, 224, seed=12)
    score(scorer, b, a, tmp_path / "ref", mask_rule="cva-gated")
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        score(StopAfter(scorer, 9), b, a, out, mask_rule="cva-gated")
    summary = score(scorer, b, a, out, resume=True, mask_rule="cva-gated")
    assert summary["counts"]["blocks_resumed"] > 0
    assert same_outputs(out, tmp_path / "ref")


# --------------------------------------------------------------------------------------------
# 3. outputs


def test_outputs_are_cogs_on_the_before_grid_with_overviews(
    tmp_path: Path, scorer: ModelScorer
) -> None:
    side = 1100
    before, after = synthetic_pair(side, side, seed=2)
    transform = grid_at(3, 7, pixel=2.5)
    b = write_tif(tmp_path / "b.tif", before, transform=transform)
    a = write_tif(tmp_path / "a.tif", after, transform=transform)
    out = tmp_path / "out"
    score(scorer, b, a, out, stride=32, block_size=1024, quicklook=False)  # stride 32: light
    for name, dtype, nodata in (
        ("change_probability.tif", "float32", PROBABILITY_NODATA),
        ("change_mask.tif", "uint8", UINT8_NODATA),
    ):
        with rasterio.open(out / name) as ds:
            assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG", name
            assert ds.profile["tiled"] and ds.block_shapes[0] == (COG_BLOCK, COG_BLOCK)
            assert ds.compression is not None and ds.compression.name == "deflate"
            assert len(ds.overviews(1)) >= 1
            assert ds.crs == UTM and ds.transform == transform
            assert (ds.height, ds.width, ds.count) == (side, side, 1)
            assert ds.dtypes[0] == dtype and ds.nodata == nodata
            overview = ds.read(1, out_shape=(side // 2, side // 2))
            assert overview.shape == (side // 2, side // 2)
    assert sorted(p.name for p in out.iterdir()) == [
        "change_mask.tif",
        "change_probability.tif",
        "changes.geojson",
        "summary.json",
    ]


@pytest.fixture(scope="module")
def small_run(
    tmp_path_factory: pytest.TempPathFactory, scorer: ModelScorer
) -> tuple[Path, dict[str, Any]]:
    """One scored 150 x 130 pair with changes, threshold 0.5, a nodata corner in the before."""
    folder = tmp_path_factory.mktemp("small")
    before, after = synthetic_pair(150, 130, seed=3)
    before[:, :12, :20] = 0
    b = write_tif(folder / "before.tif", before, nodata=0, transform=grid_at(11, -4))
    a = write_tif(folder / "after.tif", after, transform=grid_at(11, -4))
    out = folder / "out"
    return out, score(scorer, b, a, out, threshold=0.5)


def test_rasters_are_georeferenced_with_nodata_and_mask_is_the_thresholded_probability(
    small_run: tuple[Path, dict[str, Any]],
) -> None:
    out, summary = small_run
    with rasterio.open(out.parent / "before.tif") as src:
        crs, transform = src.crs, src.transform
    for name in ("change_probability.tif", "change_mask.tif"):
        with rasterio.open(out / name) as ds:
            assert ds.crs == crs and ds.transform == transform and ds.shape == (150, 130)
            assert ds.nodata is not None
            assert ds.tags()["model"].startswith(MODEL)
    prob, mask = outputs(out)
    missing = nodata_of(out)
    assert missing[:12, :20].all() and missing.sum() == 12 * 20
    valid = ~missing
    assert ((prob[valid] >= 0) & (prob[valid] <= 1)).all()
    assert np.array_equal(mask[valid] == 1, prob[valid] >= 0.5)
    assert set(np.unique(mask[valid])) == {0, 1}
    counts = summary["counts"]
    assert counts["changed_pixels"] == int((mask == 1).sum()) > 0
    assert counts["valid_pixels"] == int(valid.sum())
    assert counts["nodata_pixels"] == 12 * 20
    assert counts["changed_area_m2"] == pytest.approx(counts["changed_pixels"] * PIXEL**2)
    assert counts["changed_fraction_of_valid"] == pytest.approx(
        counts["changed_pixels"] / counts["valid_pixels"]
    )
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["status"] == "done" and summary["threshold"] == 0.5
    assert not (out / PARTIAL).exists()


def test_run_polygons_agree_with_the_mask(small_run: tuple[Path, dict[str, Any]]) -> None:
    out, summary = small_run
    feats = features(out)
    doc = json.loads((out / "changes.geojson").read_text())
    assert doc["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    assert len(feats) == summary["polygons"]["polygons"] > 0
    assert sum(f["properties"]["pixels"] for f in feats) == summary["counts"]["changed_pixels"]
    for f in feats:
        p = f["properties"]
        assert p["area_m2"] == pytest.approx(p["pixels"] * PIXEL**2)
        assert 0.5 - 1e-6 <= p["mean_probability"] <= p["max_probability"] <= 1.0
    total = sum(f["properties"]["area_m2"] for f in feats)
    assert total == pytest.approx(summary["counts"]["changed_area_m2"])


def test_quicklook_is_a_png_of_three_panels(small_run: tuple[Path, dict[str, Any]]) -> None:
    out, _ = small_run
    with Image.open(out / "quicklook.png") as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == (3 * 130 + 2 * 6, 150)
        pixels = np.asarray(im)
    assert pixels.std() > 0
    # the scene is smaller than the picture's 512 px: the third panel is the probability raster,
    # pixel for pixel, sampled from the blocks as they were scored
    with rasterio.open(out / "change_probability.tif") as ds:
        prob = ds.read(1, masked=True).filled(np.nan).astype(np.float32)
    assert np.array_equal(pixels[:, 2 * (130 + 6) :], heat(prob))


def test_uint8_probability(
    tmp_path: Path, scorer: ModelScorer, small_run: tuple[Path, dict[str, Any]]
) -> None:
    float_out, _ = small_run
    out = tmp_path / "u8"
    summary = score(
        scorer,
        float_out.parent / "before.tif",
        float_out.parent / "after.tif",
        out,
        threshold=0.5,
        probability_dtype="uint8",
        quicklook=False,
    )
    with rasterio.open(out / "change_probability.tif") as ds:
        assert ds.dtypes[0] == "uint8" and ds.nodata == UINT8_NODATA
        assert ds.scales[0] == pytest.approx(1 / UINT8_SCALE)
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        scaled = ds.read(1)
    prob, mask = outputs(float_out)
    missing = prob == PROBABILITY_NODATA
    assert np.array_equal(scaled == UINT8_NODATA, missing)
    assert scaled[~missing].max() <= UINT8_SCALE
    expected = np.rint(prob[~missing].astype(np.float64) * UINT8_SCALE)
    assert np.array_equal(scaled[~missing], expected)
    assert np.array_equal(band(out / "change_mask.tif"), mask)  # the mask is from the floats
    assert summary["probability_dtype"] == "uint8"
    # polygon statistics read the scale: the same as from the float map, to 1/254
    for f8, f32 in zip(features(out), features(float_out), strict=True):
        assert f8["properties"]["pixels"] == f32["properties"]["pixels"]
        for key in ("max_probability", "mean_probability"):
            assert f8["properties"][key] == pytest.approx(f32["properties"][key], abs=0.6 / 254)


def hand_drawn(folder: Path, crs: CRS = UTM) -> tuple[Path, Path]:
    """A 40 x 50 mask and probability on 10 m pixels: a 4 x 5 block (20 px, p 0.7..0.9), a lone
    pixel (p 0.95), a staircase of 10 steps (p 0.8), two diagonal pixels (p 0.6), nodata."""
    mask = np.zeros((40, 50), np.uint8)
    prob = np.full((40, 50), 0.1, np.float32)
    mask[2:6, 3:8] = 1
    prob[2:6, 3:8] = 0.7
    prob[3, 4] = 0.9
    mask[10, 40] = 1
    prob[10, 40] = 0.95
    for i in range(10):  # staircase: rows 20..29, each row a step further right
        mask[20 + i, 10 : 12 + i] = 1
        prob[20 + i, 10 : 12 + i] = 0.8
    mask[35, 45] = mask[36, 46] = 1
    prob[35, 45] = prob[36, 46] = 0.6
    mask[38:, :5] = UINT8_NODATA
    prob[38:, :5] = PROBABILITY_NODATA
    m = write_tif(folder / "mask.tif", mask[None], crs=crs, nodata=UINT8_NODATA)
    p = write_tif(folder / "prob.tif", prob[None], crs=crs, nodata=PROBABILITY_NODATA)
    return m, p


def test_polygons_from_hand_drawn_rasters(tmp_path: Path) -> None:
    m, p = hand_drawn(tmp_path)
    info = write_geojson(tmp_path / "all.geojson", m, p, PolygonOptions())
    feats = json.loads((tmp_path / "all.geojson").read_text())["features"]
    by_pixels = {f["properties"]["pixels"]: f["properties"] for f in feats}
    assert info["polygons"] == len(feats) == 4  # the diagonal pair is one (8-connected)
    assert sorted(by_pixels) == [1, 2, 20, 65]
    assert by_pixels[20]["area_m2"] == 2000.0
    assert by_pixels[20]["max_probability"] == pytest.approx(0.9)
    assert by_pixels[20]["mean_probability"] == pytest.approx((19 * 0.7 + 0.9) / 20, abs=1e-6)
    assert by_pixels[1] == pytest.approx(
        {"area_m2": 100.0, "pixels": 1, "max_probability": 0.95, "mean_probability": 0.95}
    )
    assert by_pixels[65]["area_m2"] == 6500.0
    assert by_pixels[2]["area_m2"] == 200.0
    assert info["changed_area_m2_in_polygons"] == pytest.approx(100 * (20 + 1 + 65 + 2))

    # min area: the lone pixel and the diagonal pair go
    info = write_geojson(tmp_path / "big.geojson", m, p, PolygonOptions(min_area_m2=500))
    feats = json.loads((tmp_path / "big.geojson").read_text())["features"]
    assert sorted(f["properties"]["pixels"] for f in feats) == [20, 65]
    assert info["polygons_below_min_area"] == 2

    # 4-connectivity splits the diagonal pair
    write_geojson(tmp_path / "c4.geojson", m, p, PolygonOptions(connectivity=4))
    feats = json.loads((tmp_path / "c4.geojson").read_text())["features"]
    assert sorted(f["properties"]["pixels"] for f in feats) == [1, 1, 1, 20, 65]


def test_polygons_cache_one_row_of_mask_tiles(tmp_path: Path) -> None:
    """GDAL polygonizes line by line: with less block cache than one row of the mask's tiles,
    every line decompresses the row again (80 s instead of 4.6 s on a 16k scene under the run's
    8 MB cache). The cache follows the width only, and the run's own setting comes back after."""
    m, p = hand_drawn(tmp_path)
    with rasterio.open(m) as ds:
        assert line_cache(ds) == 50 * 64 + WINDOW_CACHE  # 64-pixel tiles of a uint8 mask
    wide = write_tif(tmp_path / "wide.tif", np.zeros((1, 64, 1300), np.uint8), nodata=255)
    with rasterio.open(wide) as ds:
        assert line_cache(ds) == 1300 * 64 + WINDOW_CACHE
    with rasterio.Env(GDAL_CACHEMAX=1024 * 1024):
        info = write_geojson(tmp_path / "all.geojson", m, p, PolygonOptions())
        assert rasterio.env.get_gdal_config("GDAL_CACHEMAX") == 1024 * 1024
    assert info["polygons"] == 4


def test_polygon_statistics_read_in_strips_equal_the_whole_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change may span the scene: its probabilities are read a strip at a time (here strips
    of one to three rows), with the same statistics as one read of its whole window."""
    m, p = hand_drawn(tmp_path)
    whole = features_of_file(write_geojson, tmp_path / "whole.geojson", m, p)
    for budget in (7, 30):
        monkeypatch.setattr(polygons, "ZONAL_PIXELS", budget)
        strips = features_of_file(write_geojson, tmp_path / f"s{budget}.geojson", m, p)
        assert [f["geometry"] for f in strips] == [f["geometry"] for f in whole]
        for a, b in zip(strips, whole, strict=True):
            assert a["properties"] == pytest.approx(b["properties"], rel=1e-9)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_polygon_pixels_taken_from_the_mask_unless_another_change_is_in_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, connectivity: int
) -> None:
    """A polygon's pixels are the changed pixels of its window when they are exactly as many as
    its area; a ring with an island in its hole, or a neighbour across a corner under
    4-connectivity, puts other changes in the window, and only then is the polygon rasterised.
    Either way the statistics are those of the connected change."""
    from scipy import ndimage

    mask = np.zeros((30, 30), np.uint8)
    mask[2:12, 2:12] = 1
    mask[4:10, 4:10] = 0  # a ring...
    mask[6:8, 6:8] = 1  # ...with an island in its hole
    mask[20:25, 2] = mask[24, 2:7] = 1  # an L...
    mask[21, 4] = 1  # ...with a pixel in its window (apart under either connectivity)
    mask[20:24, 20:23] = 1  # a block
    mask[24, 23] = 1  # its corner neighbour (8-connected to it, apart under 4)
    mask[15, 5:9] = 1  # a bar
    rng = np.random.default_rng(3)
    prob = rng.uniform(0, 1, mask.shape).astype(np.float32)
    m = write_tif(tmp_path / "m.tif", mask[None], nodata=UINT8_NODATA)
    p = write_tif(tmp_path / "p.tif", prob[None], nodata=PROBABILITY_NODATA)
    rasterised = []
    real = rasterio.features.geometry_mask
    monkeypatch.setattr(
        rasterio.features,
        "geometry_mask",
        lambda shapes, **kw: rasterised.append(shapes) or real(shapes, **kw),
    )
    info = write_geojson(tmp_path / "g.geojson", m, p, PolygonOptions(connectivity=connectivity))
    structure = np.ones((3, 3), bool) if connectivity == 8 else None
    labels, n = ndimage.label(mask == 1, structure=structure)
    index = np.arange(1, n + 1)
    want = sorted(
        zip(
            ndimage.sum_labels(mask == 1, labels, index).astype(int).tolist(),
            ndimage.mean(prob.astype(np.float64), labels, index).tolist(),
            strict=True,
        )
    )
    feats = features_of(tmp_path / "g.geojson")
    got = sorted((f["properties"]["pixels"], f["properties"]["mean_probability"]) for f in feats)
    assert info["polygons"] == n == (7 if connectivity == 4 else 6)
    assert [g[0] for g in got] == [w[0] for w in want]
    np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], atol=1e-6)
    # rasterised: the ring and the L (another change in their windows); never the bar, the
    # block (with its corner neighbour under 8-connectivity: the window's changed pixels are
    # its own) or a lone pixel
    assert len(rasterised) == 2


def features_of_file(write: Any, path: Path, m: Path, p: Path) -> list[dict[str, Any]]:
    write(path, m, p, PolygonOptions())
    return json.loads(path.read_text())["features"]


def ring_points(feature: dict[str, Any]) -> int:
    return sum(len(ring) for ring in feature["geometry"]["coordinates"])


def test_polygons_simplify_and_wgs84(tmp_path: Path) -> None:
    from shapely.geometry import shape

    m, p = hand_drawn(tmp_path)
    write_geojson(tmp_path / "raw.geojson", m, p, PolygonOptions())
    write_geojson(tmp_path / "simple.geojson", m, p, PolygonOptions(simplify_m=15))
    raw = {f["properties"]["pixels"]: f for f in features_of(tmp_path / "raw.geojson")}
    simple = {f["properties"]["pixels"]: f for f in features_of(tmp_path / "simple.geojson")}
    assert ring_points(simple[65]) < ring_points(raw[65])  # the staircase loses its steps
    assert shape(simple[65]["geometry"]).is_valid
    # area and statistics are those of the pixels, not of the simplified outline
    assert simple[65]["properties"] == raw[65]["properties"]
    assert ring_points(simple[20]) == ring_points(raw[20]) == 5  # a rectangle stays one

    write_geojson(tmp_path / "wgs84.geojson", m, p, PolygonOptions(wgs84=True))
    doc = json.loads((tmp_path / "wgs84.geojson").read_text())
    assert "crs" not in doc  # RFC 7946: WGS84 lon/lat, no crs member
    with rasterio.open(m) as ds:
        west, south, east, north = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
    lonlat = np.array(
        [pt for f in doc["features"] for ring in f["geometry"]["coordinates"] for pt in ring]
    )
    assert (lonlat[:, 0] >= west - 1e-9).all() and (lonlat[:, 0] <= east + 1e-9).all()
    assert (lonlat[:, 1] >= south - 1e-9).all() and (lonlat[:, 1] <= north + 1e-9).all()
    assert lonlat[:, 0].min() > 14 and lonlat[:, 0].max() < 16  # UTM 33N around 15 E
    wgs = {f["properties"]["pixels"]: f["properties"] for f in doc["features"]}
    assert wgs[20] == raw[20]["properties"]  # areas stay in m2 of the raster's CRS


def test_polygons_on_a_geographic_grid_have_areas_in_m2(tmp_path: Path) -> None:
    """EPSG:4326 pixels of 1e-4 degrees at 24 N: about 11.1 m x 10.2 m."""
    mask = np.zeros((30, 30), np.uint8)
    mask[5:15, 5:15] = 1
    prob = np.where(mask == 1, 0.9, 0.1).astype(np.float32)
    t = from_origin(54.5, 24.4, 1e-4, 1e-4)
    wgs = CRS.from_epsg(4326)
    mk = write_tif(tmp_path / "m.tif", mask[None], crs=wgs, transform=t, nodata=UINT8_NODATA)
    pr = write_tif(tmp_path / "p.tif", prob[None], crs=wgs, transform=t, nodata=-1.0)
    write_geojson(tmp_path / "g.geojson", mk, pr, PolygonOptions())
    (f,) = features_of(tmp_path / "g.geojson")
    lat = np.radians(24.4 - 10e-4)
    expected = 100 * (np.radians(1e-4) * 6_371_008.8) ** 2 * np.cos(lat)
    assert f["properties"]["area_m2"] == pytest.approx(expected, rel=0.01)
    assert f["properties"]["pixels"] == 100


@pytest.mark.parametrize("lat", [0.0, 24.4, -45.0, 70.0, 84.0])
def test_small_geographic_polygons_measured_without_projecting(lat: float) -> None:
    """Specks of a pixel-sharp mask on a 10 m geographic grid: the local ellipsoidal scale gives
    the equal-area projection's area (pixel polygons: edges along meridians and parallels)."""
    from shapely.geometry import box
    from shapely.ops import unary_union

    from serving.scoring import polygons as poly

    px = 1e-4
    shapes = [
        box(10, lat, 10 + px, lat + px),  # one pixel
        unary_union([box(10, lat, 10 + 40 * px, lat + px), box(10, lat, 10 + px, lat + 90 * px)]),
        box(10, lat, 10 + 99 * px, lat + 99 * px),  # just under SMALL_DEGREES
    ]
    for world in shapes:
        c = world.centroid
        laea = CRS.from_proj4(f"+proj=laea +lat_0={c.y} +lon_0={c.x} +units=m +datum=WGS84")
        projected = shapely.geometry.shape(
            rasterio.warp.transform_geom(poly.WGS84, laea, shapely.geometry.mapping(world))
        ).area
        assert poly._area_m2(world, poly.WGS84, 1.0) == pytest.approx(projected, rel=1e-7)
    big = box(10, lat, 10 + 2 * poly.SMALL_DEGREES, lat + px)  # projected, as before
    assert poly._area_m2(big, poly.WGS84, 1.0) > 0


@pytest.mark.parametrize("connectivity", [8, 4])
def test_polygons_are_the_connected_changes_of_the_whole_mask(
    tmp_path: Path, connectivity: int
) -> None:
    """A 1100 x 1100 mask (several 512 px blocks): changes that cross block borders, a change
    whose blocks' bounding box holds another change, blobs of every size; each polygon must be
    one connected change of the whole mask, with its pixel count, max and mean probability."""
    from scipy import ndimage

    rng = np.random.default_rng(15)
    side = 1100
    field = ndimage.gaussian_filter(rng.normal(size=(side, side)), 6)
    changed = field > np.quantile(field, 0.97)
    changed[500:530, 100:1000] = True  # a band across three blocks
    changed[530:1050, 970:1000] = True  # turning down across two more
    changed[1060:1070, 20:40] = True  # apart from it, inside its blocks' bounding box
    changed[1040:1100, 0:10] = False
    mask = changed.astype(np.uint8)
    mask[:, 1090:] = UINT8_NODATA  # a nodata strip
    changed[:, 1090:] = False
    prob = (rng.uniform(0, 0.5, changed.shape) + 0.5 * changed).astype(np.float32)
    prob[:, 1090:] = PROBABILITY_NODATA
    m = write_tif(tmp_path / "m.tif", mask[None], nodata=UINT8_NODATA)
    p = write_tif(tmp_path / "p.tif", prob[None], nodata=PROBABILITY_NODATA)
    info = write_geojson(tmp_path / "g.geojson", m, p, PolygonOptions(connectivity=connectivity))

    structure = np.ones((3, 3), bool) if connectivity == 8 else None
    labels, n = ndimage.label(changed, structure=structure)
    index = np.arange(1, n + 1)
    want = sorted(
        zip(
            ndimage.sum_labels(changed, labels, index).astype(int).tolist(),
            np.round(ndimage.maximum(prob, labels, index), 6).tolist(),
            ndimage.mean(prob.astype(np.float64), labels, index).tolist(),
            strict=True,
        )
    )
    feats = features_of(tmp_path / "g.geojson")
    got = sorted(
        (
            f["properties"]["pixels"],
            f["properties"]["max_probability"],
            f["properties"]["mean_probability"],
        )
        for f in feats
    )
    assert info["polygons"] == len(got) == n > 20
    assert [g[0] for g in got] == [w[0] for w in want]
    np.testing.assert_allclose([g[1:] for g in got], [w[1:] for w in want], atol=1e-6)
    for f in feats:
        assert f["properties"]["area_m2"] == pytest.approx(f["properties"]["pixels"] * PIXEL**2)


# --------------------------------------------------------------------------------------------
# 4. grid alignment


@pytest.mark.shared_data
@pytest.mark.parametrize("city", ["abudhabi", "saclay_e"])
def test_oscd_pair_on_two_grids_comes_out_on_t1(
    tmp_path: Path, scorer: ModelScorer, shared_data: Path, city: str
) -> None:
    folder = shared_data / "oscd" / city
    t1 = folder / f"{city}_t1_B04B03B02B08.tif"
    t2 = folder / f"{city}_t2_B04B03B02B08.tif"
    out = tmp_path / city
    summary = score(
        scorer,
        t1,
        t2,
        out,
        bands_before=(1, 2, 3),
        bands_after=(1, 2, 3),
        rescale=(0, 3000),
        block_size=256,
        quicklook=False,
    )
    assert summary["warped"] and "shape" in summary["warped"]
    assert summary["resampling"] == "bilinear" and summary["rescale"] == [0, 3000]
    with rasterio.open(t1) as ref, rasterio.open(out / "change_mask.tif") as ds:
        assert ds.shape == ref.shape and ds.transform == ref.transform and ds.crs == ref.crs
        mask = ds.read(1)
    truth = band(folder / f"{city}_cm.tif") > 0
    valid = mask != UINT8_NODATA
    assert valid.mean() > 0.95  # t2 covers t1 but for a few pixels at the edges
    f1 = pixel_f1((mask == 1) & valid, truth & valid)
    print(
        f"\n{city}: pixel F1 {f1:.3f} vs {city}_cm.tif at threshold {summary['threshold']:.3f}, "
        f"changed {summary['counts']['changed_fraction_of_valid']:.2%} of valid, "
        f"truth {truth.mean():.2%}; warped: {summary['warped']}"
    )
    # a geographic grid: areas in m2 from the pixel rows and from the polygons agree
    counts, polygons = summary["counts"], summary["polygons"]
    if counts["changed_pixels"]:
        assert polygons["changed_area_m2_in_polygons"] == pytest.approx(
            counts["changed_area_m2"], rel=0.01
        )


@pytest.mark.parametrize("kind", ["plain", "nodata", "mask", "alpha"])
def test_offset_after_is_warped_and_equals_the_same_pixels_masked_on_the_grid(
    tmp_path: Path, scorer: ModelScorer, kind: str
) -> None:
    """After covers rows 20.. and cols 10.. of the before grid (its own, smaller grid), with a
    hole (nodata value, internal mask or alpha band) unless plain; nearest resampling moves whole
    pixels, so the result equals the after pixels given on the before grid with the uncovered
    strip and the hole masked."""
    before, after = synthetic_pair(140, 120, seed=4)
    b = write_tif(tmp_path / "b.tif", before)
    cut = np.ascontiguousarray(after[:, 20:, 10:])
    hole = np.ones(cut.shape[1:], bool)
    if kind != "plain":
        hole[30:50, 40:90] = False
    at = grid_at(20, 10)
    if kind == "plain":
        a_off = write_tif(tmp_path / "a_off.tif", cut, transform=at)
    elif kind == "nodata":
        a_off = write_tif(
            tmp_path / "a_off.tif", np.where(hole, cut, 0).astype(np.uint8), transform=at, nodata=0
        )
    elif kind == "mask":
        a_off = write_tif(tmp_path / "a_off.tif", cut, transform=at, mask=hole)
    else:
        alpha = np.where(hole, 255, 0).astype(np.uint8)[None]
        a_off = write_tif(
            tmp_path / "a_off.tif",
            np.concatenate([cut, alpha]),
            transform=at,
            photometric="RGB",
            alpha="YES",
        )
    covered = np.zeros((140, 120), bool)
    covered[20:, 10:] = hole
    a_grid = write_tif(tmp_path / "a_grid.tif", after, mask=covered)
    warped = score(scorer, b, a_off, tmp_path / "warped", resampling="nearest")
    direct = score(scorer, b, a_grid, tmp_path / "direct", resampling="nearest")
    assert warped["warped"] and "transform" in warped["warped"] and "shape" in warped["warped"]
    assert direct["warped"] is None and warped["bands_after"] == [1, 2, 3]
    assert np.array_equal(nodata_of(tmp_path / "warped"), ~covered)
    assert same_outputs(tmp_path / "warped", tmp_path / "direct")
    assert warped["counts"]["nodata_pixels"] == int((~covered).sum())


def test_after_in_another_crs_is_warped_onto_the_before_grid(
    tmp_path: Path, scorer: ModelScorer
) -> None:
    before, after = synthetic_pair(160, 150, seed=5)
    b = write_tif(tmp_path / "b.tif", before)
    a = reprojected_after(tmp_path, after, CRS.from_epsg(4326))
    summary = score(scorer, b, a, tmp_path / "out")
    assert "CRS" in summary["warped"]
    with rasterio.open(tmp_path / "out" / "change_probability.tif") as ds:
        assert ds.crs == UTM and ds.transform == grid_at() and ds.shape == (160, 150)
    missing = nodata_of(tmp_path / "out")
    assert missing.mean() < 0.05  # the reprojected after covers the before grid but for edges
    assert summary["counts"]["nodata_pixels"] == int(missing.sum())


@pytest.mark.parametrize("resampling", ["bilinear", "cubic"])
def test_warped_pair_streamed_in_blocks_equals_one_block(
    tmp_path: Path, scorer: ModelScorer, resampling: str
) -> None:
    """The after image is warped window by window: its pixels must not depend on the window
    (GDAL's approximate transformer made them differ by a few DN between block sizes). Wider
    than 512 px: narrower grids are warped in whole rows whatever the window."""
    before, after = synthetic_pair(90, 600, seed=16)
    b = write_tif(tmp_path / "b.tif", before)
    a = reprojected_after(tmp_path, after, CRS.from_epsg(4326))
    small = score(scorer, b, a, tmp_path / "small", block_size=40, resampling=resampling)
    score(scorer, b, a, tmp_path / "whole", block_size=1024, resampling=resampling)
    assert small["warped"] and small["counts"]["blocks"] == 3 * 15
    assert same_outputs(tmp_path / "small", tmp_path / "whole")


def test_pairs_that_do_not_overlap_are_refused(tmp_path: Path, scorer: ModelScorer) -> None:
    before, after = synthetic_pair(64, 64)
    b = write_tif(tmp_path / "b.tif", before)
    far = write_tif(tmp_path / "far.tif", after, transform=grid_at(0, 1000))
    with pytest.raises(PairError, match="do not overlap"):
        score(scorer, b, far, tmp_path / "out")
    # in another CRS and elsewhere on Earth
    other = write_tif(
        tmp_path / "o.tif", after, crs="EPSG:4326", transform=from_origin(-70.0, -30.0, 1e-4, 1e-4)
    )
    with pytest.raises(PairError, match="do not overlap"):
        score(scorer, b, other, tmp_path / "out")
    # side by side: touching edges are no overlap
    beside = write_tif(tmp_path / "beside.tif", after, transform=grid_at(0, 64))
    with pytest.raises(PairError, match="do not overlap"):
        score(scorer, b, beside, tmp_path / "out")
    assert not (tmp_path / "out" / "summary.json").exists()


@ungeoreferenced
def test_ungeoreferenced_pairs(tmp_path: Path, scorer: ModelScorer) -> None:
    before, after = synthetic_pair(70, 64)
    b = write_tif(tmp_path / "b.tif", before, crs=None)
    a = write_tif(tmp_path / "a.tif", after, crs=None)
    smaller = write_tif(tmp_path / "s.tif", after[:, :, :60], crs=None)
    with pytest.raises(PairError, match="not georeferenced") as err:
        score(scorer, b, smaller, tmp_path / "bad")
    assert not isinstance(err.value, UsageProblem)
    geo = write_tif(tmp_path / "geo.tif", after)
    with pytest.raises(PairError, match="only one of the images is georeferenced"):
        score(scorer, b, geo, tmp_path / "bad")
    # the same shape needs no georeferencing: outputs without a CRS, areas in pixels
    summary = score(scorer, b, a, tmp_path / "out")
    assert summary["warped"] is None and summary["grid"]["crs"] is None
    with rasterio.open(tmp_path / "out" / "change_mask.tif") as ds:
        assert ds.crs is None and ds.shape == (70, 64)
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"


# --------------------------------------------------------------------------------------------
# 5. bands and pixel types


def test_bands_pick_and_order_the_channels(tmp_path: Path, scorer: ModelScorer) -> None:
    rng = np.random.default_rng(6)
    before, after = synthetic_pair(100, 90, seed=6)
    # six bands: 1..3 are noise, the scene's red, green, blue are bands 6, 5, 4 reversed to 4,5,6
    six_b = np.concatenate([rng.integers(0, 256, (3, 100, 90), np.uint8), before[::-1]])
    six_a = np.concatenate([rng.integers(0, 256, (3, 100, 90), np.uint8), after[::-1]])
    b6 = write_tif(tmp_path / "b6.tif", six_b)
    a6 = write_tif(tmp_path / "a6.tif", six_a)
    b3 = write_tif(tmp_path / "b3.tif", before)
    a3 = write_tif(tmp_path / "a3.tif", after)
    picked = score(scorer, b6, a6, tmp_path / "six", bands_before=(6, 5, 4), bands_after=(6, 5, 4))
    score(scorer, b3, a3, tmp_path / "three")
    assert picked["bands_before"] == [6, 5, 4]
    assert same_outputs(tmp_path / "six", tmp_path / "three")
    # a different order is a different input
    score(scorer, b6, a6, tmp_path / "rgb", bands_before=(4, 5, 6), bands_after=(4, 5, 6))
    assert not same_outputs(tmp_path / "rgb", tmp_path / "three")
    # mixed: the before's bands from the six-band file, the after's from the three-band one
    score(scorer, b6, a3, tmp_path / "mixed", bands_before=(6, 5, 4))
    assert same_outputs(tmp_path / "mixed", tmp_path / "three")


def test_wrong_band_counts_are_usage_problems_naming_bands(
    tmp_path: Path, scorer: ModelScorer
) -> None:
    before, after = synthetic_pair(64, 64)
    six = write_tif(tmp_path / "six.tif", np.concatenate([before, after]))
    three = write_tif(tmp_path / "three.tif", after)
    for kw in (
        {},  # six bands and no --bands
        {"bands_before": (1, 2)},
        {"bands_before": (1, 2, 3, 4)},
        {"bands_before": (7, 2, 1)},
        {"bands_before": (1, 2, 3), "bands_after": (3, 4, 1)},  # the after has 3 bands
    ):
        with pytest.raises(UsageProblem, match="--bands"):
            score(scorer, six, three, tmp_path / "out", overwrite=True, **kw)


def test_other_pixel_types_need_rescale_and_then_equal_uint8(
    tmp_path: Path, scorer: ModelScorer
) -> None:
    before, after = synthetic_pair(90, 80, seed=7)
    b8 = write_tif(tmp_path / "b8.tif", before)
    a8 = write_tif(tmp_path / "a8.tif", after)
    b16 = write_tif(tmp_path / "b16.tif", before.astype(np.uint16) * 10)
    a16 = write_tif(tmp_path / "a16.tif", after.astype(np.uint16) * 10)
    bf = write_tif(tmp_path / "bf.tif", (before / 255.0).astype(np.float32))
    af = write_tif(tmp_path / "af.tif", (after / 255.0).astype(np.float32))
    for b, a in ((b16, a16), (bf, af), (b8, a16)):
        with pytest.raises(UsageProblem, match="--rescale"):
            score(scorer, b, a, tmp_path / "bad")
    score(scorer, b8, a8, tmp_path / "u8")
    s16 = score(scorer, b16, a16, tmp_path / "u16", rescale=(0, 2550))
    score(scorer, bf, af, tmp_path / "f32", rescale=(0, 1))
    assert s16["rescale"] == [0, 2550]
    assert same_outputs(tmp_path / "u16", tmp_path / "u8")
    assert same_outputs(tmp_path / "f32", tmp_path / "u8")
    with pytest.raises(UsageProblem, match="rescale"):
        score(scorer, b16, a16, tmp_path / "bad", rescale=(10, 10))
    with pytest.raises(UsageProblem, match="resampling"):
        score(scorer, b8, a8, tmp_path / "bad", resampling="median-ish")


def test_alpha_band_is_a_mask_not_a_channel(tmp_path: Path, scorer: ModelScorer) -> None:
    before, after = synthetic_pair(96, 80, seed=8)
    alpha = np.full((1, 96, 80), 255, np.uint8)
    alpha[0, 50:, :30] = 0
    b = write_tif(tmp_path / "b.tif", before)
    a_rgba = write_tif(
        tmp_path / "rgba.tif", np.concatenate([after, alpha]), photometric="RGB", alpha="YES"
    )
    a_mask = write_tif(tmp_path / "masked.tif", after, mask=alpha[0] > 0)
    summary = score(scorer, b, a_rgba, tmp_path / "rgba")  # no --bands: the alpha is not one
    score(scorer, b, a_mask, tmp_path / "masked")
    assert summary["bands_after"] == [1, 2, 3]
    assert np.array_equal(nodata_of(tmp_path / "rgba"), alpha[0] == 0)
    assert same_outputs(tmp_path / "rgba", tmp_path / "masked")


# --------------------------------------------------------------------------------------------
# 6. nodata


def test_nodata_value_and_internal_mask_in_either_date(tmp_path: Path, scorer: ModelScorer) -> None:
    before, after = synthetic_pair(128, 112, seed=9)
    before[:, 10:30, 5:45] = 0  # nodata value in the before
    before[1, 100, 100] = 0  # one band at the nodata value: the pixel is nodata
    masked = np.ones((128, 112), bool)
    masked[60:90, 70:100] = False  # internal mask in the after
    masked[5, 3] = False
    b = write_tif(tmp_path / "b.tif", before, nodata=0)
    a = write_tif(tmp_path / "a.tif", after, mask=masked)
    summary = score(scorer, b, a, tmp_path / "out")
    expected = (before == 0).any(axis=0) | ~masked
    missing = nodata_of(tmp_path / "out")
    assert np.array_equal(missing, expected)
    _, mask = outputs(tmp_path / "out")
    assert not (mask[expected] == 1).any()
    assert summary["counts"]["nodata_pixels"] == int(expected.sum())
    assert summary["counts"]["valid_pixels"] == int((~expected).sum())
    # the same holes with the roles of the dates swapped
    b2 = write_tif(tmp_path / "b2.tif", after, mask=masked)
    a2 = write_tif(tmp_path / "a2.tif", before, nodata=0)
    score(scorer, b2, a2, tmp_path / "swapped")
    assert np.array_equal(nodata_of(tmp_path / "swapped"), expected)


def test_nan_is_nodata(tmp_path: Path, scorer: ModelScorer) -> None:
    before, after = synthetic_pair(96, 96, seed=10)
    fb, fa = (before / 255.0).astype(np.float32), (after / 255.0).astype(np.float32)
    fa[:, 40:60, 40:70] = np.nan
    fa[2, 5, 5] = np.nan  # one band NaN: nodata
    fb[0, 90:, :] = np.inf  # infinities too
    b = write_tif(tmp_path / "b.tif", fb)
    a = write_tif(tmp_path / "a.tif", fa)
    score(scorer, b, a, tmp_path / "out", rescale=(0, 1))
    expected = ~np.isfinite(fa).all(axis=0) | ~np.isfinite(fb).all(axis=0)
    assert np.array_equal(nodata_of(tmp_path / "out"), expected)
    assert not (band(tmp_path / "out" / "change_mask.tif")[expected] == 1).any()
    with Image.open(tmp_path / "out" / "quicklook.png") as im:
        panels = np.asarray(im)
    before_panel, after_panel = panels[:, :96], panels[:, 96 + 6 : 2 * 96 + 6]
    assert (before_panel[90:] == NODATA_GREY).all()  # infinities are nodata there too
    assert (after_panel[40:60, 40:70] == NODATA_GREY).all()
    assert (before_panel[:90] != NODATA_GREY).any(axis=-1).mean() > 0.9


def test_striped_and_tiled_inputs_give_identical_outputs(
    tmp_path: Path, scorer: ModelScorer
) -> None:
    before, after = synthetic_pair(150, 170, seed=11)
    before[:, :20, :] = 0
    paths = {}
    for layout, kw in (("striped", {"tiled": False}), ("tiled", {"tiled": True})):
        b = write_tif(tmp_path / f"b_{layout}.tif", before, nodata=0, **kw)
        a = write_tif(tmp_path / f"a_{layout}.tif", after, nodata=0, **kw)
        with rasterio.open(b) as ds:
            assert (ds.block_shapes[0][1] == 170) == (layout == "striped")
        score(scorer, b, a, tmp_path / layout, block_size=48)
        paths[layout] = tmp_path / layout
    assert same_outputs(paths["striped"], paths["tiled"])


@pytest.mark.shared_data
def test_msk_sidecar_is_nodata(tmp_path: Path, scorer: ModelScorer, shared_data: Path) -> None:
    rgb2 = shared_data / "rasterio_testdata" / "RGB2.byte.tif"
    assert rgb2.with_name("RGB2.byte.tif.msk").exists()
    summary = score(
        scorer, rgb2, rgb2, tmp_path / "out", stride=32, block_size=512, quicklook=False
    )
    with rasterio.open(rgb2) as ds:
        sidecar = ds.read_masks(1) == 0
    assert 0 < sidecar.mean() < 1
    assert np.array_equal(nodata_of(tmp_path / "out"), sidecar)
    assert summary["counts"]["nodata_pixels"] == int(sidecar.sum())
    assert summary["counts"]["changed_pixels"] == 0  # a scene against itself


# --------------------------------------------------------------------------------------------
# 7. resume


class Interrupted(Exception):
    pass


class StopAfter:
    """A scorer that scores like ``inner`` and raises on the submit after ``blocks`` submits
    (one submit per block at these sizes): a run interrupted partway, in-process."""

    def __init__(self, inner: ModelScorer, blocks: int) -> None:
        self.inner, self.left = inner, blocks

    @property
    def metadata(self) -> ModelMetadata:
        return self.inner.metadata

    def submit(self, before: np.ndarray, after: np.ndarray) -> Callable[[], np.ndarray]:
        if self.left == 0:
            raise Interrupted(f"stopped after {self.inner}")
        self.left -= 1
        return self.inner.submit(before, after)


class CacheSpy:
    """Scores like ``inner``; records GDAL's block cache size in effect at every submit."""

    def __init__(self, inner: ModelScorer) -> None:
        self.inner, self.cache_bytes = inner, []

    @property
    def metadata(self) -> ModelMetadata:
        return self.inner.metadata

    def submit(self, before: np.ndarray, after: np.ndarray) -> Callable[[], np.ndarray]:
        options = rasterio.env.getenv() if rasterio.env.hasenv() else {}
        self.cache_bytes.append(options.get("GDAL_CACHEMAX"))
        return self.inner.submit(before, after)


def test_gdal_block_cache_is_megabytes_not_bytes(tmp_path: Path, scorer: ModelScorer) -> None:
    """rasterio hands an int GDAL_CACHEMAX to GDALSetCacheMax64, in bytes: a cache of a few
    bytes made decimated reads (quicklook, overviews) and warped reads many times slower."""
    b, a, _, _ = write_pair(tmp_path, 64, 64)
    spy = CacheSpy(scorer)
    score(spy, b, a, tmp_path / "out")
    assert spy.cache_bytes
    assert all(c is None or c >= 1 << 20 for c in spy.cache_bytes), spy.cache_bytes


def finished_blocks(out: Path) -> list[Path]:
    return sorted((out / PARTIAL / "blocks").glob("*.npy"))


def test_resume_after_an_interruption_gives_the_same_pixels(
    tmp_path: Path, scorer: ModelScorer
) -> None:
    b, a, _, _ = write_pair(tmp_path, 256, 224, seed=12)
    reference = score(scorer, b, a, tmp_path / "ref")
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        score(StopAfter(scorer, 9), b, a, out)
    # the tenth block's chunk is submitted before the ninth's result is collected (blocks are
    # pipelined): the interruption leaves eight finished
    assert len(finished_blocks(out)) == 8
    assert not (out / "summary.json").exists()
    assert not (out / "change_probability.tif").exists()
    done = len(finished_blocks(out))

    # other settings are refused, and leave the unfinished run as it was
    for other in ({"stride": 16}, {"block_size": 96}, {"bands_before": (3, 2, 1)}):
        with pytest.raises(UsageProblem, match="other inputs, model or settings"):
            score(scorer, b, a, out, resume=True, **other)
    assert len(finished_blocks(out)) == done

    summary = score(scorer, b, a, out, resume=True)
    assert summary["counts"]["blocks_resumed"] == done
    assert summary["counts"]["blocks"] == 16
    assert summary["counts"]["patches_scored_this_run"] > 0
    assert (
        summary["counts"]["patches_scored_this_run"]
        < reference["counts"]["patches_scored_this_run"]
    )
    assert same_outputs(out, tmp_path / "ref")
    assert features(out) == features(tmp_path / "ref")
    assert not (out / PARTIAL).exists()
    for key in ("valid_pixels", "changed_pixels", "changed_area_m2"):
        assert summary["counts"][key] == reference["counts"][key]

    # a finished run: resume says so, a plain run refuses, overwrite starts over
    again = score(scorer, b, a, out, resume=True)
    assert again["status"] == "already complete" and again["job"] == summary["job"]
    with pytest.raises(UsageProblem, match="--overwrite"):
        score(scorer, b, a, out)
    redo = score(scorer, b, a, out, overwrite=True)
    assert redo["status"] == "done" and redo["counts"]["blocks_resumed"] == 0
    assert same_outputs(out, tmp_path / "ref")


def test_a_run_without_resume_starts_over(tmp_path: Path, scorer: ModelScorer) -> None:
    b, a, _, _ = write_pair(tmp_path, 128, 128, seed=13)
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        score(StopAfter(scorer, 2), b, a, out)
    assert finished_blocks(out)
    summary = score(scorer, b, a, out)  # neither resume nor overwrite: the partial run is dropped
    assert summary["counts"]["blocks_resumed"] == 0


KILLED_RUN = """
import sys, time
from pathlib import Path
from serving.config import ServerSettings
from serving.scoring.pair import ModelScorer, ScoreOptions, score_pair

before, after, out, models = map(Path, sys.argv[1:5])
with ModelScorer(ServerSettings(models_dir=models, metrics_port=-1, warmup=False), "{model}") as s:
    real = s.submit

    def slow(b, a):  # slow enough that the parent catches the run partway
        time.sleep(0.05)
        return real(b, a)

    s.submit = slow
    print("scoring", flush=True)
    score_pair(before, after, out, s, ScoreOptions(block_size=32), progress=False)
print("finished", flush=True)
"""


def test_resume_after_sigkill_gives_the_same_pixels(tmp_path: Path, scorer: ModelScorer) -> None:
    b, a, _, _ = write_pair(tmp_path, 256, 224, seed=14)
    out = tmp_path / "out"
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN.format(model=MODEL))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(b), str(a), str(out), str(ROOT / "models")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while len(finished_blocks(out)) < 6:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never got going"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL and "finished" not in stdout
    assert not (out / "summary.json").exists()
    done = len(finished_blocks(out))
    total = len(range(0, 256, 32)) * len(range(0, 224, 32))
    assert 6 <= done < total

    summary = score(scorer, b, a, out, block_size=32, resume=True)
    assert summary["status"] == "done" and summary["counts"]["blocks_resumed"] == done
    # the uninterrupted run: as one block, blocks being invisible in the map (tested above)
    score(scorer, b, a, tmp_path / "ref", block_size=1024)
    assert same_outputs(out, tmp_path / "ref")


# --------------------------------------------------------------------------------------------
# 8. real data smoke runs


@pytest.mark.shared_data
def test_taizhou_landsat(tmp_path: Path, scorer: ModelScorer, shared_data: Path) -> None:
    folder = shared_data / "landsat_pairs" / "Taizhou"
    before, after = folder / "taizhou_2000_ETM.tif", folder / "taizhou_2003_ETM.tif"
    summary = score(
        scorer,
        before,
        after,
        tmp_path / "out",
        bands_before=(3, 2, 1),
        bands_after=(3, 2, 1),
        block_size=256,
    )
    assert summary["status"] == "done" and summary["warped"] is None
    assert summary["grid"]["crs"] == "EPSG:32651" and summary["counts"]["pixels"] == 400 * 400
    prob, mask = outputs(tmp_path / "out")
    assert prob.shape == (400, 400) and (prob >= 0).all() and (prob <= 1).all()
    assert summary["counts"]["changed_pixels"] == int((mask == 1).sum())
    assert (tmp_path / "out" / "quicklook.png").stat().st_size > 0
    print(
        f"\nTaizhou: changed {summary['counts']['changed_fraction_of_valid']:.2%}, "
        f"max probability {prob.max():.3f}"
    )


@pytest.mark.shared_data
def test_rgb_byte_against_a_shifted_painted_copy(
    tmp_path: Path, scorer: ModelScorer, shared_data: Path
) -> None:
    src = shared_data / "rasterio_testdata" / "RGB.byte.tif"
    with rasterio.open(src) as ds:
        data, profile, valid = ds.read(), ds.profile, ds.read_masks().min(axis=0) > 0
        transform = ds.transform
    painted = data.copy()
    painted[:, 300:360, 350:430] = np.array([250, 240, 30], np.uint8)[:, None, None]
    # the copy starts 5 rows and 7 columns into the original: a grid offset of whole pixels
    copy = np.ascontiguousarray(painted[:, 5:, 7:])
    profile.update(
        height=copy.shape[1],
        width=copy.shape[2],
        transform=transform @ Affine.translation(7, 5),
    )
    after = tmp_path / "after.tif"
    with rasterio.open(after, "w", **profile) as dst:
        dst.write(copy)
    out = tmp_path / "out"
    summary = score(scorer, src, after, out, resampling="nearest", stride=16, block_size=512)
    assert summary["warped"] and summary["grid"]["crs"] == "EPSG:32618"
    with rasterio.open(out / "change_probability.tif") as ds:
        assert ds.transform == transform and ds.shape == valid.shape
        prob = ds.read(1)
    missing = nodata_of(out)
    valid_after = np.zeros_like(valid)  # on the before grid: covered by the copy, not nodata
    valid_after[5:, 7:] = (copy != 0).all(axis=0)
    assert np.array_equal(missing, ~(valid & valid_after))
    inside = prob[310:350, 360:420].mean()
    outside = prob[~missing].mean()
    print(f"\nRGB.byte: painted block mean p {inside:.3f}, elsewhere {outside:.3f}")
    assert inside > outside


@pytest.mark.shared_data
def test_shade_single_band_web_mercator(
    tmp_path: Path, scorer: ModelScorer, shared_data: Path
) -> None:
    src = shared_data / "rasterio_testdata" / "shade.tif"
    with rasterio.open(src) as ds:
        data, profile = ds.read(), ds.profile
    changed = data.copy()
    changed[0, 400:480, 500:600] = 10
    after = tmp_path / "after.tif"
    with rasterio.open(after, "w", **profile) as dst:
        dst.write(changed)
    out = tmp_path / "out"
    summary = score(
        scorer,
        src,
        after,
        out,
        bands_before=(1, 1, 1),
        bands_after=(1, 1, 1),
        stride=32,
        block_size=512,
    )
    assert summary["grid"]["crs"] == "EPSG:3857" and summary["warped"] is None
    missing = nodata_of(out)
    assert np.array_equal(missing, (data[0] == 255) | (changed[0] == 255))
    pixel_m2 = profile["transform"].a ** 2
    assert summary["counts"]["changed_area_m2"] == pytest.approx(
        summary["counts"]["changed_pixels"] * pixel_m2
    )
    with Image.open(out / "quicklook.png") as im:
        assert im.size == (3 * 512 + 12, 512)


def test_the_scorer_warms_its_model_up_when_it_loads(caplog: pytest.LogCaptureFixture) -> None:
    """The first batches of a session allocate and tune: a cost of loading the model (paid
    once per worker), not of the first pair."""
    for warm in (True, False):
        caplog.clear()
        with (
            caplog.at_level(logging.INFO, logger="serving.batcher"),
            ModelScorer(SETTINGS.model_copy(update={"warmup": warm}), MODEL),
        ):
            pass
        assert any("warmed up" in r.getMessage() for r in caplog.records) == warm
