"""`rarechange evaluate`: the full serving path over a labelled dataset (real-imagery work)."""

from __future__ import annotations

import click


@click.command()
@click.option("--model", default="", help="Model name (default: the bundled default).")
@click.option("--dataset", required=True, help="KIND:PATH, e.g. sztaki:../shared/data/sztaki.")
def evaluate(model: str, dataset: str) -> None:
    """Pixel precision/recall/F1/IoU, AUROC and patch balanced accuracy over a labelled dataset.

    Not available in this version: dataset loaders land with the real-imagery work.
    """
    raise click.ClickException(
        "`rarechange evaluate` is not available in this version yet (no dataset loaders)"
    )
