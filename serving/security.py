"""Transport security for the gRPC server: TLS or mutual TLS from PEM files, and an optional
bearer token checked on every call.

Choices, and why:

* TLS (``tls_cert`` + ``tls_key``) encrypts and authenticates the server; with ``tls_client_ca``
  the server also demands a client certificate signed by that CA (mutual TLS), which the TLS
  handshake enforces before any call reaches Python.
* With ``auth_token`` set, every call must carry ``authorization: Bearer <token>`` metadata or
  it gets UNAUTHENTICATED. The token is compared in constant time (on digests, so its length
  does not leak either) and is never logged. Over plaintext anyone on the path can read it, so
  the server warns when a token is set without TLS.
* Health checks (``grpc.health.v1.Health``) and server reflection stay open without the token:
  Kubernetes' gRPC probes and ``grpc_health_probe`` send no metadata, and reflection describes
  only the public ``rarechange.v1`` schema, never data. TLS still applies to them; Kubernetes'
  built-in gRPC probe speaks plaintext only, so a TLS server needs an exec probe
  (``grpc_health_probe -tls -tls-ca-cert ...``, plus a client cert under mutual TLS) or a
  ``tcpSocket`` probe. Everything else, including the Open Inference Protocol, needs the token.
* The server never opens a path named in a request: requests carry image bytes, decoded from
  memory (GDAL only through ``/vsimem``, see :mod:`serving.decode`), and model names looked up
  in the repository loaded at start-up (:mod:`serving.models`); :mod:`serving.service` reads no
  file. The only files the server reads are those its own settings name, at start-up.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from serving.config import ServerSettings
from serving.errors import RareChangeError
from serving.interceptors import PROBE_SERVICES, HandlerInterceptor, rebuilt

__all__ = [
    "OPEN_SERVICES",
    "BearerTokenInterceptor",
    "InvalidCredentials",
    "describe",
    "server_credentials",
    "server_interceptors",
]

log = logging.getLogger(__name__)

OPEN_SERVICES = PROBE_SERVICES
"""Services callable without the bearer token (probes and schema discovery)."""

_HOW = (
    "send `authorization: Bearer <token>` metadata (rarechange detect: --token, RARECHANGE_TOKEN)"
)


class InvalidCredentials(RareChangeError, ValueError):
    """A TLS file named in the settings is not what it should be; the server refuses to start."""


def _pem(path: Path, setting: str, kind: str) -> bytes:
    """Read a PEM file, naming the setting when it is not PEM: gRPC's own error names neither."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidCredentials(f"{setting}: cannot read {path} ({exc.strerror})") from exc
    if b"-----BEGIN " not in data or kind.encode() not in data:
        raise InvalidCredentials(f"{setting}: {path} holds no PEM {kind}")
    return data


def _check_with_openssl(cert: Path, key: Path, client_ca: Path | None) -> None:
    """Parse the files with the standard library's OpenSSL: a key that does not match the
    certificate would otherwise surface only as gRPC's "Failed to bind to address"."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # a password callback that gives none: an encrypted key fails instead of prompting
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        raise InvalidCredentials(
            f"tls_cert/tls_key: {cert} and {key} are not a certificate and its unencrypted "
            f"private key ({exc.reason or exc})"
        ) from exc
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as exc:
            raise InvalidCredentials(
                f"tls_client_ca: {client_ca} holds no usable CA certificate ({exc.reason or exc})"
            ) from exc


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files (mutual TLS with a client CA), else None."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    cert = _pem(settings.tls_cert, "tls_cert", "CERTIFICATE")
    key = _pem(settings.tls_key, "tls_key", "PRIVATE KEY")
    client_ca = None
    if settings.tls_client_ca is not None:
        client_ca = _pem(settings.tls_client_ca, "tls_client_ca", "CERTIFICATE")
    _check_with_openssl(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def describe(settings: ServerSettings) -> str:
    """How clients must connect, said at start-up: plaintext, TLS or mutual TLS (+ token)."""
    if settings.tls_client_ca is not None:
        transport = "mutual TLS"
    elif settings.tls_cert is not None:
        transport = "TLS"
    else:
        transport = "plaintext"
    return f"{transport}, bearer token" if settings.auth_token is not None else transport


def server_interceptors(settings: ServerSettings) -> list[grpc.ServerInterceptor]:
    """The security interceptors for these settings (the token check, when a token is set)."""
    if settings.auth_token is None:
        return []
    if settings.tls_cert is None:
        log.warning(
            "auth_token is set without TLS: the token crosses the network in clear text; "
            "set tls_cert and tls_key"
        )
    return [BearerTokenInterceptor(settings.auth_token.get_secret_value())]


class BearerTokenInterceptor(HandlerInterceptor):
    """Refuse calls without the right ``authorization: Bearer <token>``, except open services."""

    def __init__(self, token: str, open_services: Sequence[str] = OPEN_SERVICES) -> None:
        if not token:
            raise ValueError("the bearer token must not be empty")
        self._digest = hashlib.sha256(token.encode()).digest()
        self._open = tuple(f"/{service}/" for service in open_services)

    def wrap(
        self, handler: grpc.RpcMethodHandler | None, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = details.method
        if method.startswith(self._open):
            return handler
        problem = self._problem(details.invocation_metadata or ())
        if problem is None:
            return handler
        return _refusal(handler, method, problem)

    def _problem(self, metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
        """None when the token is right, else what is wrong, in words for the client."""
        values = [value for key, value in metadata if key == "authorization"]
        if not values:
            return f"this server requires a bearer token: {_HOW}"
        if len(values) > 1:
            return "send exactly one `authorization` metadata entry"
        value = values[0]
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return f"the authorization metadata is not a bearer token: {_HOW}"
        given = hashlib.sha256(token.strip().encode()).digest()
        if not hmac.compare_digest(given, self._digest):
            return "invalid bearer token"
        return None


def _refusal(
    handler: grpc.RpcMethodHandler | None, method: str, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED without reading."""

    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        log.info("refused %s from %s: %s", method, context.peer(), message)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # not parsed: a refused call's bytes are never read, so junk cannot change the status
    return rebuilt(handler, refuse, parse=False)
