"""ONNX Runtime in-process: the default backend. One InferenceSession per model instance.

Execution providers follow ``ServerSettings.providers``: ``auto`` takes the best one this ONNX
Runtime offers (TensorRT > CUDA > CPU), ``cpu`` only the CPU, and ``cuda``/``tensorrt`` insist: a
server asked for a GPU that it cannot use refuses to start rather than quietly run on the CPU.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from serving.errors import ModelLoadError
from serving.integrity import load_model_bytes, weights_sha256
from serving.metadata import INPUT_NAMES, OUTPUT_NAME, ModelMetadata

log = logging.getLogger(__name__)

_ORT_TYPES = {"uint8": "tensor(uint8)", "uint16": "tensor(uint16)", "float32": "tensor(float)"}

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
_REQUIRED = {"cuda": CUDA, "tensorrt": TENSORRT}
GPU_HINT = (
    "the GPU providers need an NVIDIA GPU with its driver, CUDA/cuDNN (and TensorRT for "
    "tensorrt) libraries, and pip install 'rarechange[gpu]' (onnxruntime-gpu instead of "
    "onnxruntime); or set RARECHANGE_PROVIDERS=auto or cpu"
)

ProviderList = list[str | tuple[str, dict[str, str]]]


def read_verified_model(path: Path) -> tuple[bytes, ModelMetadata]:
    """The file's bytes and its metadata, refused unless its weights hash to what it says.

    Shared with the Triton backend, so a remote model is described by the very file that export
    copied into the Triton repository, checked the same way.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read it ({exc.strerror})") from exc
    try:
        model = load_model_bytes(data, str(path))
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    props = {p.key: p.value for p in model.metadata_props}
    metadata = ModelMetadata.from_props(props, source=str(path))
    digest = weights_sha256(model)
    if digest != metadata.weights_sha256:
        raise ModelLoadError(
            f"{path}: invalid metadata field 'weights_sha256': the file's weights hash to "
            f"{digest[:16]}..., the metadata says {metadata.weights_sha256[:16]}...; "
            "the weights were changed or damaged after export, re-export the model"
        )
    return data, metadata


def choose_providers(
    choice: str, path: Path, metadata: ModelMetadata, max_batch_size: int
) -> ProviderList:
    """ONNX Runtime's provider list for a settings choice; a GPU that was asked for must exist."""
    available = ort.get_available_providers()
    if choice == "cpu":
        return [CPU]
    if choice in _REQUIRED and _REQUIRED[choice] not in available:
        raise ModelLoadError(
            f"{path}: providers={choice} needs ONNX Runtime's {_REQUIRED[choice]}, but "
            f"onnxruntime {ort.__version__} here offers only {available}; {GPU_HINT}"
        )
    if choice not in ("auto", *_REQUIRED):
        raise ModelLoadError(f"providers must be auto, cpu, cuda or tensorrt, got {choice!r}")
    chosen: ProviderList = []
    if choice in ("auto", "tensorrt") and TENSORRT in available:
        options = tensorrt_options(path, metadata, max_batch_size)
        chosen.append((TENSORRT, options))
    if choice in ("auto", "tensorrt", "cuda") and CUDA in available:
        chosen.append(CUDA)  # TensorRT hands the nodes it cannot run to CUDA, not to the CPU
    return [*chosen, CPU]


def tensorrt_options(path: Path, metadata: ModelMetadata, max_batch_size: int) -> dict[str, str]:
    """FP16 with an engine cache: export's own options, so an engine `rarechange export
    --tensorrt` built beside the model (``trt_cache/``) is loaded instead of rebuilt (minutes)."""
    from export.tensorrt import provider_options  # no torch: onnx and numpy only

    cache = Path(path).parent / "trt_cache"
    if not cache.is_dir() and not os.access(cache.parent, os.W_OK):  # a read-only models dir
        cache = Path(tempfile.gettempdir()) / "rarechange-trt-engines" / metadata.name
    cache.mkdir(parents=True, exist_ok=True)
    return provider_options(cache, metadata, (1, max_batch_size), fp16=True)


def _provider_name(p: str | tuple[str, Any]) -> str:
    return p if isinstance(p, str) else p[0]


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(
        self,
        path: Path,
        *,
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        providers: str | Sequence[str | tuple[str, dict[str, str]]] | None = None,
        max_batch_size: int = 256,
    ) -> None:
        """``providers``: a settings choice (auto, cpu, cuda, tensorrt) or ONNX Runtime's own list;
        None is the CPU. ``max_batch_size`` bounds TensorRT's optimisation profile."""
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = inter_op_threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no busy-waiting between batches: a served session runs intermittently, and spinning
        # threads would take the cores that decode, tile and stitch the other requests
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        data, self.metadata = read_verified_model(path)
        if providers is None:
            wanted: ProviderList = [CPU]
        elif isinstance(providers, str):
            wanted = choose_providers(providers, path, self.metadata, max_batch_size)
        else:
            wanted = list(providers)
        try:
            self.session = ort.InferenceSession(data, sess_options=opts, providers=wanted)
        except Exception as exc:  # ORT raises its own untyped errors for corrupt files
            raise ModelLoadError(f"{path}: ONNX Runtime cannot load it ({exc})") from exc
        # ORT falls back to the CPU, with only a warning, when a GPU provider fails to initialise
        got = self.session.get_providers()
        self.provider = got[0]
        first = _provider_name(wanted[0])
        if first != self.provider:
            message = f"{path}: {first} did not initialise (ONNX Runtime fell back to {got})"
            if isinstance(providers, str) and providers in _REQUIRED:
                raise ModelLoadError(f"{message}; {GPU_HINT}")
            log.warning("%s; running on %s", message, self.provider)
        log.info("model %s runs on %s", self.metadata.name, self.provider)
        self._check_signature(path)

    def _check_signature(self, path: Path) -> None:
        """The graph must take what the metadata says, so serving never feeds it the wrong thing."""
        m = self.metadata
        inputs = {i.name: i for i in self.session.get_inputs()}
        if set(inputs) != set(INPUT_NAMES):
            raise ModelLoadError(f"{path}: inputs {sorted(inputs)}, expected {list(INPUT_NAMES)}")
        for name in INPUT_NAMES:
            arg = inputs[name]
            if arg.type != _ORT_TYPES[m.input_dtype]:
                raise ModelLoadError(
                    f"{path}: input {name!r} is {arg.type} but metadata says {m.input_dtype}"
                )
            if list(arg.shape[1:]) != [m.channels, m.patch_size, m.patch_size]:
                raise ModelLoadError(
                    f"{path}: input {name!r} has shape {arg.shape}, metadata says "
                    f"[N, {m.channels}, {m.patch_size}, {m.patch_size}]"
                )
        outputs = [o.name for o in self.session.get_outputs()]
        if outputs != [OUTPUT_NAME]:
            raise ModelLoadError(f"{path}: outputs {outputs}, expected [{OUTPUT_NAME!r}]")

    def infer(self, before: np.ndarray, after: np.ndarray) -> np.ndarray:
        out = self.session.run([OUTPUT_NAME], {INPUT_NAMES[0]: before, INPUT_NAMES[1]: after})[0]
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]

    def __enter__(self) -> OnnxRuntimeBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
