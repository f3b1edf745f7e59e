"""Score one GeoTIFF pair into georeferenced outputs: the batch path of `rarechange score`.

Blocks of the reference grid are read, scored by the model's batcher and backend (the server's
own), stitched (:mod:`serving.scoring.blocks`), kept as finished blocks and staged into both COGs
as they finish; the COG copies, polygons, quicklook and summary are made at the end.
``summary.json`` is written last: its presence means the run is complete. A run killed at any
point continues with ``resume=True`` and gives the same pixels as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window
from tqdm import tqdm

from serving import __version__, cva
from serving.config import ServerSettings
from serving.detector import resolve_mask_rule
from serving.errors import InvalidInput
from serving.metadata import ModelMetadata
from serving.models import ModelRepository
from serving.scoring import blocks as blk
from serving.scoring.outputs import (
    PROBABILITY_NODATA,
    UINT8_NODATA,
    UINT8_SCALE,
    BlockStore,
    CogWriter,
    ProbabilityType,
    mask_pixels,
    probability_pixels,
    remove_tree,
    write_json_atomic,
    writing,
)
from serving.scoring.polygons import PolygonOptions, metres_per_unit, write_geojson
from serving.scoring.quicklook import Canvas, write_quicklook
from serving.scoring.rasters import PairError, RasterPair, UsageProblem, file_sha256

log = logging.getLogger(__name__)

PARTIAL = ".rarechange-partial"
OUTPUTS = (
    "change_probability.tif",
    "change_mask.tif",
    "changes.geojson",
    "quicklook.png",
    "summary.json",
)


@dataclass(frozen=True)
class ScoreOptions:
    bands_before: tuple[int, ...] | None = None
    bands_after: tuple[int, ...] | None = None
    resampling: str = "bilinear"  # for an after image on another grid
    rescale: tuple[float, float] | None = None  # raster values -> the model's input range
    stride: int = 0  # 0: the model's recommended stride
    threshold: float | None = None  # None: the model's default threshold
    # "threshold", or "cva-gated": CVA's magnitude (z-scores by the whole rasters' valid pixels)
    # times the probability, cut at the scene's outliers (serving.cva.gated_mask, block by block);
    # None: the model's default, or "threshold" when a threshold is given
    mask_rule: str | None = None
    probability_dtype: ProbabilityType = "float32"
    block_size: int = 512
    polygons: PolygonOptions = field(default_factory=PolygonOptions)
    quicklook: bool = True
    resume: bool = False
    overwrite: bool = False
    gdal_cache_mb: int = 8  # GDAL's block cache; its default (5 % of RAM) grows with the scene


class ModelScorer:
    """One loaded model (its backends and dynamic batcher), reused for every pair a worker
    scores. ``submit`` is what blocks call: the same batcher and backend as the server's."""

    def __init__(self, settings: ServerSettings, model: str = "") -> None:
        self.repository = ModelRepository.load(settings, only=model or settings.default_model)
        try:
            self.served = self.repository.get(model)
            if settings.warmup:  # first batches allocate and tune: a cost of loading, not of a pair
                m = self.served.metadata
                self.served.batcher.warm_up((m.channels, m.patch_size, m.patch_size), m.input_dtype)
            self.repository.start()
        except BaseException:
            self.repository.stop()
            raise

    @property
    def metadata(self) -> ModelMetadata:
        return self.served.metadata

    def submit(self, before: np.ndarray, after: np.ndarray) -> Callable[[], np.ndarray]:
        return self.served.batcher.submit(before, after).result

    def close(self) -> None:
        self.repository.stop()

    def __enter__(self) -> ModelScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def score_pair(
    before: Path,
    after: Path,
    out: Path,
    scorer: ModelScorer,
    options: ScoreOptions = ScoreOptions(),
    progress: bool = True,
) -> dict[str, Any]:
    """Score ``before``/``after`` into ``out``; returns the summary (also ``out/summary.json``)."""
    # rasterio passes an int GDAL_CACHEMAX to GDALSetCacheMax64: bytes, not megabytes
    with (
        rasterio.Env(GDAL_CACHEMAX=options.gdal_cache_mb * 1024 * 1024),
        writing(out, out / PARTIAL / "blocks"),  # a full disk is said plainly, where it strikes
    ):
        return _score_pair(before, after, out, scorer, options, progress)


def _score_pair(
    before: Path,
    after: Path,
    out: Path,
    scorer: ModelScorer,
    options: ScoreOptions,
    progress: bool,
) -> dict[str, Any]:
    t_start = time.perf_counter()
    meta = scorer.metadata
    stride = options.stride or meta.recommended_stride
    if not 1 <= stride <= meta.patch_size:
        raise UsageProblem(
            f"stride {stride} must be between 1 and the patch size {meta.patch_size}"
        )
    try:
        rule = resolve_mask_rule(options.mask_rule, options.threshold, meta)
    except InvalidInput as exc:
        raise UsageProblem(str(exc)) from exc
    gated = rule == "cva-gated"
    threshold = meta.default_threshold if options.threshold is None else options.threshold
    if not 0.0 <= threshold <= 1.0:
        raise UsageProblem(f"threshold must be in [0, 1], got {threshold}")
    if options.block_size < meta.patch_size:
        raise UsageProblem(
            f"block size {options.block_size} is smaller than the patch {meta.patch_size}"
        )
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    partial = out / PARTIAL

    t0 = time.perf_counter()
    inputs = {"before": _file_info(before), "after": _file_info(after)}
    checksum_s = time.perf_counter() - t0
    job = {
        "inputs": {k: v["sha256"] for k, v in inputs.items()},
        "model": [meta.name, meta.version, meta.weights_sha256],
        "bands": [options.bands_before, options.bands_after],
        "resampling": options.resampling,
        "rescale": options.rescale,
        "stride": stride,
    }
    # what a finished run's files depend on: not the block size (the partial run's block
    # files do), but the threshold and the output options
    produced = {
        **job,
        "threshold": threshold,
        **({"mask_rule": rule, "gate_window": cva.GATE_WINDOW} if gated else {}),
        "outputs": [options.probability_dtype, asdict(options.polygons), options.quicklook],
    }
    pixels = hashlib.sha256(json.dumps(produced, sort_keys=True).encode()).hexdigest()[:16]
    job["block_size"] = options.block_size
    digest = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]
    # refuse a pair that cannot be scored before touching anything in `out`
    RasterPair.open(
        before,
        after,
        meta,
        options.bands_before,
        options.bands_after,
        options.resampling,
        options.rescale,
    ).close()

    if summary_path.exists() and not options.overwrite:
        done = json.loads(summary_path.read_text())
        if not options.resume:
            raise UsageProblem(
                f"{out} already holds a finished run ({summary_path}); pass --overwrite to "
                "replace it or choose another --out"
            )
        if done.get("pixels") != pixels:
            raise UsageProblem(
                f"{out} holds a finished run made with other inputs, model or settings; pass "
                "--overwrite to replace it"
            )
        log.info("%s: already complete", out)
        return {**done, "status": "already complete"}
    job_path = partial / "job.json"
    if partial.exists():
        previous = json.loads(job_path.read_text()).get("digest") if job_path.exists() else None
        if options.resume and previous is not None and previous != digest:
            raise UsageProblem(
                f"the unfinished run in {out} was made with other inputs, model or settings; run "
                "without --resume to start over"
            )
        if not options.resume or previous is None:
            remove_tree(partial)
    summary_path.unlink(missing_ok=True)
    store = BlockStore(partial / "blocks")
    write_json_atomic(job_path, {"digest": digest, **job})

    with RasterPair.open(
        before,
        after,
        meta,
        options.bands_before,
        options.bands_after,
        options.resampling,
        options.rescale,
    ) as pair:
        if pair.warped:
            log.warning(
                "%s is not on the grid of %s (%s): warping it onto that grid (%s)",
                after,
                before,
                pair.warped,
                options.resampling,
            )
        grid = pair.grid
        plan = blk.plan(grid.height, grid.width, options.block_size)
        todo = [b for b in plan if not store.has(b.index)]
        canvas = Canvas(grid.height, grid.width, len(pair.bands_before))
        resumed = len(plan) - len(todo)
        counts = {"valid": 0, "changed": 0}
        area = _PixelArea(grid)
        changed_m2 = [0.0]
        tags = {
            "model": f"{meta.name} {meta.version}",
            **({"mask_rule": "cva-gated"} if gated else {"threshold": f"{threshold:.6g}"}),
            "stride": str(stride),
            "software": f"rarechange {__version__}",
        }
        float_map = options.probability_dtype == "float32"

        def stage(block: blk.Block, prob: np.ndarray) -> None:
            """A finished block into both COGs' staging rasters (on the staging thread only)."""
            prob_cog.add(block, probability_pixels(prob, options.probability_dtype))
            counts["valid"] += int((~np.isnan(prob)).sum())
            if not gated:  # the gated mask needs the whole scene's cut: made after scoring
                add_mask(block, mask_pixels(prob, threshold))
            canvas.add_probability(block, prob)

        def add_mask(block: blk.Block, m: np.ndarray) -> None:
            changed = m == 1
            counts["changed"] += int(changed.sum())
            changed_m2[0] += area.of(block, changed)
            mask_cog.add(block, m)

        t0 = time.perf_counter()
        patches = 0
        # finished blocks are staged on a thread of their own while the next ones are scored, so
        # that only the COG copies are left after the last block; at most one block waits for
        # the thread, so memory stays bounded
        with (
            CogWriter(
                out / "change_probability.tif",
                grid,
                plan,
                "float32" if float_map else "uint8",
                PROBABILITY_NODATA if float_map else UINT8_NODATA,
                "average",
                tags=tags,
                scale=None if float_map else 1.0 / UINT8_SCALE,
                description="change probability",
                work=partial,
            ) as prob_cog,
            CogWriter(
                out / "change_mask.tif",
                grid,
                plan,
                "uint8",
                UINT8_NODATA,
                "nearest",
                tags=tags,
                description="change mask (1 = change)",
                work=partial,
            ) as mask_cog,
            tqdm(
                total=grid.pixels,
                initial=sum(b.height * b.width for b in plan if store.has(b.index)),
                unit="px",
                unit_scale=True,
                desc=f"scoring {before.name}",
                disable=not progress,
            ) as bar,
            _Staging(stage, waiting=1) as staging,
        ):
            for block in plan:  # blocks a previous attempt scored
                if store.has(block.index):
                    staging.put(block, store.load(block.index))

            # tiles on a block edge are scored once, by the first block that holds them
            book = blk.TileBook(keep=-(-grid.width // options.block_size) + 1)

            def jobs() -> Iterator[blk.BlockJob]:
                for block in todo:  # read lazily: while the previous block is being scored
                    tiles = blk.tiles_for(block, grid.height, grid.width, meta.patch_size, stride)
                    b_img, a_img, valid = pair.read(tiles.read)
                    canvas.add(block, (tiles.read.row_off, tiles.read.col_off), b_img, a_img, valid)
                    yield blk.BlockJob(
                        block, b_img, a_img, valid, tiles, meta.patch_size, stride, book
                    )

            for job, prob in blk.score_blocks(jobs(), scorer.submit):
                store.save(job.block.index, prob)
                staging.put(job.block, prob)
                patches += job.patches
                bar.update(job.block.height * job.block.width)
            staging.drain()
            gated_cut = None
            if gated:
                gated_cut = _gated_masks(pair, plan, store, partial, add_mask)
            score_s = time.perf_counter() - t0

            t0 = time.perf_counter()
            if options.quicklook:
                scored = {b.index for b in todo}
                for block in plan:  # blocks a previous attempt scored: read them for the picture
                    if block.index not in scored:
                        canvas.add(block, (block.row, block.col), *pair.read(block.window))
            quicklook_s = [0.0]

            def quicklook() -> None:
                if options.quicklook:
                    t = time.perf_counter()
                    write_quicklook(out / "quicklook.png", canvas)
                    quicklook_s[0] = time.perf_counter() - t

            # the picture is drawn beside the COG copies; the copies run one after the other:
            # side by side, each holds GDAL's buffers for a whole scene's worth of tiles at once
            # (+30 MB at 16k x 16k) for a gain only on the smallest scenes
            with ThreadPoolExecutor(1, thread_name_prefix="quicklook") as side:
                picture = side.submit(quicklook)
                prob_path, mask_path = prob_cog.finish(), mask_cog.finish()
                picture.result()
        write_s = time.perf_counter() - t0  # the quicklook included: it is drawn beside them

        t0 = time.perf_counter()
        vectors = write_geojson(out / "changes.geojson", mask_path, prob_path, options.polygons)
        vector_s = time.perf_counter() - t0
        described = pair.describe()

    valid = counts["valid"]
    summary = {
        "status": "done",
        "job": digest,
        "pixels": pixels,
        "before": str(before),
        "after": str(after),
        "inputs": inputs,
        "model": {
            "name": meta.name,
            "version": meta.version,
            "weights_sha256": meta.weights_sha256,
            "patch_size": meta.patch_size,
            "input_dtype": meta.input_dtype,
        },
        "stride": stride,
        **(
            {
                "mask_rule": "cva-gated",
                "gated_cut": gated_cut,
                "gate_window": cva.GATE_WINDOW,
                "gate_spread": cva.GATE_SPREAD,
                "gate_floor": cva.GATE_FLOOR,
            }
            if gated
            else {"mask_rule": "threshold", "threshold": threshold}
        ),
        **described,
        "outputs": {name: name for name in OUTPUTS if name != "quicklook.png" or options.quicklook},
        "probability_dtype": options.probability_dtype,
        "counts": {
            "pixels": grid.pixels,
            "valid_pixels": valid,
            "nodata_pixels": grid.pixels - valid,
            "changed_pixels": counts["changed"],
            "changed_fraction_of_valid": counts["changed"] / valid if valid else 0.0,
            "changed_area_m2": changed_m2[0],
            "blocks": len(plan),
            "blocks_resumed": resumed,
            "patches_scored_this_run": patches,
        },
        "polygons": {**vectors, **asdict(options.polygons)},
        "timings_s": {
            "checksums": round(checksum_s, 3),
            "scoring": round(score_s, 3),
            "writing": round(write_s, 3),
            "polygons": round(vector_s, 3),
            "quicklook": round(quicklook_s[0], 3),  # beside the probability COG's copy
            "total": round(time.perf_counter() - t_start, 3),
        },
        "megapixels_per_second": round(sum(b.height * b.width for b in todo) / 1e6 / score_s, 4)
        if todo and score_s > 0
        else None,
        "software": f"rarechange {__version__}",
    }
    write_json_atomic(summary_path, summary)
    remove_tree(partial)
    return summary


def _gated_masks(
    pair: RasterPair,
    plan: list[blk.Block],
    probabilities: BlockStore,
    partial: Path,
    add_mask: Callable[[blk.Block, np.ndarray], None],
) -> float:
    """The cva-gated mask of every block, and the scene's cut. Three passes over the blocks, one
    in memory at a time: the dates' band moments over valid pixels; CVA (window-averaged over a
    halo read around the block, so blocks join seamlessly) x probability per block, kept on disk
    (NaN = nodata) for the cut's passes (exact medians, a few reads); the masks. Kept scores
    are reused on resume."""
    fused = BlockStore(partial / f"gated-w{cva.GATE_WINDOW}")
    r = cva.GATE_WINDOW // 2
    if not all(fused.has(b.index) for b in plan):
        channels = len(pair.bands_before)
        moments = (cva.Moments(channels), cva.Moments(channels))
        for block in plan:
            before, after, valid = pair.read(block.window)
            if valid.all():  # no copy of the block's pixels
                before, after = before.reshape(-1, channels), after.reshape(-1, channels)
            else:
                before, after = before[valid], after[valid]
            moments[0].add(before)
            moments[1].add(after)
        for block in plan:
            if fused.has(block.index):
                continue
            top, left = max(0, block.row - r), max(0, block.col - r)
            bottom = min(pair.grid.height, block.row + block.height + r)
            right = min(pair.grid.width, block.col + block.width + r)
            before, after, valid = pair.read(Window(left, top, right - left, bottom - top))
            score = cva.gate_magnitude(before, after, moments, valid)[
                block.row - top : block.row - top + block.height,
                block.col - left : block.col - left + block.width,
            ]
            score *= probabilities.load(block.index)  # NaN where nodata
            fused.save(block.index, score)
    cut = cva.gate_cut_of(lambda: (fused.load(b.index) for b in plan))
    for block in plan:
        score = fused.load(block.index)
        with np.errstate(invalid="ignore"):
            m = (score > cut).astype(np.uint8)
        m[np.isnan(score)] = UINT8_NODATA
        add_mask(block, m)
    return cut


def _file_info(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PairError(f"no such file: {path}")
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)}


class _Staging:
    """``put(block, prob)`` runs ``stage(block, prob)`` on one worker thread, in order; the
    caller blocks once ``waiting`` blocks are queued, and the first failure is raised to it."""

    def __init__(self, stage: Callable[[blk.Block, np.ndarray], None], waiting: int) -> None:
        self.stage, self.waiting = stage, waiting
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="staging")
        self.pending: deque[Future[None]] = deque()

    def put(self, block: blk.Block, prob: np.ndarray) -> None:
        self.pending.append(self.pool.submit(self.stage, block, prob))
        while len(self.pending) > self.waiting:
            self.pending.popleft().result()

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def __enter__(self) -> _Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self.pending:  # on failure: nothing more is staged into files about to go
            f.cancel()
        self.pool.shutdown(wait=True)


class _PixelArea:
    """Square metres of changed pixels: pixel area for projected CRSs; for geographic ones the
    spherical area of each row's pixels at its latitude (exact enough for reporting)."""

    EARTH_RADIUS_M = 6_371_008.8

    def __init__(self, grid: Any) -> None:
        t = grid.transform
        self.grid = grid
        self.geographic = grid.crs is not None and grid.crs.is_geographic
        unit = 1.0 if self.geographic else metres_per_unit(grid.crs)
        self.pixel_m2 = abs(t.a * t.e - t.b * t.d) * unit * unit

    def of(self, block: blk.Block, changed: np.ndarray) -> float:
        if not self.geographic:
            return float(changed.sum()) * self.pixel_m2
        t = self.grid.transform
        rows = np.arange(block.row, block.row + block.height) + 0.5
        lat = np.radians(t.f + rows * t.e + (block.col + block.width / 2) * t.d)
        r = self.EARTH_RADIUS_M
        row_m2 = abs(math.radians(t.a) * math.radians(t.e)) * r * r * np.cos(lat)
        return float((changed.sum(axis=1) * row_m2).sum())
