"""Connected change regions of a mask, with their boxes, areas and probabilities."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Region:
    row: int
    col: int
    height: int
    width: int
    area_px: int
    max_probability: float
    mean_probability: float


def find_regions(mask: np.ndarray, probability: np.ndarray, min_area_px: int = 0) -> list[Region]:
    """8-connected regions of ``mask``, largest first; regions under ``min_area_px`` are dropped."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]  # pixels, whatever mask holds
    maxima = ndimage.maximum(probability, labels, index)
    means = ndimage.mean(probability, labels, index)
    regions = []
    for i, box in enumerate(ndimage.find_objects(labels)):
        if areas[i] < max(min_area_px, 1):
            continue
        rows, cols = box
        regions.append(
            Region(
                rows.start,
                cols.start,
                rows.stop - rows.start,
                cols.stop - cols.start,
                int(areas[i]),
                float(maxima[i]),
                float(means[i]),
            )
        )
    return sorted(regions, key=lambda r: -r.area_px)
