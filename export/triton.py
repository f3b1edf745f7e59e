"""Exported ONNX model -> Triton model repository (onnxruntime backend), without torch.

The config is derived from the ONNX graph itself, never typed by hand, so Triton's view of the
tensors cannot drift from the model. It is plain text written here rather than built with
tritonclient, so exporting and serving never need tritonclient at run time; tests parse it with
Triton's own ``ModelConfig`` protobuf.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import onnx
from onnx import TensorProto
from onnx.external_data_helper import uses_external_data

from serving.metadata import INPUT_NAMES, OUTPUT_NAME

InstanceKind = Literal["KIND_GPU", "KIND_CPU", "KIND_AUTO"]

PLATFORM = "onnxruntime_onnx"
MODEL_FILENAME = "model.onnx"  # the onnxruntime backend's default_model_filename
# The TensorRT EP's default workspace, stated explicitly so the config says what it gets.
TRT_MAX_WORKSPACE_BYTES = 1 << 30
# One level under /tmp: ORT creates the cache folder with a non-recursive create_directory, and an
# engine is only valid for the GPU/TensorRT it was built on, so it must not live in the repository.
TRT_ENGINE_CACHE_DIR = "/tmp/rarechange-trt-engines"

_KINDS: frozenset[str] = frozenset(("KIND_GPU", "KIND_CPU", "KIND_AUTO"))
# Triton model names become directory names and quoted config strings: keep them plain.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
# What serving accepts as input_dtype (serving.metadata.ModelMetadata).
_INPUT_TYPES = (TensorProto.UINT8, TensorProto.UINT16, TensorProto.FLOAT)
_OUTPUT_TYPE = TensorProto.FLOAT

_TRITON_TYPES: dict[int, str] = {
    TensorProto.BOOL: "TYPE_BOOL",
    TensorProto.UINT8: "TYPE_UINT8",
    TensorProto.UINT16: "TYPE_UINT16",
    TensorProto.UINT32: "TYPE_UINT32",
    TensorProto.UINT64: "TYPE_UINT64",
    TensorProto.INT8: "TYPE_INT8",
    TensorProto.INT16: "TYPE_INT16",
    TensorProto.INT32: "TYPE_INT32",
    TensorProto.INT64: "TYPE_INT64",
    TensorProto.FLOAT16: "TYPE_FP16",
    TensorProto.FLOAT: "TYPE_FP32",
    TensorProto.DOUBLE: "TYPE_FP64",
    TensorProto.STRING: "TYPE_STRING",
    TensorProto.BFLOAT16: "TYPE_BF16",
}


def triton_data_type(onnx_elem_type: int) -> str:
    """Triton's ``DataType`` name for an ONNX element type, failing loudly on ones it lacks."""
    try:
        return _TRITON_TYPES[onnx_elem_type]
    except KeyError:
        raise ValueError(
            f"ONNX element type {_elem_name(onnx_elem_type)} has no Triton data type"
        ) from None


def write_triton_repo(
    onnx_path: Path,
    repo_dir: Path,
    *,
    name: str,
    max_batch_size: int = 64,
    max_queue_delay_us: int = 2000,
    instances: int = 1,
    kind: InstanceKind = "KIND_GPU",
    tensorrt_fp16: bool = False,
    version: int = 1,
) -> Path:
    """Write ``repo_dir/name/config.pbtxt`` and ``repo_dir/name/<version>/model.onnx``.

    Returns the config path. Both files are replaced atomically, so a Triton polling the
    repository never loads a half-written one. ``tensorrt_fp16`` runs the graph through ORT's
    TensorRT EP in FP16 (GPU instances only); check the accuracy of that before serving it.
    """
    _check_options(name, max_batch_size, max_queue_delay_us, instances, kind, tensorrt_fp16)
    if version < 1:
        raise ValueError(f"version must be >= 1, got {version} (Triton ignores version folder 0)")
    onnx_path = Path(onnx_path)
    inputs, output = _signature(onnx_path)
    text = _render_config(
        name=name,
        inputs=inputs,
        output=output,
        max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us,
        instances=instances,
        kind=kind,
        tensorrt_fp16=tensorrt_fp16,
    )
    model_dir = Path(repo_dir) / name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    # the model first: a config never points Triton at a version folder still being written
    with onnx_path.open("rb") as src:
        _atomic_write(version_dir / MODEL_FILENAME, lambda dst: shutil.copyfileobj(src, dst))
    config = model_dir / "config.pbtxt"
    _atomic_write(config, lambda dst: dst.write(text.encode()))
    return config


@dataclass(frozen=True)
class _Tensor:
    """One graph tensor as Triton needs it: name, element type, shape with -1 for dynamic axes."""

    name: str
    elem_type: int
    shape: tuple[int, ...]

    @classmethod
    def of(cls, value: onnx.ValueInfoProto) -> _Tensor:
        tensor_type = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
        return cls(value.name, tensor_type.elem_type, shape)


def _signature(onnx_path: Path) -> tuple[list[_Tensor], _Tensor]:
    """The graph's (before, after) inputs and its probability output, checked against serving."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    if any(uses_external_data(t) for t in graph.initializer):
        raise ValueError(f"{onnx_path}: weights in external data files; export a single file")
    initializers = {t.name for t in graph.initializer}
    found = {v.name: _Tensor.of(v) for v in graph.input if v.name not in initializers}
    if sorted(found) != sorted(INPUT_NAMES):
        raise ValueError(f"{onnx_path}: graph inputs are {sorted(found)}, expected {INPUT_NAMES}")
    inputs = [found[n] for n in INPUT_NAMES]
    for t in inputs:
        if t.elem_type not in _INPUT_TYPES:
            allowed = ", ".join(_elem_name(e) for e in _INPUT_TYPES)
            raise ValueError(
                f"{onnx_path}: input {t.name!r} is {_elem_name(t.elem_type)}, expected {allowed}"
            )
        if len(t.shape) != 4 or t.shape[0] != -1:
            raise ValueError(
                f"{onnx_path}: input {t.name!r} has shape {_shape(t)}, expected [batch, C, P, P] "
                "with a dynamic batch axis"
            )
    first, second = inputs
    if (first.elem_type, first.shape) != (second.elem_type, second.shape):
        raise ValueError(
            f"{onnx_path}: inputs differ: {first.name!r} {_elem_name(first.elem_type)} "
            f"{_shape(first)}, {second.name!r} {_elem_name(second.elem_type)} {_shape(second)}"
        )
    outputs = [_Tensor.of(v) for v in graph.output]
    names = [o.name for o in outputs]
    if names != [OUTPUT_NAME]:
        raise ValueError(f"{onnx_path}: graph outputs are {names}, expected [{OUTPUT_NAME!r}]")
    (output,) = outputs
    if output.elem_type != _OUTPUT_TYPE:
        raise ValueError(
            f"{onnx_path}: output {OUTPUT_NAME!r} is {_elem_name(output.elem_type)}, expected FLOAT"
        )
    if output.shape != (-1,):
        raise ValueError(
            f"{onnx_path}: output {OUTPUT_NAME!r} has shape {_shape(output)}, expected [batch]"
        )
    return inputs, output


def _render_config(
    *,
    name: str,
    inputs: Sequence[_Tensor],
    output: _Tensor,
    max_batch_size: int,
    max_queue_delay_us: int,
    instances: int,
    kind: str,
    tensorrt_fp16: bool,
) -> str:
    """The config.pbtxt text: same arguments, same bytes, so regenerated repos diff cleanly.

    No ``preferred_batch_size``: Triton's batcher docs advise against it except for TensorRT
    plans with several optimization profiles; this model has one profile.
    """
    lines = [
        f'name: "{name}"',
        f'platform: "{PLATFORM}"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        ",\n".join(_tensor_entry(t) for t in inputs),
        "]",
        "output [",
        _tensor_entry(output),
        "]",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
        "instance_group [",
        "  {",
        f"    count: {instances}",
        f"    kind: {kind}",
        "  }",
        "]",
    ]
    if tensorrt_fp16:
        params = _tensorrt_parameters(inputs, max_batch_size)
        lines += [
            "optimization {",
            "  execution_accelerators {",
            "    gpu_execution_accelerator [",
            "      {",
            '        name: "tensorrt"',
            *(f'        parameters {{ key: "{k}" value: "{v}" }}' for k, v in params),
            "      }",
            "    ]",
            "  }",
            "}",
        ]
    return "\n".join(lines) + "\n"


def _tensor_entry(t: _Tensor) -> str:
    """One input/output entry; Triton's dims leave out the batch axis that max_batch_size adds."""
    dims = t.shape[1:]
    lines = [
        "  {",
        f'    name: "{t.name}"',
        f"    data_type: {triton_data_type(t.elem_type)}",
    ]
    if dims:
        lines.append(f"    dims: [ {', '.join(map(str, dims))} ]")
    else:
        # A per-item scalar ([batch] in the graph): Triton needs non-empty dims, so the API shape
        # is [batch, 1], reshaped to the model's [batch] (model_configuration.md, "Reshape").
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    lines.append("  }")
    return "\n".join(lines)


def _tensorrt_parameters(inputs: Sequence[_Tensor], max_batch_size: int) -> list[tuple[str, str]]:
    """The onnxruntime backend's TensorRT keys (its README: "ONNX Runtime with TensorRT ...")."""
    params = [
        ("precision_mode", "FP16"),
        ("max_workspace_size_bytes", str(TRT_MAX_WORKSPACE_BYTES)),
        # building an engine takes seconds to minutes: keep it across model reloads
        ("trt_engine_cache_enable", "1"),
        ("trt_engine_cache_path", TRT_ENGINE_CACHE_DIR),
    ]
    if all(d > 0 for t in inputs for d in t.shape[1:]):
        # One profile over every batch the batcher can form, so that a batch larger than any seen
        # so far does not make ORT rebuild the engine in the middle of serving.
        def shapes(batch: int) -> str:
            return ",".join(f"{t.name}:{'x'.join(map(str, (batch, *t.shape[1:])))}" for t in inputs)

        params += [
            ("trt_profile_min_shapes", shapes(1)),
            ("trt_profile_opt_shapes", shapes(max_batch_size)),
            ("trt_profile_max_shapes", shapes(max_batch_size)),
        ]
    return params


def _check_options(
    name: str,
    max_batch_size: int,
    max_queue_delay_us: int,
    instances: int,
    kind: str,
    tensorrt_fp16: bool,
) -> None:
    if not _NAME.match(name):
        raise ValueError(
            f"model name {name!r} must be 1-128 characters of letters, digits, '_', '.', '-' "
            "(it is a directory name) and not start with '.' or '-'"
        )
    if max_batch_size < 1:
        raise ValueError(
            f"max_batch_size must be >= 1, got {max_batch_size} (the graph has a batch axis)"
        )
    if max_queue_delay_us < 0:
        raise ValueError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")
    if instances < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}")
    if tensorrt_fp16 and kind == "KIND_CPU":
        # the backend reads gpu_execution_accelerator for GPU/AUTO instances only: it would be
        # silently ignored
        raise ValueError("tensorrt_fp16 needs GPU instances (kind KIND_GPU or KIND_AUTO)")


def _atomic_write(dest: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write to a temporary file beside ``dest``, then rename it over ``dest``."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the server may run as another user
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _elem_name(elem_type: int) -> str:
    try:
        return TensorProto.DataType.Name(elem_type)
    except ValueError:
        return str(elem_type)


def _shape(t: _Tensor) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in t.shape) + "]"
