"""`rarechange detect`: send one pair to a running server, write the mask, map, overlay and regions.

Every file is written to a temporary name beside it and renamed into place, so a reader (or a
crash half-way) never sees a partial file. gRPC errors become one line naming the status and an
exit code a script can branch on: 1 the server refused the request (bad input, unknown model,
missing token...), 3 the server could not be reached or did not answer in time.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from serving.cli.options import mask_rule_option

if TYPE_CHECKING:
    import grpc
    import numpy as np

    from serving.api import change_detection_pb2 as pb
    from serving.client import DetectResult

EXIT_REFUSED = 1  # the server answered with an error status
EXIT_UNREACHABLE = 3  # no answer: UNAVAILABLE or DEADLINE_EXCEEDED (2 is click's usage error)
STREAM_ABOVE_BYTES = 32 * 1024 * 1024  # larger pairs go through DetectChangeStream

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def write_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file in the same folder, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_outputs(
    out: Path, before: np.ndarray, after: np.ndarray, result: DetectResult
) -> dict[str, Path]:
    """mask.png, probability.png, overlay.png (before | after | mask over after), regions.json."""
    import numpy as np

    from serving.pictures import encode_png, overlay, probability_to_uint8

    out.mkdir(parents=True, exist_ok=True)
    mask = result.mask
    files = {
        "mask.png": encode_png(mask.astype(np.uint8) * 255),
        "probability.png": encode_png(probability_to_uint8(result.probability)),
        "overlay.png": encode_png(overlay(before, after, mask)),
        "regions.json": (json.dumps(regions_report(result.response), indent=1) + "\n").encode(),
    }
    return {name: write_atomic(out / name, data) for name, data in files.items()}


def regions_report(r: pb.DetectChangeResponse) -> dict[str, Any]:
    """What regions.json holds: the model, the decision, the timings and every changed region.

    Boxes are pixel boxes of the full image: top-left ``row``/``col`` and ``height``/``width``.
    """
    return {
        "model": {"name": r.model, "version": r.model_version},
        "request_id": r.request_id,
        "image": {"height": r.height, "width": r.width},
        "patch_size": r.patch_size,
        "stride": r.stride,
        **decision(r, 6),
        "changed_fraction": round(r.changed_fraction, 6),
        "timings_ms": {
            name: round(getattr(r.timings, f"{name}_ms"), 3)
            for name in ("decode", "queue", "inference", "stitch", "total")
        },
        "regions": [
            {
                "bbox": {
                    "row": g.box.row,
                    "col": g.box.col,
                    "height": g.box.height,
                    "width": g.box.width,
                },
                "area_px": g.area_px,
                "max_probability": round(g.max_probability, 6),
                "mean_probability": round(g.mean_probability, 6),
            }
            for g in r.regions
        ],
    }


def decision(r: pb.DetectChangeResponse, digits: int) -> dict[str, Any]:
    """The mask rule and its cut: a probability threshold, or the gated cut on CVA x probability."""
    from serving.api import change_detection_pb2 as pb

    if r.mask_rule == pb.MASK_RULE_CVA_GATED:
        return {"mask_rule": "cva-gated", "gated_cut": round(r.gated_cut, digits)}
    return {"mask_rule": "threshold", "threshold": round(r.threshold, digits)}


def summary(result: DetectResult) -> dict[str, object]:
    r = result.response
    return {
        "model": f"{r.model} {r.model_version}",
        "size": f"{r.width}x{r.height}",
        "patch/stride": f"{r.patch_size}/{r.stride}",
        **decision(r, 4),
        "changed_fraction": round(r.changed_fraction, 5),
        "regions": len(r.regions),
        "tiles": len(r.tiles.probability),
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


def rpc_failure(exc: grpc.RpcError, server: str) -> click.ClickException:
    """One clear line per status, with the exit code scripts branch on."""
    import grpc

    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        message = (
            f"UNAVAILABLE: could not reach the server at {server} ({details}); is it running, "
            "and does --tls-ca (or its absence) match whether it uses TLS?"
        )
        exit_code = EXIT_UNREACHABLE
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"DEADLINE_EXCEEDED: no answer from {server} in time ({details}); try --timeout"
        exit_code = EXIT_UNREACHABLE
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        message = f"UNAUTHENTICATED: {details} (pass --token or set RARECHANGE_TOKEN)"
        exit_code = EXIT_REFUSED
    else:
        message = f"{code.name}: {details}"
        exit_code = EXIT_REFUSED
    failure = click.ClickException(message)
    failure.exit_code = exit_code
    return failure


@click.command()
@click.argument("before", type=_FILE)
@click.argument("after", type=_FILE)
@click.option(
    "--server",
    "--address",
    "server",
    default="127.0.0.1:50051",
    show_default=True,
    help="Server HOST:PORT.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("out"),
    show_default=True,
    help="Folder for mask.png, probability.png, overlay.png and regions.json.",
)
@click.option("--model", default="", help="Model name (default: the server's default).")
@click.option("--stride", type=int, default=0, help="Patch stride in pixels (0: the model's).")
@click.option("--threshold", type=float, default=None, help="Decision threshold (model's default).")
@mask_rule_option
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds.")
@click.option("--tls", is_flag=True, help="Use TLS with the system's root certificates.")
@click.option("--tls-ca", type=_FILE, default=None, help="CA certificate (PEM) to trust: TLS.")
@click.option("--tls-cert", type=_FILE, default=None, help="Client certificate (PEM): mutual TLS.")
@click.option("--tls-key", type=_FILE, default=None, help="Client private key (PEM).")
@click.option(
    "--server-name",
    default=None,
    help="Name to expect in the server's certificate, when it differs from HOST.",
)
@click.option(
    "--token",
    envvar="RARECHANGE_TOKEN",
    show_envvar=True,
    default=None,
    help="Bearer token for servers that require one.",
)
def detect(
    before: Path,
    after: Path,
    server: str,
    out: Path,
    model: str,
    stride: int,
    threshold: float | None,
    mask_rule: str | None,
    timeout: float,
    tls: bool,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    server_name: str | None,
    token: str | None,
) -> None:
    """Detect changes between BEFORE and AFTER (PNG, JPEG or TIFF) with a running server.

    Exit codes: 0 done, 1 the server refused the request, 2 bad arguments, 3 server unreachable.
    """
    import grpc

    from serving.api import change_detection_pb2 as pb
    from serving.client import ChangeDetectionClient
    from serving.decode import decode_image
    from serving.errors import InvalidInput

    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if mask_rule == "cva-gated" and threshold is not None:
        raise click.UsageError("--threshold is not used by --mask-rule cva-gated")
    before_bytes, after_bytes = before.read_bytes(), after.read_bytes()
    try:
        b = decode_image(before_bytes, max_pixels=1 << 31, name=str(before))
        a = decode_image(after_bytes, max_pixels=1 << 31, name=str(after))
    except InvalidInput as exc:
        raise click.BadParameter(str(exc)) from exc
    try:
        client = ChangeDetectionClient(
            server,
            tls=tls,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            token=token or None,
            server_name_override=server_name,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    large = len(before_bytes) + len(after_bytes) > STREAM_ABOVE_BYTES
    with client:
        call = client.detect_stream if large else client.detect
        try:
            result = call(
                before_bytes,
                after_bytes,
                model=model,
                stride=stride,
                threshold=threshold,
                mask_rule=pb.MaskRule.Value(
                    "MASK_RULE_" + (mask_rule or "unspecified").upper().replace("-", "_")
                ),
                timeout=timeout,
            )
        except grpc.RpcError as exc:
            raise rpc_failure(exc, server) from exc
    for path in write_outputs(out, b, a, result).values():
        click.echo(f"wrote {path}")
    click.echo(json.dumps(summary(result), indent=1))
