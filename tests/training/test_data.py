"""Patch extraction, labelling and the synthetic patch sets."""

from __future__ import annotations

import numpy as np
import pytest

from training.data import PatchSet, extract_patches, synthetic_patches


def images(h: int = 8, w: int = 8, c: int = 3) -> tuple[np.ndarray, np.ndarray]:
    before = np.arange(h * w * c, dtype=np.uint8).reshape(h, w, c)
    return before, 255 - before


def test_extract_patches_grid_layout_and_labels() -> None:
    before, after = images()
    mask = np.zeros((8, 8), np.uint8)
    mask[0:2, 0:2] = 1  # 4 px of the top-left patch: 0.25
    mask[4:8, 4:8] = 1  # the whole bottom-right patch: 1.0
    mask[0, 7] = 1  # 1 px of the top-right patch: 1/16
    ps = extract_patches(before, after, mask, patch=4, stride=4)
    assert len(ps) == 4
    assert ps.before.shape == ps.after.shape == (4, 3, 4, 4)
    assert ps.before.dtype == np.uint8
    assert ps.before.flags.c_contiguous
    assert ps.changed_fraction.dtype == np.float32
    # row-major: (0,0), (0,4), (4,0), (4,4)
    assert ps.changed_fraction.tolist() == [0.25, 1 / 16, 0.0, 1.0]
    # channels first, same pixels
    assert np.array_equal(ps.before[1], before[0:4, 4:8].transpose(2, 0, 1))
    assert np.array_equal(ps.after[2], after[4:8, 0:4].transpose(2, 0, 1))
    assert ps.labels(0.25).tolist() == [1, 0, 0, 1]


def test_extract_patches_overlapping_stride_stays_inside() -> None:
    before, after = images(10, 9)
    ps = extract_patches(before, after, np.zeros((10, 9), np.uint8), patch=4, stride=3)
    # rows 0, 3, 6; cols 0, 3 (a patch at col 6 would reach past the right border... 6+4=10>9)
    assert len(ps) == 3 * 2
    assert np.array_equal(ps.before[-1], before[6:10, 3:7].transpose(2, 0, 1))


def test_extract_patches_mask_values_above_one_count_as_change() -> None:
    before, after = images()
    mask = np.zeros((8, 8), np.uint8)
    mask[:4, :4] = 255
    ps = extract_patches(before, after, mask, patch=4, stride=4)
    assert ps.changed_fraction.tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("after_shape", "mask_shape"), [((8, 8, 4), (8, 8)), ((8, 8, 3), (8, 7)), ((7, 8, 3), (8, 8))]
)
def test_extract_patches_rejects_mismatched_shapes(
    after_shape: tuple[int, ...], mask_shape: tuple[int, ...]
) -> None:
    before = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="shapes differ"):
        extract_patches(before, np.zeros(after_shape, np.uint8), np.zeros(mask_shape), 4, 4)


def patch_set(fractions: list[float]) -> PatchSet:
    n = len(fractions)
    before = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 1, 2, 2), np.uint8)
    return PatchSet(before, before + 100, np.array(fractions, np.float32))


def test_split_drops_ambiguous_patches() -> None:
    ps = patch_set([0.0, 0.1, 0.25, 0.5, 0.0, 0.2499, 1.0])
    neg, pos = ps.split(0.25)
    assert neg.before[:, 0, 0, 0].tolist() == [0, 4]
    assert pos.before[:, 0, 0, 0].tolist() == [2, 3, 6]
    assert pos.after[:, 0, 0, 0].tolist() == [102, 103, 106]
    assert len(neg) + len(pos) == len(ps) - 2  # 0.1 and 0.2499 are in neither
    assert not np.any((neg.changed_fraction > 0) & (neg.changed_fraction < 0.25))
    assert not np.any((pos.changed_fraction > 0) & (pos.changed_fraction < 0.25))


def test_concat_and_select() -> None:
    a, b = patch_set([0.0, 0.5]), patch_set([1.0])
    both = PatchSet.concat([a, b])
    assert len(both) == 3
    assert both.changed_fraction.tolist() == [0.0, 0.5, 1.0]
    sel = both.select(np.array([2, 0]))
    assert sel.changed_fraction.tolist() == [1.0, 0.0]


def test_synthetic_patches_deterministic() -> None:
    kw = {"patch": 32, "stride": 16, "size": 96}
    a = synthetic_patches(range(2), **kw)
    b = synthetic_patches(range(2), **kw)
    assert len(a) == 2 * 5 * 5
    assert a.before.shape == (len(a), 3, 32, 32)
    assert a.before.dtype == np.uint8
    assert np.array_equal(a.before, b.before)
    assert np.array_equal(a.after, b.after)
    assert np.array_equal(a.changed_fraction, b.changed_fraction)
    other = synthetic_patches([5, 6], **kw)
    assert not np.array_equal(a.before, other.before)
    assert np.all((a.changed_fraction >= 0) & (a.changed_fraction <= 1))
