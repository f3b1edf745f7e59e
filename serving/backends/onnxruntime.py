"""ONNX Runtime in-process: the default backend. One InferenceSession per model instance."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.errors import ModelLoadError
from serving.integrity import load_model_bytes, weights_sha256
from serving.metadata import INPUT_NAMES, OUTPUT_NAME, ModelMetadata

log = logging.getLogger(__name__)

_ORT_TYPES = {"uint8": "tensor(uint8)", "uint16": "tensor(uint16)", "float32": "tensor(float)"}


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(
        self,
        path: Path,
        *,
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        providers: list[str] | None = None,
    ) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = inter_op_threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"{path}: cannot read it ({exc.strerror})") from exc
        try:
            model = load_model_bytes(data, str(path))
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc
        props = {p.key: p.value for p in model.metadata_props}
        self.metadata = ModelMetadata.from_props(props, source=str(path))
        digest = weights_sha256(model)
        if digest != self.metadata.weights_sha256:
            raise ModelLoadError(
                f"{path}: invalid metadata field 'weights_sha256': the file's weights hash to "
                f"{digest[:16]}..., the metadata says {self.metadata.weights_sha256[:16]}...; "
                "the weights were changed or damaged after export, re-export the model"
            )
        del model
        try:
            self.session = ort.InferenceSession(
                data, sess_options=opts, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own untyped errors for corrupt files
            raise ModelLoadError(f"{path}: ONNX Runtime cannot load it ({exc})") from exc
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
