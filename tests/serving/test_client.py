"""The Python client against a real server: streaming from bytes, files and arrays, models."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.api import change_detection_pb2 as pb
from serving.client import ChangeDetectionClient
from serving.pictures import encode_png
from training.synthetic import SceneConfig, render_pair


@pytest.fixture(scope="module")
def pair():
    return render_pair(9, SceneConfig(height=120, width=160, n_changes=2))


@pytest.fixture
def client(start_server):
    with ChangeDetectionClient(start_server().address) as c:
        c.wait_ready(timeout=10)
        yield c


def test_stream_from_bytes_files_and_arrays_equals_unary(
    client: ChangeDetectionClient, pair, tmp_path: Path
) -> None:
    before, after = encode_png(pair.before), encode_png(pair.after)
    unary = client.detect(before, after).response
    (tmp_path / "b.png").write_bytes(before)
    (tmp_path / "a.png").write_bytes(after)
    sources = {
        "bytes": (before, after),
        "files": (tmp_path / "b.png", tmp_path / "a.png"),
    }
    for name, (b, a) in sources.items():
        streamed = client.detect_stream(b, a, chunk_bytes=777, request_id=name).response
        assert streamed.request_id == name
        assert streamed.mask_png == unary.mask_png
        assert streamed.probability_map.data == unary.probability_map.data
    raw = client.detect(pair.before, pair.after, encoding=pb.PROBABILITY_ENCODING_RAW_FLOAT16)
    streamed = client.detect_stream(
        pair.before, pair.after, encoding=pb.PROBABILITY_ENCODING_RAW_FLOAT16, chunk_bytes=4096
    )
    assert np.array_equal(streamed.mask, raw.mask)
    assert np.array_equal(streamed.probability, raw.probability)


def test_stream_passes_the_options(client: ChangeDetectionClient, pair) -> None:
    r = client.detect_stream(
        pair.before, pair.after, stride=16, threshold=1.0, outputs=[pb.OUTPUT_MASK]
    ).response
    assert r.stride == 16 and r.threshold == 1.0 and r.changed_fraction == 0.0
    assert r.mask_png and not r.HasField("tiles") and not r.regions
    with pytest.raises(ValueError, match="chunk_bytes"):
        client.detect_stream(pair.before, pair.after, chunk_bytes=0)
    with pytest.raises(grpc.RpcError) as err:
        client.detect_stream(pair.before, pair.after, model="nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_get_model(client: ChangeDetectionClient) -> None:
    default = client.get_model()
    assert default.is_default
    assert client.get_model(default.name).name == default.name
    assert [m.name for m in client.list_models() if m.is_default] == [default.name]
    with pytest.raises(grpc.RpcError) as err:
        client.get_model("no-such-model")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_token_client_still_waits_and_closes(start_server) -> None:
    server = start_server(auth_token="t0ken")
    with ChangeDetectionClient(server.address, token="t0ken") as client:
        client.wait_ready(timeout=10)  # works through the intercepted channel
        assert client.get_model().name
