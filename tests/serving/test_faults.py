"""The hardening issue's faults, each against a real server: the server either answers with the
status the fault calls for and goes on, or refuses to start and says why.

Where an existing test already is the scenario it is referenced here, not repeated:

- SIGTERM with calls in flight (8 calls held at a known point): test_lifecycle.py::
  test_sigterm_lets_calls_in_flight_finish. Here: SIGTERM under load, more clients than handler
  threads sending continuously.
- One request whose own patches break the backend fails alone, with generic INTERNAL text:
  test_service_errors.py::test_backend_failure_is_internal_for_that_request_only and
  ::test_concurrent_good_requests_survive_a_failing_one (and test_batcher.py). Here: a backend
  that fails one batch, once, whatever is in it (a transient fault, not a request's).
- Triton going away and coming back, one call at a time: test_triton_backend.py::
  test_triton_going_away_is_unavailable_then_serves_again. Here: the same under concurrent load,
  with calls in flight when it goes.
- Truncated or tampered model files refused by the backend: test_onnxruntime_backend.py. Here:
  ``rarechange serve`` itself refuses to start, naming the file.
- Batch scoring killed with SIGKILL and resumed gives the same pixels: test_scoring_pair.py::
  test_resume_after_sigkill_gives_the_same_pixels. A full disk: test_scoring_faults.py.

Nothing here asserts a duration: "slow" is a gate the test opens, and waits poll for a state with
a generous limit that is only reached when a test is about to fail.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import numpy_helper
from scrape import inflight

from serving.api import change_detection_pb2 as pb
from serving.api import change_detection_pb2_grpc as pb_grpc
from serving.backends.base import FunctionBackend
from serving.backends.onnxruntime import OnnxRuntimeBackend
from serving.batcher import DynamicBatcher
from serving.client import image_message
from serving.config import ServerSettings
from serving.metadata import ModelMetadata
from serving.models import ModelRepository, ServedModel
from serving.server import ChangeDetectionServer, create_server
from serving.tiling import grid

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models" / "synthetic-thin"
MODEL = MODEL_DIR / "model.onnx"
WAIT = 60.0  # seconds: only ever reached when a test is about to fail
SERVING = health_pb2.HealthCheckResponse.SERVING


def raw_request(image: np.ndarray, after: np.ndarray | None = None) -> pb.DetectChangeRequest:
    return pb.DetectChangeRequest(
        before=image_message(image), after=image_message(image if after is None else after)
    )


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=WAIT).status


def wait_for(condition: Callable[[], bool], what: str, limit: float = WAIT) -> None:
    give_up = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < give_up, f"gave up waiting: {what}"
        time.sleep(0.01)


# ------------------------------------------------------------------ `rarechange serve` processes
@dataclass
class ServeProcess:
    proc: subprocess.Popen
    stderr_path: Path
    address: str = ""
    metrics_url: str = ""

    def stderr(self) -> str:
        return self.stderr_path.read_text()


@contextmanager
def serve_process(tmp_path: Path, *args: str) -> Iterator[ServeProcess]:
    """``rarechange serve ARGS`` in a child process on free ports; killed if still running."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RARECHANGE_")}
    env["PYTHONUNBUFFERED"] = "1"
    stderr_path = tmp_path / "serve-stderr.txt"
    argv = [sys.executable, "-m", "serving.cli.main", "serve", "--port", "0", *args]
    with (
        stderr_path.open("w") as stderr,
        subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT, env=env
        ) as proc,
    ):
        try:
            yield ServeProcess(proc, stderr_path)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=WAIT)


def started(server: ServeProcess) -> ServeProcess:
    """Read the address (and the metrics URL) the server prints once it serves."""
    line = server.proc.stdout.readline()
    assert "serving on" in line, line + server.stderr()
    server.address = line.split()[-1]
    server.metrics_url = server.proc.stdout.readline().split()[-1]
    assert server.metrics_url.startswith("http://"), server.metrics_url
    return server


def only(model_dir: Path, root: Path) -> Path:
    """A models dir serving ``model_dir`` alone (the bundled one also holds variants)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / model_dir.name).symlink_to(model_dir)
    return root


# ------------------------------------------------------------------ SIGTERM under load
@dataclass
class Call:
    client: int
    start: float  # time.monotonic()
    end: float
    code: grpc.StatusCode
    details: str


@pytest.mark.slow
def test_sigterm_under_load_loses_no_admitted_request(tmp_path: Path) -> None:
    """24 clients (more than the 16 handler threads, so calls also wait in gRPC's queue) send
    back to back; SIGTERM arrives with every handler busy. Every call sent before the signal ends
    OK with its full result; after it, each client's next call is refused (UNAVAILABLE) and it
    stops; nothing ends any other way, and the server exits 0 once drained."""
    clients, grace = 24, 120.0
    size = 256
    meta = OnnxRuntimeBackend(MODEL).metadata
    tiles = len(grid(size, size, meta.patch_size, meta.recommended_stride))
    rng = np.random.default_rng(0)
    request = raw_request(
        rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
    )
    calls: list[Call] = []
    lock = threading.Lock()
    give_up = time.monotonic() + 4 * WAIT

    def client(i: int, address: str) -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]  # its own connection
        with grpc.insecure_channel(address, options=options) as channel:
            stub = pb_grpc.ChangeDetectionStub(channel)
            while time.monotonic() < give_up:
                t0 = time.monotonic()
                try:
                    response = stub.DetectChange(request, timeout=grace)
                    code, details = grpc.StatusCode.OK, ""
                    if len(response.tiles.probability) != tiles or response.height != size:
                        code, details = grpc.StatusCode.DATA_LOSS, "incomplete result"
                except grpc.RpcError as err:
                    code, details = err.code(), err.details() or ""
                with lock:
                    calls.append(Call(i, t0, time.monotonic(), code, details))
                if code != grpc.StatusCode.OK:
                    return

    models = only(MODEL_DIR, tmp_path / "models")
    args = ("--models-dir", str(models), "--metrics-port", "0", "--grace-s", str(grace))
    with serve_process(tmp_path, *args, "--providers", "cpu", "--workers", "16") as server:
        started(server)
        threads = [
            threading.Thread(target=client, args=(i, server.address)) for i in range(clients)
        ]
        for t in threads:
            t.start()
        # steady load: every client has had an answer, every handler thread is busy
        wait_for(lambda: len({c.client for c in calls}) == clients, "every client answered")
        wait_for(lambda: inflight(server.metrics_url, WAIT) >= 16, "every handler busy")
        assert all(c.code == grpc.StatusCode.OK for c in calls), calls
        signalled_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(grace)
        assert not any(t.is_alive() for t in threads)
        assert server.proc.wait(timeout=grace) == 0, server.stderr()

    codes = collections.Counter(c.code for c in calls)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, [
        c for c in calls if c.code not in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)
    ]
    in_flight = [c for c in calls if c.start < signalled_at < c.end]
    assert len(in_flight) >= 16  # admitted: in the handlers or gRPC's queue at the signal
    assert all(c.code == grpc.StatusCode.OK for c in in_flight)
    assert all(c.code == grpc.StatusCode.OK for c in calls if c.start < signalled_at)
    # each client ends on exactly one refusal, of a call it sent after the signal
    refused = [c for c in calls if c.code == grpc.StatusCode.UNAVAILABLE]
    assert sorted(c.client for c in refused) == list(range(clients))
    assert all(c.start > signalled_at for c in refused)


# ------------------------------------------------------------------ a backend fails one batch
class FlakyBackend:
    """Every patch scores 0.25, except that call ``i`` raises if ``i`` is in ``fail``; a call in
    ``hold`` waits for its release. Records which requests (by pixel value) each call held."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.fail: set[int] = set()
        self.entered = collections.defaultdict(threading.Event)
        self.release = collections.defaultdict(threading.Event)
        self.hold: set[int] = set()
        self._lock = threading.Lock()

    def __call__(self, before: np.ndarray, after: np.ndarray) -> np.ndarray:
        with self._lock:
            i = len(self.calls)
            self.calls.append(sorted({int(v) for v in after.reshape(len(after), -1).max(axis=1)}))
        if i in self.hold:
            self.entered[i].set()
            assert self.release[i].wait(WAIT), "the test never released the call"
        if i in self.fail:
            raise RuntimeError(f"injected fault: the backend failed batch {i}")
        return np.full(len(before), 0.25, np.float32)


@pytest.fixture
def flaky_server() -> Iterator[tuple[ChangeDetectionServer, FlakyBackend]]:
    backend = FlakyBackend()
    meta: ModelMetadata = OnnxRuntimeBackend(MODEL).metadata
    settings = ServerSettings(
        host="127.0.0.1", port=0, metrics_port=0, warmup=False, max_batch_size=512
    )
    batcher = DynamicBatcher(
        [FunctionBackend(backend).infer],
        max_batch_size=settings.max_batch_size,
        max_queue_delay_us=0,
        max_queue_size=1024,
        name=meta.name,
    )
    served = ServedModel(meta, MODEL, "function", batcher)
    server = create_server(settings, ModelRepository({meta.name: served}, meta.name)).start()
    try:
        yield server, backend
    finally:
        for event in backend.release.values():
            event.set()
        server.stop(grace=0)


def test_a_backend_failing_one_batch_fails_only_that_batchs_requests(flaky_server) -> None:
    """Request k is a 64x64 pair whose after image is all k, so the backend can tell whose
    patches each batch holds. A batch of one request that fails: that request INTERNAL (generic
    text), the request queued behind it OK. A batch of several requests that fails once: each is
    retried alone (the batcher's isolation), so all are OK. The server goes on serving."""
    server, backend = flaky_server
    served = server.repository.get()
    batcher, meta = served.batcher, served.metadata
    zeros = np.zeros((64, 64, 3), np.uint8)
    n = len(grid(64, 64, meta.patch_size, meta.recommended_stride))
    assert 2 * n <= batcher.max_batch_size  # one request, or two, fit in one batch

    def request(k: int) -> pb.DetectChangeRequest:
        return raw_request(zeros, np.full_like(zeros, k))

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ChangeDetectionStub(channel)
        # 1. batch 0 holds request 1 alone and fails; request 2 waits in the queue meanwhile
        backend.hold, backend.fail = {0}, {0}
        first = stub.DetectChange.future(request(1), timeout=WAIT)
        assert backend.entered[0].wait(WAIT)
        second = stub.DetectChange.future(request(2), timeout=WAIT)
        wait_for(lambda: batcher.queued_patches == n, "request 2 queued")
        backend.release[0].set()
        with pytest.raises(grpc.RpcError) as err:
            first.result()
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "injected" not in err.value.details()  # internals never reach clients
        assert len(second.result().tiles.probability) == n
        assert backend.calls == [[1], [2]]

        # 2. batch 3 holds requests 4 and 5 and fails once: each is retried alone and served
        backend.hold, backend.fail = {2}, {3}
        third = stub.DetectChange.future(request(3), timeout=WAIT)
        assert backend.entered[2].wait(WAIT)
        shared = []
        for k in (4, 5):  # one after the other: the order of the queue is known
            shared.append(stub.DetectChange.future(request(k), timeout=WAIT))
            wait_for(lambda k=k: batcher.queued_patches == (k - 3) * n, f"request {k} queued")
        backend.release[2].set()
        assert [len(c.result().tiles.probability) for c in (third, *shared)] == [n, n, n]
        assert backend.calls[2:] == [[3], [4, 5], [4], [5]]

        # 3. the server goes on
        assert len(stub.DetectChange(request(6), timeout=WAIT).tiles.probability) == n
    assert health(server.address) == SERVING
    registry = server.metrics.registry
    by_code = {
        code: registry.get_sample_value(
            "rarechange_requests_total",
            {"model": meta.name, "method": "DetectChange", "code": code},
        )
        for code in ("OK", "INTERNAL")
    }
    assert by_code == {"OK": 5.0, "INTERNAL": 1.0}


# ------------------------------------------------------------------ Triton goes away under load
@pytest.mark.slow
def test_triton_going_away_under_load_is_unavailable_then_recovers(tmp_path: Path) -> None:
    """4 clients send back to back through our server to a Triton (the KServe v2 test server of
    test_triton_backend.py) that stops, on its port, and starts again there. Calls in flight or
    sent while it is gone end UNAVAILABLE (never INTERNAL, never a hang past the deadline), our
    server stays SERVING throughout and, never restarted, serves the same results again once
    Triton is back."""
    pytest.importorskip("tritonclient.grpc")
    from test_triton_backend import FakeTriton, triton_repo

    triton = FakeTriton(triton_repo(tmp_path)).start()
    models = tmp_path / "models" / MODEL_DIR.name
    models.mkdir(parents=True)
    shutil.copy(MODEL, models / "model.onnx")
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        models_dir=models.parent,
        backend="triton",
        triton_url=triton.url,
        max_batch_size=64,
    )
    server = create_server(settings).start()
    rng = np.random.default_rng(1)
    before = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    after = before.copy()
    after[20:60, 30:70] = 255
    request = raw_request(before, after)
    calls: list[Call] = []
    results: list[list[float]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(i: int) -> None:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ChangeDetectionStub(channel)
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    response = stub.DetectChange(request, timeout=WAIT)
                    code, details = grpc.StatusCode.OK, ""
                    with lock:
                        results.append(list(response.tiles.probability))
                except grpc.RpcError as err:
                    code, details = err.code(), err.details() or ""
                with lock:
                    calls.append(Call(i, t0, time.monotonic(), code, details))
                stop.wait(0.02)  # pacing only: a refused call returns at once

    def answered(code: grpc.StatusCode, after_t: float, count: int) -> Callable[[], bool]:
        return lambda: sum(c.code == code and c.start > after_t for c in list(calls)) >= count

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        wait_for(answered(grpc.StatusCode.OK, 0.0, 8), "answers while Triton is up")
        going_at = time.monotonic()
        triton.stop()
        gone_at = time.monotonic()
        wait_for(answered(grpc.StatusCode.UNAVAILABLE, gone_at, 8), "refusals while it is gone")
        assert health(server.address) == SERVING  # ours is fine: only its backend is not
        back_at = time.monotonic()
        triton.start()  # the same port: Triton restarted
        wait_for(answered(grpc.StatusCode.OK, time.monotonic(), 8), "answers once it is back")
    finally:
        stop.set()
        for t in threads:
            t.join(WAIT)
        server.stop(grace=0)
        triton.stop()

    assert {c.code for c in calls} == {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
    while_gone = [c for c in calls if c.start > gone_at and c.end < back_at]
    assert while_gone and all(c.code == grpc.StatusCode.UNAVAILABLE for c in while_gone)
    refused = [c for c in calls if c.code == grpc.StatusCode.UNAVAILABLE]
    assert all("Triton" in c.details and "retry" in c.details for c in refused)
    assert all(c.end > going_at for c in refused)  # refused only once Triton began to go
    assert all(r == results[0] for r in results)  # the same answer before and after


# ------------------------------------------------------------------ damaged model files
def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def weights_changed(data: bytes) -> bytes:
    """One weight altered and the file re-saved: a valid ONNX file whose metadata lies."""
    model = onnx.load_model_from_string(data)
    init = max(model.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    array = numpy_helper.to_array(init).copy()
    array.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    return model.SerializeToString()


def bytes_flipped(data: bytes) -> bytes:
    """Bytes inside the largest tensor's raw data inverted in place, as a bad disk would."""
    model = onnx.load_model_from_string(data)
    init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    at = data.index(init.raw_data) + len(init.raw_data) // 2
    return data[:at] + bytes(b ^ 0xFF for b in data[at : at + 8]) + data[at + 8 :]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (truncated, "not a readable ONNX model"),
        (weights_changed, "weights_sha256"),
        (bytes_flipped, "weights_sha256"),
    ],
)
def test_a_damaged_model_file_stops_start_up_naming_it(
    tmp_path: Path, damage: Callable[[bytes], bytes], message: str
) -> None:
    """A good model and a damaged one: the server does not start (no port, exit 1) and the
    message names the damaged file and what is wrong with it."""
    models = tmp_path / "models"
    (models / "a-good").mkdir(parents=True)
    shutil.copy(MODEL, models / "a-good" / "model.onnx")
    bad = models / "z-damaged" / "model.onnx"
    bad.parent.mkdir()
    bad.write_bytes(damage(MODEL.read_bytes()))
    with serve_process(tmp_path, "--models-dir", str(models), "--metrics-port", "-1") as server:
        out, _ = server.proc.communicate(timeout=WAIT)
    assert server.proc.returncode == 1
    assert "serving on" not in out
    error = server.stderr()
    assert str(bad) in error and message in error
    assert "Traceback" not in error
