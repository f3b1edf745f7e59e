"""Evaluate a served model (or a baseline) on a labelled real dataset, through the serving path.

``rarechange evaluate`` is a thin shell over this module. A served model is scored exactly as a
client would see it: :class:`serving.detector.ChangeDetectionCore` tiles the pair, the model's
dynamic batcher and backend score the patches, the map is stitched and thresholded. Baselines
(:mod:`serving.cva`) answer the same :class:`Scorer` interface, so every number below
is computed the same way for both and the comparison is apples to apples.

Metrics per pair and overall (overall = pooled pixels, and the plain mean over pairs):

* pixel precision, recall, F1 and IoU of the mask against the truth (conventions of
  :func:`serving.quality.binary_scores`: an empty ratio is 0, or 1 when there was nothing to find
  and nothing was found);
* AUROC of the probability map over pixels: exact per pair (rank statistic); pooled from
  2**20-bin histograms of the scores, in which scores sharing a bin count as ties (half), so it
  matches the exact value to within the mass of positive/negative pairs that share a bin;
* patch balanced accuracy, :data:`PATCH_DEFINITION`.

Mean over pairs skips pairs where a metric is undefined (NaN, e.g. AUROC without a changed pixel).

numpy, Pillow, serving and training.datasets only, never torch: evaluation must run on a
serving-only install plus the source tree.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from serving import __version__
from serving.config import ServerSettings
from serving.cva import GATE_FLOOR, GATE_SPREAD, OTSU_BINS, cva
from serving.detector import ChangeDetectionCore, DetectRequest, resolve_mask_rule
from serving.errors import InvalidInput
from serving.models import ModelRepository
from serving.pictures import encode_png, to_display
from serving.quality import auroc, confusion
from training.datasets.scenes import ScenePair

__all__ = [
    "CVA_PATCH",
    "CVA_STRIDE",
    "DATASET_NOTES",
    "PATCH_DEFINITION",
    "Counts",
    "CvaScorer",
    "Evaluation",
    "IncompatibleData",
    "ModelInfo",
    "PairResult",
    "PatchCounts",
    "PooledRoc",
    "Scored",
    "Scorer",
    "ServedScorer",
    "evaluate",
    "fit_pair",
    "overlay_panels",
    "parse_bands",
    "patch_counts",
    "pixel_counts",
    "scale_to_uint8",
    "served_scorer",
    "write_atomic",
    "write_overlay",
    "write_report",
]

PATCH_DEFINITION = (
    "patches of P x P pixels (the model's patch size) with top-left corners every `stride` "
    "pixels from (0, 0), wholly inside the image (the serving grid without its mirrored border "
    "patches); truth: changed when at least half of its pixels changed, unchanged when none did, "
    "otherwise ambiguous and left out; prediction: changed when the mean of the stitched "
    "probability map over the patch is >= the threshold (mask rule cva-gated: when at least half "
    "of its pixels are in the mask); balanced accuracy = (TPR + TNR) / 2, "
    "undefined (null) unless both classes occur"
)
# CVA has no patch grid of its own: score its patches on the bundled model's grid (32 px, stride
# 8), so that the patch metric is comparable with the model it is the baseline for
CVA_PATCH = 32
CVA_STRIDE = 8
ROC_BINS = 1 << 20

DATASET_NOTES: dict[str, str] = {
    "sztaki": "SZTAKI AirChange benchmark: free for scientific use; cite Benedek and Sziranyi, "
    "IEEE TGRS 47(10) 2009 and ICPR 2008.",
    "oscd": "Onera Satellite Change Detection: modified Copernicus Sentinel-2 data; labels "
    "CC BY-NC-SA 4.0 (Caye Daudt et al., IGARSS 2018).",
    "pcd": "PCD (Sakurada and Okatani, BMVC 2015): follow the release's terms of use.",
    "abcd": "ABCD (Fujita et al., MVA 2017): non-commercial licence.",
    "folder": "a folder of pairs: its terms are those of its source (not known to rarechange).",
}


class IncompatibleData(InvalidInput):
    """The dataset's bands or pixel type do not fit the model; the message says which flags do."""


# ------------------------------------------------------------------------------------- scorers


@dataclass(frozen=True)
class ModelInfo:
    """What the report says about the scorer; ``None`` where a baseline takes anything."""

    name: str
    version: str
    kind: str  # "served" or "baseline"
    patch_size: int
    stride: int
    threshold: float | None  # None: chosen per pair (CVA: Otsu)
    threshold_method: str
    channels: int | None
    input_dtype: str | None
    band_names: tuple[str, ...]
    description: str = ""
    precision: str = ""
    training_data: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class Scored:
    """A scorer's answer for one pair."""

    probability: np.ndarray  # (H, W) float32 in [0, 1]
    mask: np.ndarray  # (H, W) bool
    threshold: float  # on the probability scale; the gated cut when gated
    gated: bool = False  # the mask is CVA x probability > the gated cut, not prob >= threshold


class Scorer(Protocol):
    """Anything evaluate can score: a served model or a baseline."""

    @property
    def info(self) -> ModelInfo: ...

    def score(self, before: np.ndarray, after: np.ndarray) -> Scored: ...


class ServedScorer:
    """A model of a started :class:`ModelRepository`, through the full serving path."""

    def __init__(
        self,
        repository: ModelRepository,
        name: str = "",
        stride: int = 0,
        threshold: float | None = None,
        mask_rule: str | None = None,
    ) -> None:
        meta = repository.get(name).metadata
        mask_rule = resolve_mask_rule(mask_rule, threshold, meta)
        self.mask_rule = mask_rule
        if mask_rule == "cva-gated":
            shown = None
            method = (
                f"cva-gated: CVA magnitude x probability above the median + {GATE_SPREAD:g} "
                f"robust SD of its bulk (Otsu's lower class), at least {GATE_FLOOR:g} "
                "(the cut in z units)"
            )
        elif threshold is not None:
            shown, method = threshold, "--threshold"
        else:
            shown, method = meta.default_threshold, meta.threshold_method
        stride = stride or meta.recommended_stride
        if not 1 <= stride <= meta.patch_size:
            raise InvalidInput(
                f"stride {stride} must be between 1 and the patch size {meta.patch_size}"
            )
        self.core = ChangeDetectionCore(repository)
        self._info = ModelInfo(
            name=meta.name,
            version=meta.version,
            kind="served",
            patch_size=meta.patch_size,
            stride=stride,
            threshold=shown,
            threshold_method=method,
            channels=meta.channels,
            input_dtype=meta.input_dtype,
            band_names=meta.band_names,
            description=meta.description,
            precision=meta.precision,
            training_data=tuple(f"{t.name} ({t.licence})" for t in meta.training_data),
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    def score(self, before: np.ndarray, after: np.ndarray) -> Scored:
        info = self._info
        detection = self.core.detect(
            DetectRequest(
                before,
                after,
                model=info.name,
                model_version=info.version,
                stride=info.stride,
                threshold=info.threshold,
                mask_rule=self.mask_rule,
                outputs=frozenset({"probability_map", "mask"}),
            )
        )
        if detection.gated_cut is not None:
            return Scored(detection.probability, detection.mask, detection.gated_cut, gated=True)
        return Scored(detection.probability, detection.mask, detection.threshold)


@contextlib.contextmanager
def served_scorer(
    settings: ServerSettings,
    name: str = "",
    stride: int = 0,
    threshold: float | None = None,
    mask_rule: str | None = None,
) -> Iterator[ServedScorer]:
    """Load every model of ``settings.models_dir`` as the server would, start the batchers, and
    stop them (closing the backends) however the evaluation ends."""
    repository = ModelRepository.load(settings)
    try:
        scorer = ServedScorer(repository, name, stride, threshold, mask_rule)
        repository.start()
        yield scorer
    finally:
        repository.stop()


class CvaScorer:
    """Change vector analysis (:mod:`serving.cva`) as a scorer: Otsu per pair, or a
    fixed ``threshold`` on the [0, 1] magnitude scale (mask = probability >= threshold)."""

    def __init__(self, stride: int = 0, threshold: float | None = None) -> None:
        stride = stride or CVA_STRIDE
        if not 1 <= stride <= CVA_PATCH:
            raise InvalidInput(f"stride {stride} must be between 1 and {CVA_PATCH} for cva")
        self._threshold = threshold
        self._info = ModelInfo(
            name="cva",
            version=f"rarechange {__version__}",
            kind="baseline",
            patch_size=CVA_PATCH,
            stride=stride,
            threshold=threshold,
            threshold_method=(
                "--threshold on the min-max scaled magnitude"
                if threshold is not None
                else f"Otsu per pair on the magnitude ({OTSU_BINS} bins)"
            ),
            channels=None,
            input_dtype=None,
            band_names=(),
            description=(
                "change vector analysis: length of the difference of the per-date, per-band "
                "z-scored pixel vectors; probability = that length min-max scaled per pair"
            ),
            training_data=("none (unsupervised)",),
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    def score(self, before: np.ndarray, after: np.ndarray) -> Scored:
        result = cva(before, after)
        if self._threshold is None:
            return Scored(result.probability, result.mask, result.probability_threshold)
        return Scored(result.probability, result.probability >= self._threshold, self._threshold)


# ------------------------------------------------------------------------------ preparing data


def parse_bands(text: str) -> tuple[int, ...]:
    """``"1,2,3"`` -> (1, 2, 3): 1-based band numbers, in the order the model takes them."""
    try:
        bands = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(
            f"{text!r}: give 1-based band numbers separated by commas, e.g. 1,2,3"
        ) from None
    if not bands or min(bands) < 1:
        raise ValueError(f"{text!r}: band numbers start at 1")
    return bands


def scale_to_uint8(before: np.ndarray, after: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per band, map the pair's 2nd-98th percentiles (over both dates together, so one mapping
    serves both and a real brightness change survives) linearly to 0-255, clipped, rounded."""
    out_b = np.empty(before.shape, np.uint8)
    out_a = np.empty(after.shape, np.uint8)
    for c in range(before.shape[2]):
        b = before[..., c].astype(np.float64)
        a = after[..., c].astype(np.float64)
        lo, hi = np.percentile(np.concatenate([b.ravel(), a.ravel()]), [2, 98])
        span = hi - lo if hi > lo else 1.0
        for src, dst in ((b, out_b), (a, out_a)):
            dst[..., c] = np.clip(np.rint((src - lo) / span * 255.0), 0, 255)
    return out_b, out_a


def fit_pair(
    pair: ScenePair,
    model: ModelInfo,
    bands: Sequence[int] | None = None,
    to_uint8: bool = False,
) -> ScenePair:
    """The pair as the model takes it: ``bands`` selected and ordered (1-based), non-uint8 pixels
    scaled to uint8 when asked; anything still not fitting is :class:`IncompatibleData`, whose
    message names the flags that would make it fit. Never converts silently."""
    have = pair.before.shape[2]
    if bands:
        wrong = [b for b in bands if b > have]
        if wrong:
            raise IncompatibleData(
                f"--bands {','.join(map(str, bands))}: pair {pair.name!r} has only {have} bands "
                f"({', '.join(pair.bands)})"
            )
        idx = [b - 1 for b in bands]
        fitted = replace(
            pair,
            before=np.ascontiguousarray(pair.before[..., idx]),
            after=np.ascontiguousarray(pair.after[..., idx]),
            bands=tuple(pair.bands[i] for i in idx),
        )
    else:
        fitted = pair
    if to_uint8 and fitted.before.dtype != np.uint8:
        b, a = scale_to_uint8(fitted.before, fitted.after)
        fitted = replace(fitted, before=b, after=a)
    problems, hints = [], []
    c, dtype = fitted.before.shape[2], fitted.before.dtype
    if model.channels is not None and c != model.channels:
        problems.append(f"{c} bands ({', '.join(fitted.bands)})")
        hints.append(_bands_hint(pair, model, bool(bands)))
    if model.input_dtype is not None and dtype != np.dtype(model.input_dtype):
        problems.append(f"{dtype} pixels")
        if model.input_dtype == "uint8" and np.issubdtype(dtype, np.integer):
            hints.append(
                "pass --scale-to-uint8 to map each pair's per-band 2nd-98th percentiles "
                "(over both dates) to 0-255"
            )
        else:
            hints.append(f"rarechange offers no conversion from {dtype} to {model.input_dtype}")
    if problems:
        raise IncompatibleData(
            f"model {model.name!r} takes {model.channels} bands of {model.input_dtype} "
            f"({', '.join(model.band_names)}); pair {pair.name!r} gives it "
            f"{' and '.join(problems)}: {'; '.join(hints)}"
        )
    return fitted


def _bands_hint(pair: ScenePair, model: ModelInfo, given: bool) -> str:
    """--bands with the numbers of the model's bands in the data when their names say so."""
    if all(name in pair.bands for name in model.band_names):
        numbers = ",".join(str(pair.bands.index(name) + 1) for name in model.band_names)
        return f"pass --bands {numbers} (1-based band numbers, in the model's order)"
    what = "give" if not given else "give exactly"
    return f"{what} {model.channels} 1-based band numbers with --bands, e.g. --bands 1,2,3"


# -------------------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Counts:
    """A confusion matrix; pooled by adding."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn
        )

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    def scores(self) -> dict[str, float]:
        """Precision, recall, F1 and IoU with serving.quality.binary_scores' conventions."""
        tp, fp, fn = self.tp, self.fp, self.fn
        nothing = tp + fp + fn == 0
        precision = tp / (tp + fp) if tp + fp else float(nothing)
        recall = tp / (tp + fn) if tp + fn else 1.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        iou = tp / (tp + fp + fn) if not nothing else 1.0
        return {"precision": precision, "recall": recall, "f1": f1, "iou": iou}

    def as_dict(self) -> dict[str, int]:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn}


@dataclass(frozen=True)
class PatchCounts:
    """Patch confusion matrix over unambiguous patches, and how many were ambiguous."""

    counts: Counts = Counts()
    ambiguous: int = 0

    def __add__(self, other: PatchCounts) -> PatchCounts:
        return PatchCounts(self.counts + other.counts, self.ambiguous + other.ambiguous)

    @property
    def balanced_accuracy(self) -> float:
        c = self.counts
        if not (c.tp + c.fn and c.tn + c.fp):
            return float("nan")
        return 0.5 * (c.tp / (c.tp + c.fn) + c.tn / (c.tn + c.fp))

    def as_dict(self) -> dict[str, Any]:
        c = self.counts
        return {
            "balanced_accuracy": self.balanced_accuracy,
            "positive": c.tp + c.fn,
            "negative": c.tn + c.fp,
            "ambiguous": self.ambiguous,
            **c.as_dict(),
        }


def pixel_counts(pred: np.ndarray, truth: np.ndarray) -> Counts:
    """Confusion matrix of a predicted mask against the true one."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ")
    return Counts(*confusion(pred, truth))


def patch_counts(
    probability: np.ndarray, truth: np.ndarray, patch: int, stride: int, threshold: float
) -> PatchCounts:
    """Patch confusion matrix as :data:`PATCH_DEFINITION` says, by summed-area tables (one pass
    over the image, whatever the number of patches)."""
    if probability.shape != truth.shape:
        raise ValueError(f"probability {probability.shape} and truth {truth.shape} differ")
    if patch < 1 or stride < 1:
        raise ValueError(f"patch and stride must be >= 1, got {patch} and {stride}")
    h, w = truth.shape
    if patch > h or patch > w:
        return PatchCounts()
    rows = np.arange(0, h - patch + 1, stride)[:, None]
    cols = np.arange(0, w - patch + 1, stride)[None, :]

    def box_sums(values: np.ndarray) -> np.ndarray:
        table = np.zeros((h + 1, w + 1))
        table[1:, 1:] = values.astype(np.float64).cumsum(0).cumsum(1)
        r1, c1 = rows + patch, cols + patch
        return table[r1, c1] - table[rows, c1] - table[r1, cols] + table[rows, cols]

    changed = np.rint(box_sums(truth != 0)).astype(np.int64)  # exact: integer sums
    mean_p = box_sums(probability) / (patch * patch)
    area = patch * patch
    positive, negative = 2 * changed >= area, changed == 0
    pred = mean_p >= threshold
    counts = Counts(
        tp=int(np.count_nonzero(positive & pred)),
        fp=int(np.count_nonzero(negative & pred)),
        fn=int(np.count_nonzero(positive & ~pred)),
        tn=int(np.count_nonzero(negative & ~pred)),
    )
    return PatchCounts(counts, int(np.count_nonzero(~positive & ~negative)))


class PooledRoc:
    """AUROC over the pixels of many pairs in fixed memory: per-class histograms of the scores
    in [0, 1] (``bins`` bins), scores sharing a bin counted as ties."""

    def __init__(self, bins: int = ROC_BINS) -> None:
        self.bins = bins
        self.positive = np.zeros(bins, np.int64)
        self.negative = np.zeros(bins, np.int64)

    def add(self, scores: np.ndarray, labels: np.ndarray) -> None:
        s = np.asarray(scores, dtype=np.float64).ravel()
        if not np.isfinite(s).all():
            raise ValueError("scores must be finite")
        index = np.clip((np.clip(s, 0.0, 1.0) * self.bins).astype(np.int64), 0, self.bins - 1)
        lab = np.asarray(labels).ravel().astype(bool)
        self.positive += np.bincount(index[lab], minlength=self.bins)
        self.negative += np.bincount(index[~lab], minlength=self.bins)

    def auroc(self) -> float:
        n_pos, n_neg = int(self.positive.sum()), int(self.negative.sum())
        if not n_pos or not n_neg:
            return float("nan")
        neg = self.negative.astype(np.float64)
        below = np.cumsum(neg) - neg
        wins = float(np.dot(self.positive.astype(np.float64), below + 0.5 * neg))
        return wins / (float(n_pos) * float(n_neg))


# ----------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class PairResult:
    """The numbers of one pair."""

    name: str
    height: int
    width: int
    threshold: float
    pixels: Counts
    auroc: float
    patches: PatchCounts
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "height": self.height,
            "width": self.width,
            "threshold": self.threshold,
            "pixels": {
                **self.pixels.scores(),
                "auroc": self.auroc,
                "changed": self.pixels.tp + self.pixels.fn,
                "predicted": self.pixels.tp + self.pixels.fp,
                "total": self.pixels.total,
                **self.pixels.as_dict(),
            },
            "patches": self.patches.as_dict(),
            "seconds": round(self.seconds, 3),
        }


MEAN_KEYS = ("precision", "recall", "f1", "iou", "auroc", "patch_balanced_accuracy")


@dataclass(frozen=True)
class Evaluation:
    """Per-pair results and the overall ones."""

    model: ModelInfo
    pairs: tuple[PairResult, ...]
    pixels: Counts  # pooled over every pixel of every pair
    auroc: float  # pooled, from histograms
    patches: PatchCounts  # pooled
    seconds: float

    def pooled(self) -> dict[str, float]:
        return {
            **self.pixels.scores(),
            "auroc": self.auroc,
            "patch_balanced_accuracy": self.patches.balanced_accuracy,
        }

    def mean_over_pairs(self) -> dict[str, float]:
        """Plain mean over pairs of each metric, skipping pairs where it is undefined."""
        rows = [
            {
                **p.pixels.scores(),
                "auroc": p.auroc,
                "patch_balanced_accuracy": p.patches.balanced_accuracy,
            }
            for p in self.pairs
        ]
        out = {}
        for key in MEAN_KEYS:
            values = [r[key] for r in rows if not math.isnan(r[key])]
            out[key] = sum(values) / len(values) if values else float("nan")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": asdict(self.model),
            "pairs": [p.as_dict() for p in self.pairs],
            "overall": {
                "pooled": {
                    **self.pooled(),
                    "changed": self.pixels.tp + self.pixels.fn,
                    "predicted": self.pixels.tp + self.pixels.fp,
                    "total": self.pixels.total,
                    **self.pixels.as_dict(),
                    "patches": self.patches.as_dict(),
                },
                "mean_over_pairs": self.mean_over_pairs(),
            },
            "seconds": round(self.seconds, 3),
        }


def evaluate(
    pairs: Iterable[ScenePair],
    scorer: Scorer,
    on_pair: Callable[[ScenePair, Scored, PairResult], None] | None = None,
) -> Evaluation:
    """Score every pair and measure it; ``on_pair`` sees each pair as it is done (overlays,
    progress), so no probability map outlives its pair."""
    info = scorer.info
    results: list[PairResult] = []
    roc = PooledRoc()
    t_start = time.perf_counter()
    for pair in pairs:
        t0 = time.perf_counter()
        scored = scorer.score(pair.before, pair.after)
        seconds = time.perf_counter() - t0
        truth = pair.mask.astype(bool)
        roc.add(scored.probability, truth)
        result = PairResult(
            name=pair.name,
            height=pair.shape[0],
            width=pair.shape[1],
            threshold=float(scored.threshold),
            pixels=pixel_counts(scored.mask, truth),
            auroc=auroc(scored.probability, truth),
            patches=(
                patch_counts(scored.mask, truth, info.patch_size, info.stride, 0.5)
                if scored.gated
                else patch_counts(
                    scored.probability, truth, info.patch_size, info.stride, scored.threshold
                )
            ),
            seconds=seconds,
        )
        results.append(result)
        if on_pair is not None:
            on_pair(pair, scored, result)
    if not results:
        raise ValueError("no pairs to evaluate")
    return Evaluation(
        model=info,
        pairs=tuple(results),
        pixels=sum((r.pixels for r in results), Counts()),
        auroc=roc.auroc(),
        patches=sum((r.patches for r in results), PatchCounts()),
        seconds=time.perf_counter() - t_start,
    )


# -------------------------------------------------------------------------------------- outputs

HIT, FALSE_ALARM, MISSED = (255, 255, 255), (255, 0, 0), (0, 128, 255)


def overlay_panels(
    before: np.ndarray,
    after: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray,
    max_width: int = 2000,
    gap: int = 8,
) -> np.ndarray:
    """before | after | truth (white) | prediction (white hit, red false alarm, blue missed),
    one (h, w, 3) uint8 picture, box-downscaled to at most ``max_width`` pixels wide."""
    truth, pred = truth.astype(bool), pred.astype(bool)
    h = truth.shape[0]
    truth_panel = np.zeros((*truth.shape, 3), np.uint8)
    truth_panel[truth] = 255
    pred_panel = np.zeros_like(truth_panel)
    pred_panel[pred & truth] = HIT
    pred_panel[pred & ~truth] = FALSE_ALARM
    pred_panel[~pred & truth] = MISSED
    spacer = np.full((h, gap, 3), 255, np.uint8)
    panels = [to_display(before), to_display(after), truth_panel, pred_panel]
    picture = np.concatenate([x for p in panels for x in (p, spacer)][:-1], axis=1)
    if picture.shape[1] <= max_width:
        return picture
    factor = max_width / picture.shape[1]
    size = (max_width, max(1, round(picture.shape[0] * factor)))
    return np.asarray(Image.fromarray(picture).resize(size, Image.Resampling.BOX))


def write_atomic(path: Path, data: bytes) -> Path:
    """Write beside ``path`` under a temporary name, then rename over it: a reader never sees a
    half-written file. Opened normally (not mkstemp), so the file gets the umask's permissions."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "pair"


def write_overlay(folder: Path, pair: ScenePair, scored: Scored) -> Path:
    """``folder/<pair name>.png``: the four-panel overlay, written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    picture = overlay_panels(pair.before, pair.after, pair.mask, scored.mask)
    return write_atomic(folder / f"{_file_stem(pair.name)}.png", encode_png(picture))


def _json_safe(value: Any) -> Any:
    """NaN and infinities as null: results.json stays standard JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _f(value: float, digits: int = 4) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def write_report(
    out: Path, evaluation: Evaluation, *, command: str, dataset: str, settings: dict[str, Any]
) -> dict[str, Path]:
    """report.md and results.json in ``out``, each written atomically."""
    from training.datasets.registry import parse_spec

    kind = parse_spec(dataset)[0]
    results = {
        "command": command,
        "dataset": {
            "spec": dataset,
            "kind": kind,
            "pairs": len(evaluation.pairs),
            "note": DATASET_NOTES.get(kind, ""),
        },
        "settings": settings,
        "definitions": {
            "patch_balanced_accuracy": PATCH_DEFINITION,
            "pooled": "every pixel (patch) of every pair counted together",
            "mean_over_pairs": "plain mean of the per-pair values, undefined ones skipped",
            "pooled_auroc": f"from {ROC_BINS}-bin score histograms, shared bins as ties",
        },
        **evaluation.as_dict(),
    }
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_json_safe(results), indent=1, allow_nan=False) + "\n"
    return {
        "results.json": write_atomic(out / "results.json", text.encode()),
        "report.md": write_atomic(
            out / "report.md", _markdown(evaluation, command, dataset, kind, settings).encode()
        ),
    }


def _markdown(
    ev: Evaluation, command: str, dataset: str, kind: str, settings: dict[str, Any]
) -> str:
    m = ev.model
    threshold = "per pair" if m.threshold is None else f"{m.threshold:.4f}"
    lines = [
        f"# Evaluation: {m.name} {m.version} on {kind}",
        "",
        "```",
        command,
        "```",
        "",
        "| | |",
        "|---|---|",
        f"| model | {m.name} {m.version} ({m.kind}{', ' + m.precision if m.precision else ''}) |",
        f"| threshold | {threshold} ({m.threshold_method}) |",
        f"| patch / stride | {m.patch_size} / {m.stride} px |",
        f"| model trained on | {'; '.join(m.training_data) or 'n/a'} |",
        f"| dataset | `{dataset}`, {len(ev.pairs)} pairs |",
        f"| dataset terms | {DATASET_NOTES.get(kind, 'unknown')} |",
        f"| bands | {settings.get('bands') or 'as stored'} |",
        f"| scale to uint8 | {_scaling(settings)} |",
        f"| time | {ev.seconds:.1f} s |",
        "",
        "## Overall",
        "",
        "| | precision | recall | F1 | IoU | AUROC | patch balanced accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, row in (("pooled", ev.pooled()), ("mean over pairs", ev.mean_over_pairs())):
        cells = " | ".join(_f(row[k]) for k in MEAN_KEYS)
        lines.append(f"| {label} | {cells} |")
    px, pc = ev.pixels, ev.patches.counts
    lines += [
        "",
        f"Pixels: {px.total} in all, {px.tp + px.fn} changed, {px.tp + px.fp} predicted; "
        f"TP {px.tp}, FP {px.fp}, FN {px.fn}, TN {px.tn}. Patches: {pc.tp + pc.fn} changed, "
        f"{pc.tn + pc.fp} unchanged, {ev.patches.ambiguous} ambiguous (left out); "
        f"TP {pc.tp}, FP {pc.fp}, FN {pc.fn}, TN {pc.tn}.",
        "",
        "## Per pair",
        "",
        "| pair | W x H | threshold | precision | recall | F1 | IoU | AUROC | patch BA "
        "| changed % | predicted % | TP | FP | FN | TN | patches +/-/? | overlay |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in ev.pairs:
        s, c, q = p.pixels.scores(), p.pixels, p.patches.counts
        lines.append(
            f"| {p.name} | {p.width}x{p.height} | {p.threshold:.4f} | {_f(s['precision'])} "
            f"| {_f(s['recall'])} | {_f(s['f1'])} | {_f(s['iou'])} | {_f(p.auroc)} "
            f"| {_f(p.patches.balanced_accuracy)} | {100 * (c.tp + c.fn) / c.total:.2f} "
            f"| {100 * (c.tp + c.fp) / c.total:.2f} | {c.tp} | {c.fp} | {c.fn} | {c.tn} "
            f"| {q.tp + q.fn}/{q.tn + q.fp}/{p.patches.ambiguous} "
            f"| [png](overlays/{_file_stem(p.name)}.png) |"
        )
    lines += [
        "",
        "## Definitions",
        "",
        "- Pixel metrics: the mask against the truth; pooled = every pixel of every pair counted "
        "together, mean over pairs = the plain mean of the per-pair values (undefined ones, n/a, "
        "skipped).",
        "- AUROC: of the probability map over pixels; per pair exact (rank statistic), pooled "
        f"from {ROC_BINS}-bin histograms of the scores (scores in one bin count as ties).",
        f"- Patch balanced accuracy: {PATCH_DEFINITION}.",
        "- Overlays: before | after | truth (white) | prediction (white: hit, red: false alarm, "
        "blue: missed), box-downscaled to at most 2000 px wide.",
        "",
    ]
    if m.kind == "baseline":
        lines.insert(-1, f"- {m.name}: {m.description}.")
    return "\n".join(lines)


def _scaling(settings: dict[str, Any]) -> str:
    if not settings.get("scale_to_uint8"):
        return "no"
    return "yes: per pair and band, the 2nd-98th percentiles of both dates mapped to 0-255"
