"""A remote Triton Inference Server as the backend: our batcher and API in front, Triton's GPUs
behind.

Triton serves the repository that ``rarechange export --triton-repo`` writes, under the model's own
name. The metadata (patch size, bands, dtype, threshold) comes from the local models dir's ONNX
file, the same file export copied into that repository, verified as the ONNX Runtime backend does;
at load, Triton's model metadata and config must agree with it (tensor names, datatypes, shapes),
so a stale or foreign model on Triton stops start-up instead of scoring the wrong thing.

tritonclient is an optional extra, imported only here. A Triton that cannot be reached, now or
later, is :class:`~serving.errors.BackendUnavailable` (UNAVAILABLE to our clients, retryable).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from serving.backends.onnxruntime import read_verified_model
from serving.errors import BackendUnavailable, ModelLoadError
from serving.kserve import DATATYPES, OUTPUT_DATATYPE, tensor_metadata
from serving.metadata import INPUT_NAMES, OUTPUT_NAME

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0  # one batch; a Triton that takes longer is treated as unavailable
# Statuses that mean "Triton is not there (or not answering)", not "Triton refused the request".
_UNAVAILABLE = {
    "StatusCode.UNAVAILABLE",
    "StatusCode.DEADLINE_EXCEEDED",
    "StatusCode.CANCELLED",
}
# Triton's reshape lets the API shape of a per-item scalar be [batch, 1] (export/triton.py)
_OUTPUT_SHAPES = ([-1], [-1, 1])
_OUTPUT_DIMS = ([], [1])


def _import_tritonclient() -> tuple[Any, type[Exception]]:
    try:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException
    except ImportError as exc:
        raise ModelLoadError(
            "backend=triton needs tritonclient, which is not installed: "
            "pip install 'rarechange[triton]'"
        ) from exc
    return grpcclient, InferenceServerException


class TritonBackend:
    """Scores patch pairs on the Triton model with this model's name at ``url`` (host:port)."""

    name = "triton"

    def __init__(
        self,
        path: Path,
        *,
        url: str,
        model_name: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self._grpc, self._error = _import_tritonclient()
        _, self.metadata = read_verified_model(path)
        self.url = url
        self.model_name = model_name or self.metadata.name
        self.timeout_s = timeout_s
        self.client = self._grpc.InferenceServerClient(url, channel_args=_channel_args())
        try:
            self.max_batch_size = self._check(path)
        except BackendUnavailable as exc:
            self.close()
            raise BackendUnavailable(
                f"cannot reach Triton at {url} for model {self.model_name!r}; start it, or point "
                "RARECHANGE_TRITON_URL at it"
            ) from exc
        except RuntimeError as exc:  # Triton answered, but refused (an unknown model, say)
            self.close()
            raise ModelLoadError(f"Triton at {url}, model {self.model_name!r}: {exc}") from exc
        except BaseException:
            self.close()
            raise
        log.info(
            "model %s scores on Triton at %s (max_batch_size %d)",
            self.metadata.name,
            url,
            self.max_batch_size,
        )

    # ------------------------------------------------------------------ load-time checks
    def _check(self, path: Path) -> int:
        """Triton's view of the model must be ours; returns Triton's max_batch_size."""
        where = f"Triton at {self.url}, model {self.model_name!r}"
        if not self._call("ModelReady", self.client.is_model_ready, self.model_name):
            raise ModelLoadError(
                f"{where}: not ready (is it in Triton's model repository? "
                f"`rarechange export --triton-repo` writes it from {path})"
            )
        meta = self._call("ModelMetadata", self.client.get_model_metadata, self.model_name)
        config = self._call("ModelConfig", self.client.get_model_config, self.model_name).config
        problems = self._compare(meta, config)
        if problems:
            raise ModelLoadError(
                f"{where} does not match {path}: {'; '.join(problems)}; "
                "re-export the Triton repository from this model"
            )
        return int(config.max_batch_size)

    def _compare(self, meta: Any, config: Any) -> list[str]:
        m = self.metadata
        problems: list[str] = []
        want_inputs, want_output_shape = tensor_metadata(m)
        got = {t.name: t for t in meta.inputs}
        if sorted(got) != sorted(INPUT_NAMES):
            problems.append(f"inputs are {sorted(got)}, expected {list(INPUT_NAMES)}")
        for name, datatype, shape in want_inputs:
            t = got.get(name)
            if t is not None and (t.datatype, list(t.shape)) != (datatype, shape):
                problems.append(
                    f"input {name!r} is {t.datatype} {list(t.shape)}, expected {datatype} {shape}"
                )
        outputs = [(o.name, o.datatype, list(o.shape)) for o in meta.outputs]
        if len(outputs) != 1 or outputs[0][:2] != (OUTPUT_NAME, OUTPUT_DATATYPE):
            problems.append(f"outputs are {outputs}, expected [{OUTPUT_NAME!r} FP32 {[-1]}]")
        elif outputs[0][2] not in _OUTPUT_SHAPES:
            problems.append(f"output shape {outputs[0][2]}, expected {want_output_shape}")
        # the config: batching on, and the same tensors as Triton's protobuf DataType names
        if config.max_batch_size < 1:
            problems.append("config max_batch_size is 0 (no batch axis); export sets it >= 1")
        data_type = self._grpc.model_config_pb2.DataType.Name
        config_inputs = {t.name: t for t in config.input}
        patch = [m.channels, m.patch_size, m.patch_size]
        want_type = "TYPE_" + DATATYPES[m.input_dtype]
        for name in INPUT_NAMES:
            t = config_inputs.get(name)
            if t is None:
                problems.append(f"config has no input {name!r}")
            elif (data_type(t.data_type), list(t.dims)) != (want_type, patch):
                problems.append(
                    f"config input {name!r} is {data_type(t.data_type)} {list(t.dims)}, "
                    f"expected {want_type} {patch}"
                )
        config_outputs = [(o.name, data_type(o.data_type), list(o.dims)) for o in config.output]
        if len(config_outputs) != 1 or config_outputs[0][:2] != (OUTPUT_NAME, "TYPE_FP32"):
            problems.append(f"config outputs are {config_outputs}, expected {OUTPUT_NAME!r} FP32")
        elif config_outputs[0][2] not in _OUTPUT_DIMS:
            problems.append(f"config output dims {config_outputs[0][2]}, expected [1] or []")
        return problems

    # ------------------------------------------------------------------ inference
    def infer(self, before: np.ndarray, after: np.ndarray) -> np.ndarray:
        """(N, C, P, P) pairs -> (N,) float32, in slices Triton's max_batch_size accepts."""
        if len(before) != len(after):
            raise ValueError(f"{len(before)} before patches but {len(after)} after patches")
        step = self.max_batch_size
        parts = [
            self._infer(before[i : i + step], after[i : i + step])
            for i in range(0, len(before), step)
        ]
        return np.concatenate(parts) if parts else np.empty(0, np.float32)

    def _infer(self, before: np.ndarray, after: np.ndarray) -> np.ndarray:
        datatype = DATATYPES[self.metadata.input_dtype]
        inputs = []
        for name, array in zip(INPUT_NAMES, (before, after), strict=True):
            tensor = self._grpc.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(np.ascontiguousarray(array))  # raw contents
            inputs.append(tensor)
        result = self._call(
            "ModelInfer",
            self.client.infer,
            self.model_name,
            inputs,
            outputs=[self._grpc.InferRequestedOutput(OUTPUT_NAME)],
            client_timeout=self.timeout_s,
        )
        out = np.asarray(result.as_numpy(OUTPUT_NAME), dtype=np.float32).reshape(-1)
        if len(out) != len(before):
            raise RuntimeError(f"Triton returned {len(out)} outputs for {len(before)} inputs")
        return out

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one tritonclient call; a Triton out of reach becomes BackendUnavailable."""
        try:
            return fn(*args, **kwargs)
        except self._error as exc:
            status = exc.status() or ""
            log.warning("Triton at %s: %s failed: %s %s", self.url, what, status, exc.message())
            if status in _UNAVAILABLE:
                raise BackendUnavailable(
                    "the inference backend (Triton) is unavailable; retry later"
                ) from exc
            raise RuntimeError(f"Triton {what} failed: {status} {exc.message()}") from exc

    def close(self) -> None:
        client, self.client = getattr(self, "client", None), None
        if client is not None:
            client.close()

    def __enter__(self) -> TritonBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _channel_args() -> list[tuple[str, int]]:
    """tritonclient's defaults, plus a short reconnect backoff: after Triton returns, serve again
    within about a second, not gRPC's default backoff of up to two minutes."""
    unlimited = 2**31 - 1
    return [
        ("grpc.max_send_message_length", unlimited),
        ("grpc.max_receive_message_length", unlimited),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
