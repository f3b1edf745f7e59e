"""Tests for the procedural before/after scene generator."""

import numpy as np
import pytest

from training.synthetic import NuisanceConfig, SceneConfig, ScenePair, plant_change, render_pair

SMALL = SceneConfig(height=192, width=160)


def _absdiff(pair: ScenePair) -> np.ndarray:
    """Per-pixel |after - before| averaged over channels."""
    return np.abs(pair.after.astype(np.float32) - pair.before.astype(np.float32)).mean(axis=2)


def test_same_seed_same_arrays() -> None:
    cfg = SceneConfig(height=128, width=96, n_changes=2)
    a, b = render_pair(7, cfg), render_pair(7, cfg)
    assert np.array_equal(a.before, b.before)
    assert np.array_equal(a.after, b.after)
    assert np.array_equal(a.mask, b.mask)
    assert a.changes == b.changes
    assert not np.array_equal(a.before, render_pair(8, cfg).before)


@pytest.mark.parametrize(("h", "w"), [(40, 70), (70, 40), (952, 640)])
def test_shapes_and_dtypes(h: int, w: int) -> None:
    pair = render_pair(3, SceneConfig(height=h, width=w))
    assert pair.before.shape == pair.after.shape == (h, w, 3)
    assert pair.mask.shape == (h, w)
    assert pair.before.dtype == pair.after.dtype == pair.mask.dtype == np.uint8
    assert set(np.unique(pair.mask)) <= {0, 1}
    for box in pair.changes:
        assert all(isinstance(v, int) for v in box)


def test_default_size_is_512() -> None:
    pair = render_pair(0)
    assert pair.before.shape == (512, 512, 3)


def test_unchanged_pair_differs_only_by_nuisance() -> None:
    for seed in range(4):
        pair = render_pair(seed, SceneConfig(height=192, width=160, n_changes=0))
        assert not pair.mask.any()
        assert pair.changes == ()
        mad = float(_absdiff(pair).mean())
        assert 2.0 < mad < 50.0, mad


def test_zero_strength_no_changes_is_identical() -> None:
    cfg = SceneConfig(height=96, width=120, n_changes=0, nuisance=NuisanceConfig(strength=0.0))
    pair = render_pair(11, cfg)
    assert np.array_equal(pair.before, pair.after)


def test_zero_strength_differs_only_inside_mask() -> None:
    cfg = SceneConfig(height=192, width=192, n_changes=3, nuisance=NuisanceConfig(strength=0.0))
    pair = render_pair(5, cfg)
    assert pair.mask.any()
    changed = (pair.before != pair.after).any(axis=2)
    assert not (changed & (pair.mask == 0)).any()


def test_changes_are_in_boxes_and_stand_out() -> None:
    for seed in range(6):
        pair = render_pair(seed, SceneConfig(height=256, width=256, n_changes=3))
        assert pair.mask.any()
        assert 1 <= len(pair.changes) <= 3
        in_boxes = np.zeros(pair.mask.shape, bool)
        for r0, c0, r1, c1 in pair.changes:
            assert 0 <= r0 < r1 <= 256 and 0 <= c0 < c1 <= 256
            assert pair.mask[r0:r1, c0:c1].any()
            in_boxes[r0:r1, c0:c1] = True
        assert not (pair.mask.astype(bool) & ~in_boxes).any()
        d = _absdiff(pair)
        ratio = d[pair.mask == 1].mean() / d[pair.mask == 0].mean()
        assert ratio > 2.0, (seed, ratio)


def test_changes_do_not_overlap() -> None:
    for seed in range(10):
        pair = render_pair(seed, SceneConfig(height=160, width=160, n_changes=6))
        cover = np.zeros(pair.mask.shape, np.int32)
        for r0, c0, r1, c1 in pair.changes:
            cover[r0:r1, c0:c1] += 1
        assert cover.max() <= 1


def test_change_count_shares_layout_and_nuisance() -> None:
    plain = render_pair(2, SceneConfig(height=192, width=192, n_changes=0))
    changed = render_pair(2, SceneConfig(height=192, width=192, n_changes=2))
    assert np.array_equal(plain.before, changed.before)
    assert changed.changes
    far = np.ones(changed.mask.shape, bool)  # blur and sub-pixel shift bleed ~2 px
    for r0, c0, r1, c1 in changed.changes:
        far[max(r0 - 4, 0) : r1 + 4, max(c0 - 4, 0) : c1 + 4] = False
    assert np.array_equal(plain.after[far], changed.after[far])


@pytest.mark.parametrize("kind", ["build", "remove"])
def test_plant_change_inside_box(kind: str) -> None:
    pair = render_pair(4, SceneConfig(height=128, width=128, n_changes=0))
    box = (40, 50, 64, 80)
    out = plant_change(pair, box, seed=1, kind=kind)
    r0, c0, r1, c1 = box
    assert out.changes == (box,)
    assert out.mask[r0:r1, c0:c1].all()
    assert out.mask.sum() == (r1 - r0) * (c1 - c0)
    outside = np.ones(pair.mask.shape, bool)
    outside[r0:r1, c0:c1] = False
    assert np.array_equal(out.after[outside], pair.after[outside])
    assert np.array_equal(out.before, pair.before)
    assert not pair.mask.any()  # the input is not modified
    d = _absdiff(out)
    assert d[out.mask == 1].mean() > 2 * d[out.mask == 0].mean()


def test_plant_change_rejects_bad_box() -> None:
    pair = render_pair(0, SceneConfig(height=64, width=64, n_changes=0))
    with pytest.raises(ValueError):
        plant_change(pair, (60, 60, 70, 70), seed=0)
