"""`rarechange serve`: the gRPC DetectChange service."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--host", default=None, help="Address to bind [env RARECHANGE_HOST, 127.0.0.1].")
@click.option(
    "--port", type=int, default=None, help="Port, 0 for a free one [RARECHANGE_PORT, 50051]."
)
@click.option(
    "--models-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of <name>/model.onnx [RARECHANGE_MODELS_DIR, the bundled models].",
)
@click.option("--default-model", default=None, help="Model used when a request names none.")
@click.option("--max-batch-size", type=int, default=None, help="Patches per inference batch.")
@click.option("--max-queue-delay-us", type=int, default=None, help="Wait for a batch to fill.")
@click.option("--instances", type=int, default=None, help="Model instances (sessions).")
def serve(**overrides: object) -> None:
    """Serve rarechange.v1.ChangeDetection over gRPC until SIGTERM, then drain.

    Every option also reads a RARECHANGE_* environment variable; options win.
    """
    from pydantic import ValidationError

    from serving.config import ServerSettings
    from serving.errors import RareChangeError
    from serving.server import serve as run

    try:
        settings = ServerSettings(**{k: v for k, v in overrides.items() if v is not None})
        run(settings)
    except ValidationError as exc:
        raise click.BadParameter(str(exc)) from exc
    except (RareChangeError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
