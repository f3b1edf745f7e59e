"""`rarechange train`: two-stage training (needs the `train` extra: torch)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--preset", default="thin", show_default=True, help="Named configuration.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Run folder: checkpoint.pt, metrics.json.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--pretrain-steps", type=int, default=None, help="Override the preset.")
@click.option("--finetune-steps", type=int, default=None, help="Override the preset.")
@click.option(
    "--max-positives", type=int, default=None, help="Label budget: positive patches kept."
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(
    preset: str,
    out: Path,
    seed: int,
    pretrain_steps: int | None,
    finetune_steps: int | None,
    max_positives: int | None,
    quiet: bool,
) -> None:
    """Pre-train the disentangled VAE on unchanged pairs, then fine-tune the change classifier.

    Data: procedurally generated aerial-like scene pairs (training/synthetic.py).
    """
    try:
        from training.recipes import train_synthetic
    except ImportError as exc:
        raise click.ClickException(
            f"training needs the train extra: pip install 'rarechange[train]' ({exc})"
        ) from exc
    overrides = {
        k: v
        for k, v in {
            "seed": seed,
            "pretrain_steps": pretrain_steps,
            "finetune_steps": finetune_steps,
            "max_positives": max_positives,
        }.items()
        if v is not None
    }
    try:
        result = train_synthetic(preset, out, progress=not quiet, **overrides)
    except KeyError as exc:
        raise click.BadParameter(str(exc), param_hint="--preset") from exc
    m = result.metrics
    click.echo(
        f"wrote {result.checkpoint}: validation AUROC {m['auroc']:.3f}, balanced accuracy "
        f"{m['balanced_accuracy']:.3f} at threshold {result.threshold:.3f} "
        f"({m['train_seconds']:.0f} s)"
    )
