"""`rarechange experiment`: reproduce the paper's results (needs the `train` extra)."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def _ints(text: str) -> tuple[int, ...]:
    """'0,1,2' or '0-9' -> a tuple of ints."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi) + 1) if hi else [int(lo)]
    return tuple(out)


def _where_and_how(work: str, work_help: str) -> Callable[[F], F]:
    """--threads, --results and --work, shared by every experiment."""

    def apply(f: F) -> F:
        for option in reversed(
            [
                click.option(
                    "--threads", type=int, default=2, show_default=True, help="torch CPU threads."
                ),
                click.option(
                    "--results",
                    type=click.Path(file_okay=False, path_type=Path),
                    default=Path("docs/results"),
                    show_default=True,
                ),
                click.option(
                    "--work",
                    type=click.Path(file_okay=False, path_type=Path),
                    default=Path(work),
                    show_default=True,
                    help=work_help,
                ),
            ]
        ):
            f = option(f)
        return f

    return apply


@click.group()
def experiment() -> None:
    """Reproduce the paper's experiments; resumable cell by cell."""


@experiment.command()
@click.option("--seeds", default="0,1,2", show_default=True, help="e.g. 0,1,2 or 0-9 (paper: 10).")
@click.option("--variants", default="MNIST-R,MNIST-B,MNIST-R-B", show_default=True)
@click.option("--budgets", default="50,500,32000", show_default=True, help="Positive pairs.")
@click.option(
    "--methods",
    default="under-sampling,over-sampling,vae-without-sim,vae-with-sim",
    show_default=True,
)
@click.option("--pretrain-epochs", type=float, default=4.0, show_default=True)
@click.option("--n-negative", type=int, default=100_000, show_default=True)
@click.option("--n-test", type=int, default=50_000, show_default=True, help="Per class.")
@_where_and_how("runs/table3", "Pre-training checkpoints.")
@click.option(
    "--name",
    default="table3",
    show_default=True,
    help="Another protocol's table beside the main one: RESULTS/NAME.md, NAME.json, NAME_cells/.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def table3(
    seeds: str,
    variants: str,
    budgets: str,
    methods: str,
    pretrain_epochs: float,
    n_negative: int,
    n_test: int,
    threads: int,
    results: Path,
    work: Path,
    name: str,
    quiet: bool,
) -> None:
    """Table 3: accuracy on MNIST-R, MNIST-B, MNIST-R-B with 50 / 500 / 32000 positives.

    Writes one JSON per finished cell to RESULTS/table3_cells/ and the summary to
    RESULTS/table3.md and RESULTS/table3.json. Run it again to resume.
    """
    try:
        import torch

        from training.experiments.table3 import Table3, Table3Settings
    except ImportError as exc:
        raise click.ClickException(
            f"needs the train extra: pip install 'rarechange[train]' ({exc})"
        ) from exc
    torch.set_num_threads(threads)
    settings = Table3Settings(
        seeds=_ints(seeds),
        variants=tuple(variants.split(",")),
        budgets=_ints(budgets),
        methods=tuple(methods.split(",")),
        pretrain_epochs=pretrain_epochs,
        n_negative=n_negative,
        n_test_per_class=n_test,
    )
    runner = Table3(settings, results, work, progress=not quiet, name=name)
    runner.run()
    runner.write_summary(command="rarechange " + shlex.join(sys.argv[1:]))
    click.echo(f"wrote {results / (name + '.md')} and {results / (name + '.json')}")


@experiment.command()
@click.option("--preset", default="aerial-rgb", show_default=True, help="A scenes preset.")
@click.option("--folds", default="", help="Held-out pairs, comma-separated (default: every pair).")
@click.option("--budgets", default="5,50,all", show_default=True, help="Positive patches.")
@click.option("--seeds", default="0,1,2", show_default=True, help="e.g. 0,1,2 or 0-9.")
@click.option("--methods", default="ours,ours-distance,ours-no-labels,siamese", show_default=True)
@click.option(
    "--set",
    "extra",
    multiple=True,
    metavar="KEY=VALUE",
    help="An override for every cell, e.g. --set data.augment.copies=1 (a protocol of its own).",
)
@click.option(
    "--pretrain-seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of each fold's pre-training, shared by its cells (not 0: a protocol of its own).",
)
@_where_and_how("runs/study", "Pre-training checkpoints per fold.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def scenes(
    preset: str,
    folds: str,
    budgets: str,
    seeds: str,
    methods: str,
    extra: tuple[str, ...],
    pretrain_seed: int,
    threads: int,
    results: Path,
    work: Path,
    quiet: bool,
) -> None:
    """Few labels on real pairs: each pair held out once, ours vs a siamese trained from scratch
    vs change vector analysis, at 5 / 50 / all positive patches, over seeds.

    One JSON per finished cell in RESULTS/study-PRESET_cells/, the summary in
    RESULTS/study-PRESET.md and .json (with --set: study-PRESET_DIGEST, a protocol of its own
    that never touches the preset's cells). Run it again to resume.
    """
    try:
        import torch

        from training.config import ConfigError
        from training.experiments.scene_study import METHODS, SceneStudy, StudySettings
    except ImportError as exc:
        raise click.ClickException(
            f"needs the train extra: pip install 'rarechange[train]' ({exc})"
        ) from exc
    torch.set_num_threads(threads)
    unknown = set(methods.split(",")) - set(METHODS)
    if unknown:
        raise click.BadParameter(
            f"{sorted(unknown)}; choose from {METHODS}", param_hint="--methods"
        )
    try:
        parsed = tuple(None if b == "all" else int(b) for b in budgets.split(","))
    except ValueError as exc:
        raise click.BadParameter(f"{budgets!r}: numbers or `all`", param_hint="--budgets") from exc
    settings = StudySettings(
        preset=preset,
        folds=tuple(f for f in folds.split(",") if f),
        budgets=parsed,
        seeds=_ints(seeds),
        methods=tuple(methods.split(",")),
        extra=extra,
        pretrain_seed=pretrain_seed,
    )
    try:
        study = SceneStudy(settings, results, work, progress=not quiet)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        raise click.UsageError(str(exc)) from exc
    study.run()
    click.echo(f"wrote {results / (study.name + '.md')} and {results / (study.name + '.json')}")
