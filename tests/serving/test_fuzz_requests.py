"""Request-level fuzzing through a real gRPC server on localhost, with the bundled models.

Hypothesis builds DetectChange requests (valid pairs; random, truncated and corrupted encodings;
headers declaring huge sizes; raw arrays of the wrong dtype, shape or byte count; NaN and Inf;
options out of range), DetectChangeStream calls, Open Inference Protocol (KServe v2) ModelInfer
calls, and raw wire bytes sent through generic channel methods, so that messages that are not
valid protocol buffers are tried too. A small model of the validation rules predicts each status:
OK for a valid request, NOT_FOUND for a model the server lacks, INVALID_ARGUMENT for the rest.
Never INTERNAL or UNKNOWN, and every call has a deadline, so a hang fails the test. The server is
checked healthy at the end.

Examples per property: ``RARECHANGE_FUZZ_EXAMPLES`` (200 by default). The regression tests at the
end pin what fuzzing found.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import struct
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from serving.api import change_detection_pb2 as pb
from serving.api import grpc_predict_v2_pb2 as kpb
from serving.backends.base import FunctionBackend
from serving.batcher import DynamicBatcher
from serving.config import ServerSettings
from serving.metadata import ModelMetadata
from serving.models import ModelRepository, ServedModel
from serving.server import ChangeDetectionServer, channel_options, create_server

MODELS = Path(__file__).resolve().parents[2] / "models"
# the bundled models the rules below are written for: uint8, 3 channels, 32 px patches (the
# Sentinel-2 model, 4 channels uint16, is left out: to this server it is a model it lacks)
FUZZED = ("aerial-rgb", "synthetic-thin", "synthetic-thin-fp16", "synthetic-thin-int8")
EXAMPLES = int(os.environ.get("RARECHANGE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # each call has its own gRPC deadline below
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DEADLINE_S = 30.0
"""Per call; the calls take milliseconds, so reaching it means the server hung."""
SIDE = 40
"""Images are at most SIDE x SIDE: with stride 1 that is more patches than QUEUE allows."""
MAX_PIXELS = SIDE * SIDE
QUEUE = 1024
MAX_STREAM_BYTES = 1 << 20
PATCH, CHANNELS, STRIDE = 32, 3, 8  # every bundled model

Code = grpc.StatusCode
OK, INVALID, NOT_FOUND = Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND
SERVICE = "/rarechange.v1.ChangeDetection"
KSERVE = "/inference.GRPCInferenceService"


# --------------------------------------------------------------------------------------------
# the server and the calls


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChangeDetectionServer]:
    models = tmp_path_factory.mktemp("models")
    for name in FUZZED:
        (models / name).symlink_to(MODELS / name)
    settings_ = ServerSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        models_dir=models,
        max_pixels=MAX_PIXELS,
        max_queue_size=QUEUE,
        max_stream_bytes=MAX_STREAM_BYTES,
        workers=4,
    )
    started = create_server(settings_).start()
    yield started
    started.stop(grace=0)


@pytest.fixture(scope="module")
def served(server: ChangeDetectionServer) -> dict[str, str]:
    """Model name -> version; "" (the default model) included."""
    models = server.repository.models
    assert {(m.metadata.patch_size, m.metadata.channels) for m in models.values()} == {(32, 3)}
    assert {m.metadata.input_dtype for m in models.values()} == {"uint8"}
    versions = {name: m.metadata.version for name, m in models.items()}
    return {**versions, "": versions[server.repository.default]}


@pytest.fixture(scope="module")
def channel(server: ChangeDetectionServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address, options=channel_options(64 << 20)) as ch:
        yield ch


@dataclass
class Answer:
    code: grpc.StatusCode
    details: str
    response: Message | bytes | None


def _call(invoke: Callable[[], object]) -> Answer:
    try:
        response = invoke()
    except grpc.RpcError as exc:
        answer = Answer(exc.code(), exc.details() or "", None)
    else:
        answer = Answer(OK, "", response)
    assert answer.code not in (Code.INTERNAL, Code.UNKNOWN), answer.details
    assert answer.code != Code.DEADLINE_EXCEEDED, f"no answer within {DEADLINE_S} s: a hang"
    return answer


def unary(channel: grpc.Channel, method: str, request: Message | bytes, reply: type) -> Answer:
    """One unary call; ``request`` as a message, or as bytes sent exactly as given."""
    serialize = None if isinstance(request, bytes) else type(request).SerializeToString
    stub = channel.unary_unary(
        method, request_serializer=serialize, response_deserializer=reply.FromString
    )
    return _call(lambda: stub(request, timeout=DEADLINE_S))


def stream(channel: grpc.Channel, messages: list[Message] | list[bytes]) -> Answer:
    serialize = None
    if messages and not isinstance(messages[0], bytes):
        serialize = pb.DetectChangeChunk.SerializeToString
    stub = channel.stream_unary(
        f"{SERVICE}/DetectChangeStream",
        request_serializer=serialize,
        response_deserializer=pb.DetectChangeResponse.FromString,
    )
    return _call(lambda: stub(iter(messages), timeout=DEADLINE_S))


# --------------------------------------------------------------------------------------------
# images, with what the server must make of them


@dataclass(frozen=True)
class Img:
    message: pb.Image
    decoded: tuple[int, int, int, str] | str | None
    """(H, W, C, dtype) it surely decodes to; None: surely refused; "?": either."""
    why: str = ""  # a word the refusal must contain ("NaN", "pixels"), if any


UNKNOWN = "?"
_DTYPES = {pb.DTYPE_UINT8: "uint8", pb.DTYPE_UINT16: "uint16", pb.DTYPE_FLOAT32: "float32"}
_MAGICS = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _bomb(kind: str, height: int, width: int) -> bytes:
    """A valid header declaring height x width, with next to no pixel data behind it."""
    if kind == "png":
        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b""))
    if kind == "jpeg":
        data = bytearray(_encode(np.zeros((8, 8, 3), np.uint8), "JPEG"))
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
        return bytes(data)
    entries = [(256, width), (257, height), (258, 8), (273, 8), (277, 1), (279, 1)]
    ifd = struct.pack("<H", len(entries))
    ifd += b"".join(struct.pack("<HHII", tag, 4, 1, value) for tag, value in entries)
    return b"II*\x00" + struct.pack("<I", 10) + b"\x00\x00" + ifd + b"\x00" * 4


def raw_outcome(data: bytes, shape: list[int], dtype: int) -> tuple[int, int, int, str] | None:
    """What a RawArray decodes to under the documented rules, None when it must be refused."""
    name = _DTYPES.get(dtype)
    if name is None or len(shape) not in (2, 3) or min(shape) < 1:
        return None
    h, w, c = shape[0], shape[1], shape[2] if len(shape) == 3 else 1
    if h * w > MAX_PIXELS or c > 64 or len(data) != h * w * c * np.dtype(name).itemsize:
        return None
    if name == "float32" and not np.isfinite(np.frombuffer(data, "<f4")).all():
        return None
    return h, w, c, name


def _raw(arr: np.ndarray, dtype: int) -> pb.Image:
    return pb.Image(raw=pb.RawArray(data=arr.tobytes(), shape=arr.shape, dtype=dtype))


@st.composite
def pixels(draw: st.DrawFn, height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8: noise from a drawn seed (a few bytes of hypothesis data, not
    H*W*3), or a flat colour, which compresses to almost nothing."""
    if draw(st.booleans()):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return np.full((height, width, 3), draw(st.integers(0, 255)), np.uint8)


@st.composite
def images(draw: st.DrawFn, height: int, width: int) -> Img:
    """An image of (about) height x width, of one of many kinds, most of them broken."""
    kind = draw(
        st.sampled_from(["raw", "png", "jpeg", "tiff"])  # valid half of the time
        | st.sampled_from(
            [
                *("grey", "uint16", "float32", "nan", "raw-any", "dtype-enum", "random"),
                *("truncated", "corrupted", "bomb", "empty", "unset"),
            ]
        )
    )
    rgb = draw(pixels(height, width))
    match kind:
        case "raw":
            return Img(_raw(rgb, pb.DTYPE_UINT8), (height, width, 3, "uint8"))
        case "png" | "jpeg" | "tiff":
            encoded = _encode(rgb, kind.upper())
            return Img(pb.Image(encoded=encoded), (height, width, 3, "uint8"))
        case "grey":
            encoded = _encode(rgb[..., 0], draw(st.sampled_from(["PNG", "JPEG", "TIFF"])))
            return Img(pb.Image(encoded=encoded), (height, width, 1, "uint8"))
        case "uint16":
            return Img(_raw(rgb.astype("<u2"), pb.DTYPE_UINT16), (height, width, 3, "uint16"))
        case "float32":
            return Img(_raw(rgb.astype("<f4"), pb.DTYPE_FLOAT32), (height, width, 3, "float32"))
        case "nan":
            arr = rgb.astype("<f4")
            bad = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
            arr[draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1)), 0] = bad
            return Img(_raw(arr, pb.DTYPE_FLOAT32), None, "NaN")
        case "raw-any":
            shape = draw(
                st.lists(
                    st.integers(-2, SIDE + 2)
                    | st.integers(-(2**63), 2**63 - 1)
                    | st.sampled_from([2**31, 2**54, 2**62]),
                    max_size=4,
                )
            )
            dtype = draw(st.sampled_from(sorted(_DTYPES)))
            size = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize if shape else 0
            if 0 < size <= 4 * MAX_PIXELS * 4 and draw(st.booleans()):
                size += draw(st.sampled_from([0, 0, -1, 1]))  # the near misses matter most
                data = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).bytes(size)
            else:
                data = draw(st.binary(max_size=256))
            message = pb.Image(raw=pb.RawArray(data=data, shape=shape, dtype=dtype))
            return Img(message, raw_outcome(data, shape, dtype))
        case "dtype-enum":  # DTYPE_UNSPECIFIED, or a number the enum does not define
            dtype = draw(st.just(0) | st.integers(4, 2**31 - 1) | st.integers(-(2**31), -1))
            return Img(_raw(rgb, dtype), None)
        case "random":
            data = draw(
                st.binary(max_size=512)
                | st.builds(bytes.__add__, st.sampled_from(_MAGICS), st.binary())
            )
            return Img(pb.Image(encoded=data), UNKNOWN if data.startswith(_MAGICS) else None)
        case "truncated":
            encoded = _encode(rgb, draw(st.sampled_from(["PNG", "JPEG", "TIFF"])))
            cut = draw(st.integers(1, len(encoded) - 1))
            return Img(pb.Image(encoded=encoded[:cut]), UNKNOWN)
        case "corrupted":
            encoded = bytearray(_encode(rgb, draw(st.sampled_from(["PNG", "JPEG", "TIFF"]))))
            for position, value in draw(
                st.lists(st.tuples(st.integers(0), st.integers(0, 255)), min_size=1, max_size=6)
            ):
                encoded[position % len(encoded)] = value
            return Img(pb.Image(encoded=bytes(encoded)), UNKNOWN)
        case "bomb":
            side = draw(st.integers(SIDE + 1, 65535))
            return Img(
                pb.Image(encoded=_bomb(draw(st.sampled_from(["png", "jpeg", "tiff"])), side, side)),
                None,
                "pixels",
            )
        case "empty":
            return Img(pb.Image(encoded=b""), None)
        case _:  # neither `encoded` nor `raw` set
            return Img(pb.Image(), None)


# --------------------------------------------------------------------------------------------
# options, and the model of the rules


path_like = st.sampled_from(
    ["../synthetic-thin", "/etc/passwd", "file:///etc/passwd", "synthetic-thin/"]
)
served_names = st.sampled_from(
    ["", "aerial-rgb", "synthetic-thin", "synthetic-thin-int8", "sentinel2-rgbn"]
)


def _mostly(common: st.SearchStrategy, rare: st.SearchStrategy) -> st.SearchStrategy:
    """``common`` four times in five, so that enough requests get past the model lookup."""
    return st.integers(0, 4).flatmap(lambda k: rare if k == 0 else common)


model_names = _mostly(served_names, path_like | st.text(max_size=12))
outputs_field = st.just([]) | st.lists(
    st.sampled_from([1, 2, 3, 4]) | st.integers(-(2**31), 2**31 - 1), max_size=5
)


@st.composite
def options(draw: st.DrawFn) -> pb.DetectOptions:
    opts = pb.DetectOptions(
        model=draw(model_names),
        model_version=draw(_mostly(st.sampled_from(["", "0.1.0", "0.2.0"]), st.text(max_size=6))),
        stride=draw(
            st.sampled_from([0, 0, 8, 16, 32]) | st.integers(0, 40) | st.integers(0, 2**32 - 1)
        ),
        outputs=draw(outputs_field),
        probability_encoding=draw(st.integers(0, 2) | st.integers(-(2**31), 2**31 - 1)),
        min_region_area_px=draw(st.integers(0, 50) | st.integers(0, 2**32 - 1)),
    )
    threshold = draw(st.none() | st.floats(0, 1, width=32) | st.floats(width=32))
    if threshold is not None:
        opts.threshold = threshold
    return opts


def _patches(length: int, stride: int) -> int:
    """Patches along an axis: the lattice k * stride from the first whose patch reaches 0."""
    return len(range(-((PATCH - 1) // stride) * stride, length, stride))


def predict(before: Img, after: Img, opts: pb.DetectOptions, served: dict[str, str]) -> set[Code]:
    """The statuses the documented validation rules allow for this request, in their order."""
    if before.decoded is None or after.decoded is None:
        return {INVALID}
    if UNKNOWN in (before.decoded, after.decoded):
        return {OK, INVALID, NOT_FOUND}
    if any(o not in (1, 2, 3, 4) for o in opts.outputs):
        return {INVALID}
    if opts.model not in served or opts.model_version not in ("", served[opts.model]):
        return {NOT_FOUND}
    h, w, c, dtype = before.decoded
    stride = opts.stride or STRIDE
    threshold = opts.threshold if opts.HasField("threshold") else 0.5
    if (
        before.decoded != after.decoded
        or (c, dtype) != (CHANNELS, "uint8")
        or not 1 <= stride <= PATCH
        or not 0.0 <= threshold <= 1.0  # False for NaN too
        or _patches(h, stride) * _patches(w, stride) > QUEUE
    ):
        return {INVALID}
    return {OK}


sizes = st.tuples(st.integers(1, SIDE), st.integers(1, SIDE))


@st.composite
def detect_requests(draw: st.DrawFn) -> tuple[pb.DetectChangeRequest, Img, Img]:
    h, w = draw(sizes)
    before = draw(images(h, w))
    ah, aw = draw(st.just((h, w)) | sizes)  # mostly the same size: pairs that can succeed
    after = draw(images(ah, aw))
    request = pb.DetectChangeRequest(
        before=before.message,
        after=after.message,
        options=draw(options()),
        request_id=draw(st.text(max_size=40)),
    )
    return request, before, after


# --------------------------------------------------------------------------------------------
# properties


def _check_response(
    response: pb.DetectChangeResponse,
    request: pb.DetectChangeRequest,
    hw: tuple[int, int],
    default_model: str,
) -> None:
    """An OK answer describes the images sent, with every output asked for."""
    h, w = hw
    assert (response.height, response.width) == hw
    assert response.request_id == (request.request_id or response.request_id)
    assert response.model == (request.options.model or default_model)
    assert 0.0 <= response.changed_fraction <= 1.0
    wanted = set(request.options.outputs) or {1, 2, 3, 4}
    if pb.OUTPUT_TILES in wanted:
        stride = response.stride
        assert len(response.tiles.probability) == _patches(h, stride) * _patches(w, stride)
    if pb.OUTPUT_PROBABILITY_MAP in wanted:
        prob = response.probability_map
        if prob.encoding == pb.PROBABILITY_ENCODING_RAW_FLOAT16:
            values = np.frombuffer(prob.data, "<f2")
        else:
            values = np.asarray(Image.open(io.BytesIO(prob.data))) / 255
        assert (prob.height, prob.width) == hw and values.size == h * w
        assert ((values >= 0) & (values <= 1)).all()
    if pb.OUTPUT_MASK in wanted:
        mask = np.asarray(Image.open(io.BytesIO(response.mask_png)))
        assert mask.shape == hw and set(np.unique(mask)) <= {0, 255}
    for region in response.regions:
        box = region.box
        assert box.row + box.height <= h and box.col + box.width <= w
        assert 0 < region.area_px <= box.height * box.width


@FUZZ
@given(detect_requests())
@example(  # huge declared size in a valid PNG header, beside a valid image
    (
        pb.DetectChangeRequest(
            before=pb.Image(encoded=_bomb("png", 40_000, 40_000)),
            after=pb.Image(raw=pb.RawArray(data=bytes(12), shape=[2, 2, 3], dtype=1)),
        ),
        Img(pb.Image(), None, "pixels"),
        Img(pb.Image(), (2, 2, 3, "uint8")),
    )
)
def test_detect_change_answers_as_the_rules_say(
    server: ChangeDetectionServer,
    channel: grpc.Channel,
    served: dict[str, str],
    case: tuple[pb.DetectChangeRequest, Img, Img],
) -> None:
    request, before, after = case
    allowed = predict(before, after, request.options, served)
    answer = unary(channel, f"{SERVICE}/DetectChange", request, pb.DetectChangeResponse)
    event(answer.code.name)  # --hypothesis-show-statistics
    assert answer.code in allowed, (answer.code, answer.details, allowed)
    known = [image.decoded for image in (before, after) if isinstance(image.decoded, tuple)]
    if answer.code == OK and known:
        _check_response(answer.response, request, known[0][:2], server.repository.default)
    # the first image that does not surely decode (before is decoded first) decides the refusal
    first = next((i for i in (before, after) if not isinstance(i.decoded, tuple)), None)
    if first is not None and first.decoded is None and first.why:
        assert first.why in answer.details, answer.details  # and the message names the cause


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[pb.DetectChangeChunk], bool]:
    """A valid stream in random chunks and interleaving, then maybe broken one way.

    Returns (messages, whether the stream is valid).
    """
    h, w = draw(sizes)
    parts: list[list[pb.DetectChangeChunk]] = []
    descriptors = []
    for field in ("before_chunk", "after_chunk"):
        rgb = draw(pixels(h, w))
        if draw(st.booleans()):
            data = _encode(rgb, draw(st.sampled_from(["PNG", "TIFF"])))
            descriptors.append(pb.ImageDescriptor(encoded=True, size_bytes=len(data)))
        else:
            data = rgb.tobytes()
            raw = pb.RawArray(shape=[h, w, 3], dtype=pb.DTYPE_UINT8)
            descriptors.append(pb.ImageDescriptor(raw=raw, size_bytes=len(data)))
        cuts = sorted(
            draw(st.sets(st.integers(1, len(data) - 1), max_size=6)) if len(data) > 1 else []
        )
        edges = [0, *cuts, len(data)]
        parts.append(
            [pb.DetectChangeChunk(**{field: data[a:b]}) for a, b in itertools.pairwise(edges)]
        )
    # any interleaving of the two images' chunks, each image's in order (as the protocol says)
    order = draw(st.permutations([0] * len(parts[0]) + [1] * len(parts[1])))
    queues = [iter(parts[0]), iter(parts[1])]
    chunks = [next(queues[i]) for i in order]
    header = pb.StreamHeader(before=descriptors[0], after=descriptors[1], request_id="s")
    messages = [pb.DetectChangeChunk(header=header), *chunks]
    damage = draw(
        st.sampled_from(["none"] * 4 + ["size+1", "size-1", "size0", "too-big", "no-header"])
        | st.sampled_from(["two-headers", "drop-chunk", "extra-chunk", "raw-shape"])
    )
    before = messages[0].header.before
    match damage:
        case "size+1" | "size-1":
            before.size_bytes += 1 if damage == "size+1" else -1
        case "size0":
            before.size_bytes = 0
        case "too-big":
            messages[0].header.after.size_bytes = MAX_STREAM_BYTES + 1
        case "no-header":
            messages = messages[1:]
        case "two-headers":
            messages.insert(draw(st.integers(1, len(messages))), messages[0])
        case "drop-chunk":
            del messages[draw(st.integers(1, len(messages) - 1))]
        case "extra-chunk":
            messages.append(pb.DetectChangeChunk(after_chunk=b"\x00"))
        case "raw-shape" if before.WhichOneof("kind") == "raw":
            before.raw.shape[0] += 1
        case _:
            return messages, True
    return messages, False


@FUZZ
@given(streams())
def test_streams_answer_as_the_rules_say(channel: grpc.Channel, case: tuple[list, bool]) -> None:
    messages, valid = case
    answer = stream(channel, messages)
    event(answer.code.name)  # --hypothesis-show-statistics
    assert answer.code == (OK if valid else INVALID), answer.details
    if valid:
        assert answer.response.request_id == "s" and answer.response.mask_png


# --------------------------------------------------------------------------------------------
# the Open Inference Protocol


@st.composite
def infer_requests(draw: st.DrawFn) -> tuple[kpb.ModelInferRequest, set[Code]]:
    """A ModelInfer request and the statuses serving/kserve.py's rules allow for it.

    Half are built carefully (valid but for the model name), half with every field random.
    """
    careful = draw(st.booleans())

    def pick(good: object, anything: st.SearchStrategy) -> object:
        return good if careful else draw(st.just(good) | anything)

    n = draw(st.integers(0, 3))
    good_shape = [n, CHANNELS, PATCH, PATCH]
    request = kpb.ModelInferRequest(model_name=draw(model_names), id=draw(st.text(max_size=8)))
    as_raw = draw(st.booleans())
    problems = []
    names = pick(
        draw(st.sampled_from([["before", "after"], ["after", "before"]])),
        st.lists(st.sampled_from(["before", "after"]) | st.text(max_size=6), max_size=3),
    )
    counts = []
    for name in names:
        datatype = pick("UINT8", st.sampled_from(["FP32", "UINT16", "INT64", "BYTES", ""]))
        huge = st.sampled_from([2**54, 2**62, 2**63 - 1]) | st.integers(0, 2**63 - 1)
        shape = pick(
            good_shape,
            st.builds(lambda k: [k, CHANNELS, PATCH, PATCH], st.integers(-1, 4) | huge)
            | st.lists(st.integers(-1, 4) | st.sampled_from([PATCH, CHANNELS]) | huge, max_size=5),
        )
        count = math.prod(shape) if shape else 0
        values = count if 0 <= count <= 4 * 3072 else draw(st.just(0) | st.integers(0, 64))
        values = max(0, values + pick(0, st.sampled_from([-1, 1]))) if values else 0
        too_big = values > 0 and pick(False, st.booleans())
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if as_raw:
            request.raw_input_contents.append(bytes(values))
        else:
            tensor.contents.uint_contents.extend([256 if too_big else 7] * values)
        if datatype != "UINT8" or len(shape) != 4 or shape[0] < 0 or shape[1:] != good_shape[1:]:
            problems.append("tensor")
        elif values != count or (too_big and not as_raw):
            problems.append("contents")
        counts.append(shape[0] if shape else None)
    if as_raw and names and pick(False, st.booleans()):  # one raw entry too many or too few
        if draw(st.booleans()):
            request.raw_input_contents.append(b"")
        else:
            del request.raw_input_contents[-1]
        problems.append("raw count")
    output_names = st.just("probability") | st.text(max_size=6)
    outputs = draw(st.lists(st.just("probability") if careful else output_names, max_size=2))
    for name in outputs:
        request.outputs.add(name=name)
    if sorted(names) != ["after", "before"] or len(set(counts)) != 1:
        problems.append("inputs")
    if any(name != "probability" for name in outputs):
        problems.append("outputs")
    if request.model_name not in {"", *FUZZED}:
        return request, {NOT_FOUND}
    return request, {INVALID} if problems else {OK}


@FUZZ
@given(infer_requests())
@example(  # np.prod overflowed int64: [2**54, 3, 32, 32] counted 0 values, then reshape raised
    (
        kpb.ModelInferRequest(
            inputs=[
                kpb.ModelInferRequest.InferInputTensor(
                    name=n, datatype="UINT8", shape=[2**54, 3, 32, 32]
                )
                for n in ("before", "after")
            ],
            raw_input_contents=[b"", b""],
        ),
        {INVALID},
    )
)
def test_model_infer_answers_as_the_rules_say(
    channel: grpc.Channel, case: tuple[kpb.ModelInferRequest, set[Code]]
) -> None:
    request, allowed = case
    answer = unary(channel, f"{KSERVE}/ModelInfer", request, kpb.ModelInferResponse)
    event(answer.code.name)  # --hypothesis-show-statistics
    assert answer.code in allowed, (answer.code, answer.details, allowed)
    if answer.code == OK:
        n = request.inputs[0].shape[0]
        assert list(answer.response.outputs[0].shape) == [n]


# --------------------------------------------------------------------------------------------
# wire bytes: whatever arrives, never INTERNAL

_METHODS = {
    f"{SERVICE}/DetectChange": (pb.DetectChangeRequest, pb.DetectChangeResponse),
    f"{SERVICE}/GetModel": (pb.GetModelRequest, pb.ModelInfo),
    f"{SERVICE}/ListModels": (pb.ListModelsRequest, pb.ListModelsResponse),
    f"{KSERVE}/ModelInfer": (kpb.ModelInferRequest, kpb.ModelInferResponse),
    f"{KSERVE}/ModelMetadata": (kpb.ModelMetadataRequest, kpb.ModelMetadataResponse),
    f"{KSERVE}/ModelReady": (kpb.ModelReadyRequest, kpb.ModelReadyResponse),
    f"{KSERVE}/ServerMetadata": (kpb.ServerMetadataRequest, kpb.ServerMetadataResponse),
    "/grpc.health.v1.Health/Check": (
        health_pb2.HealthCheckRequest,
        health_pb2.HealthCheckResponse,
    ),
}
_SEEDS = [  # serialized valid requests, for mutations that stay close to the real format
    pb.DetectChangeRequest(
        before=pb.Image(raw=pb.RawArray(data=bytes(48), shape=[4, 4, 3], dtype=1)),
        after=pb.Image(encoded=_encode(np.zeros((4, 4, 3), np.uint8), "PNG")),
        options=pb.DetectOptions(model="synthetic-thin", stride=16, outputs=[3], threshold=0.5),
        request_id="seed",
    ).SerializeToString(),
    pb.GetModelRequest(name="aerial-rgb").SerializeToString(),
    kpb.ModelInferRequest(
        model_name="synthetic-thin",
        inputs=[
            kpb.ModelInferRequest.InferInputTensor(name=n, datatype="UINT8", shape=[1, 3, 32, 32])
            for n in ("before", "after")
        ],
        raw_input_contents=[bytes(3072), bytes(3072)],
    ).SerializeToString(),
]


@st.composite
def wire_bytes(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=512))
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for op, position, value in draw(
        st.lists(
            st.tuples(
                st.sampled_from(["set", "cut", "insert"]), st.integers(0), st.integers(0, 255)
            ),
            min_size=1,
            max_size=6,
        )
    ):
        at = position % max(1, len(data))
        if op == "set" and data:
            data[at] = value
        elif op == "cut":
            del data[at:]
        else:
            data[at:at] = bytes([value])
    return bytes(data)


def _parses(message_type: type, data: bytes) -> bool:
    try:
        message_type.FromString(data)
    except DecodeError:
        return False
    return True


@FUZZ
@given(st.sampled_from(sorted(_METHODS)), wire_bytes())
@example(f"{SERVICE}/DetectChange", b"\xff\xff\xff")
def test_any_wire_bytes_are_ok_not_found_or_invalid(
    channel: grpc.Channel, method: str, data: bytes
) -> None:
    request_type, reply_type = _METHODS[method]
    answer = unary(channel, method, data, reply_type)
    event(answer.code.name)  # --hypothesis-show-statistics
    if not _parses(request_type, data):
        assert answer.code == INVALID and "malformed protocol buffer" in answer.details
    else:
        assert answer.code in (OK, INVALID, NOT_FOUND), answer.details


@FUZZ
@given(
    st.lists(
        wire_bytes() | st.just(pb.DetectChangeChunk(before_chunk=b"x").SerializeToString()),
        max_size=4,
    )
)
def test_any_wire_bytes_in_a_stream_are_invalid_or_ok(
    channel: grpc.Channel, messages: list[bytes]
) -> None:
    answer = stream(channel, messages)
    event(answer.code.name)  # --hypothesis-show-statistics
    if not all(_parses(pb.DetectChangeChunk, m) for m in messages):
        assert answer.code == INVALID, answer.details
    else:
        assert answer.code in (OK, INVALID, NOT_FOUND), answer.details


def test_server_is_healthy_after_the_fuzzing(
    server: ChangeDetectionServer, channel: grpc.Channel
) -> None:
    """Last in this module: the same server still says SERVING and still detects change."""
    check = health_pb2_grpc.HealthStub(channel).Check
    assert (
        check(health_pb2.HealthCheckRequest(), timeout=5).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    before = np.zeros((SIDE, SIDE, 3), np.uint8)
    after = before.copy()
    after[8:24, 8:24] = 255
    request = pb.DetectChangeRequest(
        before=pb.Image(encoded=_encode(before, "PNG")),
        after=pb.Image(raw=pb.RawArray(data=after.tobytes(), shape=after.shape, dtype=1)),
        options=pb.DetectOptions(model="synthetic-thin"),
    )
    answer = unary(channel, f"{SERVICE}/DetectChange", request, pb.DetectChangeResponse)
    assert answer.code == OK and answer.response.height == SIDE
    for served in server.repository.models.values():
        assert served.batcher.queued_patches == 0  # nothing left behind in any queue


# --------------------------------------------------------------------------------------------
# regressions: what fuzzing found


def test_malformed_messages_are_invalid_argument_on_every_service(
    channel: grpc.Channel,
) -> None:
    """gRPC Python answers unparsable bytes with INTERNAL; serving turns that INVALID_ARGUMENT,
    for unary calls, request streams (at the bad message) and the open services alike."""
    garbage = b"\xff\xff\xff\xff"
    for method, (_, reply) in _METHODS.items():
        answer = unary(channel, method, garbage, reply)
        assert answer.code == INVALID, (method, answer.details)
    header = pb.DetectChangeChunk(
        header=pb.StreamHeader(
            before=pb.ImageDescriptor(encoded=True, size_bytes=1),
            after=pb.ImageDescriptor(encoded=True, size_bytes=1),
        )
    ).SerializeToString()
    answer = stream(channel, [header, garbage])
    assert answer.code == INVALID and "DetectChangeChunk" in answer.details
    from grpc_reflection.v1alpha import reflection_pb2

    reflect = channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    answer = _call(lambda: list(reflect(iter([garbage]), timeout=DEADLINE_S)))
    assert answer.code == INVALID
    # the wrapped health Watch is still a streaming, non-blocking handler
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


def _function_server(meta: ModelMetadata, **overrides: object) -> ChangeDetectionServer:
    cfg = ServerSettings(host="127.0.0.1", port=0, metrics_port=-1, **overrides)
    backend = FunctionBackend(lambda b, a: np.zeros(len(b), np.float32))
    batcher = DynamicBatcher(
        [backend.infer],
        max_batch_size=cfg.max_batch_size,
        max_queue_delay_us=0,
        max_queue_size=cfg.max_queue_size,
        name=meta.name,
    )
    path = MODELS / "synthetic-thin" / "model.onnx"
    repository = ModelRepository(
        {meta.name: ServedModel(meta, path, "function", batcher)}, meta.name
    )
    return create_server(cfg, repository).start()


def _metadata(**update: object) -> ModelMetadata:
    props = {
        p.key: p.value for p in onnx.load(MODELS / "synthetic-thin" / "model.onnx").metadata_props
    }
    base = ModelMetadata.from_props(props)
    return ModelMetadata.model_validate({**base.model_dump(), "name": "fn", **update})


def _infer_request(patches: np.ndarray, as_raw: bool) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest()
    for name in ("before", "after"):
        tensor = request.inputs.add(name=name, datatype="FP32", shape=patches.shape)
        if as_raw:
            request.raw_input_contents.append(patches.astype("<f4").tobytes())
        else:
            tensor.contents.fp32_contents.extend(patches.ravel().tolist())
    return request


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("as_raw", [True, False], ids=["raw", "typed"])
def test_model_infer_refuses_non_finite_floats(value: float, as_raw: bool) -> None:
    """DetectChange refused NaN/Inf pixels; ModelInfer passed them on to a float32 model."""
    server = _function_server(_metadata(input_dtype="float32", input_range=(0.0, 1.0)))
    try:
        patches = np.full((2, 3, 32, 32), 0.5, np.float32)
        with grpc.insecure_channel(server.address) as ch:
            finite = _infer_request(patches, as_raw)
            assert unary(ch, f"{KSERVE}/ModelInfer", finite, kpb.ModelInferResponse).code == OK
            patches[1, 2, 3, 4] = value
            bad = _infer_request(patches, as_raw)
            answer = unary(ch, f"{KSERVE}/ModelInfer", bad, kpb.ModelInferResponse)
        assert answer.code == INVALID and "NaN or Inf" in answer.details, answer.details
    finally:
        server.stop(grace=0)


def test_too_many_patches_are_refused_before_they_are_cut() -> None:
    """A few-KB PNG at stride 1 used to be cut into every patch (here 287 x 287 patches, 0.5 GB
    for the pair) before the queue bound refused it; now the count is checked first."""
    server = _function_server(_metadata(), max_pixels=256 * 256, max_queue_size=1024)
    try:
        png = _encode(np.zeros((256, 256, 3), np.uint8), "PNG")
        assert len(png) < 2048
        request = pb.DetectChangeRequest(
            before=pb.Image(encoded=png),
            after=pb.Image(encoded=png),
            options=pb.DetectOptions(stride=1),
        )
        with grpc.insecure_channel(server.address) as ch:
            tracemalloc.start()
            try:
                answer = unary(ch, f"{SERVICE}/DetectChange", request, pb.DetectChangeResponse)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        assert answer.code == INVALID and "82369 patches" in answer.details
        assert peak < 32 << 20, f"{peak / 2**20:.0f} MiB allocated to refuse the pair"
    finally:
        server.stop(grace=0)
