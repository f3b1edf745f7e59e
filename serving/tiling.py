"""Tiling geometry and seam-free stitching, as pure functions over small frozen value objects.

The grid: patch origins lie on the lattice ``k * stride`` (k may be negative) and every patch that
touches the image is taken, so every pixel is covered the same number of times (``patch / stride``
per axis when the stride divides the patch) and there is no shrunken last stride at the right or
bottom border. Patches that reach past the border read the image mirrored (symmetric padding).

The blend: each patch's probability is spread over its pixels with a separable half-sample Hann
window ``sin^2(pi (n + 1/2) / P)``. Its copies at any stride that divides P/2 sum to a constant, and
the map is the window-weighted mean, so tile borders leave no seams and a uniform input gives a
uniform map whatever the stride.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tile:
    """A patch in image coordinates; row/col may be negative or reach past the image (padding)."""

    row: int
    col: int
    size: int

    def clipped(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(row, col, height, width) of the part inside the image."""
        r0, c0 = max(self.row, 0), max(self.col, 0)
        r1, c1 = min(self.row + self.size, height), min(self.col + self.size, width)
        return r0, c0, r1 - r0, c1 - c0


def axis_origins(length: int, patch: int, stride: int) -> list[int]:
    """Lattice origins k * stride of every patch that overlaps [0, length)."""
    if length < 1 or patch < 1 or stride < 1:
        raise ValueError(f"length, patch and stride must be >= 1, got {length}, {patch}, {stride}")
    if stride > patch:
        raise ValueError(f"stride {stride} > patch {patch} would leave pixels unscored")
    first = -((patch - 1) // stride) * stride  # most negative origin whose patch reaches pixel 0
    return list(range(first, length, stride))


def grid(height: int, width: int, patch: int, stride: int) -> list[Tile]:
    """All tiles of an image, row-major."""
    return [
        Tile(r, c, patch)
        for r in axis_origins(height, patch, stride)
        for c in axis_origins(width, patch, stride)
    ]


def padding(height: int, width: int, patch: int, stride: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding that makes every tile of the grid readable."""
    rows, cols = axis_origins(height, patch, stride), axis_origins(width, patch, stride)
    return -rows[0], rows[-1] + patch - height, -cols[0], cols[-1] + patch - width


def pad_image(image: np.ndarray, patch: int, stride: int) -> np.ndarray:
    """(H, W, C) -> padded copy; mirrored so border patches see plausible content, not zeros."""
    top, bottom, left, right = padding(image.shape[0], image.shape[1], patch, stride)
    return np.pad(image, ((top, bottom), (left, right), (0, 0)), mode="symmetric")


def extract_patches(
    before: np.ndarray, after: np.ndarray, tiles: list[Tile], patch: int, stride: int
) -> tuple[np.ndarray, np.ndarray]:
    """(N, C, P, P) patches of both dates in tile order, contiguous, read from mirrored padding."""
    top, _, left, _ = padding(before.shape[0], before.shape[1], patch, stride)
    out = []
    for image in (before, after):
        padded = pad_image(image, patch, stride)
        cut = np.empty((len(tiles), image.shape[2], patch, patch), image.dtype)
        for i, t in enumerate(tiles):
            r, c = t.row + top, t.col + left
            cut[i] = padded[r : r + patch, c : c + patch].transpose(2, 0, 1)
        out.append(cut)
    return out[0], out[1]


def blend_window(patch: int) -> np.ndarray:
    """(P, P) separable half-sample Hann window, strictly positive."""
    n = np.arange(patch, dtype=np.float64)
    w = np.sin(np.pi * (n + 0.5) / patch) ** 2
    return np.outer(w, w).astype(np.float32)


def stitch(
    probabilities: np.ndarray, tiles: list[Tile], height: int, width: int, patch: int
) -> np.ndarray:
    """Window-weighted mean of the tile probabilities at every pixel: (H, W) float32."""
    if len(probabilities) != len(tiles):
        raise ValueError(f"{len(probabilities)} probabilities for {len(tiles)} tiles")
    window = blend_window(patch)
    acc = np.zeros((height, width), np.float64)
    weight = np.zeros((height, width), np.float64)
    for p, tile in zip(probabilities, tiles, strict=True):
        r0, c0, h, w = tile.clipped(height, width)
        wr, wc = r0 - tile.row, c0 - tile.col
        win = window[wr : wr + h, wc : wc + w]
        acc[r0 : r0 + h, c0 : c0 + w] += p * win
        weight[r0 : r0 + h, c0 : c0 + w] += win
    return (acc / weight).astype(np.float32)
