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

* **Gating** (:func:`gated_mask`): the serving path's optional mask rule. A learned model scores
  16-32 px patches, so its mask is blurred at the scale of small changes, while CVA localises to
  the pixel but cannot tell a real change from a trivial one; ``m5 * p`` (``p`` the stitched
  probability map, ``m5`` the magnitude's mean over each pixel's 5 x 5 neighbourhood, which
  quiets single-pixel noise) keeps the pixels where both agree. The cut (:func:`gate_cut`) is
  the outliers of the score's bulk: ``median + 5 robust SD`` (1.4826 x the median absolute
  deviation) of Otsu's lower class, and never below :data:`GATE_FLOOR`. Otsu alone, the rule's
  first cut, splits a unimodal heavy-tailed score near its bulk (a fifth of a Sentinel-2 city
  flagged against 1.6 % changed, 14 % of unchanged windows); the bulk's outliers assume no count
  of changes (nothing caps the mask, unlike a fixed fraction; a change over most of a request is
  above Otsu's split, so it does not become the median), and the floor keeps an unchanged pair,
  whose outliers are still noise, nearly empty. Measured by
  ``training/experiments/cva_fusion.py`` (the window) and ``training/experiments/gate_cut.py``
  (spread and floor), chosen on training and validation cities and pairs, never held-out ones.

numpy only, and in bounded memory: strips of rows keep the float64 intermediates a few MB, so a
16k x 16k pair in the server costs its float32 magnitude map and no more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

__all__ = [
    "GATE_FLOOR",
    "GATE_SPREAD",
    "GATE_WINDOW",
    "NOISE_FLOOR",
    "OTSU_BINS",
    "CvaResult",
    "Moments",
    "band_moments",
    "box_mean",
    "change_magnitude",
    "cva",
    "gate_cut",
    "gate_cut_of",
    "gate_magnitude",
    "gated_mask",
    "lower_median_of",
    "moments_of",
    "otsu_threshold",
    "otsu_threshold_of",
    "standardise",
]

OTSU_BINS = 256
# magnitudes are in standard deviations: below this they are float64 rounding of equal z-scores
# (about 1e-15), which Otsu would otherwise split as if it were signal
NOISE_FLOOR = 1e-9
# the gated rule's magnitude is averaged over this many pixels square (odd); 1: the raw magnitude
GATE_WINDOW = 5
# the gated rule's cut: median + GATE_SPREAD robust standard deviations of the score's bulk (Otsu's
# lower class), and at least GATE_FLOOR (score units: z-score magnitude x probability)
GATE_SPREAD = 5.0
GATE_FLOOR = 1.25
# the median absolute deviation of a normal distribution is this many times smaller than its SD
MAD_TO_SD = 1.4826
# a selection collects the candidates in memory once this few remain (8 MB of float64)
SELECT_IN_MEMORY = 1 << 20
SELECT_BINS = 1 << 16


@dataclass(frozen=True, eq=False)
class CvaResult:
    """What CVA says about one pair."""

    magnitude: np.ndarray  # (H, W) float64, length of the standardised difference vector
    probability: np.ndarray  # (H, W) float32, magnitude min-max scaled to [0, 1]
    mask: np.ndarray  # (H, W) bool, magnitude > threshold
    threshold: float  # Otsu threshold on the magnitude
    probability_threshold: float  # the same threshold on the probability scale


# float64 values per strip of rows: a few MB of intermediates, whatever the image size
STRIP_VALUES = 1 << 19


def _strips(height: int, values_per_row: int) -> range:
    return range(0, height, max(1, STRIP_VALUES // max(1, values_per_row)))


class Moments:
    """Per-band count, mean and sum of squared deviations, accumulated block by block (Chan et
    al.'s pairwise update), for rasters read a window at a time: a block's own two-pass
    moments, then merged, so nothing is lost to cancellation however many blocks come."""

    def __init__(self, channels: int) -> None:
        self.n = 0
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)

    def add(self, pixels: np.ndarray) -> None:
        """``pixels``: (N, C), any dtype. 8- and 16-bit unsigned pixels (aerial RGB, Sentinel-2
        reflectance) are counted by value instead, exactly and several times faster: a scene's
        moments are a full pass over it."""
        n = len(pixels)
        if not n:
            return
        if pixels.dtype.kind == "u" and pixels.dtype.itemsize <= 2:
            mean, m2 = _histogram_moments(pixels)
        else:
            mean = pixels.sum(axis=0, dtype=np.float64) / n
            d = pixels.astype(np.float64) - mean
            m2 = np.einsum("nc,nc->c", d, d)
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * n / total)
        self.n = total

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(1, self.n))


def _histogram_moments(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and sum of squared deviations of (N, C) unsigned 8/16-bit pixels, from each
    band's histogram of values (deviations taken per value, so nothing cancels)."""
    n, c = pixels.shape
    mean, m2 = np.empty(c), np.empty(c)
    for band in range(c):
        counts = np.bincount(pixels[:, band]).astype(np.float64)
        values = np.arange(len(counts), dtype=np.float64)
        mean[band] = counts @ values / n
        d = values - mean[band]
        m2[band] = counts @ (d * d)
    return mean, m2


def moments_of(image: np.ndarray) -> Moments:
    """The per-band :class:`Moments` of an (H, W, C) image, strip by strip instead of one float64
    copy of the image."""
    if image.ndim != 3:
        raise ValueError(f"expected an (H, W, C) image, got shape {image.shape}")
    h, w, c = image.shape
    acc = Moments(c)
    strips = _strips(h, w * c)
    for r in strips:
        acc.add(image[r : r + strips.step].reshape(-1, c))
    return acc


def band_moments(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and standard deviation (float64, shape (C,)) of an (H, W, C) image."""
    acc = moments_of(image)
    return acc.mean, acc.std


def standardise(image: np.ndarray) -> np.ndarray:
    """(H, W, C) -> float64 z-scores per band with this image's own statistics (a constant band
    becomes zeros), so that bands are comparable and global gain/offset drops out."""
    mean, std = band_moments(image)
    return (np.asarray(image, np.float64) - mean) / np.where(std > 0, std, 1.0)


def change_magnitude(
    before: np.ndarray,
    after: np.ndarray,
    dtype: type[np.floating] = np.float64,
    moments: tuple[Moments, Moments] | None = None,
) -> np.ndarray:
    """(H, W) length of the per-date standardised spectral difference vector (0 below
    :data:`NOISE_FLOOR`), computed in float64 strip by strip and stored as ``dtype``. With
    ``moments`` (before's, after's) the z-scores use them instead of these pixels' own: a
    window of a raster standardised by the whole raster's statistics."""
    if before.shape != after.shape:
        raise ValueError(f"before {before.shape} and after {after.shape} differ")
    if moments is None:
        (mb, sb), (ma, sa) = band_moments(before), band_moments(after)
    else:
        (mb, sb), (ma, sa) = ((m.mean, m.std) for m in moments)
    sb, sa = np.where(sb > 0, sb, 1.0), np.where(sa > 0, sa, 1.0)
    h, w, c = before.shape
    out = np.empty((h, w), dtype)
    strips = _strips(h, w * c)
    for r in strips:
        rows = slice(r, r + strips.step)
        diff = (after[rows] - ma) / sa - (before[rows] - mb) / sb
        m = np.sqrt(np.einsum("hwc,hwc->hw", diff, diff))
        m[m < NOISE_FLOOR] = 0.0
        out[rows] = m
    return out


def box_mean(
    values: np.ndarray, valid: np.ndarray | None = None, size: int = GATE_WINDOW
) -> np.ndarray:
    """float64 mean of each pixel's ``size`` x ``size`` neighbourhood over the neighbours that
    exist: inside the array and, with ``valid``, valid (0 where none is). So an image's edge and
    nodata pull no zeros in, and a window of a raster read with a ``size // 2`` halo gives its
    pixels exactly the values of the whole raster (separable sums in a fixed order)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"window must be odd and >= 1, got {size}")
    v = np.asarray(values, np.float64)
    if valid is not None:
        v = np.where(valid, v, 0.0)
    if size == 1:
        return v.copy() if valid is None else v
    r = size // 2
    h, w = v.shape

    def window_sum(a: np.ndarray) -> np.ndarray:
        a = np.pad(a, r)
        rows = sum(a[:, i : i + w] for i in range(1, size)) + a[:, :w]
        return sum(rows[i : i + h] for i in range(1, size)) + rows[:h]

    def neighbours(n: int) -> np.ndarray:  # along one axis of n pixels, clipped by its ends
        return np.convolve(np.ones(n), np.ones(size))[r : r + n]

    total = window_sum(v)
    if valid is None:  # a rectangle of neighbours, clipped by the edges: rows x columns
        count = np.outer(neighbours(h), neighbours(w))
    else:
        count = window_sum(valid.astype(np.float64))
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


def gate_magnitude(
    before: np.ndarray,
    after: np.ndarray,
    moments: tuple[Moments, Moments] | None = None,
    valid: np.ndarray | None = None,
    window: int = GATE_WINDOW,
) -> np.ndarray:
    """The gated rule's magnitude: :func:`change_magnitude` averaged by :func:`box_mean` over
    ``window`` (valid neighbours only), float32, strip by strip with ``window // 2`` halo rows so
    no float64 map of the whole image is made."""
    if moments is None:
        moments = (moments_of(before), moments_of(after))
    if valid is not None and valid.all():
        valid = None  # the same counts, from the edges alone
    h, w, c = before.shape
    r = window // 2
    out = np.empty((h, w), np.float32)
    strips = _strips(h, w * c)
    for s in strips:
        lo, hi = max(0, s - r), min(h, s + strips.step + r)
        m = change_magnitude(before[lo:hi], after[lo:hi], np.float64, moments)
        mean = box_mean(m, None if valid is None else valid[lo:hi], window)
        out[s : s + strips.step] = mean[s - lo : s - lo + strips.step]
    return out


def otsu_threshold(values: np.ndarray, bins: int = OTSU_BINS) -> float:
    """Otsu's threshold of ``values``: the split of a ``bins``-bin histogram that maximises the
    between-class variance, returned as the largest value of the lower class (so ``values > t``
    is the upper class). Class means come from the values, not from bin centres, so a histogram
    fine enough to hold one distinct value per bin gives the exact Otsu split. Non-finite values
    are ignored. Constant input: that value (nothing is above it). Histogrammed in chunks, so a
    whole image's map needs no float64 copy."""
    flat = np.asarray(values).reshape(-1)
    return otsu_threshold_of(
        lambda: (flat[i : i + STRIP_VALUES] for i in range(0, flat.size, STRIP_VALUES)), bins
    )


def otsu_threshold_of(chunks: Callable[[], Iterable[np.ndarray]], bins: int = OTSU_BINS) -> float:
    """:func:`otsu_threshold` of the values ``chunks()`` yields, read three times (extremes,
    histogram, the lower class's largest value): blocks of a raster kept on disk, one in memory
    at a time."""
    return _otsu(chunks, bins)[0]


def _otsu(
    chunks: Callable[[], Iterable[np.ndarray]], bins: int = OTSU_BINS
) -> tuple[float, tuple[int, float, float]]:
    """Otsu's threshold, and its lower class's count and bounds (every value ``v <= threshold``:
    ``(n, min, threshold)``), which the histogram already holds."""
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")

    extremes = [(float(v.min()), float(v.max()), v.size) for v in _finite(chunks)]
    if not extremes:
        raise ValueError("no finite values to threshold")
    lo, hi = min(e[0] for e in extremes), max(e[1] for e in extremes)
    if lo == hi:
        return hi, (sum(e[2] for e in extremes), lo, hi)

    def index(v: np.ndarray) -> np.ndarray:
        return np.minimum(((v - lo) / (hi - lo) * bins).astype(np.int64), bins - 1)

    count, total = np.zeros(bins), np.zeros(bins)
    for v in _finite(chunks):
        i = index(v)
        count += np.bincount(i, minlength=bins)
        total += np.bincount(i, weights=v, minlength=bins)
    size = count.sum()
    w0, s0 = np.cumsum(count)[:-1], np.cumsum(total)[:-1]  # lower class = bins 0..k
    w1, s1 = size - w0, total.sum() - s0
    valid = (w0 > 0) & (w1 > 0)
    mu0 = np.divide(s0, w0, out=np.zeros_like(s0), where=valid)
    mu1 = np.divide(s1, w1, out=np.zeros_like(s1), where=valid)
    between = np.where(valid, w0 * w1 * (mu0 - mu1) ** 2, -1.0)
    k = int(np.argmax(between))  # the first of equal maxima: empty bins change nothing
    cut = max(float(v[index(v) <= k].max(initial=-np.inf)) for v in _finite(chunks))
    # the bin index is monotone: the values of bins 0..k are exactly those <= cut
    return cut, (int(count[: k + 1].sum()), lo, cut)


def _finite(chunks: Callable[[], Iterable[np.ndarray]]) -> Iterator[np.ndarray]:
    """The finite values of each chunk as flat float64, empty chunks skipped."""
    for chunk in chunks():
        v = np.asarray(chunk).reshape(-1)
        v = v[np.isfinite(v)].astype(np.float64)
        if v.size:
            yield v


def lower_median_of(
    chunks: Callable[[], Iterable[np.ndarray]],
    known: tuple[int, float, float] | None = None,
) -> float:
    """The lower median (the value of rank ``(n - 1) // 2``) of the finite values ``chunks()``
    yields, exactly, one chunk in memory at a time. Each pass histograms the values still in the
    running over :data:`SELECT_BINS` bins, with each bin's smallest and largest member, and
    keeps the bin holding the rank: its members are exactly the values between those two (the
    bin index is monotone). Once few enough remain they are sorted: three passes over a scene
    of hundreds of millions of values, as a rule. ``known``: the count of finite values and
    bounds that hold them all (``lo <= v <= hi``), which saves the first pass."""
    n, lo, hi = _count_and_extremes(chunks) if known is None else known
    if not n:
        raise ValueError("no finite values to take the median of")
    rank = (n - 1) // 2  # within the values still in the running: lo <= v <= hi, n of them
    while n > SELECT_IN_MEMORY and lo < hi:
        counts = np.zeros(SELECT_BINS, np.int64)
        smallest, largest = np.full(SELECT_BINS, np.inf), np.full(SELECT_BINS, -np.inf)
        for v in _finite(chunks):
            v = v[(v >= lo) & (v <= hi)]
            i = np.minimum(((v - lo) / (hi - lo) * SELECT_BINS).astype(np.int64), SELECT_BINS - 1)
            counts += np.bincount(i, minlength=SELECT_BINS)
            np.minimum.at(smallest, i, v)
            np.maximum.at(largest, i, v)
        k = int(np.searchsorted(np.cumsum(counts), rank, side="right"))
        rank -= int(counts[:k].sum())
        n, lo, hi = int(counts[k]), float(smallest[k]), float(largest[k])
    if lo == hi:
        return lo
    kept = np.concatenate([v[(v >= lo) & (v <= hi)] for v in _finite(chunks)])
    return float(np.partition(kept, rank)[rank])


def _count_and_extremes(chunks: Callable[[], Iterable[np.ndarray]]) -> tuple[int, float, float]:
    n, lo, hi = 0, np.inf, -np.inf
    for v in _finite(chunks):
        n, lo, hi = n + v.size, min(lo, float(v.min())), max(hi, float(v.max()))
    return n, lo, hi


def gate_cut_of(
    chunks: Callable[[], Iterable[np.ndarray]],
    spread: float | None = None,
    floor: float | None = None,
) -> float:
    """The gated rule's cut of the scores ``chunks()`` yields (NaN: nodata, ignored):
    ``max(floor, median + spread * 1.4826 * MAD)`` of Otsu's lower class, the scene's bulk,
    medians taken exactly by :func:`lower_median_of`, so a scene read block by block gets the
    whole scene's cut. The bulk, not the whole scene: where a change covers much of the scene
    the whole scene's median is change, and the cut would land above all of it.
    ``None``: :data:`GATE_SPREAD`, :data:`GATE_FLOOR` (read at call time)."""
    spread = GATE_SPREAD if spread is None else spread
    floor = GATE_FLOOR if floor is None else floor
    otsu, (n, lo, hi) = _otsu(chunks)

    def bulk() -> Iterator[np.ndarray]:
        for c in chunks():
            c = np.asarray(c)
            yield c[c <= otsu]  # NaN compares False: nodata stays out

    median = lower_median_of(bulk, (n, lo, hi))
    # the deviations' count and bounds follow from the bulk's: no pass to find them
    mad = lower_median_of(
        lambda: (np.abs(c.astype(np.float64) - median) for c in bulk()),
        (n, 0.0, max(hi - median, median - lo)),
    )
    return max(floor, median + spread * MAD_TO_SD * mad)


def gate_cut(score: np.ndarray, spread: float | None = None, floor: float | None = None) -> float:
    """:func:`gate_cut_of` of one in-memory score map, chunked so no float64 copy is made."""
    flat = np.asarray(score).reshape(-1)
    return gate_cut_of(
        lambda: (flat[i : i + STRIP_VALUES] for i in range(0, flat.size, STRIP_VALUES)),
        spread,
        floor,
    )


def gated_mask(
    before: np.ndarray, after: np.ndarray, probability: np.ndarray
) -> tuple[np.ndarray, float]:
    """The mask of CVA's window-averaged magnitude gated by a probability map (``m5 * p`` above
    :func:`gate_cut`), and the cut. The float32 score map is the only full-size intermediate."""
    if probability.shape != before.shape[:2]:
        raise ValueError(f"probability {probability.shape} does not fit {before.shape[:2]}")
    score = gate_magnitude(before, after)
    score *= probability
    cut = gate_cut(score)
    return score > cut, cut


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
