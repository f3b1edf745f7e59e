"""The gRPC servicer: thin conversions between messages and the core, and the one place where the
project's errors become status codes."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np

from serving.api import change_detection_pb2 as pb
from serving.api import change_detection_pb2_grpc as pb_grpc
from serving.config import ServerSettings
from serving.decode import array_from_raw, decode_image
from serving.detector import ALL_OUTPUTS, ChangeDetectionCore, Detection, DetectRequest
from serving.errors import (
    BackendUnavailable,
    DeadlineExceeded,
    InvalidInput,
    ModelLoadError,
    ModelNotFound,
    Overloaded,
)
from serving.interceptors import HandlerInterceptor, behavior_of, rebuilt
from serving.models import ServedModel
from serving.pictures import FAST_PNG, encode_png, probability_to_uint8

log = logging.getLogger(__name__)

STATUS_FOR = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (BackendUnavailable, grpc.StatusCode.UNAVAILABLE),
    (ModelLoadError, grpc.StatusCode.FAILED_PRECONDITION),
)

OUTPUT_NAMES = {
    pb.OUTPUT_TILES: "tiles",
    pb.OUTPUT_PROBABILITY_MAP: "probability_map",
    pb.OUTPUT_MASK: "mask",
    pb.OUTPUT_REGIONS: "regions",
}
MASK_RULE_NAMES = {
    pb.MASK_RULE_UNSPECIFIED: None,  # the model's default (the threshold rule if one is set)
    pb.MASK_RULE_THRESHOLD: "threshold",
    pb.MASK_RULE_CVA_GATED: "cva-gated",
}
MASK_RULE_ENUMS = {"threshold": pb.MASK_RULE_THRESHOLD, "cva-gated": pb.MASK_RULE_CVA_GATED}
DTYPE_NAMES = {pb.DTYPE_UINT8: "uint8", pb.DTYPE_UINT16: "uint16", pb.DTYPE_FLOAT32: "float32"}


_NO_DEADLINE_S = 365 * 24 * 3600.0


def time_remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds left before the client's deadline, None when it set none.

    gRPC reports "no deadline" as an end centuries away, which no timed wait accepts
    (OverflowError), so anything beyond a year counts as none.
    """
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE_S else remaining


@contextlib.contextmanager
def status_mapping(context: grpc.ServicerContext, request_id: str) -> Iterator[None]:
    """Map the project's errors to status codes; anything else is a bug: INTERNAL, generic text."""
    try:
        yield
    except tuple(cls for cls, _ in STATUS_FOR) as exc:
        code = next(code for cls, code in STATUS_FOR if isinstance(exc, cls))
        log.info("request %s: %s: %s", request_id, code.name, exc)
        context.abort(code, str(exc))
    except Exception:
        log.exception("request %s failed", request_id)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error (request {request_id})")


class _Unparsable:
    """What a request message's bytes became when they do not parse (see the interceptor below)."""

    __slots__ = ("details",)

    def __init__(self, details: str) -> None:
        self.details = details


class MalformedRequestInterceptor(HandlerInterceptor):
    """Request bytes that are not a valid message get INVALID_ARGUMENT, not gRPC's INTERNAL.

    gRPC Python answers a message it cannot deserialize with INTERNAL ("Exception deserializing
    request!"): the server blamed, and alerts on INTERNAL fired, for a client's bad bytes. This
    wraps every handler's deserializer so that a failed parse reaches the handler as a marker,
    refused there with INVALID_ARGUMENT (in a request stream, at the malformed message). Keep it
    innermost: a call the token check refuses is then never parsed at all.
    """

    def wrap(
        self, handler: grpc.RpcMethodHandler | None, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        message = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
        problem = (
            f"the request is not a valid {getattr(message, 'full_name', 'request')} message "
            "(malformed protocol buffer); send messages serialized from the published .proto"
        )

        def tolerant(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception:  # DecodeError, or whatever another deserializer raises
                return _Unparsable(problem)

        stream_in = handler.request_streaming
        behavior = behavior_of(handler)
        method = details.method

        # wraps() keeps attributes gRPC reads from the behaviour (the health service's Watch is
        # `experimental_non_blocking` and takes a third argument, hence *rest)
        @functools.wraps(behavior)
        def checked(request: Any, context: grpc.ServicerContext, *rest: Any) -> Any:
            if stream_in:
                return behavior(_parsed(request, context, method), context, *rest)
            if isinstance(request, _Unparsable):
                log.info("%s: INVALID_ARGUMENT: %s", method, request.details)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
            return behavior(request, context, *rest)

        return rebuilt(handler, checked, deserializer=tolerant)


def _parsed(requests: Iterator[Any], context: grpc.ServicerContext, method: str) -> Iterator[Any]:
    """A request stream that stops with INVALID_ARGUMENT at the first unparsable message.

    The code is set before raising rather than with abort(): a handler's status_mapping maps the
    InvalidInput to the same code, and for handlers without one (reflection) gRPC sends the code
    already set instead of UNKNOWN.
    """
    for request in requests:
        if isinstance(request, _Unparsable):
            log.info("%s: INVALID_ARGUMENT: %s", method, request.details)
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            context.set_details(request.details)
            raise InvalidInput(request.details)
        yield request


class ChangeDetectionServicer(pb_grpc.ChangeDetectionServicer):
    def __init__(self, core: ChangeDetectionCore, settings: ServerSettings) -> None:
        self.core = core
        self.settings = settings

    # ------------------------------------------------------------------ DetectChange
    def DetectChange(
        self, request: pb.DetectChangeRequest, context: grpc.ServicerContext
    ) -> pb.DetectChangeResponse:
        request_id = request.request_id or uuid.uuid4().hex
        with status_mapping(context, request_id):
            t0 = time.perf_counter()
            before = self._image(request.before, "before")
            after = self._image(request.after, "after")
            decode_ms = (time.perf_counter() - t0) * 1e3
            return self._detect(before, after, request.options, request_id, context, decode_ms)
        raise AssertionError("unreachable: status_mapping aborts")  # pragma: no cover

    def DetectChangeStream(
        self, request_iterator: Iterator[pb.DetectChangeChunk], context: grpc.ServicerContext
    ) -> pb.DetectChangeResponse:
        request_id = uuid.uuid4().hex
        with status_mapping(context, request_id):
            t0 = time.perf_counter()
            header, before_bytes, after_bytes = self._collect(request_iterator)
            request_id = header.request_id or request_id
            before = self._described(header.before, before_bytes, "before")
            after = self._described(header.after, after_bytes, "after")
            decode_ms = (time.perf_counter() - t0) * 1e3
            return self._detect(before, after, header.options, request_id, context, decode_ms)
        raise AssertionError("unreachable: status_mapping aborts")  # pragma: no cover

    def _detect(
        self,
        before: np.ndarray,
        after: np.ndarray,
        options: pb.DetectOptions,
        request_id: str,
        context: grpc.ServicerContext,
        decode_ms: float,
    ) -> pb.DetectChangeResponse:
        outputs = frozenset(OUTPUT_NAMES[o] for o in options.outputs if o in OUTPUT_NAMES)
        if len(outputs) != len(set(options.outputs)):
            raise InvalidInput(f"unknown output in {list(options.outputs)}")
        if options.mask_rule not in MASK_RULE_NAMES:
            raise InvalidInput(f"unknown mask_rule {options.mask_rule}")
        remaining = time_remaining(context)
        req = DetectRequest(
            before=before,
            after=after,
            model=options.model,
            model_version=options.model_version,
            stride=options.stride,
            threshold=options.threshold if options.HasField("threshold") else None,
            mask_rule=MASK_RULE_NAMES[options.mask_rule],
            outputs=outputs or ALL_OUTPUTS,
            min_region_area_px=options.min_region_area_px,
            deadline=None if remaining is None else time.monotonic() + remaining,
        )
        detection = self.core.detect(req, decode_ms=decode_ms)
        return to_response(detection, req.outputs, options.probability_encoding, request_id)

    # ------------------------------------------------------------------ models
    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        repo = self.core.repository
        return pb.ListModelsResponse(
            models=[self._info(repo.models[name]) for name in sorted(repo.models)]
        )

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        with status_mapping(context, "GetModel"):
            return self._info(self.core.repository.get(request.name))
        raise AssertionError("unreachable")  # pragma: no cover

    def _info(self, served: ServedModel) -> pb.ModelInfo:
        m = served.metadata
        return pb.ModelInfo(
            name=m.name,
            version=m.version,
            patch_size=m.patch_size,
            channels=m.channels,
            band_names=list(m.band_names),
            input_dtype=m.input_dtype,
            recommended_stride=m.recommended_stride,
            default_threshold=m.default_threshold,
            default_mask_rule=MASK_RULE_ENUMS[m.default_mask_rule],
            is_default=m.name == self.core.repository.default,
            backend=served.backend_name,
            metadata_json=m.model_dump_json(),
        )

    # ------------------------------------------------------------------ images
    def _image(self, image: pb.Image, name: str) -> np.ndarray:
        match image.WhichOneof("source"):
            case "encoded":
                return decode_image(image.encoded, max_pixels=self.settings.max_pixels, name=name)
            case "raw":
                return self._raw(image.raw, image.raw.data, name)
            case _:
                raise InvalidInput(f"{name}: no image given (set `encoded` or `raw`)")

    def _raw(self, raw: pb.RawArray, data: bytes, name: str) -> np.ndarray:
        dtype = DTYPE_NAMES.get(raw.dtype)
        if dtype is None:
            raise InvalidInput(f"{name}: raw dtype must be one of {sorted(DTYPE_NAMES.values())}")
        return array_from_raw(
            data, list(raw.shape), dtype, max_pixels=self.settings.max_pixels, name=name
        )

    def _described(self, desc: pb.ImageDescriptor, data: bytes, name: str) -> np.ndarray:
        if desc.WhichOneof("kind") == "raw":
            return self._raw(desc.raw, data, name)
        return decode_image(data, max_pixels=self.settings.max_pixels, name=name)

    def _collect(
        self, chunks: Iterator[pb.DetectChangeChunk]
    ) -> tuple[pb.StreamHeader, bytes, bytes]:
        """Read the header, then both images' chunks, never past the sizes the header declared."""
        first = next(chunks, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidInput("the first message of the stream must be the header")
        header = first.header
        limit = self.settings.max_stream_bytes
        sizes = {"before": header.before.size_bytes, "after": header.after.size_bytes}
        for which, size in sizes.items():
            if size == 0:
                raise InvalidInput(f"header: {which}.size_bytes must be set")
            if size > limit:
                raise InvalidInput(f"{which} declares {size} bytes, over the limit of {limit}")
        parts: dict[str, bytearray] = {"before": bytearray(), "after": bytearray()}
        for chunk in chunks:
            kind = chunk.WhichOneof("part")
            if kind not in ("before_chunk", "after_chunk"):
                raise InvalidInput("after the header, only before_chunk and after_chunk may follow")
            which = kind.removesuffix("_chunk")
            parts[which] += getattr(chunk, kind)
            if len(parts[which]) > sizes[which]:
                raise InvalidInput(f"{which}: more bytes than the {sizes[which]} declared")
        for which, size in sizes.items():
            if len(parts[which]) != size:
                raise InvalidInput(f"{which}: {len(parts[which])} bytes received, {size} declared")
        return header, bytes(parts["before"]), bytes(parts["after"])


def to_response(
    d: Detection, outputs: frozenset[str], encoding: int, request_id: str
) -> pb.DetectChangeResponse:
    h, w = d.probability.shape
    resp = pb.DetectChangeResponse(
        request_id=request_id,
        model=d.metadata.name,
        model_version=d.metadata.version,
        height=h,
        width=w,
        patch_size=d.metadata.patch_size,
        stride=d.stride,
        threshold=0.0 if d.gated_cut is not None else d.threshold,
        mask_rule=MASK_RULE_ENUMS[d.mask_rule],
        gated_cut=d.gated_cut or 0.0,
        changed_fraction=d.changed_fraction,
        timings=pb.Timings(**d.timings_ms),
    )
    if "tiles" in outputs:
        rows, cols, heights, widths = d.lattice.boxes(h, w)
        tiles = resp.tiles
        tiles.row.extend(rows)
        tiles.col.extend(cols)
        tiles.height.extend(heights)
        tiles.width.extend(widths)
        tiles.probability.extend(d.tile_probabilities.tolist())
    if "probability_map" in outputs:
        if encoding == pb.PROBABILITY_ENCODING_RAW_FLOAT16:
            data = d.probability.astype("<f2").tobytes()
        else:
            encoding = pb.PROBABILITY_ENCODING_PNG8
            data = encode_png(probability_to_uint8(d.probability), FAST_PNG)
        resp.probability_map.CopyFrom(
            pb.ProbabilityMap(encoding=encoding, data=data, height=h, width=w)
        )
    if "mask" in outputs:
        resp.mask_png = encode_png(d.mask.astype(np.uint8) * 255, FAST_PNG)
    if "regions" in outputs:
        for r in d.regions:
            resp.regions.add(
                box=pb.PixelBox(row=r.row, col=r.col, height=r.height, width=r.width),
                area_px=r.area_px,
                max_probability=r.max_probability,
                mean_probability=r.mean_probability,
            )
    return resp
