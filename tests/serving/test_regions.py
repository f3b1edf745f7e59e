"""serving.regions.find_regions on masks drawn by hand."""

from __future__ import annotations

import numpy as np
import pytest

from serving.regions import Region, find_regions


def _canvas() -> tuple[np.ndarray, np.ndarray]:
    """Two blobs: a 3x4 block (area 12) and an L of 5 pixels, on a 10x12 image."""
    mask = np.zeros((10, 12), bool)
    prob = np.full((10, 12), 0.05, np.float32)
    mask[1:4, 2:6] = True  # rows 1-3, cols 2-5
    prob[1:4, 2:6] = 0.6
    prob[2, 3] = 0.9
    mask[6:9, 9] = True  # the L: rows 6-8 of col 9, then cols 10-11 of row 8
    mask[8, 10:12] = True
    prob[6:9, 9] = 0.7
    prob[8, 10:12] = 0.8
    return mask, prob


def test_two_blobs() -> None:
    mask, prob = _canvas()
    regions = find_regions(mask, prob)
    assert len(regions) == 2
    big, small = regions  # largest first
    assert (big.row, big.col, big.height, big.width, big.area_px) == (1, 2, 3, 4, 12)
    assert big.max_probability == pytest.approx(0.9)
    assert big.mean_probability == pytest.approx((11 * 0.6 + 0.9) / 12)
    assert (small.row, small.col, small.height, small.width, small.area_px) == (6, 9, 3, 3, 5)
    assert small.max_probability == pytest.approx(0.8)
    assert small.mean_probability == pytest.approx((3 * 0.7 + 2 * 0.8) / 5)
    assert all(isinstance(r, Region) for r in regions)
    assert all(type(v) is int for v in (big.row, big.col, big.height, big.width, big.area_px))
    assert type(big.max_probability) is float and type(big.mean_probability) is float


def test_probability_outside_the_mask_is_ignored() -> None:
    mask, prob = _canvas()
    prob[0, 0] = 1.0  # not in any region
    prob[4, 2] = 0.99  # touches the block's box border but is not masked
    big = find_regions(mask, prob)[0]
    assert big.max_probability == pytest.approx(0.9)


def test_diagonal_neighbours_are_connected() -> None:
    mask = np.zeros((6, 6), bool)
    for i in range(4):
        mask[1 + i, 1 + i] = True  # a diagonal line: 8-connected, not 4-connected
    mask[4, 0] = True  # alone: its nearest masked pixel, (4, 4), is far
    prob = mask * np.float32(0.75)
    regions = find_regions(mask, prob)
    assert [(r.row, r.col, r.height, r.width, r.area_px) for r in regions] == [
        (1, 1, 4, 4, 4),
        (4, 0, 1, 1, 1),
    ]
    # a bottom row touching both only at corners, (4, 0)-(5, 1) and (5, 3)-(4, 4), joins them
    mask[5, 1:4] = True
    regions = find_regions(mask, mask * np.float32(0.75))
    assert [(r.row, r.col, r.height, r.width, r.area_px) for r in regions] == [(1, 0, 5, 5, 8)]


def test_min_area_filter() -> None:
    mask, prob = _canvas()
    assert [r.area_px for r in find_regions(mask, prob, min_area_px=5)] == [12, 5]
    assert [r.area_px for r in find_regions(mask, prob, min_area_px=6)] == [12]
    assert [r.area_px for r in find_regions(mask, prob, min_area_px=12)] == [12]
    assert find_regions(mask, prob, min_area_px=13) == []


def test_single_pixel_regions_are_kept_by_default() -> None:
    mask = np.zeros((3, 3), bool)
    mask[0, 0] = mask[2, 2] = True
    prob = np.where(mask, 0.6, 0.0)
    regions = find_regions(mask, prob)
    assert [(r.row, r.col, r.area_px) for r in regions] == [(0, 0, 1), (2, 2, 1)]


def test_empty_mask() -> None:
    assert find_regions(np.zeros((5, 7), bool), np.ones((5, 7), np.float32)) == []
    assert find_regions(np.zeros((0, 0), bool), np.zeros((0, 0), np.float32)) == []


def test_full_mask_is_one_region() -> None:
    prob = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    (region,) = find_regions(np.ones((3, 4), bool), prob)
    assert (region.row, region.col, region.height, region.width, region.area_px) == (0, 0, 3, 4, 12)
    assert region.max_probability == pytest.approx(1.0)
    assert region.mean_probability == pytest.approx(0.5)


def test_area_counts_pixels_for_a_0_255_mask() -> None:
    """A mask read from an 8-bit PNG (0/255) labels the same regions; areas stay pixel counts."""
    mask, prob = _canvas()
    regions = find_regions(mask.astype(np.uint8) * 255, prob, min_area_px=6)
    assert [r.area_px for r in regions] == [12]
    assert regions == find_regions(mask, prob, min_area_px=6)


def test_region_statistics_equal_ndimage_on_many_regions() -> None:
    """The labelled-pixels-only reductions give what scipy's per-label statistics give."""
    from scipy import ndimage

    rng = np.random.default_rng(5)
    prob = rng.random((64, 80)).astype(np.float32)
    mask = prob > 0.6  # hundreds of regions, of every size
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    index = np.arange(1, count + 1)
    regions = find_regions(mask, prob)
    assert len(regions) == count > 100
    by_box = {(r.row, r.col, r.height, r.width, r.area_px): r for r in regions}
    assert len(by_box) == count  # no two regions share a box and an area here
    maxima = ndimage.maximum(prob, labels, index)
    means = ndimage.mean(prob, labels, index)
    for i, (rows, cols) in enumerate(ndimage.find_objects(labels)):
        area = int((labels == i + 1).sum())
        key = (rows.start, cols.start, rows.stop - rows.start, cols.stop - cols.start, area)
        assert by_box[key].max_probability == float(maxima[i])
        assert by_box[key].mean_probability == pytest.approx(float(means[i]), rel=1e-12)
