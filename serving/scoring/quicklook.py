"""before | after | probability, small enough to open anywhere; read from overviews, so a
16k x 16k scene costs what a 1k one does."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.enums import Resampling

from serving.scoring.rasters import RasterPair

NODATA_GREY = 64


def stretch(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(h, w, C) any type -> (h, w, 3) uint8, 2-98 % of the valid pixels, nodata grey."""
    img = image[..., :3] if image.shape[2] >= 3 else np.repeat(image[..., :1], 3, axis=2)
    img = img.astype(np.float32)
    values = img[valid] if valid.any() else img.reshape(-1, 3)
    lo, hi = np.percentile(values, [2, 98]) if values.size else (0.0, 1.0)
    out = np.clip((img - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    out[~valid] = NODATA_GREY
    return out


def heat(probability: np.ndarray) -> np.ndarray:
    """[0, 1] with NaN for nodata -> (h, w, 3) uint8: black -> red -> yellow, nodata grey."""
    p = np.clip(np.nan_to_num(probability), 0, 1)
    rgb = np.stack([np.clip(2 * p, 0, 1), np.clip(2 * p - 1, 0, 1), np.zeros_like(p)], axis=-1)
    out = (rgb * 255).astype(np.uint8)
    out[np.isnan(probability)] = NODATA_GREY
    return out


def write_quicklook(
    path: Path, pair: RasterPair, probability_path: Path, max_side: int = 512, gap: int = 6
) -> Path:
    before, vb = pair.read_overview("before", max_side)
    after, va = pair.read_overview("after", max_side)
    h, w = before.shape[:2]
    with rasterio.open(probability_path) as ds:
        prob = ds.read(1, out_shape=(h, w), resampling=Resampling.nearest, masked=True)
        prob = np.ma.filled(prob.astype(np.float64) * ds.scales[0], np.nan)
    panels = [stretch(before, vb), stretch(after, va), heat(prob)]
    sep = np.full((h, gap, 3), 255, np.uint8)
    image = np.concatenate([panels[0], sep, panels[1], sep, panels[2]], axis=1)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        Image.fromarray(image).save(f, format="PNG")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
