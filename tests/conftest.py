"""Shared fixtures: real servers on free localhost ports, the bundled model, a trained one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from serving.config import ServerSettings, shared_data_dir
from serving.server import ChangeDetectionServer, create_server

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_MODELS = ROOT / "models"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    data = shared_data_dir()
    if data is None:
        pytest.skip(
            "real data not present (set RARECHANGE_DATA or put ../shared/data beside the repo)"
        )
    return data


@pytest.fixture
def start_server() -> Iterator[Callable[..., ChangeDetectionServer]]:
    """Start a real gRPC server on 127.0.0.1:0 with the given settings; stopped after the test."""
    servers: list[ChangeDetectionServer] = []

    def start(models_dir: Path = BUNDLED_MODELS, **settings: object) -> ChangeDetectionServer:
        settings.setdefault("metrics_port", 0)  # a free port: servers never fight over 9090
        cfg = ServerSettings(host="127.0.0.1", port=0, models_dir=models_dir, **settings)
        server = create_server(cfg).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace=0)


@pytest.fixture(scope="session")
def thin_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The thin path's first half, for real: train the `thin` preset for seconds, export to ONNX."""
    pytest.importorskip("torch")
    from export.onnx_export import export_checkpoint
    from training.recipes import train_synthetic

    root = tmp_path_factory.mktemp("thin")
    result = train_synthetic("thin", root / "run", progress=False)
    export_checkpoint(
        result.checkpoint, root / "models" / "thin-test", name="thin-test", version="0.0.1"
    )
    return root / "models"
