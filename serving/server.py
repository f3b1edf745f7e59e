"""Server factory and lifecycle: models loaded before the port opens, standard health and
reflection, explicit message limits, graceful drain on SIGTERM."""

from __future__ import annotations

import logging
import signal
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving import kserve
from serving.api import change_detection_pb2 as pb
from serving.api import change_detection_pb2_grpc as pb_grpc
from serving.config import ServerSettings
from serving.detector import ChangeDetectionCore
from serving.drain import DrainGate
from serving.metrics import ServerMetrics
from serving.models import ModelRepository
from serving.security import describe, server_credentials, server_interceptors
from serving.service import ChangeDetectionServicer, MalformedRequestInterceptor

log = logging.getLogger(__name__)

DRAIN_QUIET_S = 0.25
"""How long a stopping server waits, once idle, for a call to end or be refused before the gRPC
stop: a client that just got its answer sends its next call within that and meets the gate."""

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ChangeDetection"].full_name


def server_options(settings: ServerSettings) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments, from the settings."""
    options = [
        *channel_options(settings.max_message_bytes),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
    ]
    if settings.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * 1000)),
        ]
    return options


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Both directions set explicitly: gRPC's 4 MiB default is too small for image pairs."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


@dataclass
class ChangeDetectionServer:
    grpc_server: grpc.Server
    port: int
    health: health.HealthServicer
    repository: ModelRepository
    settings: ServerSettings
    metrics: ServerMetrics | None = None
    gate: DrainGate = field(default_factory=DrainGate)

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    @property
    def security(self) -> str:
        """'plaintext', 'TLS' or 'mutual TLS', plus ', bearer token': said at start-up."""
        return describe(self.settings)

    @property
    def metrics_port(self) -> int | None:
        """The bound /metrics HTTP port once started; None when metrics_port is -1."""
        return None if self.metrics is None else self.metrics.port

    def start(self) -> ChangeDetectionServer:
        """Open /metrics and the port, warm every model instance up, then report SERVING."""
        if self.metrics is not None and self.settings.metrics_port >= 0:
            self.metrics.start_http(self.settings.host, self.settings.metrics_port)
        self.grpc_server.start()  # health says NOT_SERVING (set at creation) until warm
        try:
            if self.settings.warmup:
                for served in self.repository.models.values():
                    m = served.metadata
                    served.batcher.warm_up((m.channels, m.patch_size, m.patch_size), m.input_dtype)
        except BaseException:  # a model that cannot run a batch: close the ports, say why
            self.grpc_server.stop(0)
            if self.metrics is not None:
                self.metrics.stop_http()
            raise
        self.repository.start()  # calls that came in during warm-up were queued, run them now
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving %s on %s (%s)", sorted(self.repository.models), self.address, self.security
        )
        return self

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, refuse new calls, let running ones finish within ``grace``."""
        self.health.enter_graceful_shutdown()
        grace = self.settings.grace_s if grace is None else grace
        deadline = time.monotonic() + grace
        # refuse from Python first (UNAVAILABLE, which clients retry elsewhere): a gRPC stop alone
        # cancels calls that arrive at that instant, and CANCELLED is retried by no one
        self.gate.close()
        if not self.gate.wait_idle(grace, quiet=min(DRAIN_QUIET_S, grace)):
            log.warning("grace of %.1f s over with %d calls running", grace, self.gate.running)
        self.grpc_server.stop(max(0.0, deadline - time.monotonic())).wait()
        self.repository.stop()
        if self.metrics is not None:
            self.metrics.stop_http()
        log.info("stopped")

    def __enter__(self) -> ChangeDetectionServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def create_server(
    settings: ServerSettings, repository: ModelRepository | None = None
) -> ChangeDetectionServer:
    """Load the models (failing loudly), bind the port (0: a free one), do not start yet."""
    credentials = server_credentials(settings)  # read before the (slow) models: fail fast
    repository = repository or ModelRepository.load(settings)
    metrics = ServerMetrics()  # this server's own registry: servers in one process never collide
    metrics.watch(repository)
    gate = DrainGate()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="rpc"),
        # metrics outermost, so that calls refused by the others are counted too; the parse check
        # innermost, so that calls the token check refuses are never parsed
        interceptors=[
            metrics.interceptor,
            gate,  # a stopping server refuses here (UNAVAILABLE), counted by the metrics
            *server_interceptors(settings),
            MalformedRequestInterceptor(),
        ],
        options=server_options(settings),
    )
    pb_grpc.add_ChangeDetectionServicer_to_server(
        ChangeDetectionServicer(ChangeDetectionCore(repository), settings), server
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    services = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    if settings.kserve:  # the Open Inference Protocol, ready when health says SERVING
        kserve.add_to_server(server, repository, kserve.health_readiness(health_servicer))
        services += (kserve.SERVICE_NAME,)
    reflection.enable_server_reflection(services, server, pool=kserve.reflection_pool(services))
    bind = f"{settings.host}:{settings.port}"
    try:  # grpcio raises RuntimeError on a failed bind (older versions returned 0)
        if credentials is None:
            port = server.add_insecure_port(bind)
        else:
            port = server.add_secure_port(bind, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"cannot bind {settings.host}:{settings.port}")
    return ChangeDetectionServer(server, port, health_servicer, repository, settings, metrics, gate)


def serve(settings: ServerSettings) -> None:
    """Run until SIGTERM or SIGINT, then drain."""
    server = create_server(settings).start()
    received: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        # the handler only records the signal: it runs in the main thread whenever that thread
        # next executes Python, and must not take a lock the main thread might hold
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    # the address stays the last word: scripts and tests read it from this line
    print(f"rarechange ({server.security}) serving on {server.address}", flush=True)
    if server.metrics_port is not None:
        print(f"metrics on http://{settings.host}:{server.metrics_port}/metrics", flush=True)
    # poll, never block forever: the kernel may deliver SIGTERM to any of the server's threads,
    # and a main thread blocked in a lock would then never run the handler (the drain would be
    # skipped until the orchestrator kills the pod)
    while not received:
        time.sleep(0.1)
    log.info("signal received, draining for up to %.1f s", settings.grace_s)
    server.stop()
