"""Prometheus metrics: requests, latency, queueing, batching and the models served.

Each server keeps its metrics in its own :class:`~prometheus_client.CollectorRegistry`, not the
process-wide default, so that several servers in one process (tests, benchmarks) never share or
collide on a series. ``/metrics`` is served over plain HTTP on ``settings.metrics_port`` (0: a
free port, -1: none; the series are still kept, for in-process readers).

Where each series comes from, and why there:

* requests and their latency: a gRPC server interceptor, the one place that sees every method
  and its final status code, including calls aborted by the servicer or refused by the token
  check (it is installed outermost). Health and reflection are left out: probes would swamp the
  counts and ``Watch`` streams last for ever.
* queue time, batch size, inference time: the dynamic batcher's callbacks, so that the batcher
  itself stays free of any metrics library; queue depth is read from the batcher at scrape time.
* the models: one ``rarechange_model_info`` series per model, set at load.

Model labels are only ever names of served models (or empty), never a string taken as is from a
request, so a client cannot grow the number of series.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client import start_http_server as _start_http_server

from serving.interceptors import PROBE_SERVICES, HandlerInterceptor, behavior_of, rebuilt

if TYPE_CHECKING:
    from serving.models import ModelRepository

__all__ = ["UNMETERED_SERVICES", "MetricsInterceptor", "ServerMetrics", "requested_model"]

log = logging.getLogger(__name__)

UNMETERED_SERVICES = frozenset(PROBE_SERVICES)

# seconds; requests span a 64x64 pair (milliseconds) to a scene (minutes)
REQUEST_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0
)  # fmt: skip
QUEUE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0
)  # fmt: skip
INFERENCE_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0
)  # fmt: skip
BATCH_BUCKETS = tuple(float(2**i) for i in range(13))  # 1 .. 4096 patches


class ServerMetrics:
    """One server's series, their registry and the HTTP endpoint that exposes them."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "rarechange_requests",
            "gRPC calls by final status code (the gRPC status name).",
            ["model", "method", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "rarechange_request_seconds",
            "gRPC call latency in the server, from the handler's start to its last response.",
            ["model", "method"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "rarechange_inflight_requests", "gRPC calls being handled now.", registry=r
        )
        self.queue_seconds = Histogram(
            "rarechange_queue_seconds",
            "Per request: time from queueing its patches to its first patch entering a batch.",
            ["model"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "rarechange_inference_seconds",
            "Per batch: time in the backend.",
            ["model"],
            buckets=INFERENCE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "rarechange_batch_size",
            "Per batch: patch pairs in it.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batches = Counter(
            "rarechange_batches", "Batches run by the backend (executions).", ["model"], registry=r
        )
        self.patches = Counter(
            "rarechange_patches",
            "Patch pairs scored; patches / batches is the average batch size.",
            ["model"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "rarechange_queue_depth", "Patch pairs waiting in the batcher.", ["model"], registry=r
        )
        self.model_info = Info(
            "rarechange_model",
            "The models served (value 1), one series each.",
            ["model"],
            registry=r,
        )
        self.interceptor = MetricsInterceptor(self)
        self._models: frozenset[str] = frozenset()
        self._default = ""
        self._http: Any = None  # the WSGI server, while serving
        self._http_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ models
    def watch(self, repository: ModelRepository) -> None:
        """Describe every model and hook its batcher, so queueing and batching are measured."""
        for name, served in repository.models.items():
            m, batcher = served.metadata, served.batcher
            self.model_info.labels(model=name).info(
                {
                    "version": m.version,
                    "precision": m.precision,
                    "patch_size": str(m.patch_size),
                    "channels": str(m.channels),
                    "input_dtype": m.input_dtype,
                    "recommended_stride": str(m.recommended_stride),
                    "backend": served.backend_name,
                    "instances": str(len(batcher.instances)),
                    "max_batch_size": str(batcher.max_batch_size),
                    "default": str(name == repository.default).lower(),
                    "weights_sha256": m.weights_sha256[:16],
                }
            )
            self.queue_depth.labels(model=name).set_function(
                lambda b=batcher: float(b.queued_patches)
            )
            batcher.on_batch = self._batch_observer(name)
            batcher.on_queued = self.queue_seconds.labels(model=name).observe
            for counter in (self.batches, self.patches):
                counter.labels(model=name)  # exported as 0 before the first batch
        self._models = frozenset(repository.models)
        self._default = repository.default

    def _batch_observer(self, model: str) -> Callable[[int, float], None]:
        size = self.batch_size.labels(model=model)
        seconds = self.inference_seconds.labels(model=model)
        batches = self.batches.labels(model=model)
        patches = self.patches.labels(model=model)

        def observe(n: int, inference_s: float) -> None:
            size.observe(n)
            seconds.observe(inference_s)
            batches.inc()
            patches.inc(n)

        return observe

    def model_label(self, requested: str | None) -> str:
        """The served model a request names ('' = the default); '' for none or an unknown one."""
        if requested is None:
            return ""
        name = requested or self._default
        return name if name in self._models else ""

    # ------------------------------------------------------------------ HTTP
    @property
    def port(self) -> int | None:
        """The bound /metrics port, None when not serving HTTP."""
        return None if self._http is None else int(self._http.server_port)

    def start_http(self, host: str, port: int) -> int:
        """Serve /metrics on ``host:port`` (0: a free port); return the bound port."""
        if self._http is not None:
            raise RuntimeError("metrics HTTP server already running")
        self._http, self._http_thread = _start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return int(self._http.server_port)

    def stop_http(self) -> None:
        """Close the /metrics port (idempotent)."""
        http, thread = self._http, self._http_thread
        if http is None:
            return
        self._http = self._http_thread = None
        http.shutdown()
        http.server_close()
        if thread is not None:
            thread.join(5)


def requested_model(message: object) -> str | None:
    """The model name a request message carries ('' = the default), None when it has none.

    Covers rarechange.v1 (``options.model``, a stream's header, ``GetModelRequest.name``) and the
    Open Inference Protocol (``model_name``; ``name`` in its metadata/ready requests).
    """
    descriptor = getattr(message, "DESCRIPTOR", None)
    fields = getattr(descriptor, "fields_by_name", {})
    if "options" in fields:
        return message.options.model  # type: ignore[attr-defined]
    if "header" in fields:  # DetectChangeChunk: only the first message names the model
        if message.WhichOneof("part") != "header":  # type: ignore[attr-defined]
            return None
        return message.header.options.model  # type: ignore[attr-defined]
    for field in ("model_name", "name"):
        if field in fields:
            return str(getattr(message, field))
    return None


class _Call:
    """One metered call: its model label, start time and final code."""

    __slots__ = ("done", "method", "metrics", "model", "t0")

    def __init__(self, metrics: ServerMetrics, method: str) -> None:
        self.metrics = metrics
        self.method = method
        self.model: str | None = None
        self.t0 = time.perf_counter()
        self.done = False
        metrics.inflight.inc()

    def see(self, message: object) -> None:
        if self.model is None:
            self.model = requested_model(message)

    def watch(self, messages: Iterator[Any]) -> Iterator[Any]:
        for message in messages:
            self.see(message)
            yield message

    def finish(self, context: grpc.ServicerContext, code: grpc.StatusCode | None = None) -> None:
        if self.done:
            return
        self.done = True
        if code is None:
            set_code = context.code()  # set by abort() or set_code(); None when left alone
            if set_code is not None:
                code = set_code
            elif not context.is_active():  # the client cancelled or its deadline passed
                code = grpc.StatusCode.CANCELLED
            else:
                code = grpc.StatusCode.OK
        m = self.metrics
        model = m.model_label(self.model)
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        m.requests.labels(model=model, method=self.method, code=name).inc()
        m.request_seconds.labels(model=model, method=self.method).observe(
            time.perf_counter() - self.t0
        )
        m.inflight.dec()

    def failed(self, context: grpc.ServicerContext) -> None:
        """The handler raised: abort()'s code, else UNKNOWN (what gRPC sends for a raise)."""
        self.finish(context, context.code() or grpc.StatusCode.UNKNOWN)

    def stream(self, responses: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from responses
        except GeneratorExit:  # the client went away mid-stream
            self.finish(context, grpc.StatusCode.CANCELLED)
            raise
        except BaseException:
            self.failed(context)
            raise
        self.finish(context)


class MetricsInterceptor(HandlerInterceptor):
    """Counts every call by model, method and final status code, and times it."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def wrap(
        self, handler: grpc.RpcMethodHandler | None, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        service, _, method = details.method.lstrip("/").rpartition("/")
        if handler is None or service in UNMETERED_SERVICES:
            return handler
        metered = self._metered(
            behavior_of(handler), method, handler.request_streaming, handler.response_streaming
        )
        return rebuilt(handler, metered)

    def _metered(
        self, behavior: Callable[..., Any], method: str, stream_in: bool, stream_out: bool
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        metrics = self.metrics

        def metered(request: Any, context: grpc.ServicerContext) -> Any:
            call = _Call(metrics, method)
            if stream_in:
                request = call.watch(request)
            else:
                call.see(request)
            try:
                result = behavior(request, context)
            except BaseException:
                call.failed(context)
                raise
            if stream_out:
                return call.stream(result, context)
            call.finish(context)
            return result

        return metered
