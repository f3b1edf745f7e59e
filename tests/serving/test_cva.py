"""Change vector analysis: Otsu against hand-computed splits, standardisation, the baseline, and
the gated rule (its exact streaming medians and its cut)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest

from serving import cva as cva_module
from serving.cva import (
    Moments,
    band_moments,
    box_mean,
    change_magnitude,
    cva,
    gate_cut,
    gate_cut_of,
    gate_magnitude,
    gated_mask,
    lower_median_of,
    moments_of,
    otsu_threshold,
    standardise,
)


def brute_force_otsu(values: np.ndarray) -> float:
    """Every split between distinct values; the one of largest w0 w1 (mu0 - mu1)^2, first wins."""
    v = np.sort(np.asarray(values, np.float64))
    best, best_t = -1.0, float(v[-1])
    for t in np.unique(v)[:-1]:
        low, high = v[v <= t], v[v > t]
        between = len(low) * len(high) * (low.mean() - high.mean()) ** 2
        if between > best:
            best, best_t = between, float(t)
    return best_t


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        # splits (w0 w1 (mu0 - mu1)^2): {0,0}|{1,5,5,6} 144.5, {0,0,1}|{5,5,6} 225, {..5}|{6} 72.2
        ([0, 0, 1, 5, 5, 6], 1.0),
        # {0,0,0,0}|{3,4,8}: 4*3*5^2 = 300 beats {..,3}|{4,8} 291.6 and {..,4}|{8} 280.2:
        # not the widest gap (4 -> 8)
        ([0, 0, 0, 0, 3, 4, 8], 0.0),
        ([2.5, 7.5], 2.5),
    ],
)
def test_otsu_hand_computed(values: list[float], expected: float) -> None:
    assert otsu_threshold(np.array(values)) == expected
    assert brute_force_otsu(np.array(values)) == expected


def test_otsu_matches_brute_force_when_each_value_has_its_own_bin() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        values = rng.choice(np.arange(0, 40, dtype=np.float64), size=60)  # 40 levels, 256 bins
        assert otsu_threshold(values) == brute_force_otsu(values)


def test_otsu_bimodal_and_degenerate_cases() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(1, 0.2, 900), rng.normal(5, 0.3, 100)])
    t = otsu_threshold(values)
    assert 1.5 < t < 4.0 and t in values  # a value of the lower class
    assert otsu_threshold(np.full(7, 3.0)) == 3.0  # constant: nothing above it
    assert otsu_threshold(np.array([1.0, np.nan, 2.0, 9.0])) == 2.0  # NaN ignored
    with pytest.raises(ValueError, match="no finite"):
        otsu_threshold(np.array([np.nan]))
    with pytest.raises(ValueError, match="bins"):
        otsu_threshold(np.arange(4.0), bins=1)


def test_standardise_per_band_and_constant_band() -> None:
    image = np.zeros((2, 2, 2), np.uint16)
    image[..., 0] = [[0, 2], [0, 2]]
    image[..., 1] = 7  # constant: zero deviations, no division by zero
    z = standardise(image)
    assert np.array_equal(z[..., 0], [[-1, 1], [-1, 1]])
    assert np.array_equal(z[..., 1], np.zeros((2, 2)))


def test_magnitude_hand_computed() -> None:
    before = np.array([[[0, 0], [2, 2]]], np.uint8)  # (1, 2, 2): two pixels, two bands
    after = np.array([[[2, 0], [0, 2]]], np.uint8)
    # band 0: z before [-1, 1], after [1, -1] -> difference [2, -2]; band 1: no difference
    assert np.allclose(change_magnitude(before, after), [[2.0, 2.0]])


def test_global_gain_and_offset_are_not_change() -> None:
    rng = np.random.default_rng(1)
    before = rng.integers(0, 200, (40, 50, 3)).astype(np.uint16)
    after = before * 3 + 100  # illumination: another gain and offset per date
    assert np.array_equal(change_magnitude(before, after), np.zeros((40, 50)))  # no rounding
    assert not cva(before, after).mask.any()


def test_cva_finds_a_planted_change() -> None:
    rng = np.random.default_rng(2)
    before = rng.normal(100, 5, (64, 64, 4)).clip(0, 255).astype(np.uint8)
    after = (before.astype(np.int16) + rng.normal(0, 5, before.shape)).clip(0, 255)
    after = after.astype(np.uint8)
    after[20:36, 30:50] = [220, 30, 30, 220]
    truth = np.zeros((64, 64), bool)
    truth[20:36, 30:50] = True
    r = cva(before, after)
    assert r.probability.dtype == np.float32 and r.probability.shape == (64, 64)
    assert r.probability.min() == 0.0 and r.probability.max() == 1.0
    assert np.array_equal(r.mask, r.magnitude > r.threshold)
    tp = (r.mask & truth).sum()
    assert tp / truth.sum() > 0.99 and tp / r.mask.sum() > 0.95
    # the threshold on the probability scale splits the same way (away from rounding)
    away = np.abs(r.probability - r.probability_threshold) > 1e-6
    assert np.array_equal((r.probability > r.probability_threshold)[away], r.mask[away])


def test_cva_of_identical_images_is_empty() -> None:
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    r = cva(image, image)
    assert not r.mask.any() and np.array_equal(r.probability, np.zeros((2, 3), np.float32))


def test_cva_uses_every_band_alike() -> None:
    """The same relative change in any one band, whatever its range, gives the same magnitude."""
    base = np.tile(np.arange(8, dtype=np.uint16), (8, 1))[..., None].repeat(3, axis=2)
    base[..., 1] *= 1000  # a band with 1000 times the range
    magnitudes = []
    for band in range(3):
        after = base.copy()
        after[0, 0, band] = after[0, 7, band]  # one pixel moved to the far end of its band
        magnitudes.append(change_magnitude(base, after)[0, 0])
    assert magnitudes[0] > 0 and magnitudes == pytest.approx([magnitudes[0]] * 3, rel=1e-9)


def test_bins_do_not_matter_while_levels_stay_apart() -> None:
    values = np.array([0, 1, 1, 2, 9, 10, 10, 11], np.float64)
    for bins in (16, 64, 256, 1024):
        assert otsu_threshold(values, bins) == 2.0


# ----------------------------------------------------------------- bounded memory, gating


@pytest.mark.parametrize("strip_values", [1, 7, 100, 1 << 19])
def test_strips_change_nothing(monkeypatch: pytest.MonkeyPatch, strip_values: int) -> None:
    """Moments, magnitude and Otsu summed strip by strip equal the whole-array computation."""
    rng = np.random.default_rng(5)
    before = rng.integers(0, 4000, (23, 17, 4)).astype(np.uint16)
    after = rng.integers(0, 4000, (23, 17, 4)).astype(np.uint16)
    x = before.astype(np.float64)
    z = lambda a: (a - a.mean(axis=(0, 1))) / a.std(axis=(0, 1))  # noqa: E731
    reference = np.sqrt(((z(after.astype(np.float64)) - z(x)) ** 2).sum(axis=2))
    whole_otsu = otsu_threshold(reference)
    monkeypatch.setattr(cva_module, "STRIP_VALUES", strip_values)
    mean, std = band_moments(before)
    np.testing.assert_allclose(mean, x.mean(axis=(0, 1)), rtol=1e-12)
    np.testing.assert_allclose(std, x.std(axis=(0, 1)), rtol=1e-12)
    np.testing.assert_allclose(change_magnitude(before, after), reference, rtol=1e-10)
    assert otsu_threshold(reference) == whole_otsu
    with_nan = reference.copy()
    with_nan[3, 4] = np.nan  # ignored, wherever the chunk boundaries fall
    assert otsu_threshold(with_nan) == otsu_threshold(np.delete(reference.ravel(), 3 * 17 + 4))


def brute_force_box_mean(values: np.ndarray, valid: np.ndarray, size: int) -> np.ndarray:
    r = size // 2
    out = np.zeros(values.shape)
    for y, x in np.ndindex(values.shape):
        win = (slice(max(0, y - r), y + r + 1), slice(max(0, x - r), x + r + 1))
        if valid[win].any():
            out[y, x] = values[win][valid[win]].mean()
    return out


def test_box_mean_hand_computed() -> None:
    values = np.array([[0.0, 3.0], [6.0, 9.0], [12.0, 15.0]])
    # every pixel of a 3 x 2 array sees the neighbours inside it only: no zeros from outside
    expected = [[4.5, 4.5], [7.5, 7.5], [10.5, 10.5]]
    np.testing.assert_allclose(box_mean(values, size=3), expected)
    valid = np.array([[True, False], [True, True], [False, False]])
    # invalid pixels are not neighbours: (0 + 6 + 9) / 3 = 5; (6 + 9) / 2 for the bottom row
    np.testing.assert_allclose(box_mean(values, valid, 3), [[5, 5], [5, 5], [7.5, 7.5]])
    # 5 x 5 reaches every pixel of this array from every pixel: the mean of all (valid) values
    np.testing.assert_allclose(box_mean(values, size=5), np.full((3, 2), 7.5))
    np.testing.assert_allclose(box_mean(values, valid, 5), np.full((3, 2), 5.0))
    np.testing.assert_array_equal(box_mean(values, size=1), values)
    np.testing.assert_array_equal(box_mean(values, np.zeros((3, 2), bool)), np.zeros((3, 2)))
    for bad in (0, 2, -1):
        with pytest.raises(ValueError, match="odd"):
            box_mean(values, size=bad)


@pytest.mark.parametrize("size", [1, 3, 5])
@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (9, 4), (13, 11)])
def test_box_mean_equals_brute_force(size: int, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(size * 100 + shape[0])
    values = rng.random(shape)
    valid = rng.random(shape) > 0.3
    np.testing.assert_allclose(
        box_mean(values, valid, size), brute_force_box_mean(values, valid, size), rtol=1e-12
    )
    all_valid = np.ones(shape, bool)
    np.testing.assert_allclose(
        box_mean(values, size=size), brute_force_box_mean(values, all_valid, size), rtol=1e-12
    )


@pytest.mark.parametrize("strip_values", [1, 13, 1 << 19])
def test_gate_magnitude_in_strips_and_windows_is_the_whole_images(
    monkeypatch: pytest.MonkeyPatch, strip_values: int
) -> None:
    """Strips with halo rows, and any window read with a GATE_WINDOW // 2 halo (as batch scoring
    reads its blocks), give exactly the whole image's values: blocks join without seams."""
    rng = np.random.default_rng(8)
    before = rng.integers(0, 4000, (29, 23, 4)).astype(np.uint16)
    after = rng.integers(0, 4000, (29, 23, 4)).astype(np.uint16)
    whole = box_mean(change_magnitude(before, after)).astype(np.float32)
    r = cva_module.GATE_WINDOW // 2
    monkeypatch.setattr(cva_module, "STRIP_VALUES", strip_values)
    np.testing.assert_array_equal(gate_magnitude(before, after), whole)
    moments = (moments_of(before), moments_of(after))
    for top, left, h, w in [(0, 0, 5, 7), (10, 6, 8, 9), (24, 16, 5, 7)]:
        t, l_ = max(0, top - r), max(0, left - r)
        b, r_ = min(29, top + h + r), min(23, left + w + r)
        part = gate_magnitude(before[t:b, l_:r_], after[t:b, l_:r_], moments)
        np.testing.assert_array_equal(
            part[top - t : top - t + h, left - l_ : left - l_ + w],
            whole[top : top + h, left : left + w],
        )


def test_gated_mask_keeps_what_the_model_calls_real() -> None:
    rng = np.random.default_rng(6)
    before = rng.integers(0, 60, (40, 48, 3)).astype(np.uint8)
    after = before.copy()
    after[10:18, 20:30] += 120  # a real change
    after[30:36, 5:15] += 110  # a trivial one, as bright
    probability = np.full((40, 48), 0.05, np.float32)
    probability[8:20, 18:32] = 0.95  # the model's verdict, patch-blurred
    mask, cut = gated_mask(before, after, probability)
    # the real change, to within the 5 x 5 window's two-pixel fringe; none of the trivial one
    assert mask[10:18, 20:30].all() and mask[8:20, 18:32].sum() == mask.sum() < 12 * 14
    assert cva(before, after).mask[30:36, 5:15].all()  # CVA alone takes both
    score = gate_magnitude(before, after) * probability
    assert np.array_equal(mask, score > cut)
    with pytest.raises(ValueError, match="does not fit"):
        gated_mask(before, after, probability[:-1])


def chunked(values: np.ndarray, size: int) -> Callable[[], Iterator[np.ndarray]]:
    flat = values.reshape(-1)
    return lambda: (flat[i : i + size] for i in range(0, flat.size, size))


@pytest.mark.parametrize("in_memory", [1 << 20, 5])
def test_lower_median_is_exact_over_chunks(monkeypatch: pytest.MonkeyPatch, in_memory: int) -> None:
    """The value of rank (n - 1) // 2, whatever the chunking; with room for 5 values only, the
    refinement passes run until a bin of equal values or 5 candidates is left."""
    monkeypatch.setattr(cva_module, "SELECT_IN_MEMORY", in_memory)
    rng = np.random.default_rng(21)
    cases = [
        rng.standard_normal(1) ** 3,
        rng.standard_normal(2),
        rng.standard_normal(1001) ** 3,  # heavy tails: most values in a few bins
        np.round(rng.standard_normal(20_000), 2),  # many ties
        np.r_[np.zeros(5_000), rng.random(3) * 1e9],  # one value half the data, huge outliers
        rng.exponential(size=30_001).astype(np.float32),
    ]
    for values in cases:
        expected = np.sort(values.astype(np.float64))[(values.size - 1) // 2]
        for size in (1, 7, 4096, values.size):
            assert lower_median_of(chunked(values, size)) == expected
    with_nan = np.array([np.nan, 3.0, np.inf, 1.0, 2.0, -np.inf, 10.0])
    assert lower_median_of(chunked(with_nan, 2)) == 2.0  # non-finite values ignored
    assert lower_median_of(chunked(np.full(9, 4.5), 2)) == 4.5
    with pytest.raises(ValueError, match="no finite"):
        lower_median_of(chunked(np.array([np.nan]), 1))


def test_gate_cut_hand_computed() -> None:
    # Otsu puts 100 alone above; the bulk 0, 1, 2, 3 has lower median 1, absolute deviations
    # 1, 0, 1, 2 -> lower median 1; cut 1 + 4 x 1.4826 x 1
    values = np.array([0.0, 1.0, 2.0, 3.0, 100.0])
    assert otsu_threshold(values) == 3.0
    assert gate_cut(values, spread=4.0, floor=0.0) == pytest.approx(6.9304)
    assert gate_cut(values, spread=4.0, floor=10.0) == 10.0  # the floor wins
    spread, floor = cva_module.GATE_SPREAD, cva_module.GATE_FLOOR
    assert gate_cut(values) == pytest.approx(max(floor, 1 + 1.4826 * spread))
    nodata = np.array([[0.0, np.nan, 1.0], [2.0, 3.0, np.nan], [100.0, np.nan, np.nan]])
    assert gate_cut_of(chunked(nodata, 2), 4.0, 0.0) == pytest.approx(6.9304)


@pytest.mark.parametrize("in_memory", [1 << 20, 5])
def test_gate_cut_equals_the_formula_over_chunks(
    monkeypatch: pytest.MonkeyPatch, in_memory: int
) -> None:
    """The bulk's count and bounds come from Otsu's histogram and the deviations' from the
    bulk's (no pass of their own): still the exact lower medians of Otsu's lower class, however
    the values are chunked and refined."""
    monkeypatch.setattr(cva_module, "SELECT_IN_MEMORY", in_memory)
    rng = np.random.default_rng(22)
    values = (rng.exponential(0.3, 5_001) * rng.random(5_001)).astype(np.float32)
    v = np.sort(values[values <= otsu_threshold(values)].astype(np.float64))  # the bulk
    median = v[(v.size - 1) // 2]
    mad = np.sort(np.abs(v - median))[(v.size - 1) // 2]
    for size in (1, 333, v.size):
        assert gate_cut_of(chunked(values, size), 5.0, 0.0) == median + 5.0 * 1.4826 * mad


def scene(changed: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A 120 x 120 uint16 4-band pair with noise everywhere and ``changed`` of its rows changed,
    the model's probability high there (patch-blurred) and low elsewhere; and the truth."""
    rng = np.random.default_rng(seed)
    before = rng.integers(900, 1100, (120, 120, 4)).astype(np.uint16)
    after = (before + rng.integers(-60, 60, before.shape)).astype(np.uint16)  # trivial noise
    truth = np.zeros((120, 120), bool)
    rows = round(120 * changed)
    truth[:rows] = True
    after[:rows] += 400
    probability = rng.uniform(0.02, 0.2, (120, 120)).astype(np.float32)
    if rows:
        probability[: rows + 4] = 0.9
    return before, after, probability, truth


@pytest.mark.parametrize("changed", [0.35, 0.6])
def test_gate_cut_leaves_an_unchanged_pair_empty_and_caps_no_large_change(changed: float) -> None:
    """The cases the rule was chosen for beyond F1: an unchanged pair's mask stays (nearly)
    empty, where Otsu flags a share of the noise; and a change over a third of the scene, or
    over most of it, is found whole (a fixed fraction would cap it; the whole scene's median
    would be change, and a cut from it would miss it all)."""
    before, after, probability, _ = scene(0.0, 1)
    mask, cut = gated_mask(before, after, probability)
    assert cut == cva_module.GATE_FLOOR and mask.mean() < 0.001
    score = gate_magnitude(before, after) * probability
    assert (score > otsu_threshold(score)).mean() > 0.05  # Otsu splits the noise
    before, after, probability, truth = scene(changed, 2)
    mask, cut = gated_mask(before, after, probability)
    rows = int(truth.any(axis=1).sum())
    assert mask[truth].mean() > 0.99 and not mask[rows + 4 :].any()  # past the blurred fringe
    score = gate_magnitude(before, after) * probability
    v = np.sort(score.ravel().astype(np.float64))
    median = v[(v.size - 1) // 2]
    whole = median + 5.0 * 1.4826 * np.sort(np.abs(v - median))[(v.size - 1) // 2]
    if changed > 0.5:
        assert not (score > whole)[truth].any()  # the whole scene's outliers: none of it


def test_gated_mask_memory_is_bounded_by_its_outputs() -> None:
    """A whole-image float64 standardisation of this pair would take 3 x 100 MB; strips keep the
    peak near the float32 score map (16 MB) and the mask (4 MB)."""
    import tracemalloc

    rng = np.random.default_rng(7)
    before = rng.integers(0, 255, (2048, 2048, 3), dtype=np.uint8)
    after = rng.integers(0, 255, (2048, 2048, 3), dtype=np.uint8)
    probability = rng.random((2048, 2048), dtype=np.float32)
    tracemalloc.start()
    try:
        gated_mask(before, after, probability)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 48 * 2**20, f"peak {peak / 2**20:.0f} MB"


@pytest.mark.parametrize(
    ("dtype", "high"), [(np.uint8, 256), (np.uint16, 12_000), (np.int16, 3_000), (np.float32, 1)]
)
def test_moments_by_value_and_by_pixel_agree_with_exact_sums(dtype: type, high: int) -> None:
    """Unsigned 8/16-bit pixels are counted by value, the rest pixel by pixel; either way,
    merged over uneven blocks, the moments are the exact ones (fractions, no rounding)."""
    from fractions import Fraction

    rng = np.random.default_rng(11)
    pixels = (rng.random((5_000, 3)) * high).astype(dtype)
    acc = Moments(3)
    for lo, hi in [(0, 1), (1, 1), (1, 1_700), (1_700, 5_000)]:  # an empty block too
        acc.add(pixels[lo:hi])
    for band in range(3):
        values = [Fraction(float(v)) for v in pixels[:, band]]
        mean = sum(values) / len(values)
        m2 = sum((v - mean) ** 2 for v in values)
        assert acc.n == 5_000
        assert acc.mean[band] == pytest.approx(float(mean), rel=1e-14)
        assert acc.m2[band] == pytest.approx(float(m2), rel=1e-12)
