"""The server's life cycle: warm-up before SERVING, NOT_SERVING while draining, SIGTERM lets the
calls in flight finish.

Models are plain functions (FunctionBackend) held at a gate, so that "slow" is an event the test
controls, never a sleep; no test asserts a duration.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from scrape import inflight

from serving.api import change_detection_pb2 as pb
from serving.api import change_detection_pb2_grpc as pb_grpc
from serving.backends.base import FunctionBackend
from serving.backends.onnxruntime import OnnxRuntimeBackend
from serving.batcher import DynamicBatcher
from serving.client import ChangeDetectionClient, image_message
from serving.config import ServerSettings
from serving.drain import DRAINING_MESSAGE
from serving.metadata import ModelMetadata
from serving.models import ModelRepository, ServedModel
from serving.server import SERVICE_NAME, ChangeDetectionServer, create_server
from serving.tiling import grid

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "synthetic-thin" / "model.onnx"
WAIT = 30.0  # seconds: only ever reached when a test is about to fail
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Instance:
    """One model instance: records (batch size, all zeros) per call; ``gate`` holds its first
    call until ``release`` is set, having signalled ``entered``."""

    def __init__(self, gate: bool = False) -> None:
        self.gate = gate
        self.calls: list[tuple[int, bool]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, before: np.ndarray, after: np.ndarray) -> np.ndarray:
        self.calls.append((len(before), not before.any() and not after.any()))
        if self.gate and len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(WAIT), "the test never opened the gate"
        return np.full(len(before), 0.25, np.float32)


@pytest.fixture(scope="module")
def metadata() -> ModelMetadata:
    return OnnxRuntimeBackend(MODEL).metadata


@pytest.fixture
def make_server(metadata: ModelMetadata) -> Iterator[Callable[..., ChangeDetectionServer]]:
    """A server (created, not started) whose model is the given instances; stopped afterwards."""
    made: list[tuple[ChangeDetectionServer, list[Instance]]] = []

    def make(instances: list[Instance], **settings: object) -> ChangeDetectionServer:
        cfg = ServerSettings(
            host="127.0.0.1", port=0, metrics_port=-1, max_batch_size=16, **settings
        )
        batcher = DynamicBatcher(
            [FunctionBackend(fn).infer for fn in instances],
            max_batch_size=cfg.max_batch_size,
            max_queue_delay_us=0,
            max_queue_size=1024,
            name=metadata.name,
        )
        served = ServedModel(metadata, MODEL, "function", batcher)
        server = create_server(cfg, ModelRepository({metadata.name: served}, metadata.name))
        made.append((server, instances))
        return server

    yield make
    for server, instances in made:
        for instance in instances:
            instance.release.set()
        server.stop(grace=0)


def request(size: int = 64) -> pb.DetectChangeRequest:
    image = image_message(np.zeros((size, size, 3), np.uint8))
    return pb.DetectChangeRequest(before=image, after=image)


def health_status(address: str, timeout: float = WAIT) -> int | grpc.StatusCode:
    """The health of the service over a fresh channel, or the call's code when it is refused."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            return stub.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout
            ).status
        except grpc.RpcError as err:
            return err.code()


def test_health_is_not_serving_until_every_instance_is_warm(make_server) -> None:
    slow, other = Instance(gate=True), Instance()
    server = make_server([slow, other])
    starter = threading.Thread(target=server.start)
    starter.start()
    assert slow.entered.wait(WAIT)  # warming up: the port is open, the first instance is busy
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT)
            assert status.status == NOT_SERVING
        # a call made now is queued and answered once the models are warm
        call = pb_grpc.ChangeDetectionStub(channel).DetectChange.future(request(), timeout=WAIT)
        assert not call.done() and not other.calls
        slow.release.set()
        starter.join(WAIT)
        assert not starter.is_alive()
        for service in ("", SERVICE_NAME):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT)
            assert status.status == SERVING
        assert call.result().height == 64
    # each instance ran one full batch of zero patches before anything else
    assert slow.calls[0] == (16, True) and other.calls[0] == (16, True)
    assert sum(n for n, _ in slow.calls[1:] + other.calls[1:]) == len(
        call.result().tiles.probability
    )


def test_no_warm_up_when_disabled(make_server) -> None:
    instance = Instance()
    make_server([instance], warmup=False).start()
    assert instance.calls == []


def test_health_is_not_serving_while_draining(make_server) -> None:
    model = Instance(gate=True)
    server = make_server([model], warmup=False).start()
    assert health_status(server.address) == SERVING
    with grpc.insecure_channel(server.address) as channel:
        call = pb_grpc.ChangeDetectionStub(channel).DetectChange.future(request(), timeout=WAIT)
        assert model.entered.wait(WAIT)  # the call is in the model, held there
        stopper = threading.Thread(target=server.stop, kwargs={"grace": WAIT})
        stopper.start()
        # poll until the drain shows, then keep polling while the call is still held
        give_up = time.monotonic() + WAIT
        while health_status(server.address) == SERVING:
            assert time.monotonic() < give_up, "health never left SERVING"
            time.sleep(0.01)
        seen = [health_status(server.address) for _ in range(5)]
        # while calls run, the port stays open for probes: they read NOT_SERVING
        assert seen == [NOT_SERVING] * 5, seen
        in_process = server.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), None)
        assert in_process.status == NOT_SERVING
        assert not call.done() and stopper.is_alive()
        model.release.set()
        assert call.result().height == 64  # the call in flight finished normally
    stopper.join(WAIT)
    assert not stopper.is_alive()


def test_a_call_made_while_draining_is_refused_unavailable(make_server) -> None:
    """Not CANCELLED (what gRPC's own stop gives a call that arrives as it stops, and what no
    client retries): the drain gate answers UNAVAILABLE, unread, while admitted calls go on."""
    model = Instance(gate=True)
    server = make_server([model], warmup=False).start()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ChangeDetectionStub(channel)
        held = stub.DetectChange.future(request(), timeout=WAIT)
        assert model.entered.wait(WAIT)
        stopper = threading.Thread(target=server.stop, kwargs={"grace": WAIT})
        stopper.start()
        give_up = time.monotonic() + WAIT
        while not server.gate.refused:  # probe until the gate is closed
            assert time.monotonic() < give_up, "the gate never closed"
            try:
                stub.DetectChange(request(), timeout=WAIT)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                assert err.details() == DRAINING_MESSAGE
        for _ in range(3):  # and every later one, junk bytes included (never parsed)
            with pytest.raises(grpc.RpcError) as refused:
                stub.DetectChange(request(), timeout=WAIT)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            junk = channel.unary_unary(f"/{SERVICE_NAME}/DetectChange")
            with pytest.raises(grpc.RpcError) as refused:
                junk(b"\xff\x00 not a protobuf", timeout=WAIT)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.gate.running == 1 and not held.done() and stopper.is_alive()
        model.release.set()
        assert held.result().height == 64
    stopper.join(WAIT)
    assert not stopper.is_alive() and server.gate.running == 0


@pytest.mark.slow
def test_sigterm_lets_calls_in_flight_finish(tmp_path: Path, metadata: ModelMetadata) -> None:
    """8 calls of a 512x512 pair (thousands of patches each) in flight at SIGTERM all complete;
    a new call is refused; the process exits 0 within the grace period."""
    grace = 120.0
    env = {
        **os.environ,
        "RARECHANGE_METRICS_PORT": "0",
        "RARECHANGE_GRACE_S": str(grace),
        "PYTHONUNBUFFERED": "1",
    }
    n = 8
    with (
        (tmp_path / "stderr.txt").open("w") as stderr,
        subprocess.Popen(
            [sys.executable, "-m", "serving.cli.main", "serve", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=ROOT,
            env=env,
        ) as proc,
    ):
        try:
            line = proc.stdout.readline()
            assert "serving on" in line, line + (tmp_path / "stderr.txt").read_text()
            address = line.split()[-1]
            metrics_url = proc.stdout.readline().split()[-1]
            assert metrics_url.startswith("http://"), metrics_url
            rng = np.random.default_rng(0)
            before = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
            after = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
            with ChangeDetectionClient(address) as client, ThreadPoolExecutor(n) as pool:
                calls = [pool.submit(client.detect, before, after, timeout=grace) for _ in range(n)]
                give_up = time.monotonic() + WAIT
                while inflight(metrics_url, WAIT) < n:
                    assert time.monotonic() < give_up, "the calls never were all in flight"
                    assert not any(c.done() for c in calls), [c.exception() for c in calls]
                    time.sleep(0.01)
                proc.send_signal(signal.SIGTERM)
                # once the drain has begun (health refused too), a new call is refused
                # a stopping server refuses new calls; on a loaded machine a refused connection
                # can also surface as the call's own deadline passing: both mean "not served"
                refused = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                give_up = time.monotonic() + WAIT
                seen: list[object] = []
                while (status := health_status(address, timeout=2.0)) not in refused:
                    seen.append(status)
                    assert time.monotonic() < give_up, f"never began draining: {seen[-5:]}"
                    time.sleep(0.01)
                with grpc.insecure_channel(address) as channel:
                    with pytest.raises(grpc.RpcError) as err:
                        pb_grpc.ChangeDetectionStub(channel).DetectChange(request(), timeout=5.0)
                    assert err.value.code() in refused
                results = [c.result(timeout=grace) for c in calls]
            assert [r.response.height for r in results] == [512] * n
            tiles = len(grid(512, 512, metadata.patch_size, metadata.recommended_stride))
            assert all(len(r.response.tiles.probability) == tiles for r in results)
            assert proc.wait(timeout=grace) == 0, (tmp_path / "stderr.txt").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
