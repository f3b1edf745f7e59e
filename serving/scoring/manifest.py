"""Many pairs: a CSV manifest scored by a pool of workers, each holding one loaded model.

Engines: ``local`` (a process pool on this machine, the default) and ``ray`` (Ray actors, on a
local Ray started for the run or on a cluster at ``ray_address``). A pair that fails is retried
``retries`` times (resuming its finished blocks); the others go on. ``manifest_results.csv``
records every pair's status, attempts, error and outputs, rewritten atomically as pairs finish, so
it is complete even if the run is stopped.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from serving.config import ServerSettings
from serving.memory import tune_malloc
from serving.scoring.pair import ModelScorer, ScoreOptions, score_pair
from serving.scoring.rasters import PairError, UnreadableInput, UsageProblem, parse_bands

log = logging.getLogger(__name__)

Engine = Literal["local", "ray"]
RESULT_COLUMNS = (
    "id",
    "before",
    "after",
    "status",
    "attempts",
    "error",
    "out",
    "changed_pixels",
    "changed_area_m2",
    "polygons",
    "seconds",
)


class ManifestError(UsageProblem):
    """The manifest itself is wrong (columns, ids, empty): nothing is scored."""


@dataclass(frozen=True)
class PairJob:
    id: str
    before: Path
    after: Path
    bands: tuple[int, ...] | None = None


@dataclass
class PairOutcome:
    job: PairJob
    status: str = "pending"  # done | already complete | failed
    attempts: int = 0
    error: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def read_manifest(path: Path) -> list[PairJob]:
    """Rows of ``before,after[,id][,bands]``; relative paths are relative to the manifest."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ManifestError(f"cannot read the manifest {path}: {exc}") from exc
    reader = csv.DictReader(io.StringIO(text))
    columns = {c.strip() for c in reader.fieldnames or []}
    missing = {"before", "after"} - columns
    if missing:
        raise ManifestError(
            f"{path}: needs columns before and after (optional: id, bands); has {sorted(columns)}"
        )
    jobs, seen = [], set()
    for n, raw in enumerate(reader, start=2):
        row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
        if not row.get("before") or not row.get("after"):
            raise ManifestError(f"{path} line {n}: before and after must both be given")
        pair_id = row.get("id") or f"{n - 1:05d}-{Path(row['before']).stem}"
        if not re.fullmatch(r"[A-Za-z0-9._-]+", pair_id):
            raise ManifestError(
                f"{path} line {n}: id {pair_id!r} must be letters, digits, '.', '_' or '-' "
                "(it names the pair's output folder)"
            )
        if pair_id in seen:
            raise ManifestError(f"{path} line {n}: id {pair_id!r} appears twice")
        seen.add(pair_id)
        try:
            bands = parse_bands(row.get("bands"))
        except UsageProblem as exc:
            raise ManifestError(f"{path} line {n}: {exc}") from exc
        jobs.append(
            PairJob(pair_id, _resolve(path, row["before"]), _resolve(path, row["after"]), bands)
        )
    if not jobs:
        raise ManifestError(f"{path}: no pairs")
    return jobs


def _resolve(manifest: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (manifest.parent / p)


# ------------------------------------------------------------------------------- one worker
_WORKER: ModelScorer | None = None


def _init_worker(settings: ServerSettings, model: str) -> None:
    global _WORKER
    tune_malloc()
    _WORKER = ModelScorer(settings, model)


def _score_in_worker(job: PairJob, out: Path, options: ScoreOptions) -> dict[str, Any]:
    assert _WORKER is not None, "worker not initialised"
    return run_job(_WORKER, job, out, options)


def run_job(scorer: ModelScorer, job: PairJob, out: Path, options: ScoreOptions) -> dict[str, Any]:
    """One attempt at one pair; raises on failure (the engine retries)."""
    if job.bands is not None:
        options = replace(options, bands_before=job.bands, bands_after=job.bands)
    return score_pair(job.before, job.after, out / job.id, scorer, options, progress=False)


def retriable(exc: BaseException | None) -> bool:
    """Worth another attempt: crashes, I/O errors and unreadable files may be transient; a
    judgement about the data or the flags (footprints apart, wrong bands) is not."""
    return not isinstance(exc, PairError) or isinstance(exc, UnreadableInput)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, PairError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}".strip()


# ---------------------------------------------------------------------------------- engines
def score_manifest(
    jobs: list[PairJob],
    out: Path,
    settings: ServerSettings,
    model: str,
    options: ScoreOptions,
    engine: Engine = "local",
    workers: int = 1,
    retries: int = 1,
    ray_address: str | None = None,
    progress: bool = True,
) -> list[PairOutcome]:
    """Score every pair; returns the outcomes in manifest order (also ``manifest_results.csv``)."""
    if workers < 1:
        raise UsageProblem(f"--workers must be >= 1, got {workers}")
    if retries < 0:
        raise UsageProblem(f"--retries must be >= 0, got {retries}")
    out.mkdir(parents=True, exist_ok=True)
    outcomes = {j.id: PairOutcome(j) for j in jobs}
    results_path = out / "manifest_results.csv"
    write_results(results_path, list(outcomes.values()), out)
    run = _run_local if engine == "local" else _run_ray
    with tqdm(total=len(jobs), unit="pair", desc="pairs", disable=not progress) as bar:

        def finished(outcome: PairOutcome) -> None:
            outcomes[outcome.job.id] = outcome
            write_results(results_path, list(outcomes.values()), out)
            bar.update(1)
            if outcome.status == "failed":
                log.error("pair %s failed: %s", outcome.job.id, outcome.error)

        run(jobs, out, settings, model, options, workers, retries, ray_address, finished)
    return [outcomes[j.id] for j in jobs]


def _attempts(
    jobs: list[PairJob],
    options: ScoreOptions,
    retries: int,
    start: Callable[[PairJob, ScoreOptions], Any],
    done: Callable[[list[Any]], Iterator[tuple[Any, dict[str, Any] | None, BaseException | None]]],
    finished: Callable[[PairOutcome], None],
    capacity: int,
) -> None:
    """The engine-independent loop: keep ``capacity`` attempts in flight, retry failures with
    resume on, report each pair once when it succeeds or runs out of attempts."""
    queue = list(jobs)
    state = {j.id: PairOutcome(j) for j in jobs}
    flight: dict[Any, tuple[PairJob, float]] = {}
    while queue or flight:
        while queue and len(flight) < capacity:
            job = queue.pop(0)
            o = state[job.id]
            o.attempts += 1
            # a retry resumes the blocks the failed attempt finished
            opts = replace(options, resume=options.resume or o.attempts > 1)
            flight[start(job, opts)] = (job, time.perf_counter())
        for handle, summary, error in done(list(flight)):
            job, t0 = flight.pop(handle)
            o = state[job.id]
            o.seconds += time.perf_counter() - t0
            if error is None and summary is not None:
                o.status, o.summary, o.error = summary.get("status", "done"), summary, ""
                finished(o)
            elif o.attempts <= retries and retriable(error):
                o.error = _error_text(error)
                log.warning("pair %s attempt %d failed (%s); retrying", job.id, o.attempts, o.error)
                queue.append(job)
            else:
                o.status, o.error = "failed", _error_text(error)
                finished(o)


def _run_local(
    jobs: list[PairJob],
    out: Path,
    settings: ServerSettings,
    model: str,
    options: ScoreOptions,
    workers: int,
    retries: int,
    ray_address: str | None,
    finished: Callable[[PairOutcome], None],
) -> None:
    pools: list[ProcessPoolExecutor] = []

    def pool() -> ProcessPoolExecutor:
        """The live pool; a new one when a worker died (a crash breaks the whole pool)."""
        if not pools or getattr(pools[-1], "_broken", False):
            if pools:
                pools[-1].shutdown(wait=False, cancel_futures=True)
            pools.append(
                ProcessPoolExecutor(
                    max_workers=workers, initializer=_init_worker, initargs=(settings, model)
                )
            )
        return pools[-1]

    def start(job: PairJob, opts: ScoreOptions) -> Future:
        return pool().submit(_score_in_worker, job, out, opts)

    def done(handles: list[Future]) -> Iterator[tuple[Future, Any, BaseException | None]]:
        ready, _ = wait(handles, return_when=FIRST_COMPLETED)
        for f in ready:
            exc = f.exception()
            yield f, None if exc else f.result(), exc

    try:
        _attempts(jobs, options, retries, start, done, finished, workers)
    finally:
        for p in pools:
            p.shutdown(wait=True, cancel_futures=True)


def _run_ray(
    jobs: list[PairJob],
    out: Path,
    settings: ServerSettings,
    model: str,
    options: ScoreOptions,
    workers: int,
    retries: int,
    ray_address: str | None,
    finished: Callable[[PairOutcome], None],
) -> None:
    try:
        import ray
    except ImportError as exc:
        raise UsageProblem("--engine ray needs Ray: pip install 'rarechange[ray]'") from exc

    started_here = not ray.is_initialized()
    if started_here:
        if ray_address:
            ray.init(address=ray_address, log_to_driver=False)
        else:
            ray.init(
                num_cpus=workers,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(_source_paths())}},
            )

    @ray.remote(num_cpus=1)
    class Worker:
        def __init__(self) -> None:
            self.scorer = ModelScorer(settings, model)

        def score(self, job: PairJob, opts: ScoreOptions) -> dict[str, Any]:
            return run_job(self.scorer, job, out, opts)

    actors = [Worker.remote() for _ in range(workers)]
    idle = list(actors)
    owner: dict[Any, Any] = {}
    try:

        def start(job: PairJob, opts: ScoreOptions) -> Any:
            actor = idle.pop()
            ref = actor.score.remote(job, opts)
            owner[ref] = actor
            return ref

        def done(refs: list[Any]) -> Iterator[tuple[Any, Any, BaseException | None]]:
            ready, _ = ray.wait(refs, num_returns=1)
            for ref in ready:
                actor = owner.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # the pair failed in the worker
                    idle.append(actor)
                    cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                    yield ref, None, cause
                    continue
                except ray.exceptions.RayError as exc:  # the worker died: a new one replaces it
                    fresh = Worker.remote()
                    actors.append(fresh)
                    idle.append(fresh)
                    yield ref, None, exc
                    continue
                idle.append(actor)
                yield ref, result, None

        _attempts(jobs, options, retries, start, done, finished, workers)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_here:
            ray.shutdown()


def _source_paths() -> list[str]:
    """The folder holding the ``serving`` package (a source checkout is not always installed)."""
    import serving

    return [str(Path(serving.__file__).resolve().parent.parent)]


# ----------------------------------------------------------------------------------- results
def write_results(path: Path, outcomes: list[PairOutcome], out: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        w.writeheader()
        for o in outcomes:
            counts = o.summary.get("counts", {})
            w.writerow(
                {
                    "id": o.job.id,
                    "before": str(o.job.before),
                    "after": str(o.job.after),
                    "status": o.status,
                    "attempts": o.attempts,
                    "error": o.error,
                    "out": str(out / o.job.id) if o.summary else "",
                    "changed_pixels": counts.get("changed_pixels", ""),
                    "changed_area_m2": (
                        f"{counts['changed_area_m2']:.3f}" if "changed_area_m2" in counts else ""
                    ),
                    "polygons": o.summary.get("polygons", {}).get("polygons", ""),
                    "seconds": f"{o.seconds:.3f}" if o.attempts else "",
                }
            )
    os.replace(tmp, path)
