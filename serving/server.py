"""Server factory and lifecycle: models loaded before the port opens, standard health and
reflection, explicit message limits, graceful drain on SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.api import change_detection_pb2 as pb
from serving.api import change_detection_pb2_grpc as pb_grpc
from serving.config import ServerSettings
from serving.detector import ChangeDetectionCore
from serving.models import ModelRepository
from serving.service import ChangeDetectionServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ChangeDetection"].full_name


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

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def start(self) -> ChangeDetectionServer:
        self.repository.start()
        self.grpc_server.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s", sorted(self.repository.models), self.address)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, refuse new calls, let running ones finish within ``grace``."""
        self.health.enter_graceful_shutdown()
        grace = self.settings.grace_s if grace is None else grace
        self.grpc_server.stop(grace).wait()
        self.repository.stop()
        log.info("stopped")

    def __enter__(self) -> ChangeDetectionServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def create_server(
    settings: ServerSettings, repository: ModelRepository | None = None
) -> ChangeDetectionServer:
    """Load the models (failing loudly), bind the port (0: a free one), do not start yet."""
    repository = repository or ModelRepository.load(settings)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="rpc"),
        options=channel_options(settings.max_message_bytes),
    )
    pb_grpc.add_ChangeDetectionServicer_to_server(
        ChangeDetectionServicer(ChangeDetectionCore(repository), settings), server
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise OSError(f"cannot bind {settings.host}:{settings.port}")
    return ChangeDetectionServer(server, port, health_servicer, repository, settings)


def serve(settings: ServerSettings) -> None:
    """Run until SIGTERM or SIGINT, then drain."""
    server = create_server(settings).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"rarechange serving on {server.address}", flush=True)
    stop.wait()
    log.info("signal received, draining for up to %.1f s", settings.grace_s)
    server.stop()
