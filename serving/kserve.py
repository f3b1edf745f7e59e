"""The Open Inference Protocol (KServe v2 gRPC) on the server's own port.

For clients that already speak it (tritonclient, KServe, MLServer tooling) and hold patch pairs
rather than images: ``ModelInfer`` takes ``before``/``after`` as ``[N, C, P, P]`` tensors of the
model's dtype and returns ``probability`` FP32 ``[N]``; an empty model name is the default model,
as in DetectChange. The patches go through the model's DynamicBatcher, the same queue as
DetectChange, so both kinds of traffic share batches, the queue bound and the deadline handling.
Errors use the project's classes and ``serving.service``'s status mapping, so a malformed tensor
is INVALID_ARGUMENT naming the field, a full queue RESOURCE_EXHAUSTED.

The stubs come from KServe's ``grpc_predict_v2.proto`` (proto/kserve/), in a private descriptor
pool: tritonclient defines the same ``inference`` package, and both must load in one process (the
Triton backend, the tests). Hence :func:`reflection_pool` for the reflection service.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable
from importlib import metadata as importlib_metadata

import grpc
import numpy as np
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health, health_pb2

from serving.api import grpc_predict_v2_pb2 as kpb
from serving.api import grpc_predict_v2_pb2_grpc as kpb_grpc
from serving.errors import InvalidInput, ModelNotFound
from serving.metadata import INPUT_NAMES, OUTPUT_NAME, ModelMetadata
from serving.models import ModelRepository
from serving.service import status_mapping, time_remaining

log = logging.getLogger(__name__)

SERVICE_NAME = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "rarechange"
PLATFORM = "onnxruntime_onnx"  # Triton's name for an ONNX model, whichever backend runs it
# the protocol's tensor data types for the input dtypes serving accepts (ModelMetadata.input_dtype)
DATATYPES = {"uint8": "UINT8", "uint16": "UINT16", "float32": "FP32"}
OUTPUT_DATATYPE = "FP32"
# where typed (non-raw) tensor contents live in InferTensorContents, per input dtype
_CONTENTS = {"uint8": "uint_contents", "uint16": "uint_contents", "float32": "fp32_contents"}

ReadyFn = Callable[[], bool]


def health_readiness(servicer: health.HealthServicer) -> ReadyFn:
    """Readiness as the standard health service reports it for the whole server ("").

    One source of truth: the server says SERVING only once the models are loaded and their
    batchers run, and NOT_SERVING from the moment it starts draining.
    """

    def ready() -> bool:
        try:
            # the overall status "" is always set by create_server, so no context is needed
            response = servicer.Check(health_pb2.HealthCheckRequest(service=""), None)
        except Exception:  # a status not set yet: not ready
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    return ready


def tensor_metadata(meta: ModelMetadata) -> tuple[list[tuple[str, str, list[int]]], list[int]]:
    """(name, datatype, shape) of the two inputs, -1 for the batch axis, and the output's shape."""
    shape = [-1, meta.channels, meta.patch_size, meta.patch_size]
    inputs = [(name, DATATYPES[meta.input_dtype], shape) for name in INPUT_NAMES]
    return inputs, [-1]


class KServeServicer(kpb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over the server's model repository."""

    def __init__(self, repository: ModelRepository, ready: ReadyFn) -> None:
        self.repository = repository
        self.ready = ready
        # read once: importlib.metadata opens files in site-packages, and no request may make
        # the server read a file
        try:
            self.version = importlib_metadata.version("rarechange")
        except importlib_metadata.PackageNotFoundError:  # a source tree that was never installed
            self.version = "0+unknown"

    # ------------------------------------------------------------------ health
    def ServerLive(
        self, request: kpb.ServerLiveRequest, context: grpc.ServicerContext
    ) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)  # answering at all is being live

    def ServerReady(
        self, request: kpb.ServerReadyRequest, context: grpc.ServicerContext
    ) -> kpb.ServerReadyResponse:
        return kpb.ServerReadyResponse(ready=bool(self.repository.models) and self.ready())

    def ModelReady(
        self, request: kpb.ModelReadyRequest, context: grpc.ServicerContext
    ) -> kpb.ModelReadyResponse:
        """False, not NOT_FOUND, for a model this server lacks: it is a probe, it must answer."""
        try:
            self.repository.get(request.name, request.version)
        except ModelNotFound:
            return kpb.ModelReadyResponse(ready=False)
        return kpb.ModelReadyResponse(ready=self.ready())

    # ------------------------------------------------------------------ metadata
    def ServerMetadata(
        self, request: kpb.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> kpb.ServerMetadataResponse:
        # no protocol extensions (model repository, statistics, shared memory, ...) are offered
        return kpb.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=[])

    def ModelMetadata(
        self, request: kpb.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> kpb.ModelMetadataResponse:
        with status_mapping(context, "ModelMetadata"):
            meta = self.repository.get(request.name, request.version).metadata
            inputs, output_shape = tensor_metadata(meta)
            tensor = kpb.ModelMetadataResponse.TensorMetadata
            return kpb.ModelMetadataResponse(
                name=meta.name,
                versions=[meta.version],
                platform=PLATFORM,
                inputs=[tensor(name=n, datatype=d, shape=s) for n, d, s in inputs],
                outputs=[tensor(name=OUTPUT_NAME, datatype=OUTPUT_DATATYPE, shape=output_shape)],
            )
        raise AssertionError("unreachable: status_mapping aborts")  # pragma: no cover

    # ------------------------------------------------------------------ inference
    def ModelInfer(
        self, request: kpb.ModelInferRequest, context: grpc.ServicerContext
    ) -> kpb.ModelInferResponse:
        request_id = request.id or uuid.uuid4().hex
        with status_mapping(context, request_id):
            served = self.repository.get(request.model_name, request.model_version)
            meta = served.metadata
            before, after = parse_inputs(request, meta)
            for i, out in enumerate(request.outputs):
                if out.name != OUTPUT_NAME:
                    raise InvalidInput(
                        f"outputs[{i}].name: {out.name!r} is not an output of model "
                        f"{meta.name!r}; it has only {OUTPUT_NAME!r}"
                    )
            remaining = time_remaining(context)
            deadline = None if remaining is None else time.monotonic() + remaining
            job = served.batcher.submit(before, after, deadline)
            context.add_callback(job.cancel)  # a client that goes away frees its queue slots
            probabilities = job.result(timeout=remaining)
            return infer_response(request, meta, probabilities)
        raise AssertionError("unreachable: status_mapping aborts")  # pragma: no cover


def parse_inputs(request: kpb.ModelInferRequest, meta: ModelMetadata) -> tuple[np.ndarray, ...]:
    """The request's before/after tensors as (N, C, P, P) arrays of the model's dtype.

    Nothing is converted: a tensor of another datatype or shape is refused, naming the field.
    """
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents: {len(raw)} entries for {len(request.inputs)} inputs; "
            "give one per input, in the order of `inputs`"
        )
    expected = ", ".join(repr(n) for n in INPUT_NAMES)
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name not in INPUT_NAMES:
            raise InvalidInput(
                f"inputs[{i}].name: {tensor.name!r} is not an input of model {meta.name!r}; "
                f"it takes {expected}"
            )
        if tensor.name in arrays:
            raise InvalidInput(f"inputs[{i}].name: {tensor.name!r} is given twice")
        arrays[tensor.name] = _tensor(tensor, i, raw[i] if raw else None, meta)
    missing = [n for n in INPUT_NAMES if n not in arrays]
    if missing:
        raise InvalidInput(f"inputs: {', '.join(map(repr, missing))} missing; it takes {expected}")
    before, after = (arrays[n] for n in INPUT_NAMES)
    if len(before) != len(after):
        raise InvalidInput(
            f"inputs: {len(before)} {INPUT_NAMES[0]!r} patches but {len(after)} "
            f"{INPUT_NAMES[1]!r} patches; send them in pairs"
        )
    return before, after


def _tensor(
    tensor: kpb.ModelInferRequest.InferInputTensor,
    index: int,
    raw: bytes | None,
    meta: ModelMetadata,
) -> np.ndarray:
    field = f"inputs[{index}] ({tensor.name!r})"
    datatype = DATATYPES[meta.input_dtype]
    if tensor.datatype != datatype:
        raise InvalidInput(
            f"{field}.datatype: {tensor.datatype!r}, model {meta.name!r} takes {datatype!r}"
        )
    shape = list(tensor.shape)
    patch = [meta.channels, meta.patch_size, meta.patch_size]
    if len(shape) != 4 or shape[0] < 0 or shape[1:] != patch:
        raise InvalidInput(
            f"{field}.shape: {shape}, model {meta.name!r} takes [N, {', '.join(map(str, patch))}] "
            "(patches, channels, height, width)"
        )
    count = math.prod(shape)  # exact: np.prod wraps around in int64 ([2**54, 3, 32, 32] -> 0)
    dtype = np.dtype(meta.input_dtype)
    if raw is not None:
        if tensor.HasField("contents"):
            raise InvalidInput(
                f"{field}.contents: set although raw_input_contents is used; use one or the other"
            )
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(
                f"raw_input_contents[{index}] ({tensor.name!r}): {len(raw)} bytes, shape {shape} "
                f"of {datatype} needs {count * dtype.itemsize}"
            )
        # little-endian on the wire; astype copies only on a big-endian host
        array = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
        return _finite(array.reshape(shape), field)
    name = _CONTENTS[meta.input_dtype]
    values = getattr(tensor.contents, name)
    if len(values) != count:
        raise InvalidInput(
            f"{field}.contents.{name}: {len(values)} values, shape {shape} needs {count}"
        )
    if dtype.kind == "u":
        wide = np.asarray(values, dtype=np.uint32)
        top = np.iinfo(dtype).max
        if wide.size and int(wide.max()) > top:
            raise InvalidInput(f"{field}.contents.{name}: values above {top} for {datatype}")
        return wide.astype(dtype).reshape(shape)
    return _finite(np.asarray(values, dtype=dtype).reshape(shape), field)


def _finite(array: np.ndarray, field: str) -> np.ndarray:
    """NaN/Inf silently poison a model's normalisation: refused, as DetectChange refuses them."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput(f"{field}: values contain NaN or Inf; send finite values")
    return array


def infer_response(
    request: kpb.ModelInferRequest, meta: ModelMetadata, probabilities: np.ndarray
) -> kpb.ModelInferResponse:
    """``probability`` FP32 [N]: raw bytes when the request sent raw bytes, else typed values."""
    response = kpb.ModelInferResponse(
        model_name=meta.name, model_version=meta.version, id=request.id
    )
    probabilities = np.asarray(probabilities, dtype=np.float32).reshape(-1)
    output = response.outputs.add(
        name=OUTPUT_NAME, datatype=OUTPUT_DATATYPE, shape=[len(probabilities)]
    )
    if request.raw_input_contents:
        response.raw_output_contents.append(probabilities.astype("<f4").tobytes())
    else:
        output.contents.fp32_contents.extend(probabilities.tolist())
    return response


def add_to_server(server: grpc.Server, repository: ModelRepository, ready: ReadyFn) -> None:
    """Register the Open Inference Protocol service on ``server``."""
    kpb_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(repository, ready), server)


def reflection_pool(service_names: Iterable[str]) -> descriptor_pool.DescriptorPool:
    """One descriptor pool holding every named service's file, for the reflection service.

    The KServe stubs live in a private pool (see the module docstring) that gRPC's reflection,
    which reads a single pool, would not see; this copies each service's file and its imports
    from whichever pool defines it, the private one first.
    """
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.AddSerializedFile(file.serialized_pb)
        added.add(file.name)

    for name in service_names:
        for source in (kpb.POOL, descriptor_pool.Default()):
            try:
                add(source.FindFileContainingSymbol(name))
            except KeyError:
                continue
            break
        else:
            log.warning("reflection: no descriptor for service %s", name)
    return pool
