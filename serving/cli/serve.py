"""`rarechange serve`: the gRPC DetectChange service (and the Open Inference Protocol)."""

from __future__ import annotations

from pathlib import Path

import click

_FILE = click.Path(exists=False, dir_okay=False, path_type=Path)


@click.command()
@click.option("--host", default=None, help="Address to bind [RARECHANGE_HOST, 127.0.0.1].")
@click.option(
    "--port", type=int, default=None, help="gRPC port, 0 for a free one [RARECHANGE_PORT, 50051]."
)
@click.option(
    "--metrics-port",
    type=int,
    default=None,
    help="Prometheus /metrics HTTP port; 0 a free one, -1 off [RARECHANGE_METRICS_PORT, 9090].",
)
@click.option(
    "--models",
    "--models-dir",
    "models_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of exported models, <name>/model.onnx, each served under its name "
    "[RARECHANGE_MODELS_DIR, the bundled models/].",
)
@click.option("--default-model", default=None, help="Model used when a request names none.")
@click.option(
    "--backend",
    type=click.Choice(["onnxruntime", "triton"]),
    default=None,
    help="ONNX Runtime in-process, or a Triton server [RARECHANGE_BACKEND, onnxruntime].",
)
@click.option(
    "--providers",
    type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]),
    default=None,
    help="ONNX Runtime execution providers; auto: TensorRT > CUDA > CPU as available.",
)
@click.option("--triton-url", default=None, help="Triton gRPC address [localhost:8001].")
@click.option("--max-batch-size", type=int, default=None, help="Patches per inference batch.")
@click.option("--max-queue-delay-us", type=int, default=None, help="Wait for a batch to fill.")
@click.option("--max-queue-size", type=int, default=None, help="Patches waiting, at most.")
@click.option("--instances", type=int, default=None, help="Model instances (sessions) per model.")
@click.option("--intra-op-threads", type=int, default=None, help="Threads per session.")
@click.option("--workers", type=int, default=None, help="gRPC handler threads.")
@click.option("--max-pixels", type=int, default=None, help="Per image, checked before decoding.")
@click.option("--max-message-bytes", type=int, default=None, help="gRPC message limit [64 MiB].")
@click.option("--grace-s", type=float, default=None, help="Drain time on SIGTERM [10].")
@click.option("--tls-cert", type=_FILE, default=None, help="Server certificate (PEM): TLS.")
@click.option("--tls-key", type=_FILE, default=None, help="Server private key (PEM).")
@click.option(
    "--tls-client-ca", type=_FILE, default=None, help="CA of client certificates: mutual TLS."
)
@click.option(
    "--token",
    "auth_token",
    default=None,
    help="Require 'authorization: Bearer TOKEN' on calls [RARECHANGE_AUTH_TOKEN].",
)
@click.option(
    "--token-file",
    "auth_token_file",
    type=_FILE,
    default=None,
    help="Read the bearer token from this file (a mounted secret) [RARECHANGE_AUTH_TOKEN_FILE].",
)
@click.option(
    "--max-connection-age-s",
    type=float,
    default=None,
    help="Close client connections after this long, 0 never, so load spreads over new "
    "replicas [0].",
)
@click.option(
    "--kserve/--no-kserve", default=None, help="Also serve the Open Inference Protocol [on]."
)
@click.option("--warmup/--no-warmup", default=None, help="Warm every model up before SERVING.")
def serve(**overrides: object) -> None:
    """Serve rarechange.v1.ChangeDetection over gRPC until SIGTERM, then drain.

    Every option also reads a RARECHANGE_* environment variable (the option's name in capitals);
    options win. Invalid settings stop start-up with a message naming the setting (exit 2).
    """
    from pydantic import ValidationError

    from serving.config import ServerSettings
    from serving.errors import RareChangeError
    from serving.memory import SERVING, tune_malloc
    from serving.server import serve as run

    try:
        settings = ServerSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise click.UsageError(f"invalid settings: {problems}") from exc
    tune_malloc(**SERVING)  # requests reuse their predecessors' pages (serving/memory.py)
    try:
        run(settings)
    except (RareChangeError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
