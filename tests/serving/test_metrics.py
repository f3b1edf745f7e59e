"""Prometheus metrics of a real server, scraped over HTTP as Prometheus would."""

from __future__ import annotations

import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from serving.api import change_detection_pb2 as pb
from serving.client import ChangeDetectionClient
from serving.pictures import encode_png
from serving.server import SERVICE_NAME
from training.synthetic import SceneConfig, render_pair

Samples = list[tuple[str, dict[str, str], float]]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the samples named ``name`` whose labels include ``labels``."""
    return sum(
        v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())
    )


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [lab for n, lab, _ in samples if n == name]


@pytest.fixture(scope="module")
def pair():
    return render_pair(5, SceneConfig(height=96, width=160, n_changes=1))


def test_requests_batches_and_models_are_counted(start_server, pair) -> None:
    server = start_server(metrics_port=0)  # warm-up on: its batches must not be counted
    assert server.metrics_port not in (None, 0, 9090)
    tiles = 0
    with ChangeDetectionClient(server.address) as client:
        default = next(m.name for m in client.list_models() if m.is_default)
        for stride in (0, 16, 32):
            tiles += len(client.detect(pair.before, pair.after, stride=stride).tiles.probability)
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as err:
                client.detect(pair.before, pair.after, model="no-such-model")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            client.stub.GetModel(pb.GetModelRequest(name="no-such-model"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        health = health_pb2_grpc.HealthStub(client.channel)
        health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)

    s = scrape(server.metrics_port)
    requests = "rarechange_requests_total"
    assert value(s, requests, model=default, method="DetectChange", code="OK") == 3
    # an unknown name is never a label value: clients cannot grow the number of series
    assert value(s, requests, model="", method="DetectChange", code="NOT_FOUND") == 2
    assert value(s, requests, method="GetModel", code="NOT_FOUND") == 1
    assert value(s, requests, method="ListModels", code="OK") == 1
    assert value(s, requests) == 7  # health checks are not counted
    assert {lab["model"] for lab in series(s, requests)} == {default, ""}
    latency = "rarechange_request_seconds_count"
    assert value(s, latency, model=default, method="DetectChange") == 3
    assert value(s, latency) == 7
    assert value(s, "rarechange_request_seconds_sum") > 0
    assert value(s, "rarechange_inflight_requests") == 0

    # batching: every patch the responses report, in at least one batch, nothing from warm-up
    patches = value(s, "rarechange_patches_total", model=default)
    batches = value(s, "rarechange_batches_total", model=default)
    assert patches == tiles > 0
    assert batches >= 1
    assert value(s, "rarechange_batch_size_count", model=default) == batches
    assert value(s, "rarechange_batch_size_sum", model=default) == patches
    assert value(s, "rarechange_inference_seconds_count", model=default) == batches
    assert value(s, "rarechange_queue_seconds_count", model=default) == 3  # one per OK request
    assert value(s, "rarechange_queue_depth", model=default) == 0

    infos = {lab["model"]: lab for lab in series(s, "rarechange_model_info")}
    assert set(infos) == set(server.repository.models)
    meta = server.repository.get(default).metadata
    info = infos[default]
    assert info["version"] == meta.version and info["precision"] == "fp32"
    assert info["patch_size"] == str(meta.patch_size) and info["default"] == "true"
    assert info["backend"] == "onnxruntime"
    assert value(s, "rarechange_model_info", model=default) == 1
    for name in set(infos) - {default}:  # every model's series exist before its first call
        assert {"model": name} in series(s, "rarechange_batches_total")
        assert value(s, "rarechange_batches_total", model=name) == 0


def test_a_stream_is_counted_under_the_model_its_header_names(start_server, pair) -> None:
    server = start_server(metrics_port=0, warmup=False)
    before, after = encode_png(pair.before), encode_png(pair.after)
    name = sorted(server.repository.models)[-1]  # not the default
    chunks = [
        pb.DetectChangeChunk(
            header=pb.StreamHeader(
                before=pb.ImageDescriptor(encoded=True, size_bytes=len(before)),
                after=pb.ImageDescriptor(encoded=True, size_bytes=len(after)),
                options=pb.DetectOptions(model=name),
            )
        ),
        pb.DetectChangeChunk(before_chunk=before),
        pb.DetectChangeChunk(after_chunk=after),
    ]
    with ChangeDetectionClient(server.address) as client:
        r = client.stub.DetectChangeStream(iter(chunks), timeout=30)
    assert r.model == name
    s = scrape(server.metrics_port)
    assert value(s, "rarechange_requests_total", model=name, code="OK") == 1
    assert value(s, "rarechange_patches_total", model=name) == len(r.tiles.probability)


def test_servers_in_one_process_keep_their_own_counts(start_server, pair) -> None:
    busy = start_server(metrics_port=0, warmup=False)
    idle = start_server(metrics_port=0, warmup=False)
    assert busy.metrics_port != idle.metrics_port
    with ChangeDetectionClient(busy.address) as client:
        client.detect(pair.before, pair.after)
    assert value(scrape(busy.metrics_port), "rarechange_requests_total") == 1
    assert value(scrape(idle.metrics_port), "rarechange_requests_total") == 0


def test_metrics_port_minus_one_serves_no_http_and_stop_closes_it(start_server) -> None:
    off = start_server(metrics_port=-1, warmup=False)
    assert off.metrics_port is None
    on = start_server(metrics_port=0, warmup=False)
    port = on.metrics_port
    assert port is not None
    scrape(port)
    on.stop(grace=0)
    assert on.metrics_port is None
    with pytest.raises(urllib.error.URLError):
        scrape(port)
