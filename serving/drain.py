"""The drain gate: how a stopping server refuses new calls with UNAVAILABLE, not CANCELLED.

gRPC's own ``server.stop(grace)`` cancels any call that reached the server core but was not yet
handed to Python at that instant: its client sees CANCELLED, a code no client retries. So a stop
first closes this gate, which answers every new call UNAVAILABLE ("retry elsewhere") from Python,
waits for the calls already admitted to finish, and only then stops the gRPC server, by which time
clients have stopped sending here. Health and reflection stay open: probes must see NOT_SERVING.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from serving.interceptors import PROBE_SERVICES, HandlerInterceptor, behavior_of, rebuilt

__all__ = ["DRAINING_MESSAGE", "DrainGate"]

log = logging.getLogger(__name__)

DRAINING_MESSAGE = "the server is shutting down; retry on another replica"


class DrainGate(HandlerInterceptor):
    """Counts running calls; once closed, refuses new ones (UNAVAILABLE) without reading them."""

    def __init__(self, always_open: Sequence[str] = PROBE_SERVICES) -> None:
        self._open_prefixes = tuple(f"/{service}/" for service in always_open)
        self._cond = threading.Condition()
        self._running = 0
        self._closed = False
        self.refused = 0
        self._last = time.monotonic()  # when a call last ended or was refused

    @property
    def running(self) -> int:
        """Calls admitted and not yet finished (a streamed response counts until its end)."""
        with self._cond:
            return self._running

    def close(self) -> None:
        """From now on refuse new calls; those already admitted go on."""
        with self._cond:
            self._closed = True
            running = self._running
        log.info("draining: new calls are refused, %d running", running)

    def wait_idle(self, timeout: float, quiet: float = 0.0) -> bool:
        """Block until no admitted call runs and no call has ended or been refused for ``quiet``
        seconds (so the last clients' next calls meet the gate, not a stopped server), or until
        ``timeout`` seconds; True when idle."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                if not self._running and now - self._last >= quiet:
                    return True
                if now >= deadline:
                    return False
                wait = deadline - now if self._running else quiet - (now - self._last)
                self._cond.wait(min(wait, deadline - now))

    def wrap(
        self, handler: grpc.RpcMethodHandler | None, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        if handler is None or details.method.startswith(self._open_prefixes):
            return handler
        with self._cond:
            closed = self._closed
            if closed:
                self.refused += 1
                self._last = time.monotonic()
        if closed:  # not parsed: a refused call's bytes are never read
            return rebuilt(handler, _refuse, parse=False)
        return rebuilt(handler, self._counted(behavior_of(handler), handler.response_streaming))

    def _enter(self) -> None:
        # admitted calls run even when the gate closed while they waited for a handler thread:
        # they were sent before the stop, and gRPC's own grace then waits for them
        with self._cond:
            self._running += 1

    def _leave(self) -> None:
        with self._cond:
            self._running -= 1
            self._last = time.monotonic()
            if not self._running:
                self._cond.notify_all()

    def _counted(
        self, behavior: Callable[..., Any], stream_out: bool
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def counted(request: Any, context: grpc.ServicerContext) -> Any:
            self._enter()
            if not stream_out:
                try:
                    return behavior(request, context)
                finally:
                    self._leave()
            try:
                responses = behavior(request, context)
            except BaseException:
                self._leave()
                raise
            return self._streamed(responses)

        return counted

    def _streamed(self, responses: Iterator[Any]) -> Iterator[Any]:
        try:
            yield from responses
        finally:
            self._leave()


def _refuse(request: Any, context: grpc.ServicerContext) -> Any:
    context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
