"""before | after | probability, small enough to open anywhere.

The dates and the probability are sampled (nearest pixel) from the blocks as they are read and
scored, so nothing is read a second time and the picture does not wait for the COGs. A 16k x 16k
scene costs what a 1k one does."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from serving.scoring.blocks import Block

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


class Canvas:
    """The quicklook's before and after, filled block by block."""

    def __init__(self, height: int, width: int, channels: int, max_side: int = 512) -> None:
        scale = max(1.0, max(height, width) / max_side)
        h, w = max(1, round(height / scale)), max(1, round(width / scale))
        # the scene pixel at the centre of each quicklook pixel
        self.rows = np.minimum(((np.arange(h) + 0.5) * height / h).astype(np.int64), height - 1)
        self.cols = np.minimum(((np.arange(w) + 0.5) * width / w).astype(np.int64), width - 1)
        self.before = np.zeros((h, w, channels), np.float32)
        self.after = np.zeros((h, w, channels), np.float32)
        self.valid = np.zeros((h, w), bool)
        self.probability = np.full((h, w), np.nan, np.float32)

    def add(
        self,
        block: Block,
        origin: tuple[int, int],
        before: np.ndarray,
        after: np.ndarray,
        valid: np.ndarray,
    ) -> None:
        """``before``/``after``/``valid``: a window of the scene whose first pixel is ``origin``
        (row, col) and which holds the block."""
        ri, ci = self._inside(block)
        if not len(ri) or not len(ci):
            return
        r = (self.rows[ri] - origin[0])[:, None]
        c = (self.cols[ci] - origin[1])[None, :]
        self.before[ri[:, None], ci[None, :]] = before[r, c]
        self.after[ri[:, None], ci[None, :]] = after[r, c]
        self.valid[ri[:, None], ci[None, :]] = valid[r, c]

    def add_probability(self, block: Block, probability: np.ndarray) -> None:
        """``probability``: the block's (h, w) map, NaN where nodata."""
        ri, ci = self._inside(block)
        r = (self.rows[ri] - block.row)[:, None]
        c = (self.cols[ci] - block.col)[None, :]
        self.probability[ri[:, None], ci[None, :]] = probability[r, c]

    def _inside(self, block: Block) -> tuple[np.ndarray, np.ndarray]:
        ri = np.flatnonzero((self.rows >= block.row) & (self.rows < block.row + block.height))
        ci = np.flatnonzero((self.cols >= block.col) & (self.cols < block.col + block.width))
        return ri, ci


def write_quicklook(path: Path, canvas: Canvas, gap: int = 6) -> Path:
    h = canvas.valid.shape[0]
    panels = [
        stretch(canvas.before, canvas.valid),
        stretch(canvas.after, canvas.valid),
        heat(canvas.probability),
    ]
    sep = np.full((h, gap, 3), 255, np.uint8)
    image = np.concatenate([panels[0], sep, panels[1], sep, panels[2]], axis=1)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        Image.fromarray(image).save(f, format="PNG")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
