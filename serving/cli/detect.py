"""`rarechange detect`: send one pair to a running server, write the mask, map and overlay."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    import numpy as np


def write_outputs(
    out: Path, before: np.ndarray, after: np.ndarray, result: object
) -> dict[str, Path]:
    """mask.png, probability.png and overlay.png (before | after | mask over after), atomically."""
    import numpy as np

    from serving.pictures import encode_png, overlay, probability_to_uint8

    out.mkdir(parents=True, exist_ok=True)
    images = {
        "mask.png": result.mask.astype(np.uint8) * 255,
        "probability.png": probability_to_uint8(result.probability),
        "overlay.png": overlay(before, after, result.mask),
    }
    written = {}
    for name, array in images.items():
        path = out / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_bytes(encode_png(array))
        tmp.replace(path)
        written[name] = path
    return written


def summary(result: object) -> dict[str, object]:
    r = result.response
    return {
        "model": f"{r.model} {r.model_version}",
        "size": f"{r.width}x{r.height}",
        "patch/stride": f"{r.patch_size}/{r.stride}",
        "threshold": round(r.threshold, 4),
        "changed_fraction": round(r.changed_fraction, 5),
        "regions": len(r.regions),
        "tiles": len(r.tiles),
        "timings_ms": {
            k: round(v, 1)
            for k, v in (
                ("decode", r.timings.decode_ms),
                ("queue", r.timings.queue_ms),
                ("inference", r.timings.inference_ms),
                ("stitch", r.timings.stitch_ms),
                ("total", r.timings.total_ms),
            )
        },
    }


@click.command()
@click.argument("before", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("after", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--address", default="127.0.0.1:50051", show_default=True, help="Server host:port.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("out"),
    show_default=True,
)
@click.option("--model", default="", help="Model name (default: the server's default).")
@click.option("--stride", type=int, default=0, help="Patch stride in pixels (0: the model's).")
@click.option("--threshold", type=float, default=None, help="Decision threshold (model's default).")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds.")
def detect(
    before: Path,
    after: Path,
    address: str,
    out: Path,
    model: str,
    stride: int,
    threshold: float | None,
    timeout: float,
) -> None:
    """Detect changes between BEFORE and AFTER (PNG, JPEG or TIFF) with a running server."""
    import grpc

    from serving.client import ChangeDetectionClient
    from serving.decode import decode_image
    from serving.errors import InvalidInput

    before_bytes, after_bytes = before.read_bytes(), after.read_bytes()
    try:
        b = decode_image(before_bytes, max_pixels=1 << 31, name=str(before))
        a = decode_image(after_bytes, max_pixels=1 << 31, name=str(after))
    except InvalidInput as exc:
        raise click.BadParameter(str(exc)) from exc
    with ChangeDetectionClient(address) as client:
        try:
            result = client.detect(
                before_bytes,
                after_bytes,
                model=model,
                stride=stride,
                threshold=threshold,
                timeout=timeout,
            )
        except grpc.RpcError as exc:
            raise click.ClickException(f"{exc.code().name}: {exc.details()}") from exc
    for path in write_outputs(out, b, a, result).values():
        click.echo(f"wrote {path}")
    click.echo(json.dumps(summary(result), indent=1))
