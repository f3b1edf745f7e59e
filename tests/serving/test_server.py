"""A real gRPC server on localhost with the bundled model: the API, its outputs and its errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from serving.api import change_detection_pb2 as pb
from serving.client import ChangeDetectionClient, image_message
from serving.cva import gate_magnitude
from serving.pictures import encode_png
from serving.server import SERVICE_NAME
from serving.tiling import grid
from training.synthetic import SceneConfig, render_pair

BUNDLED = Path(__file__).resolve().parents[2] / "models"


@pytest.fixture(scope="module")
def pair():
    return render_pair(7, SceneConfig(height=200, width=300, n_changes=2))


@pytest.fixture
def server(start_server):
    return start_server()


@pytest.fixture
def client(server):
    with ChangeDetectionClient(server.address) as c:
        yield c


def test_health_reports_serving(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_list_and_get_models(client: ChangeDetectionClient) -> None:
    models = client.list_models()
    assert len(models) >= 1
    default = [m for m in models if m.is_default]
    assert len(default) == 1
    info = client.stub.GetModel(pb.GetModelRequest(), timeout=5)
    assert info.name == default[0].name
    meta = json.loads(info.metadata_json)
    assert meta["patch_size"] == info.patch_size and meta["weights_sha256"]
    assert info.backend == "onnxruntime"
    with pytest.raises(grpc.RpcError) as err:
        client.stub.GetModel(pb.GetModelRequest(name="no-such-model"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_detect_change_returns_every_output(client: ChangeDetectionClient, pair) -> None:
    result = client.detect(encode_png(pair.before), encode_png(pair.after))
    r = result.response
    assert (r.height, r.width) == (200, 300)
    assert r.model and r.model_version and r.request_id
    assert result.probability.shape == (200, 300)
    assert result.mask.shape == (200, 300)
    tiles = result.tiles
    want = grid(200, 300, r.patch_size, r.stride)
    assert len(tiles.probability) == len(want)
    boxes = np.stack([tiles.row, tiles.col, tiles.height, tiles.width], axis=1).tolist()
    assert boxes == [list(t.clipped(200, 300)) for t in want]  # row-major, clipped to the image
    assert ((tiles.probability >= 0) & (tiles.probability <= 1)).all()
    assert r.changed_fraction == pytest.approx(result.mask.mean(), abs=1e-6)
    assert sum(reg.area_px for reg in r.regions) == result.mask.sum()
    t = r.timings
    assert t.total_ms >= t.inference_ms > 0 and t.decode_ms > 0 and t.stitch_ms > 0


def test_raw_arrays_give_the_same_result_as_png(client: ChangeDetectionClient, pair) -> None:
    encoded = client.detect(encode_png(pair.before), encode_png(pair.after))
    raw = client.detect(pair.before, pair.after, encoding=pb.PROBABILITY_ENCODING_RAW_FLOAT16)
    assert np.array_equal(encoded.mask, raw.mask)
    # the mask is the map thresholded (away from float16 rounding at the threshold itself)
    thr, p = raw.response.threshold, raw.probability
    assert raw.mask[p >= thr + 1e-3].all() and not raw.mask[p < thr - 1e-3].any()
    assert np.abs(encoded.probability - raw.probability).max() <= 1 / 255 + 1e-3


def test_outputs_can_be_selected(client: ChangeDetectionClient, pair) -> None:
    r = client.detect(pair.before, pair.after, outputs=[pb.OUTPUT_MASK]).response
    assert r.mask_png and not r.HasField("tiles") and not r.probability_map.data and not r.regions


def test_options_stride_and_threshold(client: ChangeDetectionClient, pair) -> None:
    r = client.detect(pair.before, pair.after, stride=16, threshold=1.0).response
    assert r.stride == 16 and r.threshold == 1.0
    assert len(r.tiles.probability) == len(grid(200, 300, r.patch_size, 16))
    everything = client.detect(pair.before, pair.after, threshold=0.0).response
    assert everything.changed_fraction == 1.0


def test_cva_gated_mask_rule(client: ChangeDetectionClient, pair) -> None:
    plain = client.detect(pair.before, pair.after, encoding=pb.PROBABILITY_ENCODING_RAW_FLOAT16)
    gated = client.detect(
        pair.before,
        pair.after,
        encoding=pb.PROBABILITY_ENCODING_RAW_FLOAT16,
        mask_rule=pb.MASK_RULE_CVA_GATED,
    )
    r = gated.response
    assert plain.response.mask_rule == pb.MASK_RULE_THRESHOLD and plain.response.gated_cut == 0
    assert r.mask_rule == pb.MASK_RULE_CVA_GATED and r.threshold == 0 and r.gated_cut > 0
    # the same probability map, a different mask: CVA x probability above its Otsu cut, per pixel
    assert np.array_equal(gated.probability, plain.probability)
    score = gate_magnitude(pair.before, pair.after) * gated.probability
    margin = 1e-2 * r.gated_cut  # the float16 map moves scores near the cut
    assert gated.mask[score > r.gated_cut + margin].all()
    assert not gated.mask[score < r.gated_cut - margin].any()
    assert not np.array_equal(gated.mask, plain.mask)
    assert r.changed_fraction == pytest.approx(gated.mask.mean())
    for region in r.regions:  # regions follow the gated mask
        box = gated.mask[
            region.box.row : region.box.row + region.box.height,
            region.box.col : region.box.col + region.box.width,
        ]
        assert box.sum() >= region.area_px


def test_a_models_default_mask_rule(start_server, tmp_path, pair) -> None:
    """A model exported with default_mask_rule cva-gated: unspecified requests get it, a request
    that sets a threshold or names the threshold rule gets probability >= threshold."""
    import onnx

    from serving.metadata import ModelMetadata

    src = BUNDLED / "synthetic-thin" / "model.onnx"
    model = onnx.load(src)
    props = {p.key: p.value for p in model.metadata_props}
    meta = ModelMetadata.from_props(props).model_copy(update={"default_mask_rule": "cva-gated"})
    onnx.helper.set_model_props(model, {**props, **meta.to_props()})
    (tmp_path / "synthetic-thin").mkdir()
    onnx.save(model, tmp_path / "synthetic-thin" / "model.onnx")
    with ChangeDetectionClient(start_server(tmp_path).address) as c:
        assert c.get_model().default_mask_rule == pb.MASK_RULE_CVA_GATED
        assert c.detect(pair.before, pair.after).response.mask_rule == pb.MASK_RULE_CVA_GATED
        r = c.detect(pair.before, pair.after, threshold=0.5).response
        assert r.mask_rule == pb.MASK_RULE_THRESHOLD and r.threshold == 0.5
        named = c.detect(pair.before, pair.after, mask_rule=pb.MASK_RULE_THRESHOLD).response
        assert named.mask_rule == pb.MASK_RULE_THRESHOLD
        assert named.threshold == pytest.approx(meta.default_threshold)
    with ChangeDetectionClient(start_server().address) as c:
        rules = {m.name: m.default_mask_rule for m in c.list_models()}
        assert rules["aerial-rgb"] == rules["synthetic-thin"] == pb.MASK_RULE_THRESHOLD
        assert rules["sentinel2-rgbn"] == pb.MASK_RULE_CVA_GATED  # its card says why


def test_large_message_over_grpc_default_limit(client: ChangeDetectionClient) -> None:
    big = render_pair(3, SceneConfig(height=1400, width=1400, n_changes=0))
    request_bytes = big.before.nbytes + big.after.nbytes
    assert request_bytes > 4 * 1024 * 1024
    r = client.detect(big.before, big.after, stride=32, outputs=[pb.OUTPUT_MASK]).response
    assert (r.height, r.width) == (1400, 1400)


def test_stream_equals_unary(client: ChangeDetectionClient, pair) -> None:
    before, after = encode_png(pair.before), encode_png(pair.after)
    unary = client.detect(before, after).response

    def chunks():
        yield pb.DetectChangeChunk(
            header=pb.StreamHeader(
                before=pb.ImageDescriptor(encoded=True, size_bytes=len(before)),
                after=pb.ImageDescriptor(encoded=True, size_bytes=len(after)),
                request_id="stream-1",
            )
        )
        for i in range(0, max(len(before), len(after)), 1000):
            if i < len(before):
                yield pb.DetectChangeChunk(before_chunk=before[i : i + 1000])
            if i < len(after):
                yield pb.DetectChangeChunk(after_chunk=after[i : i + 1000])

    streamed = client.stub.DetectChangeStream(chunks(), timeout=30)
    assert streamed.request_id == "stream-1"
    assert streamed.mask_png == unary.mask_png
    assert streamed.probability_map.data == unary.probability_map.data


def _grey_png(h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("before", "after", "options", "code"),
    [
        ("png", "smaller", {}, grpc.StatusCode.INVALID_ARGUMENT),
        ("grey", "grey", {}, grpc.StatusCode.INVALID_ARGUMENT),
        ("garbage", "png", {}, grpc.StatusCode.INVALID_ARGUMENT),
        ("empty", "png", {}, grpc.StatusCode.INVALID_ARGUMENT),
        ("uint16", "uint16", {}, grpc.StatusCode.INVALID_ARGUMENT),
        ("png", "png", {"model": "nope"}, grpc.StatusCode.NOT_FOUND),
        ("png", "png", {"model_version": "0.0.0-nope"}, grpc.StatusCode.NOT_FOUND),
        ("png", "png", {"stride": 1000}, grpc.StatusCode.INVALID_ARGUMENT),
        ("png", "png", {"threshold": 1.5}, grpc.StatusCode.INVALID_ARGUMENT),
        ("png", "png", {"outputs": [99]}, grpc.StatusCode.INVALID_ARGUMENT),
        ("png", "png", {"mask_rule": 99}, grpc.StatusCode.INVALID_ARGUMENT),
        (
            "png",
            "png",
            {"mask_rule": pb.MASK_RULE_CVA_GATED, "threshold": 0.5},
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ],
)
def test_bad_requests_get_clear_status(client, pair, before, after, options, code) -> None:
    images = {
        "png": image_message(encode_png(pair.before)),
        "smaller": image_message(encode_png(pair.after[:-3])),
        "grey": image_message(_grey_png(64, 64)),
        "garbage": pb.Image(encoded=b"\x89PNG not really"),
        "empty": pb.Image(),
        "uint16": image_message(pair.before.astype(np.uint16)),
    }
    request = pb.DetectChangeRequest(
        before=images[before], after=images[after], options=pb.DetectOptions(**options)
    )
    with pytest.raises(grpc.RpcError) as err:
        client.stub.DetectChange(request, timeout=30)
    assert err.value.code() == code
    assert err.value.details()  # a message that says what was wrong


def test_pixel_limit_rejects_before_decoding(start_server, pair) -> None:
    server = start_server(max_pixels=100 * 100)
    with ChangeDetectionClient(server.address) as client, pytest.raises(grpc.RpcError) as err:
        client.detect(encode_png(pair.before), encode_png(pair.after))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pixels" in err.value.details()


def test_stream_without_header_is_invalid(client) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.stub.DetectChangeStream(iter([pb.DetectChangeChunk(before_chunk=b"x")]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_stream_size_mismatch_is_invalid(client, pair) -> None:
    before = encode_png(pair.before)
    header = pb.StreamHeader(
        before=pb.ImageDescriptor(encoded=True, size_bytes=len(before) + 5),
        after=pb.ImageDescriptor(encoded=True, size_bytes=len(before)),
    )
    msgs = [
        pb.DetectChangeChunk(header=header),
        pb.DetectChangeChunk(before_chunk=before),
        pb.DetectChangeChunk(after_chunk=before),
    ]
    with pytest.raises(grpc.RpcError) as err:
        client.stub.DetectChangeStream(iter(msgs), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "declared" in err.value.details()


def test_max_connection_age_moves_clients_without_failing_calls(start_server, pair) -> None:
    """Connections are closed after max_connection_age_s (so clients behind a Service reach new
    replicas); the client reconnects and no call fails."""
    from serving.config import ServerSettings
    from serving.server import server_options

    assert (
        dict(server_options(ServerSettings(max_connection_age_s=1.5)))["grpc.max_connection_age_ms"]
        == 1500
    )
    assert "grpc.max_connection_age_ms" not in dict(server_options(ServerSettings()))
    server = start_server(max_connection_age_s=0.3, max_connection_age_grace_s=5)
    before, after = encode_png(pair.before), encode_png(pair.after)
    with ChangeDetectionClient(server.address) as client:
        import time

        t_end = time.monotonic() + 1.5
        calls = 0
        while time.monotonic() < t_end or calls < 4:  # at least 4 calls, even when slow
            assert client.detect(before, after).mask.shape == (200, 300)
            calls += 1
        assert calls >= 4
