"""Place split: fine-tune on places that pre-training never saw.

Pre-training on every unchanged patch of the training pairs teaches the encoder those places: the
common features of a changed patch's two dates are pulled together by the unchanged windows that
overlap it. On its own training pairs the distance between the dates' common features then
separates changed from unchanged patches far worse than on a pair it never saw (patch AUROC
0.57-0.64 against 0.57-0.87 held out, SZTAKI, docs/method.md), so a classifier fitted on a few
training positives learns the wrong thing and scores held-out pairs below chance.

The split keeps the two stages apart on each training pair: pre-training takes only unchanged
patches at least ``buffer`` pixels from any changed pixel and from the reserved blocks; fine-tuning
takes the changed patches (whose pixels pre-training then never saw, when ``buffer`` >= the patch
size) and, as negatives, unchanged patches inside the reserved blocks.
"""

from __future__ import annotations

import numpy as np

from training.data import PatchSet, extract_patches

__all__ = ["place_split", "reserved_blocks", "window_sums"]


def reserved_blocks(shape: tuple[int, int], block: int, every: int) -> np.ndarray:
    """(H, W) bool: one block in ``every``, on diagonals, so reserved places spread over the pair
    (a changed suburb and an unchanged forest both give fine-tuning negatives)."""
    if block < 1 or every < 2:
        raise ValueError(f"need block >= 1 and every >= 2, got {block}, {every}")
    rows = np.arange(shape[0]) // block
    cols = np.arange(shape[1]) // block
    return (rows[:, None] + cols[None, :]) % every == 0


def window_sums(values: np.ndarray, patch: int, stride: int, margin: int) -> np.ndarray:
    """Sum of ``values`` over each grid patch grown by ``margin`` on every side (clipped to the
    image), in extract_patches' grid order: a summed-area table, so any margin costs the same."""
    h, w = values.shape
    table = np.zeros((h + 1, w + 1), np.int64)
    table[1:, 1:] = values.astype(np.int64).cumsum(0).cumsum(1)
    r = np.arange(0, h - patch + 1, stride)
    c = np.arange(0, w - patch + 1, stride)
    r0, r1 = np.clip(r - margin, 0, h), np.clip(r + patch + margin, 0, h)
    c0, c1 = np.clip(c - margin, 0, w), np.clip(c + patch + margin, 0, w)
    sums = table[r1][:, c1] - table[r0][:, c1] - table[r1][:, c0] + table[r0][:, c0]  # (rows, cols)
    return sums.reshape(-1)


def place_split(
    before: np.ndarray,
    after: np.ndarray,
    mask: np.ndarray,
    patch: int,
    stride: int,
    positive_fraction: float,
    block: int,
    every: int,
    buffer: int,
) -> tuple[PatchSet, PatchSet]:
    """(pre-training negatives, fine-tuning patches) of one pair; the second holds positives
    (changed fraction >= ``positive_fraction``) and reserved-block negatives."""
    if buffer < 0:
        raise ValueError(f"buffer must be >= 0, got {buffer}")
    every_patch = extract_patches(before, after, mask, patch, stride)
    reserved = reserved_blocks(mask.shape, block, every)
    frac = every_patch.changed_fraction
    near_change = window_sums(mask > 0, patch, stride, buffer) > 0
    near_reserved = window_sums(reserved, patch, stride, buffer) > 0
    inside_reserved = window_sums(reserved, patch, stride, 0) == patch * patch
    pretrain = ~near_change & ~near_reserved
    finetune = (frac >= positive_fraction) | ((frac == 0) & inside_reserved)
    return (
        every_patch.select(np.flatnonzero(pretrain)),
        every_patch.select(np.flatnonzero(finetune)),
    )
