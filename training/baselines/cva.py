"""Change vector analysis (CVA): the classic unsupervised change-detection baseline.

Per pixel, the length of the spectral difference vector between the two dates, thresholded by
Otsu's method. Choices, so that the numbers can be reproduced and argued with:

* **Standardisation.** Each band of each date is z-scored with that date's own mean and standard
  deviation (per pair). Per band, so that bands of different range (Sentinel-2 NIR against blue)
  weigh alike in the vector length; per date, so that a global gain or offset between the dates
  (illumination, sensor calibration, haze) cancels instead of painting the whole scene changed.
  A constant band contributes nothing (its deviations are all zero).
* **Magnitude.** ``m = || z(after) - z(before) ||_2`` over the bands, float64; below
  :data:`NOISE_FLOOR` (rounding error, not change) it is 0.
* **Threshold.** Otsu on a 256-bin histogram of ``m`` over the pair (class means from the values
  themselves, not bin centres); the threshold is the largest value of the lower class, so that
  ``mask = m > threshold`` reproduces Otsu's split exactly.
* **Probability.** ``m`` min-max scaled to [0, 1] per pair, float32: a score for AUROC (which a
  monotone rescaling does not change within a pair), not a calibrated probability.

numpy only: this runs in the torch-free evaluation command.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "NOISE_FLOOR",
    "OTSU_BINS",
    "CvaResult",
    "change_magnitude",
    "cva",
    "otsu_threshold",
    "standardise",
]

OTSU_BINS = 256
# magnitudes are in standard deviations: below this they are float64 rounding of equal z-scores
# (about 1e-15), which Otsu would otherwise split as if it were signal
NOISE_FLOOR = 1e-9


@dataclass(frozen=True, eq=False)
class CvaResult:
    """What CVA says about one pair."""

    magnitude: np.ndarray  # (H, W) float64, length of the standardised difference vector
    probability: np.ndarray  # (H, W) float32, magnitude min-max scaled to [0, 1]
    mask: np.ndarray  # (H, W) bool, magnitude > threshold
    threshold: float  # Otsu threshold on the magnitude
    probability_threshold: float  # the same threshold on the probability scale


def standardise(image: np.ndarray) -> np.ndarray:
    """(H, W, C) -> float64 z-scores per band with this image's own statistics (a constant band
    becomes zeros), so that bands are comparable and global gain/offset drops out."""
    x = np.asarray(image, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"expected an (H, W, C) image, got shape {x.shape}")
    mean = x.mean(axis=(0, 1), keepdims=True)
    std = x.std(axis=(0, 1), keepdims=True)
    return (x - mean) / np.where(std > 0, std, 1.0)


def change_magnitude(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """(H, W) length of the per-date standardised spectral difference vector (0 below
    :data:`NOISE_FLOOR`)."""
    if before.shape != after.shape:
        raise ValueError(f"before {before.shape} and after {after.shape} differ")
    diff = standardise(after) - standardise(before)
    magnitude = np.sqrt(np.einsum("hwc,hwc->hw", diff, diff))
    magnitude[magnitude < NOISE_FLOOR] = 0.0
    return magnitude


def otsu_threshold(values: np.ndarray, bins: int = OTSU_BINS) -> float:
    """Otsu's threshold of ``values``: the split of a ``bins``-bin histogram that maximises the
    between-class variance, returned as the largest value of the lower class (so ``values > t``
    is the upper class). Class means come from the values, not from bin centres, so a histogram
    fine enough to hold one distinct value per bin gives the exact Otsu split.
    Constant input: that value (nothing is above it)."""
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("no finite values to threshold")
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        return hi
    index = np.minimum(((v - lo) / (hi - lo) * bins).astype(np.int64), bins - 1)
    count = np.bincount(index, minlength=bins).astype(np.float64)
    total = np.bincount(index, weights=v, minlength=bins)
    w0, s0 = np.cumsum(count)[:-1], np.cumsum(total)[:-1]  # lower class = bins 0..k
    w1, s1 = v.size - w0, total.sum() - s0
    valid = (w0 > 0) & (w1 > 0)
    mu0 = np.divide(s0, w0, out=np.zeros_like(s0), where=valid)
    mu1 = np.divide(s1, w1, out=np.zeros_like(s1), where=valid)
    between = np.where(valid, w0 * w1 * (mu0 - mu1) ** 2, -1.0)
    k = int(np.argmax(between))  # the first of equal maxima: empty bins change nothing
    return float(v[index <= k].max())


def cva(before: np.ndarray, after: np.ndarray, bins: int = OTSU_BINS) -> CvaResult:
    """Change vector analysis of one co-registered pair of (H, W, C) images, any dtype."""
    magnitude = change_magnitude(before, after)
    threshold = otsu_threshold(magnitude, bins)
    lo, hi = float(magnitude.min()), float(magnitude.max())
    span = hi - lo if hi > lo else 1.0
    probability = ((magnitude - lo) / span).astype(np.float32)
    return CvaResult(
        magnitude=magnitude,
        probability=probability,
        mask=magnitude > threshold,
        threshold=threshold,
        probability_threshold=(threshold - lo) / span,
    )
