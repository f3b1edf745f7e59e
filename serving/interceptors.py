"""What every server interceptor here shares: find the method's handler, put another in its place.

gRPC hands an interceptor the method's handler, one of four kinds (unary or streamed request, unary
or streamed response); replacing it means building a handler of the same kind around a new
behaviour. The metrics, drain, bearer-token and malformed-request interceptors each only say what
their behaviour does (:meth:`HandlerInterceptor.wrap`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import grpc

__all__ = ["PROBE_SERVICES", "HandlerInterceptor", "behavior_of", "kind_of", "rebuilt"]

PROBE_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
"""Health and reflection: probes and schema discovery, which no token, drain or metric may block
or count as traffic."""


def kind_of(handler: grpc.RpcMethodHandler) -> str:
    """'unary_unary', 'unary_stream', 'stream_unary' or 'stream_stream'."""
    stream_in, stream_out = handler.request_streaming, handler.response_streaming
    return ("stream" if stream_in else "unary") + "_" + ("stream" if stream_out else "unary")


def behavior_of(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    """The function that serves the calls, whichever the kind."""
    return getattr(handler, kind_of(handler))


def rebuilt(
    handler: grpc.RpcMethodHandler | None,
    behavior: Callable[..., Any],
    *,
    parse: bool = True,
    deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind (unary-unary when there is none) running ``behavior``.

    ``parse=False`` reads no request (a refusal must not parse what it refuses); ``deserializer``
    replaces the handler's own.
    """
    kind = "unary_unary" if handler is None else kind_of(handler)
    if not parse:
        deserializer = None
    elif deserializer is None and handler is not None:
        deserializer = handler.request_deserializer
    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    return factory(
        behavior,
        request_deserializer=deserializer,
        response_serializer=None if handler is None else handler.response_serializer,
    )


class HandlerInterceptor(grpc.ServerInterceptor):
    """An interceptor that may replace each method's handler; unknown methods pass untouched."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        return self.wrap(continuation(handler_call_details), handler_call_details)

    @abc.abstractmethod
    def wrap(
        self, handler: grpc.RpcMethodHandler | None, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        """The handler to use for this call: ``handler`` itself, or one made by :func:`rebuilt`."""
