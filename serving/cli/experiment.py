"""`rarechange experiment`: reproduce the paper's results (needs the `train` extra)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click


def _ints(text: str) -> tuple[int, ...]:
    """'0,1,2' or '0-9' -> a tuple of ints."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi) + 1) if hi else [int(lo)]
    return tuple(out)


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
@click.option("--threads", type=int, default=2, show_default=True, help="torch CPU threads.")
@click.option(
    "--results",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("docs/results"),
    show_default=True,
)
@click.option(
    "--work",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/table3"),
    show_default=True,
    help="Pre-training checkpoints.",
)
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
