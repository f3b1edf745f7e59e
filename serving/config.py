"""Server settings: one place, read from ``RARECHANGE_*`` environment variables or arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
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
    warmup: bool = True  # one batch per model instance before health says SERVING
    # backends: ONNX Runtime in-process (providers: auto = TensorRT > CUDA > CPU as available),
    # or a Triton server serving the repository that `rarechange export --triton-repo` writes
    backend: Literal["onnxruntime", "triton"] = "onnxruntime"
    providers: Literal["auto", "cpu", "cuda", "tensorrt"] = "auto"
    triton_url: str = "localhost:8001"
    # the Open Inference Protocol (KServe v2 gRPC) on the same port, for raw patch-pair batches
    kserve: bool = True
    # Prometheus metrics over HTTP on their own port; 0 picks a free one, -1 turns them off
    metrics_port: int = Field(9090, ge=-1, le=65535)
    # security: TLS from files, mutual TLS when a client CA is given, optional bearer token
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token: SecretStr | None = None
    # the token from a file (a mounted Kubernetes Secret), so it never sits in the environment
    auth_token_file: Path | None = None
    max_concurrent_streams: int = Field(64, ge=1)  # per connection (HTTP/2)
    # close connections after this long (0: never), so that clients behind a Service spread over
    # replicas the autoscaler adds; in-flight calls get max_connection_age_grace_s to finish
    max_connection_age_s: float = Field(0.0, ge=0)
    max_connection_age_grace_s: float = Field(30.0, ge=0)

    @model_validator(mode="after")
    def _tls_files(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {path} is not a readable file")
        if self.auth_token_file is not None:
            if self.auth_token is not None:
                raise ValueError("auth_token and auth_token_file: set one, not both")
            token = self.auth_token_file.read_text().strip()
            if not token:
                raise ValueError(f"auth_token_file: {self.auth_token_file} is empty")
            self.auth_token = SecretStr(token)
        return self


def shared_data_dir() -> Path | None:
    """Real datasets: $RARECHANGE_DATA, else ../shared/data beside the checkout, else None."""
    import os

    env = os.environ.get("RARECHANGE_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parent.parent.parent / "shared" / "data")
    return next((p for p in candidates if p.is_dir()), None)
