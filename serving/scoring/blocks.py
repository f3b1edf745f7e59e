"""A scene as a stream of blocks, each scored with the serving tiler and blend.

The tiles are those of the whole scene (:func:`serving.tiling.grid`); a block takes every tile
that touches it, reads the window those tiles cover (mirrored only at the scene's borders, as the
whole-scene padding is) and stitches its own pixels with :func:`serving.tiling.stitch_region`.
So a scene streamed block by block gives the same map, bit for bit, as the scene scored whole,
while memory is bounded by the block size, not the scene. Tiles that touch no valid pixel are
not scored: they cannot change a valid pixel's value.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
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
    # start before the first tile or end after the last: BlockJob offsets the tiles)
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


class TileBook:
    """The blocks of this run that later blocks may share tiles with: a tile at a block's edge
    belongs to every block it touches, and only the first of them scores it (about 2 % of a
    scene's patches at the default 1024-pixel blocks). ``keep``: blocks per row of the plan,
    plus one (the left neighbour and the row above)."""

    def __init__(self, keep: int) -> None:
        self.jobs: deque[BlockJob] = deque(maxlen=keep)


class BlockJob:
    """One block's scene tiles, cut into chunks of patches for the batcher, and its probability
    map stitched once every chunk is back. ``before``/``after`` (h', w', C) and ``valid``
    (h', w') are the window ``tiles.read``. With a ``book``, tiles an earlier block of the book
    scores are taken from it when this block finishes (blocks finish in order), not scored
    again: the same values, so the map is unchanged."""

    def __init__(
        self,
        block: Block,
        before: np.ndarray,
        after: np.ndarray,
        valid: np.ndarray,
        tiles: BlockTiles,
        patch: int,
        stride: int,
        book: TileBook | None = None,
    ) -> None:
        self.block, self.valid, self.tiles = block, valid, tiles
        self.patch, self.stride = patch, stride
        self.n_cols = len(tiles.cols)
        self.prob = np.zeros((len(tiles.rows), self.n_cols), np.float32)
        needed = _tiles_touching_valid(valid, tiles, patch)
        self._borrowed: list[
            tuple[BlockJob, tuple[slice, slice], tuple[slice, slice], np.ndarray]
        ] = []
        if book is not None:
            free = np.ones(self.prob.shape, bool)
            for earlier in book.jobs:
                own, theirs = _shared(tiles, earlier.tiles, stride)
                if own is None or theirs is None or not free[own].any():
                    continue
                self._borrowed.append((earlier, own, theirs, free[own].copy()))
                free[own] = False  # a tile several earlier blocks hold is taken from the first
            needed &= free.reshape(-1)
            book.jobs.append(self)
        self.index = np.flatnonzero(needed)
        # each plane's tiles as a (n_rows, n_cols, C, P, P) view: tile origins are a lattice of
        # the stride, so a run of tiles along a row is a basic slice, copied in one call (a
        # fancy-index gather of the same patches costs about four times as much)
        self.lattices: list[np.ndarray] = []
        if len(self.index):
            top, _, left, _ = tiles.pad
            r0 = int(tiles.rows[0]) - (tiles.read.row_off - top)
            c0 = int(tiles.cols[0]) - (tiles.read.col_off - left)
            n_r = len(tiles.rows)
            for img in (before, after):
                # (h', w', C) as read: the window axes come last, (H', W', C, P, P)
                windows = sliding_window_view(pad(img, tiles), (patch, patch), axis=(0, 1))
                self.lattices.append(
                    windows[
                        r0 : r0 + (n_r - 1) * stride + 1 : stride,
                        c0 : c0 + (self.n_cols - 1) * stride + 1 : stride,
                    ]
                )

    @property
    def patches(self) -> int:
        return len(self.index)

    def chunks(
        self, size: int, buffers: Buffers | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(tile indices, before (n, C, P, P), after): each chunk cut only when asked for, into
        arrays taken from ``buffers`` when given (to be given back once scored)."""
        for start in range(0, len(self.index), size):
            part = self.index[start : start + size]
            rows, cols = part // self.n_cols, part % self.n_cols
            # runs of consecutive tiles on one row (tiles without valid pixels break runs)
            cuts = np.flatnonzero((np.diff(part) != 1) | (np.diff(rows) != 0)) + 1
            bounds = [0, *cuts.tolist(), len(part)]
            out = []
            for lattice in self.lattices:
                shape, n = lattice.shape[2:], len(part)
                buf = (
                    buffers.take(size, shape, lattice.dtype)[:n]
                    if buffers is not None
                    else np.empty((n, *shape), lattice.dtype)
                )
                for i, j in itertools.pairwise(bounds):
                    c = cols[i]
                    np.copyto(buf[i:j], lattice[rows[i], c : c + j - i])
                out.append(buf)
            yield part, out[0], out[1]

    def fill(self, part: np.ndarray, probabilities: np.ndarray) -> None:
        self.prob.reshape(-1)[part] = probabilities

    def finish(self) -> np.ndarray:
        """The block's (h, w) float32 probability, NaN where invalid."""
        for earlier, own, theirs, take in self._borrowed:  # finished before this one
            self.prob[own][take] = earlier.prob[theirs][take]
        self._borrowed = []
        block, tiles = self.block, self.tiles
        region = (block.row, block.col, block.height, block.width)
        out = tiling.stitch_region(
            self.prob, tiles.rows, tiles.cols, region, self.patch, self.stride
        )
        r, c = block.row - tiles.read.row_off, block.col - tiles.read.col_off
        out[~self.valid[r : r + block.height, c : c + block.width]] = np.nan
        # a finished job stays in the book for its tile probabilities only: its pixels and mask
        # go, or a row of finished blocks would hold a row of windows
        self.lattices = []
        self.valid = np.zeros((0, 0), bool)
        return out


def score_blocks(
    jobs: Iterable[BlockJob], submit: Submit, chunk: int = 1024, in_flight: int = 2
) -> Iterator[tuple[BlockJob, np.ndarray]]:
    """(job, probability map) for each job, in order, as soon as its last chunk is back.

    At most ``in_flight`` chunks are with the batcher, across block boundaries: the next
    block is read (``jobs`` is pulled lazily) and cut while the last chunks of the previous one
    are scored, and a finished block is stitched, and handed to the caller to save, while the
    next block's first chunks are scored, so the model never waits for Python between blocks."""
    if in_flight < 1:
        raise ValueError(f"in_flight must be >= 1, got {in_flight}")
    # (job, chunk indices, waiter, its arrays); indices None marks the end of the job's chunks
    pending: deque[
        tuple[BlockJob, np.ndarray | None, Callable[[], np.ndarray] | None, tuple[np.ndarray, ...]]
    ] = deque()
    buffers = Buffers(keep=2 * (in_flight + 1))
    busy = 0

    def settle(keep: int) -> Iterator[tuple[BlockJob, np.ndarray]]:
        nonlocal busy
        while pending and (busy > keep or pending[0][1] is None):
            job, part, waiter, arrays = pending.popleft()
            if part is None or waiter is None:
                yield job, job.finish()
            else:
                job.fill(part, waiter())  # scored: the batcher reads its arrays no more
                buffers.give(*arrays)
                busy -= 1

    for job in jobs:
        for part, before, after in job.chunks(chunk, buffers):
            pending.append((job, part, submit(before, after), (before, after)))
            busy += 1
            yield from settle(in_flight - 1)
        pending.append((job, None, None, ()))
        yield from settle(in_flight - 1)
    yield from settle(0)


class Buffers:
    """Patch arrays reused once their chunk is scored. A fresh array of a few megabytes is
    mapped afresh by glibc (``serving/memory.py`` keeps block-sized arrays out of the heap) and
    pays a page fault per 4 KiB on first touch: about as much as cutting the patches into it.
    At most ``keep`` arrays wait here."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.free: list[np.ndarray] = []

    def take(self, size: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An array of (``size``, *``shape``) ``dtype``; slice it to the rows needed."""
        for i, buf in enumerate(self.free):
            if buf.shape == (size, *shape) and buf.dtype == dtype:
                return self.free.pop(i)
        return np.empty((size, *shape), dtype)

    def give(self, *arrays: np.ndarray) -> None:
        for a in arrays:
            base = a if a.base is None else a.base  # a chunk is the first rows of one
            if len(self.free) < self.keep and isinstance(base, np.ndarray):
                self.free.append(base)


def _shared(
    a: BlockTiles, b: BlockTiles, stride: int
) -> tuple[tuple[slice, slice] | None, tuple[slice, slice] | None]:
    """The tiles two blocks both hold, as (rows, cols) slices of each one's tile grid (the
    origins of both are runs of the scene's lattice); (None, None) when they share none."""
    own, theirs = [], []
    for mine, other in ((a.rows, b.rows), (a.cols, b.cols)):
        lo, hi = max(int(mine[0]), int(other[0])), min(int(mine[-1]), int(other[-1]))
        if lo > hi:
            return None, None
        own.append(slice((lo - int(mine[0])) // stride, (hi - int(mine[0])) // stride + 1))
        theirs.append(slice((lo - int(other[0])) // stride, (hi - int(other[0])) // stride + 1))
    return (own[0], own[1]), (theirs[0], theirs[1])


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
