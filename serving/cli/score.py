"""`rarechange score`: whole GeoTIFF scenes, one pair or a manifest of many, streamed in blocks.

Exit codes: 0 every pair done; 1 some pairs failed (each with its error in the output); 2 bad
usage (flags, bands or pixel types that do not fit the model, an unreadable manifest).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from serving.cli.options import mask_rule_option

log = logging.getLogger(__name__)


def _pair_of_floats(text: str | None) -> tuple[float, float] | None:
    if not text:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise click.BadParameter(f"{text!r}: give LOW,HIGH, e.g. 0,3000") from exc
    return lo, hi


@click.command()
@click.argument("before", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.argument("after", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Output folder (one sub-folder per pair with --manifest).",
)
@click.option(
    "--manifest",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="CSV with columns before, after (optional id, bands): score many pairs.",
)
@click.option("--model", default="", help="Model name (default: the repository's default).")
@click.option(
    "--models-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of <name>/model.onnx (default: $RARECHANGE_MODELS_DIR, else bundled).",
)
@click.option("--bands", default=None, help="1-based bands of both images, model order: 3,2,1.")
@click.option("--bands-before", default=None, help="Bands of the before image (over --bands).")
@click.option("--bands-after", default=None, help="Bands of the after image (over --bands).")
@click.option(
    "--rescale",
    default=None,
    metavar="LOW,HIGH",
    help="Map raster values LOW..HIGH onto the model's input range (clipped); needed "
    "when the raster's pixel type is not the model's.",
)
@click.option(
    "--resampling",
    default="bilinear",
    show_default=True,
    type=click.Choice(["nearest", "bilinear", "cubic", "average", "lanczos"]),
    help="Warping an after image that is not on the before image's grid.",
)
@click.option("--stride", type=click.IntRange(min=0), default=0, help="0: the model's.")
@click.option(
    "--threshold",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="Mask threshold (default: the model's).",
)
@mask_rule_option
@click.option(
    "--probability-type",
    type=click.Choice(["float32", "uint8"]),
    default="float32",
    show_default=True,
    help="uint8: 0..254 = 0..1 (scale tag set), 255 = nodata.",
)
@click.option(
    "--block-size",
    type=click.IntRange(min=16),
    default=512,
    show_default=True,
    help="Pixels per block side: memory is bounded by this, not by the scene.",
)
@click.option(
    "--min-area",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Drop polygons smaller than this many square metres.",
)
@click.option(
    "--simplify",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Simplify polygons with this tolerance in metres (0: exact pixel edges).",
)
@click.option("--wgs84", is_flag=True, help="Polygons in EPSG:4326 (default: the raster's CRS).")
@click.option("--no-quicklook", is_flag=True, help="Skip quicklook.png.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--overwrite", is_flag=True, help="Replace finished results in --out.")
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="With --manifest: a local process pool, or Ray (local or --ray-address).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="With --manifest: pairs scored at once, each worker holding one model.",
)
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="With --manifest: attempts after a pair's first failure (resuming it).",
)
@click.option("--ray-address", default=None, help="A Ray cluster (default: a local Ray).")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="ONNX Runtime threads per worker.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def score(
    before: Path | None,
    after: Path | None,
    out: Path,
    manifest: Path | None,
    model: str,
    models_dir: Path | None,
    bands: str | None,
    bands_before: str | None,
    bands_after: str | None,
    rescale: str | None,
    resampling: str,
    stride: int,
    threshold: float | None,
    mask_rule: str | None,
    probability_type: str,
    block_size: int,
    min_area: float,
    simplify: float,
    wgs84: bool,
    no_quicklook: bool,
    resume: bool,
    overwrite: bool,
    engine: str,
    workers: int,
    retries: int,
    ray_address: str | None,
    threads: int,
    quiet: bool,
) -> None:
    """Score whole GeoTIFF pairs into georeferenced change rasters and polygons.

    Writes to OUT: change_probability.tif and change_mask.tif (Cloud-Optimized GeoTIFFs on the
    before image's grid), changes.geojson (polygons with area in m2, max and mean probability),
    quicklook.png (before | after | probability) and summary.json. The after image is warped
    onto the before image's grid when they differ; pixels that are nodata in either date are
    nodata in every output. With --manifest, every pair goes to OUT/<id>/ and
    OUT/manifest_results.csv records each pair's status.
    """
    from serving.config import ServerSettings
    from serving.errors import ModelLoadError, ModelNotFound
    from serving.memory import tune_malloc
    from serving.scoring.outputs import OutputWriteError
    from serving.scoring.pair import ModelScorer, ScoreOptions, score_pair
    from serving.scoring.polygons import PolygonOptions
    from serving.scoring.rasters import PairError, UsageProblem, parse_bands

    if manifest is not None and (before or after):
        raise click.UsageError("give BEFORE AFTER or --manifest, not both")
    if manifest is None and not (before and after):
        raise click.UsageError("give BEFORE AFTER (two GeoTIFFs), or --manifest pairs.csv")
    if resume and overwrite:
        raise click.UsageError("--resume continues a run, --overwrite replaces it: pick one")
    try:
        common = parse_bands(bands)
        options = ScoreOptions(
            bands_before=parse_bands(bands_before) or common,
            bands_after=parse_bands(bands_after) or common,
            resampling=resampling,
            rescale=_pair_of_floats(rescale),
            stride=stride,
            threshold=threshold,
            mask_rule=mask_rule,
            probability_dtype=probability_type,  # type: ignore[arg-type]
            block_size=block_size,
            polygons=PolygonOptions(min_area_m2=min_area, simplify_m=simplify, wgs84=wgs84),
            quicklook=not no_quicklook,
            resume=resume,
            overwrite=overwrite,
        )
    except UsageProblem as exc:
        raise click.UsageError(str(exc)) from exc
    extra: dict[str, Any] = {"models_dir": models_dir} if models_dir is not None else {}
    settings = ServerSettings(
        metrics_port=-1, intra_op_threads=threads, default_model=model, **extra
    )

    if manifest is not None:
        _manifest(
            manifest, out, settings, model, options, engine, workers, retries, ray_address, quiet
        )
        return
    assert before is not None and after is not None
    for p in (before, after):
        if not p.is_file():
            raise click.UsageError(f"no such file: {p}")
    tune_malloc()  # memory flat in the scene's size (serving/memory.py)
    try:
        with ModelScorer(settings, model) as scorer:
            summary = score_pair(before, after, out, scorer, options, progress=not quiet)
    except (ModelNotFound, ModelLoadError) as exc:
        raise click.UsageError(str(exc)) from exc
    except UsageProblem as exc:
        raise click.UsageError(str(exc)) from exc
    except (PairError, OutputWriteError) as exc:  # the run failed; the message says why
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    _report(summary, out, quiet)


def _report(summary: dict[str, Any], out: Path, quiet: bool) -> None:
    c = summary["counts"]
    if summary.get("warped"):
        click.echo(f"note: the after image was warped onto the before grid ({summary['warped']})")
    if quiet:
        return
    click.echo(
        f"{summary['status']}: {c['changed_pixels']} changed pixels "
        f"({100 * c['changed_fraction_of_valid']:.3f} % of {c['valid_pixels']} valid), "
        f"{c['changed_area_m2']:.1f} m2, {summary['polygons']['polygons']} polygons -> {out}"
    )


def _manifest(
    manifest: Path,
    out: Path,
    settings: Any,
    model: str,
    options: Any,
    engine: str,
    workers: int,
    retries: int,
    ray_address: str | None,
    quiet: bool,
) -> None:
    from serving.scoring.manifest import read_manifest, score_manifest
    from serving.scoring.rasters import UsageProblem

    try:
        jobs = read_manifest(manifest)
        outcomes = score_manifest(
            jobs,
            out,
            settings,
            model,
            options,
            engine=engine,  # type: ignore[arg-type]
            workers=workers,
            retries=retries,
            ray_address=ray_address,
            progress=not quiet,
        )
    except UsageProblem as exc:
        raise click.UsageError(str(exc)) from exc
    failed = [o for o in outcomes if o.status == "failed"]
    for o in failed:
        click.echo(f"failed: {o.job.id} after {o.attempts} attempt(s): {o.error}", err=True)
    click.echo(
        json.dumps(
            {
                "pairs": len(outcomes),
                "done": len(outcomes) - len(failed),
                "failed": len(failed),
                "results": str(out / "manifest_results.csv"),
            }
        )
    )
    if failed:
        sys.exit(1)
