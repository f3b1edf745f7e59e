"""A small Python client for rarechange.v1: what the CLI, the demo and the tests call.

Security: pass ``tls_ca`` (or ``tls=True`` for the system's roots) for TLS, ``tls_cert`` and
``tls_key`` for mutual TLS, and ``token`` for servers that require a bearer token. The token
travels as ``authorization: Bearer <token>`` metadata, added by a client interceptor rather
than call credentials because gRPC attaches call credentials to TLS channels only, and a token
must also work over a plaintext channel (e.g. to a TLS-terminating proxy on localhost).
"""

from __future__ import annotations

import io
from collections import namedtuple
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import numpy as np
from PIL import Image

from serving.api import change_detection_pb2 as pb
from serving.api import change_detection_pb2_grpc as pb_grpc
from serving.config import MiB
from serving.server import channel_options

RAW_DTYPES = {"uint8": pb.DTYPE_UINT8, "uint16": pb.DTYPE_UINT16, "float32": pb.DTYPE_FLOAT32}
STREAM_CHUNK_BYTES = 1 * MiB
"""Bytes per DetectChangeStream message: small next to any message limit, few enough messages."""

ImageSource = bytes | Path | np.ndarray


def image_message(image: ImageSource) -> pb.Image:
    """Encoded bytes, a file's bytes, or a numpy array sent raw."""
    if isinstance(image, np.ndarray):
        arr = np.ascontiguousarray(image)
        return pb.Image(raw=pb.RawArray(data=_raw_bytes(arr), shape=arr.shape, dtype=_dtype(arr)))
    if isinstance(image, Path):
        image = image.read_bytes()
    return pb.Image(encoded=image)


def _dtype(arr: np.ndarray) -> int:
    if arr.dtype.name not in RAW_DTYPES:
        raise ValueError(f"raw arrays must be one of {sorted(RAW_DTYPES)}, got {arr.dtype}")
    return RAW_DTYPES[arr.dtype.name]


def _raw_bytes(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()


def stream_parts(image: ImageSource) -> tuple[pb.ImageDescriptor, Callable[[int], Iterator[bytes]]]:
    """The header's descriptor and a chunk generator; a file is read chunk by chunk, not whole."""
    if isinstance(image, np.ndarray):
        arr = np.ascontiguousarray(image)
        raw = pb.RawArray(shape=arr.shape, dtype=_dtype(arr))  # data left empty: it streams
        data = _raw_bytes(arr)
        return pb.ImageDescriptor(raw=raw, size_bytes=len(data)), lambda n: _slices(data, n)
    if isinstance(image, Path):
        path = image

        def read(n: int) -> Iterator[bytes]:
            with path.open("rb") as f:
                while chunk := f.read(n):
                    yield chunk

        return pb.ImageDescriptor(encoded=True, size_bytes=path.stat().st_size), read
    return pb.ImageDescriptor(encoded=True, size_bytes=len(image)), lambda n: _slices(image, n)


def _slices(data: bytes, n: int) -> Iterator[bytes]:
    view = memoryview(data)
    for i in range(0, len(view), n):
        yield bytes(view[i : i + n])


class TileArrays(NamedTuple):
    """The response's tiles as arrays, row-major over the tile lattice (see ``Tiles`` in the
    .proto): tile i covers rows row[i]:row[i]+height[i], cols col[i]:col[i]+width[i]."""

    row: np.ndarray
    col: np.ndarray
    height: np.ndarray
    width: np.ndarray
    probability: np.ndarray


@dataclass
class DetectResult:
    response: pb.DetectChangeResponse

    @property
    def tiles(self) -> TileArrays:
        t = self.response.tiles
        return TileArrays(
            *(np.asarray(a, np.int64) for a in (t.row, t.col, t.height, t.width)),
            np.asarray(t.probability, np.float32),
        )

    @property
    def probability(self) -> np.ndarray:
        pm = self.response.probability_map
        if pm.encoding == pb.PROBABILITY_ENCODING_RAW_FLOAT16:
            return np.frombuffer(pm.data, "<f2").reshape(pm.height, pm.width).astype(np.float32)
        return np.asarray(Image.open(io.BytesIO(pm.data)), dtype=np.float32) / 255.0

    @property
    def mask(self) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(self.response.mask_png))) > 0


class _CallDetails(
    namedtuple(  # the six fields grpc.ClientCallDetails describes
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Add ``authorization: Bearer <token>`` to every call, on TLS and plaintext channels alike."""

    def __init__(self, token: str) -> None:
        if not token or not (token.isascii() and token.isprintable()) or " " in token:
            raise ValueError("the token must be non-empty printable ASCII without spaces")
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [m for m in (details.metadata or ()) if m[0] != "authorization"]
        return _CallDetails(
            details.method,
            details.timeout,
            [*metadata, self._entry],
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class ChangeDetectionClient:
    """One channel to a server; TLS when ``tls`` or ``tls_ca`` is given, mTLS with a cert/key."""

    def __init__(
        self,
        address: str,
        *,
        max_message_bytes: int = 64 * MiB,
        tls: bool = False,
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        token: str | None = None,
        server_name_override: str | None = None,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        secure = tls or tls_ca is not None or tls_cert is not None
        options: list[tuple[str, Any]] = list(channel_options(max_message_bytes))
        if server_name_override:
            if not secure:
                raise ValueError("server_name_override only applies to TLS (give tls_ca)")
            options.append(("grpc.ssl_target_name_override", server_name_override))
        if secure:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=tls_ca.read_bytes() if tls_ca else None,  # None: system roots
                private_key=tls_key.read_bytes() if tls_key else None,
                certificate_chain=tls_cert.read_bytes() if tls_cert else None,
            )
            channel = grpc.secure_channel(address, credentials, options=options)
        else:
            channel = grpc.insecure_channel(address, options=options)
        self.address = address
        self.channel = grpc.intercept_channel(channel, BearerToken(token)) if token else channel
        self.stub = pb_grpc.ChangeDetectionStub(self.channel)

    def detect(
        self,
        before: ImageSource,
        after: ImageSource,
        *,
        model: str = "",
        stride: int = 0,
        threshold: float | None = None,
        outputs: list[int] | None = None,
        encoding: int = pb.PROBABILITY_ENCODING_PNG8,
        mask_rule: int = pb.MASK_RULE_UNSPECIFIED,
        timeout: float | None = 60.0,
    ) -> DetectResult:
        request = pb.DetectChangeRequest(
            before=image_message(before),
            after=image_message(after),
            options=_options(model, stride, threshold, outputs, encoding, mask_rule),
        )
        return DetectResult(self.stub.DetectChange(request, timeout=timeout))

    def detect_stream(
        self,
        before: ImageSource,
        after: ImageSource,
        *,
        model: str = "",
        stride: int = 0,
        threshold: float | None = None,
        outputs: list[int] | None = None,
        encoding: int = pb.PROBABILITY_ENCODING_PNG8,
        mask_rule: int = pb.MASK_RULE_UNSPECIFIED,
        request_id: str = "",
        chunk_bytes: int = STREAM_CHUNK_BYTES,
        timeout: float | None = 600.0,
    ) -> DetectResult:
        """DetectChangeStream: for pairs over the message limit; files are never read whole."""
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        before_desc, before_chunks = stream_parts(before)
        after_desc, after_chunks = stream_parts(after)
        header = pb.StreamHeader(
            options=_options(model, stride, threshold, outputs, encoding, mask_rule),
            before=before_desc,
            after=after_desc,
            request_id=request_id,
        )

        def messages() -> Iterator[pb.DetectChangeChunk]:
            yield pb.DetectChangeChunk(header=header)
            for chunk in before_chunks(chunk_bytes):
                yield pb.DetectChangeChunk(before_chunk=chunk)
            for chunk in after_chunks(chunk_bytes):
                yield pb.DetectChangeChunk(after_chunk=chunk)

        return DetectResult(self.stub.DetectChangeStream(messages(), timeout=timeout))

    def list_models(self, timeout: float = 10.0) -> list[pb.ModelInfo]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout).models)

    def get_model(self, name: str = "", timeout: float = 10.0) -> pb.ModelInfo:
        """One model's metadata; the empty name means the server's default model."""
        return self.stub.GetModel(pb.GetModelRequest(name=name), timeout=timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ChangeDetectionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _options(
    model: str,
    stride: int,
    threshold: float | None,
    outputs: list[int] | None,
    encoding: int,
    mask_rule: int = pb.MASK_RULE_UNSPECIFIED,
) -> pb.DetectOptions:
    options = pb.DetectOptions(
        model=model,
        stride=stride,
        outputs=outputs or [],
        probability_encoding=encoding,
        mask_rule=mask_rule,
    )
    if threshold is not None:
        options.threshold = threshold
    return options
