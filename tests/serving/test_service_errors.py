"""The service's failure modes against a real server: each gets its status and a message naming
the field, and one bad request never harms the next. Models here are plain functions behind the
real batcher, so that slowness and failures are deterministic."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest

from serving.api import change_detection_pb2 as pb
from serving.backends.base import FunctionBackend
from serving.batcher import DynamicBatcher
from serving.client import ChangeDetectionClient, image_message
from serving.config import ServerSettings
from serving.metadata import ModelMetadata
from serving.models import ModelRepository, ServedModel
from serving.server import ChangeDetectionServer, create_server

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "synthetic-thin" / "model.onnx"
Fn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def mean_abs_diff(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    diff = np.abs(before.astype(np.float32) - after.astype(np.float32))
    return diff.mean(axis=(1, 2, 3)) / 255.0


def metadata(**update: object) -> ModelMetadata:
    props = {p.key: p.value for p in onnx.load(BUNDLED).metadata_props}
    base = ModelMetadata.from_props(props)
    return ModelMetadata.model_validate({**base.model_dump(), "name": "fn", **update})


def function_server(
    fn: Fn, meta: ModelMetadata | None = None, **settings: object
) -> ChangeDetectionServer:
    meta = meta or metadata()
    cfg = ServerSettings(host="127.0.0.1", port=0, metrics_port=-1, **settings)
    batcher = DynamicBatcher(
        [FunctionBackend(fn).infer],
        max_batch_size=cfg.max_batch_size,
        max_queue_delay_us=cfg.max_queue_delay_us,
        max_queue_size=cfg.max_queue_size,
        name=meta.name,
    )
    served = ServedModel(meta, BUNDLED, "function", batcher)
    return create_server(cfg, ModelRepository({meta.name: served}, meta.name)).start()


@pytest.fixture
def servers() -> Callable[..., ChangeDetectionServer]:
    started: list[ChangeDetectionServer] = []

    def start(fn: Fn, meta: ModelMetadata | None = None, **settings: object):
        server = function_server(fn, meta, **settings)
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop(grace=0)


def pair(h: int = 96, w: int = 96, dtype: str = "uint8") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    before = rng.integers(0, 200, (h, w, 3)).astype(dtype)
    after = before.copy()
    after[30:60, 30:60] += 50
    return before, after


def test_raw_array_with_wrong_byte_length_names_the_shape(servers) -> None:
    server = servers(mean_abs_diff)
    before, after = pair()
    bad = image_message(before)
    bad.raw.data = bad.raw.data[:-7]
    request = pb.DetectChangeRequest(before=bad, after=image_message(after))
    with ChangeDetectionClient(server.address) as client, pytest.raises(grpc.RpcError) as err:
        client.stub.DetectChange(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "before" in err.value.details() and "bytes" in err.value.details()


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_raw_floats_is_invalid(servers, value: float) -> None:
    server = servers(mean_abs_diff, metadata(input_dtype="float32", input_range=(0.0, 1.0)))
    before, after = (x.astype(np.float32) / 255 for x in pair())
    after[5, 7, 1] = value
    with ChangeDetectionClient(server.address) as client, pytest.raises(grpc.RpcError) as err:
        client.detect(before, after)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "after" in err.value.details()
    assert "NaN" in err.value.details() or "finite" in err.value.details()


def test_channel_count_the_model_does_not_take(servers) -> None:
    server = servers(mean_abs_diff)
    before, after = pair()
    with ChangeDetectionClient(server.address) as client, pytest.raises(grpc.RpcError) as err:
        client.detect(before[..., :1].copy(), after[..., :1].copy())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "channel" in err.value.details() or "band" in err.value.details()


def test_deadline_exceeded_and_expired_work_is_not_run(servers) -> None:
    calls: list[int] = []

    def slow(before: np.ndarray, after: np.ndarray) -> np.ndarray:
        calls.append(len(before))
        time.sleep(0.4)
        return mean_abs_diff(before, after)

    # one patch per batch: a request of many patches needs many slow batches
    server = servers(slow, max_batch_size=1)
    before, after = pair()
    with ChangeDetectionClient(server.address) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.detect(before, after, stride=32, timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(1.0)
        ran = len(calls)
        time.sleep(1.0)
        assert len(calls) == ran  # the rest of the request's patches were dropped, not run
        tiles = (96 // 32) ** 2
        assert ran < tiles


def test_a_full_queue_refuses_before_cutting_patches(servers, monkeypatch) -> None:
    """RESOURCE_EXHAUSTED at once, and the refused pair is never tiled: under overload the
    patch extraction of refused calls took CPU from the admitted ones (docs/reliability.md)."""
    from serving import tiling

    entered, release = threading.Event(), threading.Event()

    def held(before: np.ndarray, after: np.ndarray) -> np.ndarray:
        entered.set()
        assert release.wait(30)
        return mean_abs_diff(before, after)

    cut: list[int] = []
    extract_grid = tiling.extract_grid

    def counted(before: np.ndarray, *rest: object) -> tuple[np.ndarray, np.ndarray]:
        cut.append(before.shape[0])
        return extract_grid(before, *rest)

    monkeypatch.setattr(tiling, "extract_grid", counted)
    # 96x96 at stride 32: 9 patches; the queue holds 16, so one call waits and the next is refused
    server = servers(held, max_batch_size=16, max_queue_size=16, warmup=False)
    before, after = pair()
    with ChangeDetectionClient(server.address) as client:
        first = threading.Thread(target=client.detect, args=(before, after), kwargs={"stride": 32})
        first.start()
        assert entered.wait(30)  # its 9 patches are in the model
        second = threading.Thread(target=client.detect, args=(before, after), kwargs={"stride": 32})
        second.start()
        give_up = time.monotonic() + 30
        while server.repository.get().batcher.queued_patches < 9:
            assert time.monotonic() < give_up
            time.sleep(0.01)
        try:
            with pytest.raises(grpc.RpcError) as err:
                client.detect(before, after, stride=32, timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue full" in (err.value.details() or "")
            assert len(cut) == 2  # the first two calls were tiled, the refused one was not
        finally:
            release.set()
            first.join(30)
            second.join(30)


def test_backend_failure_is_internal_for_that_request_only(servers) -> None:
    def fragile(before: np.ndarray, after: np.ndarray) -> np.ndarray:
        if (after == 255).all(axis=(1, 2, 3)).any():  # a white patch breaks this "engine"
            raise RuntimeError("engine exploded")
        return mean_abs_diff(before, after)

    server = servers(fragile)
    before, after = pair()
    white = np.full_like(after, 255)
    with ChangeDetectionClient(server.address) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.detect(before, white)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "engine exploded" not in err.value.details()  # no internals leak to callers
        ok = client.detect(before, after)  # the server keeps serving
        assert ok.probability.max() > 0.05 and ok.probability.min() < 0.01


def test_concurrent_good_requests_survive_a_failing_one(servers) -> None:
    def fragile(before: np.ndarray, after: np.ndarray) -> np.ndarray:
        if (after == 255).all(axis=(1, 2, 3)).any():
            raise RuntimeError("boom")
        return mean_abs_diff(before, after)

    server = servers(fragile, max_queue_delay_us=20000)
    before, after = pair()
    codes: list[grpc.StatusCode] = []

    def call(a: np.ndarray) -> None:
        with ChangeDetectionClient(server.address) as client:
            try:
                client.detect(before, a)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())

    threads = [threading.Thread(target=call, args=(after,)) for _ in range(6)]
    threads.append(threading.Thread(target=call, args=(np.full_like(after, 255),)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # batched together or not, only the failing request fails... unless its batch was shared:
    # then the good requests in that batch are retried alone and succeed
    assert codes.count(grpc.StatusCode.INTERNAL) == 1
    assert codes.count(grpc.StatusCode.OK) == 6


@pytest.mark.slow
def test_a_16k_by_16k_pair_streams_in_chunks(servers) -> None:
    """The pair is 2 x 256 MiB of raw grey pixels, far over any message limit: it streams."""
    side, patch = 16384, 512
    meta = metadata(patch_size=patch, channels=1, band_names=("grey",), recommended_stride=patch)
    server = servers(mean_abs_diff, meta, max_pixels=side * side)
    before = np.zeros((side, side), np.uint8)
    before[::7] = 90
    after = before.copy()
    after[5000:5600, 9000:9800] = 255  # one changed block
    chunk = 4 << 20

    def descriptor(arr: np.ndarray) -> pb.ImageDescriptor:
        raw = pb.RawArray(shape=arr.shape, dtype=pb.DTYPE_UINT8)
        return pb.ImageDescriptor(raw=raw, size_bytes=arr.nbytes)

    def chunks():
        yield pb.DetectChangeChunk(
            header=pb.StreamHeader(
                before=descriptor(before),
                after=descriptor(after),
                options=pb.DetectOptions(
                    outputs=[pb.OUTPUT_MASK, pb.OUTPUT_REGIONS], threshold=0.2
                ),
                request_id="16k",
            )
        )
        b, a = memoryview(before.reshape(-1)), memoryview(after.reshape(-1))
        for i in range(0, before.nbytes, chunk):
            yield pb.DetectChangeChunk(before_chunk=bytes(b[i : i + chunk]))
            yield pb.DetectChangeChunk(after_chunk=bytes(a[i : i + chunk]))

    with ChangeDetectionClient(server.address) as client:
        response = client.stub.DetectChangeStream(chunks(), timeout=600)
    assert response.request_id == "16k"
    assert response.mask_png and len(response.mask_png) < 64 << 20
    assert len(response.regions) >= 1
    box = max(response.regions, key=lambda r: r.area_px).box
    # the largest region reported is where the change is (at this model's 512 px resolution)
    assert box.row <= 5300 < box.row + box.height and box.col <= 9400 < box.col + box.width
    assert box.height <= 2048 and box.width <= 2048


def test_a_call_without_a_deadline_is_served(servers) -> None:
    """gRPC reports "no deadline" as a time centuries away; it must not break the timed waits."""
    server = servers(mean_abs_diff)
    before, after = pair()
    request = pb.DetectChangeRequest(before=image_message(before), after=image_message(after))
    with ChangeDetectionClient(server.address) as client:
        response = client.stub.DetectChange(request)  # no timeout at all
    assert response.height == 96 and response.width == 96
