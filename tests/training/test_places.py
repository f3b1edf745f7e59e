"""The place split: pre-training and fine-tuning patches come from disjoint places."""

from __future__ import annotations

import numpy as np
import pytest

from training.data import extract_patches
from training.places import place_split, reserved_blocks, window_sums


def brute_window_sums(values: np.ndarray, patch: int, stride: int, margin: int) -> np.ndarray:
    h, w = values.shape
    out = []
    for r in range(0, h - patch + 1, stride):
        for c in range(0, w - patch + 1, stride):
            r0, c0 = max(r - margin, 0), max(c - margin, 0)
            out.append(values[r0 : r + patch + margin, c0 : c + patch + margin].sum())
    return np.array(out)


@pytest.mark.parametrize(("patch", "stride", "margin"), [(8, 4, 0), (8, 3, 5), (16, 8, 40)])
def test_window_sums_match_brute_force(patch: int, stride: int, margin: int) -> None:
    values = np.random.default_rng(0).random((53, 71)) < 0.05
    got = window_sums(values, patch, stride, margin)
    assert np.array_equal(got, brute_window_sums(values, patch, stride, margin))


def test_reserved_blocks_are_one_in_every_on_diagonals() -> None:
    r = reserved_blocks((40, 60), block=10, every=3)
    blocks = r[::10, ::10]  # one value per block: each block is uniform
    assert np.array_equal(np.repeat(np.repeat(blocks, 10, 0), 10, 1), r)
    assert blocks.tolist()[:2] == [
        [True, False, False, True, False, False],
        [False, False, True, False, False, True],
    ]
    with pytest.raises(ValueError, match="every >= 2"):
        reserved_blocks((4, 4), 2, 1)


def scene(seed: int = 0, size: int = 160) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    before = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    after = before.copy()
    mask = np.zeros((size, size), np.uint8)
    for r, c, s in ((20, 30, 20), (100, 110, 30), (130, 10, 12)):
        mask[r : r + s, c : c + s] = 1
        after[r : r + s, c : c + s] = 255 - after[r : r + s, c : c + s]
    return before, after, mask


def test_stages_see_disjoint_pixels() -> None:
    """With buffer >= patch, no pixel of a pre-training patch is in any fine-tuning patch, and
    pre-training patches are unchanged and far from changes; every positive goes to fine-tuning."""
    before, after, mask = scene()
    patch, stride, block, every = 16, 4, 40, 3
    pre, fine = place_split(before, after, mask, patch, stride, 0.25, block, every, buffer=patch)
    assert len(pre) and len(fine)
    assert not pre.changed_fraction.any()
    everything = extract_patches(before, after, mask, patch, stride)
    assert (fine.changed_fraction >= 0.25).sum() == (everything.changed_fraction >= 0.25).sum()
    # where each patch lies: match the patches back to the grid by content (random pixels)
    h, w = mask.shape
    boxes = [
        (r, c) for r in range(0, h - patch + 1, stride) for c in range(0, w - patch + 1, stride)
    ]
    index = {everything.before[i].tobytes(): boxes[i] for i in range(len(boxes))}
    seen_pre = np.zeros(mask.shape, bool)
    for p in pre.before:
        r, c = index[p.tobytes()]
        seen_pre[r : r + patch, c : c + patch] = True
    seen_fine = np.zeros(mask.shape, bool)
    reserved = reserved_blocks(mask.shape, block, every)
    for p, f in zip(fine.before, fine.changed_fraction, strict=True):
        r, c = index[p.tobytes()]
        seen_fine[r : r + patch, c : c + patch] = True
        if f == 0:  # a fine-tuning negative lies inside a reserved block
            assert reserved[r : r + patch, c : c + patch].all()
    assert not (seen_pre & seen_fine).any()
    assert not (seen_pre & reserved).any() and not (seen_pre & (mask > 0)).any()


def test_zero_buffer_keeps_every_unchanged_patch_outside_reserved_blocks() -> None:
    before, after, mask = scene(1)
    pre, _ = place_split(before, after, mask, 16, 8, 0.25, block=1000, every=2, buffer=0)
    assert len(pre) == 0  # one block covers the image and is reserved
    pre, _ = place_split(before, after, mask, 16, 8, 0.25, block=40, every=2, buffer=0)
    everything = extract_patches(before, after, mask, 16, 8)
    inside = window_sums(reserved_blocks(mask.shape, 40, 2), 16, 8, 0) > 0
    assert len(pre) == ((everything.changed_fraction == 0) & ~inside).sum()
