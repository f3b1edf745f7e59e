"""`rarechange train`: two-stage training (needs the `train` extra: torch)."""

from __future__ import annotations

from pathlib import Path

import click

from serving.cli.argv import command_line


def _remember_command(out: Path) -> None:
    """The exact command goes into the run folder, so that the exported model card can show it."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".command.txt.tmp"
    tmp.write_text(command_line() + "\n")
    tmp.replace(out / "command.txt")


@click.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A run config (TOML); see training/configs/.",
)
@click.option(
    "--preset", default=None, help="A named config from training/configs/ (e.g. thin, mnist)."
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.FIELD=VALUE",
    help="Override one setting, e.g. --set train.pretrain_epochs=2 (repeatable).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Run folder: config.json, per-epoch checkpoints, checkpoint.pt, metrics.",
)
@click.option(
    "--stage",
    type=click.Choice(["both", "pretrain", "finetune"]),
    default="both",
    show_default=True,
    help="Run both stages or one; finetune needs a finished pretrain.",
)
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(
    config_path: Path | None,
    preset: str | None,
    overrides: tuple[str, ...],
    out: Path,
    stage: str,
    threads: int | None,
    quiet: bool,
) -> None:
    """Pre-train the disentangled VAE on unchanged pairs, then fine-tune the change classifier.

    Re-running the same command resumes from the last finished epoch of the run folder.
    """
    try:
        import torch

        from training.config import ConfigError, load_config
        from training.recipes import ConfigMismatch, run
    except ImportError as exc:
        raise click.ClickException(
            f"training needs the train extra: pip install 'rarechange[train]' ({exc})"
        ) from exc
    if threads:
        torch.set_num_threads(threads)
    try:
        config = load_config(
            config_path, overrides, preset=preset if preset or config_path else "thin"
        )
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from exc
    _remember_command(out)
    try:
        result = run(config, out, stage=stage, progress=not quiet)
    except (ConfigMismatch, ConfigError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    if result is None:
        click.echo(f"pre-training done in {out}")
        return
    m = result.metrics
    shown = ", ".join(
        f"{k} {m[k]:.3f}"
        for k in ("auroc", "f1", "pixel_f1", "test_accuracy", "test_auroc")
        if k in m
    )
    click.echo(f"wrote {result.checkpoint}: {shown}; threshold {result.threshold:.3f}")
