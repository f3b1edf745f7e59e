"""Server settings: one place, read from ``RARECHANGE_*`` environment variables or arguments."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


def default_models_dir() -> Path:
    """The bundled models next to the source tree (an editable install or a container's copy)."""
    return Path(__file__).resolve().parent.parent / "models"


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RARECHANGE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)  # 0 picks a free port
    models_dir: Path = Field(default_factory=default_models_dir)
    default_model: str = ""  # empty: the only model, or the first by name
    workers: int = Field(16, ge=1)  # gRPC handler threads (requests decoding/stitching at once)
    max_message_bytes: int = Field(64 * MiB, ge=MiB)
    max_pixels: int = Field(16384 * 16384, ge=1)  # per image, checked before decoding
    max_stream_bytes: int = Field(2048 * MiB, ge=1)  # per image in DetectChangeStream
    # dynamic batcher (per model), named as in Triton's model configuration
    max_batch_size: int = Field(256, ge=1)
    max_queue_delay_us: int = Field(2000, ge=0)
    max_queue_size: int = Field(1 << 20, ge=1)  # patches waiting, across all requests
    instances: int = Field(1, ge=1)  # model instances, each with its own session
    intra_op_threads: int = Field(2, ge=1)
    grace_s: float = Field(10.0, ge=0)  # drain time on SIGTERM


def shared_data_dir() -> Path | None:
    """Real datasets: $RARECHANGE_DATA, else ../shared/data beside the checkout, else None."""
    import os

    env = os.environ.get("RARECHANGE_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parent.parent.parent / "shared" / "data")
    return next((p for p in candidates if p.is_dir()), None)
