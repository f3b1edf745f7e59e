"""Patch pairs for training: cut co-registered image pairs into labelled patches.

A patch pair is negative when no pixel of it changed, positive when at least
``positive_fraction`` of it changed; pairs in between are ambiguous and left out of training, so
that the classifier learns a clean boundary (the tiler scores them at serving time all the same).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PatchSet:
    before: np.ndarray  # (N, C, P, P) uint8
    after: np.ndarray  # (N, C, P, P) uint8
    changed_fraction: np.ndarray  # (N,) float32

    def __len__(self) -> int:
        return len(self.before)

    def labels(self, positive_fraction: float) -> np.ndarray:
        return (self.changed_fraction >= positive_fraction).astype(np.int64)

    def select(self, index: np.ndarray) -> PatchSet:
        return PatchSet(self.before[index], self.after[index], self.changed_fraction[index])

    def split(self, positive_fraction: float) -> tuple[PatchSet, PatchSet]:
        """(negatives, positives); ambiguous patches are in neither."""
        neg = self.select(np.flatnonzero(self.changed_fraction == 0))
        pos = self.select(np.flatnonzero(self.changed_fraction >= positive_fraction))
        return neg, pos

    @staticmethod
    def concat(sets: Iterable[PatchSet]) -> PatchSet:
        sets = list(sets)
        return PatchSet(
            np.concatenate([s.before for s in sets]),
            np.concatenate([s.after for s in sets]),
            np.concatenate([s.changed_fraction for s in sets]),
        )


def extract_patches(
    before: np.ndarray, after: np.ndarray, mask: np.ndarray, patch: int, stride: int
) -> PatchSet:
    """Cut (H, W, C) images and an (H, W) 0/1 mask into patches on a grid inside the image."""
    if before.shape != after.shape or before.shape[:2] != mask.shape:
        raise ValueError(f"shapes differ: {before.shape}, {after.shape}, mask {mask.shape}")
    h, w = mask.shape
    rows = range(0, h - patch + 1, stride)
    cols = range(0, w - patch + 1, stride)
    boxes = [(r, c) for r in rows for c in cols]
    b = np.stack([before[r : r + patch, c : c + patch] for r, c in boxes])  # (N, P, P, C)
    a = np.stack([after[r : r + patch, c : c + patch] for r, c in boxes])  # (N, P, P, C)
    m = np.stack([mask[r : r + patch, c : c + patch] for r, c in boxes])  # (N, P, P)
    return PatchSet(
        np.ascontiguousarray(b.transpose(0, 3, 1, 2)),
        np.ascontiguousarray(a.transpose(0, 3, 1, 2)),
        (m > 0).mean(axis=(1, 2)).astype(np.float32),
    )


def synthetic_patches(
    seeds: Iterable[int],
    *,
    patch: int,
    stride: int,
    size: int = 256,
    change_rate: float = 6.0,
    nuisance_strength: tuple[float, float] = (0.5, 2.0),
    max_change_px: int = 96,
) -> PatchSet:
    """Patches from generated scene pairs, with more changes than real scenes have, so that a few
    seconds of training see enough positives. Each scene draws its nuisance strength uniformly
    from ``nuisance_strength``, so the model sees mild and harsh trivial differences."""
    from training.synthetic import NuisanceConfig, SceneConfig, render_pair

    sets = []
    for seed in seeds:
        strength = np.random.default_rng([seed, 7]).uniform(*nuisance_strength)
        cfg = SceneConfig(
            height=size,
            width=size,
            change_rate=change_rate,
            max_change_px=max_change_px,
            nuisance=NuisanceConfig(strength=strength),
        )
        pair = render_pair(seed, cfg)
        sets.append(extract_patches(pair.before, pair.after, pair.mask, patch, stride))
    return PatchSet.concat(sets)
