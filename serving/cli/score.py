"""`rarechange score`: batch scoring of GeoTIFF pairs (the batch-scoring issue fills it in)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("before", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("after", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", default="", help="Model name (default: the bundled default).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def score(before: Path, after: Path, model: str, out: Path) -> None:
    """Score a whole GeoTIFF pair into COG probability and mask rasters and GeoJSON polygons.

    Not available in this version: streaming windowed scoring lands with the batch-scoring work.
    Use `rarechange detect` for pairs that fit in memory.
    """
    raise click.ClickException(
        "`rarechange score` is not available in this version yet; "
        "use `rarechange detect` for pairs that fit in memory"
    )
