"""A scene as a stream of blocks, each scored with the serving tiler and blend.

The tiles are those of the whole scene (:func:`serving.tiling.grid`); a block takes every tile
that touches it, reads the window those tiles cover (mirrored only at the scene's borders, as the
whole-scene padding is) and stitches its own pixels with :func:`serving.tiling.stitch_region`.
So a scene streamed block by block gives the same map, bit for bit, as the scene scored whole,
while memory is bounded by the block size, not the scene. Tiles that touch no valid pixel are
not scored: they cannot change a valid pixel's value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from rasterio.windows import Window

from serving import tiling

# score(before (N, C, P, P), after) -> a waiter returning (N,) probabilities: the batcher's
# submit/result, so the next chunk is cut while the previous one is being scored
Submit = Callable[[np.ndarray, np.ndarray], Callable[[], np.ndarray]]


@dataclass(frozen=True)
class Block:
    index: int
    row: int
    col: int
    height: int
    width: int

    @property
    def window(self) -> Window:
        return Window(self.col, self.row, self.width, self.height)


def plan(height: int, width: int, size: int) -> list[Block]:
    """Row-major blocks of at most ``size`` x ``size`` pixels covering the scene."""
    if size < 1:
        raise ValueError(f"block size must be >= 1, got {size}")
    out = []
    for r in range(0, height, size):
        for c in range(0, width, size):
            out.append(Block(len(out), r, c, min(size, height - r), min(size, width - c)))
    return out


@dataclass(frozen=True)
class BlockTiles:
    """The scene tiles a block needs, and the scene window they read."""

    rows: np.ndarray  # tile row origins (scene coordinates)
    cols: np.ndarray
    read: Window  # the part of the scene to read
    pad: tuple[int, int, int, int]  # mirrored padding (top, bottom, left, right) past the scene


def tiles_for(block: Block, height: int, width: int, patch: int, stride: int) -> BlockTiles:
    rows = _touching(tiling.axis_origins(height, patch, stride), block.row, block.height, patch)
    cols = _touching(tiling.axis_origins(width, patch, stride), block.col, block.width, patch)
    r0, r1 = int(rows[0]), int(rows[-1]) + patch
    c0, c1 = int(cols[0]), int(cols[-1]) + patch
    top, left = max(0, -r0), max(0, -c0)
    bottom, right = max(0, r1 - height), max(0, c1 - width)
    # the mirror past a border reads the scene's first (last) `pad` rows: read them too, or a
    # block narrower than its padding would mirror itself, not the scene (the window may then
    # start before the first tile or end after the last: score_block offsets the tiles)
    rr0, rr1 = _mirror_source(r0 + top, r1 - bottom, top, bottom, height)
    cc0, cc1 = _mirror_source(c0 + left, c1 - right, left, right, width)
    read = Window(cc0, rr0, cc1 - cc0, rr1 - rr0)
    return BlockTiles(rows, cols, read, (top, bottom, left, right))


def _mirror_source(start: int, stop: int, before: int, after: int, length: int) -> tuple[int, int]:
    """[start, stop) of one axis, grown to hold what ``before``/``after`` pixels of symmetric
    padding mirror at the scene's borders (the whole axis when the padding is longer)."""
    if before:
        stop = max(stop, min(length, before))
    if after:
        start = min(start, max(0, length - after))
    return start, stop


def _touching(origins: list[int], start: int, length: int, patch: int) -> np.ndarray:
    o = np.asarray(origins)
    return o[(o < start + length) & (o + patch > start)]


def pad(image: np.ndarray, tiles: BlockTiles) -> np.ndarray:
    """Mirror past the scene's borders, exactly as :func:`serving.tiling.pad_image` does."""
    top, bottom, left, right = tiles.pad
    if not any(tiles.pad):
        return image
    widths = ((top, bottom), (left, right)) + ((0, 0),) * (image.ndim - 2)
    return np.pad(image, widths, mode="symmetric")


def score_block(
    block: Block,
    before: np.ndarray,
    after: np.ndarray,
    valid: np.ndarray,
    tiles: BlockTiles,
    patch: int,
    stride: int,
    submit: Submit,
    chunk: int = 4096,
) -> tuple[np.ndarray, int]:
    """(probability (h, w) float32 with NaN where invalid, patches scored) for one block.

    ``before``/``after`` (h', w', C) and ``valid`` (h', w') are the window ``tiles.read``."""
    n_r, n_c = len(tiles.rows), len(tiles.cols)
    prob = np.zeros((n_r, n_c), np.float32)
    needed = _tiles_touching_valid(valid, tiles, patch)
    index = np.flatnonzero(needed)
    if len(index):
        planes = [pad(img, tiles).transpose(2, 0, 1) for img in (before, after)]
        # every P x P window as a view, then gathers of the tile origins (local coordinates)
        views = [
            sliding_window_view(np.ascontiguousarray(p), (patch, patch), axis=(1, 2)).transpose(
                1, 2, 0, 3, 4
            )
            for p in planes
        ]
        top, _, left, _ = tiles.pad
        local_r = (tiles.rows - (tiles.read.row_off - top)).astype(np.intp)
        local_c = (tiles.cols - (tiles.read.col_off - left)).astype(np.intp)
        flat = prob.reshape(-1)
        for part, waiter in _pipelined(index, chunk, views, local_r, local_c, n_c, submit):
            flat[part] = waiter()
    region = (block.row, block.col, block.height, block.width)
    out = tiling.stitch_region(prob, tiles.rows, tiles.cols, region, patch, stride)
    r, c = block.row - tiles.read.row_off, block.col - tiles.read.col_off
    inside = valid[r : r + block.height, c : c + block.width]
    out[~inside] = np.nan
    return out, len(index)


def _pipelined(
    index: np.ndarray,
    chunk: int,
    views: list[np.ndarray],
    local_r: np.ndarray,
    local_c: np.ndarray,
    n_c: int,
    submit: Submit,
) -> Iterator[tuple[np.ndarray, Callable[[], np.ndarray]]]:
    """Cut chunk k+1 while chunk k is scored: two chunks in flight at most."""
    pending: tuple[np.ndarray, Callable[[], np.ndarray]] | None = None
    for start in range(0, len(index), chunk):
        part = index[start : start + chunk]
        rr, cc = local_r[part // n_c], local_c[part % n_c]
        waiter = submit(views[0][rr, cc], views[1][rr, cc])
        if pending is not None:
            yield pending
        pending = (part, waiter)
    if pending is not None:
        yield pending


def _tiles_touching_valid(valid: np.ndarray, tiles: BlockTiles, patch: int) -> np.ndarray:
    """(n_rows * n_cols,) bool: the tile covers at least one valid scene pixel."""
    if valid.all():
        return np.ones(len(tiles.rows) * len(tiles.cols), bool)
    # summed-area table over the read window; tiles clipped to it (padding is never valid)
    sat = np.zeros((valid.shape[0] + 1, valid.shape[1] + 1), np.int64)
    sat[1:, 1:] = valid.cumsum(0).cumsum(1)
    r0 = np.clip(tiles.rows - tiles.read.row_off, 0, valid.shape[0])
    r1 = np.clip(tiles.rows + patch - tiles.read.row_off, 0, valid.shape[0])
    c0 = np.clip(tiles.cols - tiles.read.col_off, 0, valid.shape[1])
    c1 = np.clip(tiles.cols + patch - tiles.read.col_off, 0, valid.shape[1])
    total = (
        sat[r1[:, None], c1[None, :]]
        - sat[r0[:, None], c1[None, :]]
        - sat[r1[:, None], c0[None, :]]
        + sat[r0[:, None], c0[None, :]]
    )
    return (total > 0).reshape(-1)
