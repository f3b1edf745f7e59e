"""The install contract: serving needs no torch, extras are what the docs say, torch stays CPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(reqs: list[str]) -> set[str]:
    return {
        r.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip()
        for r in reqs
    }


def test_base_install_is_serving_only() -> None:
    base = _names(PYPROJECT["dependencies"])
    for needed in (
        "onnxruntime",
        "grpcio",
        "grpcio-health-checking",
        "grpcio-reflection",
        "protobuf",
        "numpy",
        "pillow",
        "rasterio",
        "pydantic",
        "pydantic-settings",
        "prometheus-client",
        "onnx",  # serving reads metadata and recomputes the weights digest itself
    ):
        assert needed in base, needed
    assert "torch" not in base and "onnxscript" not in base


def test_extras() -> None:
    extras = PYPROJECT["optional-dependencies"]
    assert {"train", "export", "gpu", "triton", "ray", "dev"} <= set(extras)
    for extra in ("train", "export"):
        torch = [r for r in extras[extra] if r.startswith("torch")]
        # the range that resolves to the local CPU wheel; never an open upper bound
        assert torch == ["torch>=2.4,<2.14"], torch
    assert "onnx" in _names(extras["export"])
    assert "onnxruntime-gpu" in _names(extras["gpu"])
    assert "tritonclient" in _names(extras["triton"])
    assert {"pytest", "ruff", "grpcio-tools", "hypothesis"} <= _names(extras["dev"])


def test_serving_serves_with_torch_unimportable() -> None:
    """Start the real server on the bundled model and detect, where torch cannot be imported."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from serving.client import ChangeDetectionClient
        from serving.config import ServerSettings
        from serving.server import create_server
        from training.synthetic import SceneConfig, render_pair

        server = create_server(ServerSettings(port=0, metrics_port=0)).start()
        try:
            pair = render_pair(1, SceneConfig(height=96, width=128))
            with ChangeDetectionClient(server.address) as client:
                r = client.detect(pair.before, pair.after).response
            assert (r.height, r.width) == (96, 128), (r.height, r.width)
        finally:
            server.stop(0)
        loaded = [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
        assert sys.modules["torch"] is None and loaded == ["torch"], loaded
        print("served without torch")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "served without torch" in out.stdout
