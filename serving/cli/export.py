"""`rarechange export`: checkpoint -> self-describing ONNX (needs the `export` extra)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("run_or_checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Model folder, e.g. models/NAME: model.onnx and README.md.",
)
@click.option("--name", default=None, help="Model name (default: the --out folder's name).")
@click.option("--version", "model_version", default="0.1.0", show_default=True)
@click.option("--description", default="", help="One paragraph for the model card.")
def export(
    run_or_checkpoint: Path, out: Path, name: str | None, model_version: str, description: str
) -> None:
    """Export a run (or its checkpoint.pt) to OUT/model.onnx after an ONNX/PyTorch parity check."""
    try:
        from export.onnx_export import ExportError, export_checkpoint
    except ImportError as exc:
        raise click.ClickException(
            f"export needs the export extra: pip install 'rarechange[export]' ({exc})"
        ) from exc
    from pydantic import ValidationError

    checkpoint = run_or_checkpoint
    if checkpoint.is_dir():
        checkpoint = checkpoint / "checkpoint.pt"
    if not checkpoint.is_file():
        raise click.BadParameter(f"{checkpoint} does not exist", param_hint="RUN_OR_CHECKPOINT")
    try:
        result = export_checkpoint(
            checkpoint,
            out,
            name=name or out.name,
            version=model_version,
            description=" ".join(description.split()),
        )
    except (ExportError, ValidationError, ValueError) as exc:
        raise click.ClickException(f"export failed: {exc}") from exc
    click.echo(
        f"wrote {result.path} ({result.metadata.name} {result.metadata.version}); "
        f"ONNX vs PyTorch max abs diff {result.parity_max_abs_diff:.2g}"
    )
