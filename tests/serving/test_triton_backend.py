"""The Triton backend against a real gRPC server speaking Triton's protocol.

Triton itself cannot run here, so the test starts a small one: tritonclient's own servicer classes
(KServe v2 plus Triton's ModelConfig), running ONNX Runtime on the model files of a Triton
repository that export.triton.write_triton_repo wrote from the bundled model, with the config read
from its config.pbtxt. TritonBackend must give what the in-process backend gives, DetectChange
through our server must give the same maps on either backend, and a Triton that goes away must be
UNAVAILABLE while it is gone, and serve again when it returns.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from export.triton import write_triton_repo
from serving import tiling
from serving.api import change_detection_pb2 as pb
from serving.api import change_detection_pb2_grpc as pb_grpc
from serving.backends.onnxruntime import OnnxRuntimeBackend
from serving.config import ServerSettings
from serving.errors import BackendUnavailable, ModelLoadError
from serving.server import ChangeDetectionServer, create_server
from training.synthetic import SceneConfig, render_pair

pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from serving.backends.triton import TritonBackend

ONNX = Path(__file__).resolve().parents[2] / "models" / "synthetic-thin" / "model.onnx"
MODEL = "synthetic-thin"
TRITON_MAX_BATCH = 16  # small, so that the backend must split the batches our batcher forms
_NUMPY = {"TYPE_UINT8": np.uint8, "TYPE_UINT16": np.uint16, "TYPE_FP32": np.float32}


# ---------------------------------------------------------------------- a small Triton
class OnnxTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Triton's gRPC service over ONNX Runtime, for the models of a Triton model repository."""

    def __init__(self, repository: Path) -> None:
        self.models: dict[str, tuple[model_config_pb2.ModelConfig, ort.InferenceSession]] = {}
        for path in sorted(repository.glob("*/config.pbtxt")):
            config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
            latest = max(int(p.name) for p in path.parent.iterdir() if p.name.isdigit())
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            session = ort.InferenceSession(
                str(path.parent / str(latest) / "model.onnx"), opts, ["CPUExecutionProvider"]
            )
            self.models[config.name] = (config, session)

    def _model(self, name: str, context: grpc.ServicerContext) -> tuple:
        if name not in self.models:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{name}'")
        return self.models[name]

    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=request.name in self.models)

    def ModelConfig(self, request, context):
        config, _ = self._model(request.name, context)
        return service_pb2.ModelConfigResponse(config=config)

    def ModelMetadata(self, request, context):
        config, _ = self._model(request.name, context)

        def tensor(t):  # Triton's API shape: the batch axis, then dims
            datatype = model_config_pb2.DataType.Name(t.data_type).removeprefix("TYPE_")
            return service_pb2.ModelMetadataResponse.TensorMetadata(
                name=t.name, datatype=datatype, shape=[-1, *t.dims]
            )

        return service_pb2.ModelMetadataResponse(
            name=config.name,
            versions=["1"],
            platform=config.platform,
            inputs=[tensor(t) for t in config.input],
            outputs=[tensor(t) for t in config.output],
        )

    def ModelInfer(self, request, context):
        config, session = self._model(request.model_name, context)
        types = {t.name: t for t in config.input}
        feeds = {}
        for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
            dtype = _NUMPY[model_config_pb2.DataType.Name(types[tensor.name].data_type)]
            feeds[tensor.name] = np.frombuffer(raw, dtype).reshape(tensor.shape)
        batch = len(next(iter(feeds.values())))
        if batch > config.max_batch_size:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"inference request batch-size must be <= {config.max_batch_size}",
            )
        (output,) = config.output
        (result,) = session.run([output.name], feeds)
        response = service_pb2.ModelInferResponse(model_name=config.name, model_version="1")
        response.outputs.add(name=output.name, datatype="FP32", shape=[batch, *output.dims])
        response.raw_output_contents.append(np.asarray(result, "<f4").tobytes())
        return response


class FakeTriton:
    """Start, stop and restart it on one port, as a Triton pod going away and coming back."""

    def __init__(self, repository: Path) -> None:
        self.servicer = OnnxTriton(repository)
        self.port = 0
        self.server: grpc.Server | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FakeTriton:
        server = grpc.server(futures.ThreadPoolExecutor(4))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
        port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        assert port, f"cannot bind 127.0.0.1:{self.port}"
        self.port = port
        server.start()
        self.server = server
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0).wait()
            self.server = None


def triton_repo(root: Path, **options: object) -> Path:
    repo = root / "triton-repo"
    write_triton_repo(ONNX, repo, name=MODEL, kind="KIND_CPU", **options)
    return repo


@pytest.fixture
def triton(tmp_path: Path) -> Iterator[FakeTriton]:
    fake = FakeTriton(triton_repo(tmp_path, max_batch_size=TRITON_MAX_BATCH)).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def reference() -> Iterator[OnnxRuntimeBackend]:
    with OnnxRuntimeBackend(ONNX) as b:
        yield b


@pytest.fixture(scope="module")
def pair():
    return render_pair(11, SceneConfig(height=96, width=160, n_changes=3))


@pytest.fixture(scope="module")
def patches(reference: OnnxRuntimeBackend, pair) -> tuple[np.ndarray, np.ndarray]:
    m = reference.metadata
    tiles = tiling.grid(96, 160, m.patch_size, m.recommended_stride)
    return tiling.extract_patches(
        pair.before, pair.after, tiles, m.patch_size, m.recommended_stride
    )


# ---------------------------------------------------------------------- the backend itself
def test_triton_backend_equals_onnxruntime(triton: FakeTriton, reference, patches) -> None:
    before, after = patches
    assert len(before) > 3 * TRITON_MAX_BATCH  # several Triton batches per call
    with TritonBackend(ONNX, url=triton.url) as backend:
        assert backend.name == "triton" and backend.max_batch_size == TRITON_MAX_BATCH
        assert backend.metadata == reference.metadata  # from the local file, verified
        got = backend.infer(before, after)
        empty = backend.infer(before[:0], after[:0])
    want = reference.infer(before, after)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert want.min() < 0.1 and want.max() > 0.9
    assert empty.shape == (0,)


def test_a_model_triton_lacks_is_refused(triton: FakeTriton) -> None:
    with pytest.raises(ModelLoadError, match="not ready"):
        TritonBackend(ONNX, url=triton.url, model_name="other-model")


def test_a_triton_model_that_disagrees_is_refused(tmp_path: Path) -> None:
    repo = triton_repo(tmp_path)
    config = repo / MODEL / "config.pbtxt"
    config.write_text(config.read_text().replace("dims: [ 3, 32, 32 ]", "dims: [ 3, 16, 16 ]"))
    fake = FakeTriton(repo).start()
    try:
        with pytest.raises(ModelLoadError) as err:
            TritonBackend(ONNX, url=fake.url)
    finally:
        fake.stop()
    message = str(err.value)
    assert "does not match" in message and "input 'before'" in message
    assert "[-1, 3, 16, 16]" in message and "re-export" in message


def test_an_unreachable_triton_is_unavailable(triton: FakeTriton) -> None:
    url = triton.url
    triton.stop()
    with pytest.raises(BackendUnavailable, match=f"cannot reach Triton at {url}"):
        TritonBackend(ONNX, url=url)


def test_without_tritonclient_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)  # `import` now fails
    with pytest.raises(ModelLoadError, match=r"pip install 'rarechange\[triton\]'"):
        TritonBackend(ONNX, url="127.0.0.1:1")


# ---------------------------------------------------------------------- through our server
@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """Only the model Triton serves (the bundled folder also holds variants)."""
    folder = tmp_path / "models" / MODEL
    folder.mkdir(parents=True)
    shutil.copy(ONNX, folder / "model.onnx")
    return folder.parent


@pytest.fixture
def servers(models_dir: Path) -> Iterator[Callable[..., ChangeDetectionServer]]:
    started: list[ChangeDetectionServer] = []

    def start(**overrides: object) -> ChangeDetectionServer:
        settings = ServerSettings(
            host="127.0.0.1",
            port=0,
            metrics_port=-1,
            models_dir=models_dir,
            max_batch_size=64,
            **overrides,
        )
        server = create_server(settings).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(grace=0)


def detect(address: str, pair) -> tuple[pb.DetectChangeResponse, np.ndarray]:
    def image(array: np.ndarray) -> pb.Image:
        raw = pb.RawArray(data=array.tobytes(), shape=array.shape, dtype=pb.DTYPE_UINT8)
        return pb.Image(raw=raw)

    request = pb.DetectChangeRequest(before=image(pair.before), after=image(pair.after))
    request.options.probability_encoding = pb.PROBABILITY_ENCODING_RAW_FLOAT16
    with grpc.insecure_channel(address) as channel:
        response = pb_grpc.ChangeDetectionStub(channel).DetectChange(request, timeout=60)
    pm = response.probability_map
    return response, np.frombuffer(pm.data, "<f2").reshape(pm.height, pm.width)


def health_status(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


def test_detect_change_on_triton_equals_onnxruntime(servers, triton: FakeTriton, pair) -> None:
    on_triton = servers(backend="triton", triton_url=triton.url)
    in_process = servers(backend="onnxruntime", providers="cpu")
    with grpc.insecure_channel(on_triton.address) as channel:
        info = pb_grpc.ChangeDetectionStub(channel).GetModel(pb.GetModelRequest(), timeout=10)
    assert info.backend == "triton"
    response, probability = detect(on_triton.address, pair)
    reference, want = detect(in_process.address, pair)
    assert list(response.tiles.probability) == pytest.approx(
        list(reference.tiles.probability), abs=1e-6
    )
    np.testing.assert_allclose(probability, want, rtol=0, atol=1e-3)
    assert want.max() > 0.9 and response.changed_fraction == reference.changed_fraction


def test_triton_going_away_is_unavailable_then_serves_again(
    servers, triton: FakeTriton, pair
) -> None:
    server = servers(backend="triton", triton_url=triton.url)
    _, before = detect(server.address, pair)

    triton.stop()
    with pytest.raises(grpc.RpcError) as err:
        detect(server.address, pair)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Triton" in err.value.details() and "retry" in err.value.details()
    assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING

    triton.start()  # the same port: Triton restarted
    give_up = time.monotonic() + 20
    while True:  # the channel reconnects within its (short) backoff
        try:
            _, after = detect(server.address, pair)
            break
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > give_up:
                raise
            time.sleep(0.2)
    np.testing.assert_array_equal(after, before)
