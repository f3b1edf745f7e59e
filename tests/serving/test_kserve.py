"""The Open Inference Protocol (KServe v2 gRPC) on our real server, driven by Triton's own client:
health, metadata, inference equal to the in-process backend, and each error with its status."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving import kserve, tiling
from serving.backends.base import FunctionBackend
from serving.backends.onnxruntime import OnnxRuntimeBackend
from serving.batcher import DynamicBatcher
from serving.config import ServerSettings
from serving.metadata import ModelMetadata
from serving.models import ModelRepository, ServedModel
from serving.server import SERVICE_NAME, ChangeDetectionServer, create_server
from training.synthetic import SceneConfig, render_pair

tc = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

MODELS = Path(__file__).resolve().parents[2] / "models"
MODEL = "synthetic-thin"
ONNX = MODELS / MODEL / "model.onnx"


def settings(**overrides: object) -> ServerSettings:
    base: dict[str, object] = {"host": "127.0.0.1", "port": 0, "metrics_port": -1}
    return ServerSettings(**{**base, "models_dir": MODELS, **overrides})


@pytest.fixture
def servers() -> Iterator[Callable[..., ChangeDetectionServer]]:
    started: list[ChangeDetectionServer] = []

    def start(repository: ModelRepository | None = None, **overrides: object):
        server = create_server(settings(**overrides), repository).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(grace=0)


@pytest.fixture(scope="module")
def backend() -> Iterator[OnnxRuntimeBackend]:
    with OnnxRuntimeBackend(ONNX) as b:
        yield b


@pytest.fixture(scope="module")
def patches(backend: OnnxRuntimeBackend) -> tuple[np.ndarray, np.ndarray]:
    """Real patch pairs of a synthetic scene with changes: probabilities across [0, 1]."""
    m = backend.metadata
    pair = render_pair(7, SceneConfig(height=96, width=160, n_changes=3))
    tiles = tiling.grid(96, 160, m.patch_size, m.recommended_stride)
    return tiling.extract_patches(
        pair.before, pair.after, tiles, m.patch_size, m.recommended_stride
    )


@pytest.fixture
def server(servers) -> ChangeDetectionServer:
    return servers()


@pytest.fixture
def client(server: ChangeDetectionServer) -> Iterator[tc.InferenceServerClient]:
    with tc.InferenceServerClient(server.address) as c:
        yield c


def infer_inputs(before: np.ndarray, after: np.ndarray, datatype: str = "UINT8") -> list:
    inputs = []
    for name, array in (("before", before), ("after", after)):
        tensor = tc.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def status_of(call: Callable[[], object]) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as err:
        call()
    return err.value.status(), err.value.message()


# ---------------------------------------------------------------------- health and metadata
def test_live_and_ready(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready("")  # the default model
    assert not client.is_model_ready("no-such-model")
    assert not client.is_model_ready(MODEL, model_version="no-such-version")


def test_not_ready_while_draining(server: ChangeDetectionServer, client) -> None:
    server.health.enter_graceful_shutdown()  # what stop() does first, before refusing calls
    assert client.is_server_live()
    assert not client.is_server_ready()
    assert not client.is_model_ready(MODEL)


def test_server_metadata(client: tc.InferenceServerClient) -> None:
    meta = client.get_server_metadata()
    assert meta.name == "rarechange" and meta.version
    assert list(meta.extensions) == []


def test_model_metadata(client: tc.InferenceServerClient, backend: OnnxRuntimeBackend) -> None:
    m = backend.metadata
    meta = client.get_model_metadata(MODEL)
    assert meta.name == MODEL and list(meta.versions) == [m.version]
    shape = [-1, m.channels, m.patch_size, m.patch_size]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("before", "UINT8", shape),
        ("after", "UINT8", shape),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("probability", "FP32", [-1])
    ]
    status, message = status_of(lambda: client.get_model_metadata("no-such-model"))
    assert status == "StatusCode.NOT_FOUND" and "no-such-model" in message


def test_reflection_describes_the_kserve_service(server: ChangeDetectionServer) -> None:
    """The stubs live in a private pool; reflection must still serve their descriptors."""
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(server.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        assert {kserve.SERVICE_NAME, SERVICE_NAME} <= set(db.get_services())
        pool = DescriptorPool(db)
        methods = set(pool.FindServiceByName(kserve.SERVICE_NAME).methods_by_name)
        assert methods == {
            "ServerLive",
            "ServerReady",
            "ModelReady",
            "ServerMetadata",
            "ModelMetadata",
            "ModelInfer",
        }
        assert pool.FindServiceByName(SERVICE_NAME).full_name == "rarechange.v1.ChangeDetection"


def test_kserve_can_be_turned_off(servers) -> None:
    server = servers(kserve=False)
    with tc.InferenceServerClient(server.address) as c:
        status, _ = status_of(c.is_server_live)
    assert status == "StatusCode.UNIMPLEMENTED"


# ---------------------------------------------------------------------- inference
def test_raw_infer_equals_the_backend(client, backend, patches) -> None:
    before, after = patches
    result = client.infer(MODEL, infer_inputs(before, after), request_id="r-1")
    got = result.as_numpy("probability")
    want = backend.infer(before, after)
    assert got.dtype == np.float32 and got.shape == (len(before),)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert want.min() < 0.1 and want.max() > 0.9  # the patches really exercise the model
    response = result.get_response()
    assert response.id == "r-1" and response.model_name == MODEL
    assert len(response.raw_output_contents) == 1  # raw in, raw out
    assert not response.outputs[0].HasField("contents")


def test_typed_contents_infer_equals_the_backend(server, backend, patches) -> None:
    """Typed contents in (uint_contents), typed fp32_contents out; Triton's own message classes."""
    before, after = patches[0][:7], patches[1][:7]
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    for name, array in (("before", before), ("after", after)):
        tensor = request.inputs.add(name=name, datatype="UINT8", shape=array.shape)
        tensor.contents.uint_contents.extend(array.reshape(-1).tolist())
    with grpc.insecure_channel(server.address) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, timeout=30
        )
    assert not response.raw_output_contents
    (output,) = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("probability", "FP32", [7])
    got = np.asarray(output.contents.fp32_contents, dtype=np.float32)
    np.testing.assert_allclose(got, backend.infer(before, after), rtol=0, atol=1e-6)


def test_an_empty_batch_gives_an_empty_result(client, backend) -> None:
    m = backend.metadata
    empty = np.zeros((0, m.channels, m.patch_size, m.patch_size), np.uint8)
    result = client.infer(MODEL, infer_inputs(empty, empty))
    assert result.as_numpy("probability").shape == (0,)


# ---------------------------------------------------------------------- errors
def test_wrong_input_name(client, patches) -> None:
    before, after = patches
    inputs = infer_inputs(before, after)
    inputs[0] = tc.InferInput("image", list(before.shape), "UINT8")
    inputs[0].set_data_from_numpy(before)
    status, message = status_of(lambda: client.infer(MODEL, inputs))
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert "inputs[0].name" in message and "'image'" in message


def test_missing_input(client, patches) -> None:
    before, after = patches
    status, message = status_of(lambda: client.infer(MODEL, infer_inputs(before, after)[:1]))
    assert status == "StatusCode.INVALID_ARGUMENT" and "'after' missing" in message


def test_wrong_datatype(client, patches) -> None:
    before, after = (p.astype(np.float32) for p in patches)
    status, message = status_of(lambda: client.infer(MODEL, infer_inputs(before, after, "FP32")))
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert "inputs[0] ('before').datatype" in message and "'UINT8'" in message


def test_wrong_shape(client, patches) -> None:
    before, after = (np.ascontiguousarray(p[:, :, :16, :16]) for p in patches)
    status, message = status_of(lambda: client.infer(MODEL, infer_inputs(before, after)))
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert "inputs[0] ('before').shape" in message and "[N, 3, 32, 32]" in message


def test_unequal_pair_counts(client, patches) -> None:
    before, after = patches
    status, message = status_of(lambda: client.infer(MODEL, infer_inputs(before, after[:-1])))
    assert status == "StatusCode.INVALID_ARGUMENT" and "in pairs" in message


def test_unknown_model(client, patches) -> None:
    status, message = status_of(lambda: client.infer("no-such-model", infer_inputs(*patches)))
    assert status == "StatusCode.NOT_FOUND" and "no-such-model" in message


def test_unknown_output(client, patches) -> None:
    outputs = [tc.InferRequestedOutput("mask")]
    status, message = status_of(
        lambda: client.infer(MODEL, infer_inputs(*patches), outputs=outputs)
    )
    assert status == "StatusCode.INVALID_ARGUMENT" and "outputs[0].name" in message


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.raw_input_contents.__setitem__(1, b"\0" * 5), "raw_input_contents[1]"),
        (lambda r: r.raw_input_contents.pop(), "raw_input_contents: 1 entries for 2 inputs"),
        (lambda r: r.inputs[0].contents.uint_contents.append(1), "inputs[0] ('before').contents"),
    ],
)
def test_malformed_contents(server, patches, mutate, field: str) -> None:
    before, after = patches[0][:2], patches[1][:2]
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    for name, array in (("before", before), ("after", after)):
        request.inputs.add(name=name, datatype="UINT8", shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    mutate(request)
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()


def test_typed_values_out_of_range(server, patches) -> None:
    before = patches[0][:1]
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    for name in ("before", "after"):
        tensor = request.inputs.add(name=name, datatype="UINT8", shape=before.shape)
        tensor.contents.uint_contents.extend([256] * before.size)
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "values above 255" in err.value.details()


def test_queue_full_is_resource_exhausted(servers, backend, patches) -> None:
    """One batch held in the model, the queue full behind it: the next call is refused at once,
    and the held ones complete once the model moves again."""
    release = threading.Event()
    entered = threading.Event()

    def held(before: np.ndarray, after: np.ndarray) -> np.ndarray:
        entered.set()
        release.wait(30)
        return np.zeros(len(before), np.float32)

    meta: ModelMetadata = backend.metadata
    batcher = DynamicBatcher(
        [FunctionBackend(held).infer], max_batch_size=4, max_queue_delay_us=0, max_queue_size=8
    )
    repo = ModelRepository({meta.name: ServedModel(meta, ONNX, "function", batcher)}, meta.name)
    release.set()  # let the warm-up through
    server = servers(repo, max_batch_size=4, max_queue_size=8)
    release.clear()
    entered.clear()
    before, after = patches[0][:8], patches[1][:8]
    with tc.InferenceServerClient(server.address) as c, ThreadPoolExecutor(2) as pool:
        first = pool.submit(c.infer, MODEL, infer_inputs(before[:4], after[:4]))
        assert entered.wait(10)  # its batch is in the model, out of the queue
        second = pool.submit(c.infer, MODEL, infer_inputs(before, after))  # fills the queue
        try:
            give_up = time.monotonic() + 10
            while batcher.queued_patches < 8 and time.monotonic() < give_up:
                time.sleep(0.01)
            status, message = status_of(lambda: c.infer(MODEL, infer_inputs(before, after)))
        finally:
            release.set()
        assert status == "StatusCode.RESOURCE_EXHAUSTED" and "queue full" in message
        assert first.result(30).as_numpy("probability").shape == (4,)
        assert second.result(30).as_numpy("probability").shape == (8,)
