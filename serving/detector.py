"""The core of DetectChange, free of gRPC: tile the pair, batch the patches, stitch, threshold.

The servicer converts messages to and from these types; everything here speaks numpy and raises the
project's own errors, so the same core serves the CLI, batch scoring and tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from serving import cva, tiling
from serving.errors import InvalidInput
from serving.metadata import MASK_RULES, ModelMetadata
from serving.models import ModelRepository
from serving.regions import Region, find_regions

ALL_OUTPUTS = frozenset({"tiles", "probability_map", "mask", "regions"})


@dataclass(frozen=True)
class DetectRequest:
    before: np.ndarray  # (H, W, C)
    after: np.ndarray  # (H, W, C)
    model: str = ""
    model_version: str = ""
    stride: int = 0  # 0: the model's recommended stride
    threshold: float | None = None  # None: the model's default threshold
    # one of MASK_RULES; None: "threshold" when a threshold is given, else the model's default
    mask_rule: str | None = None
    outputs: frozenset[str] = ALL_OUTPUTS
    min_region_area_px: int = 0
    deadline: float | None = None  # time.monotonic() seconds


@dataclass
class Detection:
    metadata: ModelMetadata
    stride: int
    threshold: float  # on the probability (mask rule "threshold"; nan for "cva-gated")
    lattice: tiling.Lattice  # the tiles, row-major
    tile_probabilities: np.ndarray  # (N,)
    probability: np.ndarray  # (H, W) float32
    mask: np.ndarray  # (H, W) bool
    regions: list[Region]
    timings_ms: dict[str, float] = field(default_factory=dict)
    mask_rule: str = "threshold"
    gated_cut: float | None = None  # "cva-gated": the cut on magnitude x probability

    @property
    def changed_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


class ChangeDetectionCore:
    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    def detect(self, req: DetectRequest, decode_ms: float = 0.0) -> Detection:
        t_start = time.perf_counter()
        served = self.repository.get(req.model, req.model_version)
        meta = served.metadata
        check_compatible(req.before, req.after, meta)
        stride = req.stride or meta.recommended_stride
        if not 1 <= stride <= meta.patch_size:
            raise InvalidInput(
                f"stride {stride} must be between 1 and the patch size {meta.patch_size}"
            )
        rule = resolve_mask_rule(req.mask_rule, req.threshold, meta)
        gated = rule == "cva-gated"
        threshold = meta.default_threshold if req.threshold is None else req.threshold
        if not 0.0 <= threshold <= 1.0 or not np.isfinite(threshold):
            raise InvalidInput(f"threshold must be in [0, 1], got {threshold}")

        h, w = req.before.shape[:2]
        grid = tiling.lattice(h, w, meta.patch_size, stride)
        # the queue's bound, checked before tiling: the patches of a few-KB PNG at stride 1 are
        # gigabytes, which submit() would refuse only after they had been cut out
        count = len(grid)
        if count > served.batcher.max_queue_size:
            raise InvalidInput(
                f"the pair needs {count} patches at stride {stride}, more than the queue holds "
                f"({served.batcher.max_queue_size}); use a larger stride, a smaller image, or the "
                "streaming/batch scoring path"
            )
        served.batcher.check_room(count)  # a full queue refuses before any tiling work
        before, after = tiling.extract_grid(req.before, req.after, meta.patch_size, stride)
        t_tiled = time.perf_counter()
        remaining = None if req.deadline is None else max(0.0, req.deadline - time.monotonic())
        job = served.batcher.submit(before, after, req.deadline)
        probs = job.result(timeout=remaining)
        t_scored = time.perf_counter()

        prob_map = grid.stitch(probs, h, w)
        cut = None
        if gated:
            mask, cut = cva.gated_mask(req.before, req.after, prob_map)
            threshold = float("nan")
        else:
            mask = prob_map >= threshold
        regions = (
            find_regions(mask, prob_map, req.min_region_area_px) if "regions" in req.outputs else []
        )
        t_end = time.perf_counter()
        queue_ms = job.queue_s * 1e3
        timings = {
            "decode_ms": decode_ms,
            "queue_ms": queue_ms,
            "inference_ms": job.inference_s * 1e3,
            "stitch_ms": (t_tiled - t_start + t_end - t_scored) * 1e3,
            "total_ms": decode_ms + (t_end - t_start) * 1e3,
        }
        return Detection(
            meta,
            stride,
            threshold,
            grid,
            probs,
            prob_map,
            mask,
            regions,
            timings,
            mask_rule=rule,
            gated_cut=cut,
        )


def resolve_mask_rule(rule: str | None, threshold: float | None, meta: ModelMetadata) -> str:
    """The rule a request gets: the one it names; else a threshold it sets means the threshold
    rule; else the model's default. Naming the gated rule and a threshold is a contradiction."""
    if rule is None:
        return "threshold" if threshold is not None else meta.default_mask_rule
    if rule not in MASK_RULES:
        raise InvalidInput(f"mask_rule must be one of {MASK_RULES}, got {rule!r}")
    if rule == "cva-gated" and threshold is not None:
        raise InvalidInput(
            "threshold is not used by the cva-gated mask rule (it cuts each pair at its own "
            "outliers); unset it"
        )
    return rule


def check_compatible(before: np.ndarray, after: np.ndarray, meta: ModelMetadata) -> None:
    """The pair must match each other and what the model was trained on: no silent conversion."""
    if before.shape != after.shape or before.dtype != after.dtype:
        raise InvalidInput(
            f"before is {_describe(before)}, after is {_describe(after)}; "
            "register and crop the pair to one grid first"
        )
    if before.ndim != 3 or before.shape[0] < 1 or before.shape[1] < 1:
        raise InvalidInput(f"images must be (height, width, channels), got {before.shape}")
    if before.shape[2] != meta.channels:
        raise InvalidInput(
            f"model {meta.name!r} takes {meta.channels} channels ({', '.join(meta.band_names)}), "
            f"the images have {before.shape[2]}"
        )
    if before.dtype != np.dtype(meta.input_dtype):
        raise InvalidInput(
            f"model {meta.name!r} takes {meta.input_dtype} pixels, the images are {before.dtype}"
        )


def _describe(a: np.ndarray) -> str:
    return "x".join(map(str, a.shape)) + f" {a.dtype}"
