"""`rarechange evaluate`: the full serving path over a labelled dataset, or the CVA baseline.

The model is loaded as ``rarechange serve`` would load it (every model of the models folder, the
same backend, dynamic batcher, tiling and stitching, no network), so the numbers are the ones a
client of the server gets. The work lives in :mod:`training.evaluation` (torch-free), imported
when the command runs so that ``rarechange --help`` stays light.

Exit codes: 0 done; 1 the model or dataset could not be found or read; 2 bad arguments, including
bands or pixel types that do not fit the model (the message says which flags would).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from serving.cli.argv import command_line
from serving.cli.options import mask_rule_option

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from serving.config import ServerSettings
    from training.datasets.scenes import ScenePair
    from training.evaluation import Evaluation, PairResult, Scored, Scorer

BASELINES = ("cva",)


@click.command()
@click.option(
    "--model",
    default="",
    help="Model name in --models-dir (default: the repository's default), or `cva` for the "
    "change vector analysis baseline (needs no models).",
)
@click.option(
    "--dataset",
    required=True,
    help="KIND:PATH with pixel masks: sztaki, oscd (PATH optional: the shared data), pcd, folder.",
)
@click.option(
    "--models-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of <name>/model.onnx (default: $RARECHANGE_MODELS_DIR, else the bundled models).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for report.md, results.json and overlays/ (default out/evaluate/MODEL-KIND).",
)
@click.option(
    "--stride", type=click.IntRange(min=0), default=0, help="Patch stride (0: the model's)."
)
@click.option(
    "--threshold",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="Decision threshold on the probability (default: the model's; cva: Otsu per pair).",
)
@mask_rule_option
@click.option(
    "--bands",
    default=None,
    help="1-based band numbers to feed the model, in its order, e.g. 1,2,3 (RGB of OSCD).",
)
@click.option(
    "--scale-to-uint8",
    is_flag=True,
    help="Map each pair's per-band 2nd-98th percentiles (both dates together) to 0-255, for "
    "uint8 models on uint16 data.",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N pairs.")
@click.option(
    "--pairs",
    "pair_names",
    default=None,
    help="Only these pairs, by name, comma-separated (e.g. a model's held-out Szada/1).",
)
def evaluate(
    model: str,
    dataset: str,
    models_dir: Path | None,
    out: Path | None,
    stride: int,
    threshold: float | None,
    mask_rule: str | None,
    bands: str | None,
    scale_to_uint8: bool,
    limit: int | None,
    pair_names: str | None,
) -> None:
    """Pixel precision/recall/F1/IoU, AUROC and patch balanced accuracy over a labelled dataset,
    per pair and overall, with an overlay per pair; written to report.md and results.json.

    Exit codes: 0 done, 1 model or dataset not found or unreadable, 2 bad arguments (bands or
    pixel types that do not fit the model included).
    """
    from serving.errors import InvalidInput, ModelLoadError, ModelNotFound
    from training.datasets.registry import load_dataset, parse_spec
    from training.datasets.scenes import DatasetError, DatasetNotFound, PatchPairs
    from training.evaluation import fit_pair, parse_bands

    command = command_line()
    try:
        kind, _ = parse_spec(dataset)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--dataset") from exc
    try:
        band_numbers = parse_bands(bands) if bands else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--bands") from exc

    try:
        loaded = load_dataset(dataset)
    except (DatasetNotFound, DatasetError, FileNotFoundError) as exc:
        raise click.ClickException(f"dataset {dataset!r}: {exc}") from exc
    if isinstance(loaded, PatchPairs):
        raise click.BadParameter(
            f"{kind} is labelled per patch pair, not per pixel: evaluate needs pixel masks",
            param_hint="--dataset",
        )
    if pair_names:
        wanted = [n.strip() for n in pair_names.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {p.name for p in loaded})
        if unknown:
            raise click.BadParameter(
                f"no pair named {unknown} in {dataset}; it has {[p.name for p in loaded]}",
                param_hint="--pairs",
            )
        loaded = [p for p in loaded if p.name in wanted]
    pairs = loaded[:limit] if limit else loaded

    settings = None
    if model not in BASELINES:
        from serving.config import ServerSettings

        extra = {"models_dir": models_dir} if models_dir is not None else {}
        settings = ServerSettings(metrics_port=-1, **extra)
    try:
        with _scorer(model, settings, stride, threshold, mask_rule) as scorer:
            name = scorer.info.name
            out = out or Path("out") / "evaluate" / f"{name}-{kind}"
            fitted = [fit_pair(p, scorer.info, band_numbers, scale_to_uint8) for p in pairs]
            result = _run(fitted, scorer, out)
    except ModelNotFound as exc:
        raise click.ClickException(f"{exc} (or `cva`, the baseline)") from exc
    except ModelLoadError as exc:
        raise click.ClickException(str(exc)) from exc
    except InvalidInput as exc:
        raise click.UsageError(str(exc)) from exc

    from training.evaluation import write_report

    recorded: dict[str, Any] = {
        "models_dir": None if settings is None else str(settings.models_dir),
        "stride": result.model.stride,
        "threshold": threshold,
        "mask_rule": mask_rule,
        "bands": list(band_numbers) if band_numbers else None,
        "scale_to_uint8": scale_to_uint8,
        "limit": limit,
        "pairs": pair_names,
    }
    written = write_report(out, result, command=command, dataset=dataset, settings=recorded)
    pooled, mean = result.pooled(), result.mean_over_pairs()
    click.echo(
        f"{name} on {kind} ({len(result.pairs)} pairs): pooled F1 {pooled['f1']:.4f}, "
        f"IoU {pooled['iou']:.4f}, AUROC {pooled['auroc']:.4f}, patch balanced accuracy "
        f"{pooled['patch_balanced_accuracy']:.4f}; mean over pairs F1 {mean['f1']:.4f}, "
        f"AUROC {mean['auroc']:.4f}"
    )
    for path in written.values():
        click.echo(f"wrote {path}")


def _scorer(
    model: str,
    settings: ServerSettings | None,
    stride: int,
    threshold: float | None,
    mask_rule: str | None,
) -> AbstractContextManager[Scorer]:
    """The baseline, or (with ``settings``) the model served in-process, stopped on exit."""
    import contextlib

    from serving.errors import InvalidInput
    from training.evaluation import CvaScorer, served_scorer

    if settings is None:
        if mask_rule not in (None, "threshold"):
            raise InvalidInput(f"--mask-rule {mask_rule} gates a served model; cva has none")
        return contextlib.nullcontext(CvaScorer(stride, threshold))
    return served_scorer(settings, model, stride, threshold, mask_rule)


def _run(pairs: list[ScenePair], scorer: Scorer, out: Path) -> Evaluation:
    """Evaluate with a progress bar (tqdm when installed, else a line per pair on stderr)."""
    from training.evaluation import evaluate, write_overlay

    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    bar = tqdm(total=len(pairs), desc=scorer.info.name, unit="pair") if tqdm else None

    finished = 0

    def done(pair: ScenePair, scored: Scored, result: PairResult) -> None:
        nonlocal finished
        finished += 1
        write_overlay(out / "overlays", pair, scored)
        f1 = result.pixels.scores()["f1"]
        if bar is not None:
            bar.set_postfix_str(f"{pair.name} F1 {f1:.3f}")
            bar.update()
        else:
            click.echo(f"[{finished}/{len(pairs)}] {pair.name}: F1 {f1:.4f}", err=True)

    try:
        return evaluate(pairs, scorer, on_pair=done)
    finally:
        if bar is not None:
            bar.close()
