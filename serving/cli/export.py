"""`rarechange export`: checkpoint -> self-describing ONNX, variants, Triton repository, TensorRT.

Needs the `export` extra (torch, onnx). Exit codes: 0 written; 1 export failed or a variant was
refused (the fp32 model and the accepted variants are still written); 2 bad arguments.
"""

from __future__ import annotations

from pathlib import Path

import click

from serving.cli.argv import command_line
from serving.cli.options import MASK_RULES


def _commands(run_dir: Path | None) -> dict[str, str]:
    train = ""
    if run_dir is not None and (run_dir / "command.txt").is_file():
        train = (run_dir / "command.txt").read_text().strip()
    return {"Train": train, "Export": command_line()}


@click.command()
@click.argument("run_or_checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Model folder, e.g. models/NAME: model.onnx and README.md. Variants go beside it "
    "(models/NAME-int8, models/NAME-fp16).",
)
@click.option("--name", default=None, help="Model name (default: the --out folder's name).")
@click.option("--version", "model_version", default="0.1.0", show_default=True)
@click.option("--description", default="", help="One paragraph for the model card.")
@click.option(
    "--mask-rule",
    type=click.Choice(MASK_RULES),
    default="threshold",
    show_default=True,
    help="The mask rule requests get unless they name one or set a threshold (metadata "
    "default_mask_rule): threshold, or cva-gated (change vector analysis x probability, cut at "
    "the pair's outliers).",
)
@click.option("--int8", "int8", is_flag=True, help="Also write a static-QDQ int8 variant.")
@click.option("--fp16", "fp16", is_flag=True, help="Also write a float16 variant.")
@click.option(
    "--max-accuracy-loss",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Refuse a variant whose held-out accuracy is more than this many points below fp32.",
)
@click.option(
    "--triton-repo",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write a Triton model repository entry DIR/NAME/{config.pbtxt,1/model.onnx}.",
)
@click.option("--triton-max-batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--triton-queue-delay-us", type=click.IntRange(min=0), default=2000, show_default=True
)
@click.option("--triton-instances", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--triton-kind",
    type=click.Choice(["KIND_GPU", "KIND_CPU", "KIND_AUTO"]),
    default="KIND_GPU",
    show_default=True,
)
@click.option(
    "--triton-tensorrt-fp16",
    is_flag=True,
    help="Ask Triton's ONNX Runtime backend for the TensorRT accelerator in FP16.",
)
@click.option(
    "--tensorrt",
    is_flag=True,
    help="Build a TensorRT FP16 engine cache (OUT/trt_cache) here; needs an NVIDIA GPU.",
)
def export(
    run_or_checkpoint: Path,
    out: Path,
    name: str | None,
    model_version: str,
    description: str,
    mask_rule: str,
    int8: bool,
    fp16: bool,
    max_accuracy_loss: float,
    triton_repo: Path | None,
    triton_max_batch: int,
    triton_queue_delay_us: int,
    triton_instances: int,
    triton_kind: str,
    triton_tensorrt_fp16: bool,
    tensorrt: bool,
) -> None:
    """Export a run (or its checkpoint.pt) to OUT/model.onnx after an ONNX/PyTorch parity check.

    Given the run folder, parity is also checked on its held-out patch pairs, and variants are
    scored on them beside fp32.
    """
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
    run_dir = checkpoint.parent if (checkpoint.parent / "config.json").is_file() else None
    if (int8 or fp16) and run_dir is None:
        raise click.BadParameter(
            f"variants are scored on the run's held-out data, but {checkpoint.parent} has no "
            "config.json; pass the run folder made by `rarechange train`",
            param_hint="RUN_OR_CHECKPOINT",
        )
    name = name or out.name

    held = real_inputs = None
    if run_dir is not None:
        from export.variants import HeldOut
        from training.recipes import held_out_patches, load_run_config

        config = load_run_config(run_dir)
        patches, positive_fraction = held_out_patches(config)
        held = HeldOut.from_patches(patches, positive_fraction)
        real_inputs = [
            (held.before[i : i + 256], held.after[i : i + 256]) for i in (0, len(held) // 2)
        ]

    try:
        result = export_checkpoint(
            checkpoint,
            out,
            name=name,
            version=model_version,
            description=" ".join(description.split()),
            real_inputs=real_inputs,
            commands=_commands(run_dir),
            default_mask_rule=mask_rule,
        )
    except (ExportError, ValidationError, ValueError) as exc:
        raise click.ClickException(f"export failed: {exc}") from exc
    click.echo(
        f"wrote {result.path} ({result.metadata.name} {result.metadata.version}); "
        f"ONNX vs PyTorch max abs diff {result.parity_max_abs_diff:.2g}"
    )

    refused: list[str] = []
    if (int8 or fp16) and run_dir is not None and held is not None:
        from export.variants import export_variants
        from training.recipes import calibration_patches, load_run_config

        precisions = [p for p, wanted in (("fp16", fp16), ("int8", int8)) if wanted]
        reports = export_variants(
            result,
            precisions,  # type: ignore[arg-type]
            held,
            calibration_patches(load_run_config(run_dir)) if int8 else None,
            max_accuracy_loss,
        )
        for r in reports:
            line = (
                f"{r.precision}: accuracy {r.accuracy:.2f} % ({r.accuracy_change:+.2f} vs fp32), "
                f"AUROC {r.auroc:.2f} % ({r.auroc_change:+.2f}) on {r.n_held_out} held-out pairs"
            )
            if r.accepted:
                click.echo(f"wrote {r.path}; {line}")
            else:
                refused.append(
                    f"{r.precision} variant refused (more than "
                    f"{r.max_accuracy_loss:g} points lost): {line}"
                )

    if triton_repo is not None:
        from export.triton import write_triton_repo

        config_path = write_triton_repo(
            result.path,
            triton_repo,
            name=name,
            max_batch_size=triton_max_batch,
            max_queue_delay_us=triton_queue_delay_us,
            instances=triton_instances,
            kind=triton_kind,  # type: ignore[arg-type]
            tensorrt_fp16=triton_tensorrt_fp16,
        )
        click.echo(f"wrote {config_path}")

    if tensorrt:
        from export.tensorrt import TensorRTUnavailable, build_engine

        try:
            build = build_engine(result.path)
        except TensorRTUnavailable as exc:
            raise click.ClickException(f"--tensorrt: {exc}") from exc
        click.echo(
            f"TensorRT FP16 engine cached in {build.cache_dir} for batch {build.batch_sizes} "
            f"({build.seconds:.0f} s; max |TRT - CPU| {build.max_abs_diff_vs_cpu:.2g})"
        )
    if refused:
        raise click.ClickException("; ".join(refused))
