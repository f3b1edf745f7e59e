"""Fuzzing of image decoding and request validation: coverage-guided, then in volume.

Two parts; ``python bench/fuzz.py`` runs both and prints one summary (``--json`` also saves it).

* ``atheris``: libFuzzer, through atheris, mutates inputs for four entry points with coverage
  feedback from instrumented Python (``serving`` and Pillow's parsers):

  - ``decode``: :func:`serving.decode.decode_image` on any bytes;
  - ``raw``: :func:`serving.decode.array_from_raw` on any shape, dtype name and buffer, checked
    against an exact model of what it must accept;
  - ``detect``: the bytes of a DetectChangeRequest through the real servicer (parse, decode,
    validate, tile, infer on the bundled ``synthetic-thin``, respond);
  - ``infer``: the bytes of a KServe v2 ModelInferRequest through its servicer.

  The seeds are ``bench/fuzz_corpus/<target>/``: real PNG, JPEG and TIFF files of a few hundred
  bytes and requests built from them (``python bench/fuzz.py corpus`` rewrites them). Anything
  but a refusal (InvalidInput; INVALID_ARGUMENT or NOT_FOUND) is a crash, an input running over
  ``--unit-timeout-s`` a hang, one allocating over ``--rss-limit-mb`` a memory bomb: libFuzzer
  stops and keeps the input under ``out/fuzz/<target>/``. Afterwards the corpus (seeds + what
  libFuzzer added) is replayed without instrumentation to count the lines it executes in the
  modules under test.
* ``requests``: ``rarechange serve`` in its own process and ``--count`` generated requests over
  localhost gRPC, of many kinds (valid pairs, random bytes, truncated and corrupted files, huge
  declared sizes, raw arrays of the wrong dtype/shape/length, NaN/Inf, bad options, malformed
  wire bytes, streams, KServe ModelInfer), each with the statuses its rules allow. Tallied by
  kind and status; a crash is the server dying or answering INTERNAL/UNKNOWN, a hang a call that
  reaches its deadline; at the end the server must still say SERVING and answer a valid request.

Usage::

    python bench/fuzz.py [--seconds 60] [--count 10000] [--json out/fuzz.json]
    python bench/fuzz.py atheris --seconds 60 --targets decode detect
    python bench/fuzz.py requests --count 10000 --workers 4 --seed 0
    python bench/fuzz.py corpus

The first part needs ``pip install atheris`` (3.0.0 installs from a manylinux x86-64 wheel for
CPython 3.11; it is not in the dev extra); the second runs with the project's dev install alone.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import math
import os
import random
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# No serving or Pillow import at module level: the atheris worker must import them inside
# atheris.instrument_imports() to get coverage feedback from them.

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
MODELS = ROOT / "models"
FUZZ_MODEL = "synthetic-thin"
TARGETS = ("decode", "raw", "detect", "infer")
MAX_PIXELS = 256 * 256
"""The pixel limit in the fuzzed configuration: small, so a decode of any accepted size is quick."""
MEASURED = ("serving/decode.py", "serving/service.py", "serving/detector.py", "serving/kserve.py")
sys.path.insert(0, str(ROOT))  # `python bench/fuzz.py` puts bench/, not the repository, first


# ============================================================================================
# small encoders, shared by the corpus and the request generators


def _encode(arr: Any, fmt: str, **kwargs: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _png_header_only(width: int, height: int, depth: int = 8, colour: int = 2) -> bytes:
    """A PNG whose header declares width x height (valid CRCs) with no pixel data behind it."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b""))
        + _png_chunk(b"IEND", b"")
    )


def _tiff_header_only(width: int, height: int, spp: int = 1, bits: int = 8) -> bytes:
    """A little-endian TIFF declaring width x height x spp, one strip of 1 byte."""
    tags = [(256, width), (257, height), (258, bits), (273, 8), (277, spp), (279, 1)]
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHII", tag, 4, 1, value % 2**32) for tag, value in tags
    )
    return b"II*\x00" + struct.pack("<I", 10) + b"\x00\x00" + ifd + b"\x00" * 4


def _jpeg_declaring(data: bytes, width: int, height: int) -> bytes:
    """A real JPEG with its frame header rewritten to declare width x height."""
    out = bytearray(data)
    sof = next(i for i in range(len(out) - 1) if out[i] == 0xFF and out[i + 1] in (0xC0, 0xC2))
    out[sof + 5 : sof + 9] = struct.pack(">HH", height % 65536, width % 65536)
    return bytes(out)


# ============================================================================================
# the seed corpus


def write_corpus(folder: Path = CORPUS) -> dict[str, int]:
    """Small real files and requests, the same bytes every time (fixed seeds, fixed settings)."""
    import numpy as np

    from serving.api import change_detection_pb2 as pb
    from serving.api import grpc_predict_v2_pb2 as kpb
    from serving.pictures import encode_tiff

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    smooth = np.add.outer(np.arange(12), np.arange(12)).astype(np.uint8) * 9
    grey16 = (rng.integers(0, 4096, (6, 6)) * 16).astype(np.uint16)

    tiff = encode_tiff

    images = {
        "rgb8.png": _encode(rgb, "PNG"),
        "smooth-grey.png": _encode(smooth, "PNG"),
        "grey16.png": _encode(grey16, "PNG"),
        "palette.png": _encode(smooth % 4, "PNG", bits=2),
        "rgba.png": _encode(np.dstack([rgb, rgb[..., :1]]), "PNG"),
        "rgb.jpg": _encode(rgb, "JPEG", quality=75),
        "progressive.jpg": _encode(smooth, "JPEG", progressive=True),
        "rgb.tif": tiff(np.moveaxis(rgb, -1, 0)),
        "4xu16-deflate.tif": tiff(
            rng.integers(0, 65536, (4, 6, 6), dtype=np.uint16), compress="deflate"
        ),
        "f32-tiled.tif": tiff(
            rng.normal(size=(1, 16, 16)).astype(np.float32),
            tiled=True,
            blockxsize=16,
            blockysize=16,
        ),
        "pillow-lzw.tif": _encode(rgb, "TIFF", compression="tiff_lzw"),
        "header-40000x40000.png": _png_header_only(40_000, 40_000),
        "header-40000x40000.tif": _tiff_header_only(40_000, 40_000),
    }
    raw8 = pb.Image(raw=pb.RawArray(data=rgb.tobytes(), shape=[8, 8, 3], dtype=pb.DTYPE_UINT8))
    png8 = pb.Image(encoded=images["rgb8.png"])
    detect = {
        "png-pair.pb": pb.DetectChangeRequest(before=png8, after=png8, request_id="seed"),
        "raw-pair.pb": pb.DetectChangeRequest(before=raw8, after=raw8),
        "png-raw-options.pb": pb.DetectChangeRequest(
            before=png8,
            after=raw8,
            options=pb.DetectOptions(
                model=FUZZ_MODEL,
                model_version="0.1.0",
                stride=16,
                threshold=0.5,
                outputs=[pb.OUTPUT_MASK, pb.OUTPUT_REGIONS],
                probability_encoding=pb.PROBABILITY_ENCODING_RAW_FLOAT16,
                min_region_area_px=2,
            ),
        ),
        "jpeg-tiff.pb": pb.DetectChangeRequest(
            before=pb.Image(encoded=images["rgb.jpg"]), after=pb.Image(encoded=images["rgb.tif"])
        ),
        "float-raw.pb": pb.DetectChangeRequest(
            before=pb.Image(
                raw=pb.RawArray(
                    data=np.zeros((4, 4, 3), "<f4").tobytes(),
                    shape=[4, 4, 3],
                    dtype=pb.DTYPE_FLOAT32,
                )
            ),
            after=raw8,
        ),
    }
    infer = {}
    for n, as_raw in ((0, True), (1, True), (0, False)):
        request = kpb.ModelInferRequest(model_name=FUZZ_MODEL, id="seed")
        for name in ("before", "after"):
            tensor = request.inputs.add(name=name, datatype="UINT8", shape=[n, 3, 32, 32])
            if as_raw:
                request.raw_input_contents.append(bytes(n * 3 * 32 * 32))
            else:
                tensor.contents.uint_contents.extend([0] * (n * 3 * 32 * 32))
        request.outputs.add(name="probability")
        infer[f"n{n}-{'raw' if as_raw else 'typed'}.pb"] = request
    files = {f"decode/{name}": data for name, data in images.items()}
    files |= {f"detect/{name}": m.SerializeToString() for name, m in detect.items()}
    files |= {f"infer/{name}": m.SerializeToString() for name, m in infer.items()}
    files |= {  # the raw target reads a FuzzedDataProvider; a few arbitrary starting points
        "raw/zeros": bytes(64),
        "raw/ramp": bytes(range(256)),
        "raw/ones": b"\x01" * 200,
    }
    for target in TARGETS:
        shutil.rmtree(folder / target, ignore_errors=True)
        (folder / target).mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: len(data) for name, data in files.items()}


# ============================================================================================
# the fuzz targets (run by the atheris worker, and again uninstrumented for line coverage)


class Refused(Exception):
    """What the in-process gRPC context raises on abort(), as gRPC's own context does."""

    def __init__(self, code: Any, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code


class _Context:
    """Just enough of grpc.ServicerContext for the servicers: abort, deadline, callbacks."""

    def abort(self, code: Any, details: str) -> None:
        raise Refused(code, details)

    def time_remaining(self) -> float:
        return 30.0

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return True

    def is_active(self) -> bool:
        return True


def build_targets(target: str) -> Callable[[bytes], None]:
    """The entry point for ``target``: raises only when the code under test misbehaves."""
    import grpc
    import numpy as np

    from serving.decode import MAX_BANDS, SUPPORTED_DTYPES, array_from_raw, decode_image
    from serving.errors import InvalidInput

    refusals = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}

    def check_image(out: Any, limit: int) -> None:
        assert isinstance(out, np.ndarray) and out.ndim == 3, type(out)
        assert out.shape[0] * out.shape[1] <= limit and 1 <= out.shape[2] <= MAX_BANDS
        assert out.dtype.name in SUPPORTED_DTYPES and out.flags.c_contiguous
        if out.dtype.kind == "f":
            assert np.isfinite(out).all()

    if target == "decode":

        def decode(data: bytes) -> None:
            try:
                out = decode_image(data, max_pixels=MAX_PIXELS, name="fuzz")
            except InvalidInput:
                return
            check_image(out, MAX_PIXELS)

        return decode

    if target == "raw":
        import atheris  # the FuzzedDataProvider splits the bytes into typed values

        dtypes = [*SUPPORTED_DTYPES, "float64", "int8", "<u2", ">f4", "bool", "", "O"]

        def raw(data: bytes) -> None:
            fdp = atheris.FuzzedDataProvider(data)
            dtype = fdp.PickValueInList(dtypes)
            ndim = fdp.ConsumeIntInRange(0, 4)
            shape = [
                fdp.ConsumeIntInRange(-2, 300)
                if fdp.ConsumeBool()
                else fdp.ConsumeIntInRange(-(2**63), 2**63 - 1)
                for _ in range(ndim)
            ]
            buffer = fdp.ConsumeBytes(fdp.remaining_bytes())
            expected = _raw_model(buffer, shape, dtype, np)
            try:
                out = array_from_raw(buffer, shape, dtype, max_pixels=MAX_PIXELS)
            except InvalidInput:
                assert expected is None, f"refused a valid buffer: {shape} {dtype}"
                return
            assert expected is not None, f"accepted an invalid buffer: {shape} {dtype}"
            assert out.dtype == np.dtype(dtype) and np.array_equal(out, expected)

        return raw

    from google.protobuf.message import DecodeError

    from serving import kserve
    from serving.api import change_detection_pb2 as pb
    from serving.api import grpc_predict_v2_pb2 as kpb
    from serving.config import ServerSettings
    from serving.detector import ChangeDetectionCore
    from serving.models import ModelRepository
    from serving.service import ChangeDetectionServicer

    models = Path(tempfile.mkdtemp(prefix="rarechange-fuzz-models-"))
    (models / FUZZ_MODEL).symlink_to(MODELS / FUZZ_MODEL)
    settings = ServerSettings(
        models_dir=models,
        max_pixels=MAX_PIXELS,
        max_queue_size=16384,
        max_queue_delay_us=0,
        intra_op_threads=1,
        providers="cpu",
        metrics_port=-1,
    )
    repository = ModelRepository.load(settings).start()
    context = _Context()

    if target == "detect":
        servicer = ChangeDetectionServicer(ChangeDetectionCore(repository), settings)

        def detect(data: bytes) -> None:
            try:
                request = pb.DetectChangeRequest.FromString(data)
            except DecodeError:
                return  # gRPC answers INVALID_ARGUMENT (serving.service.MalformedRequest...)
            try:
                response = servicer.DetectChange(request, context)
            except Refused as refused:
                assert refused.code in refusals, str(refused)
                return
            assert response.height >= 1 and response.width >= 1

        return detect

    if target == "infer":
        servicer = kserve.KServeServicer(repository, ready=lambda: True)

        def infer(data: bytes) -> None:
            try:
                request = kpb.ModelInferRequest.FromString(data)
            except DecodeError:
                return
            try:
                response = servicer.ModelInfer(request, context)
            except Refused as refused:
                assert refused.code in refusals, str(refused)
                return
            assert len(response.outputs) == 1

        return infer
    raise ValueError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")


def _raw_model(buffer: bytes, shape: list[int], dtype: str, np: Any) -> Any:
    """What array_from_raw must return (an array), or None where it must refuse."""
    if dtype not in ("uint8", "uint16", "float32") or len(shape) not in (2, 3) or min(shape) < 1:
        return None
    h, w, c = shape[0], shape[1], shape[2] if len(shape) == 3 else 1
    if h * w > MAX_PIXELS or c > 64 or len(buffer) != h * w * c * np.dtype(dtype).itemsize:
        return None
    arr = np.frombuffer(buffer, np.dtype(dtype).newbyteorder("<")).reshape(h, w, c)
    return None if arr.dtype.kind == "f" and not np.isfinite(arr).all() else arr


def atheris_worker(target: str, libfuzzer_args: list[str]) -> None:
    """Run libFuzzer on ``target`` in this process; never returns (libFuzzer exits)."""
    import atheris

    with atheris.instrument_imports(include=["serving", "PIL"]):  # Pillow's parsers too
        import PIL.Image
        import PIL.JpegImagePlugin
        import PIL.PngImagePlugin
        import PIL.TiffImagePlugin  # noqa: F401

        import serving.decode
        import serving.detector
        import serving.kserve
        import serving.service  # noqa: F401
    entry = build_targets(target)
    atheris.Setup([sys.argv[0], *libfuzzer_args], entry)
    atheris.Fuzz()


def coverage_worker(target: str, folders: list[str]) -> None:
    """Replay every input in ``folders`` (uninstrumented) and print the lines of MEASURED
    executed, as JSON: {file: [executed, executable]}, counting lines inside functions."""
    entry = build_targets(target)
    wanted = {str(ROOT / name): name for name in MEASURED}
    hits: dict[str, set[int]] = {name: set() for name in MEASURED}

    def tracer(frame: types.FrameType, event: str, arg: Any) -> Any:
        name = wanted.get(frame.f_code.co_filename)
        if name is None:
            return None
        hits[name].add(frame.f_lineno)
        return tracer

    inputs = sorted(p for folder in folders for p in Path(folder).glob("*") if p.is_file())
    threading.settrace(tracer)
    sys.settrace(tracer)
    try:
        for path in inputs:
            entry(path.read_bytes())
    finally:
        sys.settrace(None)
        threading.settrace(None)  # type: ignore[arg-type]
    report = {}
    for name in MEASURED:
        lines = _function_lines(ROOT / name)
        report[name] = [len(hits[name] & lines), len(lines)]
    print(json.dumps({"inputs": len(inputs), "lines": report}))


def _function_lines(path: Path) -> set[int]:
    """Line numbers of code inside the module's functions (not the module-level statements)."""
    module = compile(path.read_text(), str(path), "exec")
    stack = [c for c in module.co_consts if isinstance(c, types.CodeType)]
    lines: set[int] = set()
    while stack:
        code = stack.pop()
        lines |= {line for _, _, line in code.co_lines() if line is not None}
        stack.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return lines


# ============================================================================================
# part 1: atheris, one process per target


@dataclass
class AtherisResult:
    target: str
    runs: int = 0
    seconds: float = 0.0
    seeds: int = 0
    new_units: int = 0
    cov_start: int = 0
    cov_end: int = 0
    features: int = 0
    slowest_unit_s: int = 0
    peak_rss_mb: int = 0
    crashes: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    lines: dict[str, list[int]] = field(default_factory=dict)
    exit_code: int = 0


def run_atheris(
    targets: list[str], seconds: int, work: Path, unit_timeout_s: int, rss_limit_mb: int
) -> list[AtherisResult]:
    results = []
    for target in targets:
        folder = work / target
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "corpus").mkdir(parents=True)
        (folder / "artifacts").mkdir()
        seeds = CORPUS / target
        args = [
            str(folder / "corpus"),  # new units go to the first folder: the seeds stay as they are
            str(seeds),
            f"-max_total_time={seconds}",
            f"-timeout={unit_timeout_s}",
            f"-rss_limit_mb={rss_limit_mb}",
            "-max_len=8192",
            "-print_final_stats=1",
            f"-artifact_prefix={folder / 'artifacts'}/",
        ]
        command = [sys.executable, __file__, "_atheris-worker", target, "--", *args]
        print(f"atheris: {target} for {seconds} s ...", file=sys.stderr, flush=True)
        log = folder / "libfuzzer.log"
        with log.open("w") as out:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
        result = _parse_libfuzzer(target, log.read_text(errors="replace"), done.returncode)
        result.seeds = sum(1 for _ in seeds.glob("*"))
        result.crashes = sorted(
            str(p) for p in (folder / "artifacts").glob("*") if not p.name.startswith("timeout-")
        )
        result.hangs = sorted(str(p) for p in (folder / "artifacts").glob("timeout-*"))
        coverage = subprocess.run(
            [
                sys.executable,
                __file__,
                "_coverage-worker",
                target,
                str(seeds),
                str(folder / "corpus"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if coverage.returncode == 0:
            result.lines = json.loads(coverage.stdout.strip().splitlines()[-1])["lines"]
        else:
            print(coverage.stderr[-2000:], file=sys.stderr)
        results.append(result)
    return results


def _parse_libfuzzer(target: str, text: str, exit_code: int) -> AtherisResult:
    result = AtherisResult(target, exit_code=exit_code)
    stats = dict(re.findall(r"^stat::(\w+):\s+(\d+)", text, re.MULTILINE))
    result.runs = int(stats.get("number_of_executed_units", 0))
    result.new_units = int(stats.get("new_units_added", 0))
    result.slowest_unit_s = int(stats.get("slowest_unit_time_sec", 0))
    result.peak_rss_mb = int(stats.get("peak_rss_mb", 0))
    progress = re.findall(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+)", text, re.MULTILINE)
    inited = [p for p in progress if p[1] == "INITED"]
    if inited:
        result.cov_start = int(inited[0][2])
    if progress:
        result.cov_end, result.features = int(progress[-1][2]), int(progress[-1][3])
    done = re.search(r"^Done (\d+) runs in (\d+) second", text, re.MULTILINE)
    if done:
        result.seconds = float(done.group(2))
    return result


# ============================================================================================
# part 2: generated requests against a real server


@dataclass
class Case:
    kind: str
    method: str  # "DetectChange", "DetectChangeStream", "ModelInfer" or "wire:<method path>"
    request: Any  # a message, a list of messages (stream), or bytes (wire)
    allowed: frozenset[str]  # status code names
    size: tuple[int, int] | None = None  # (H, W) an OK response must report


def bundled_versions(names: list[str]) -> dict[str, str]:
    """Each bundled model's version, from its ONNX metadata ("" is the default: aerial-rgb)."""
    import onnx

    from serving.metadata import ModelMetadata

    versions = {}
    for name in names:
        model = onnx.load(MODELS / (name or "aerial-rgb") / "model.onnx", load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}
        versions[name] = ModelMetadata.from_props(props).version
    return versions


class Generator:
    """Requests of every kind, from one seeded random.Random (the same seed, the same run)."""

    KINDS = (
        *("valid", "random-bytes", "truncated", "corrupted", "huge-declared", "raw-wrong"),
        *("nan-inf", "bad-options", "unknown-model", "wire-bytes", "stream", "kserve"),
    )

    def __init__(self, seed: int, max_side: int = 64) -> None:
        import numpy as np

        from serving.api import change_detection_pb2 as pb
        from serving.api import grpc_predict_v2_pb2 as kpb

        self.np, self.pb, self.kpb = np, pb, kpb
        self.rng = random.Random(seed)
        self.nprng = np.random.default_rng(seed)
        self.max_side = max_side
        self.models = [
            "",
            "aerial-rgb",
            "synthetic-thin",
            "synthetic-thin-fp16",
            "synthetic-thin-int8",
        ]
        self.versions = bundled_versions(self.models)

    # -- pieces
    def pixels(self, h: int, w: int, c: int = 3) -> Any:
        if self.rng.random() < 0.5:
            return self.nprng.integers(0, 256, (h, w, c), dtype=self.np.uint8)
        return self.np.full((h, w, c), self.rng.randrange(256), self.np.uint8)

    def size(self) -> tuple[int, int]:
        return self.rng.randint(1, self.max_side), self.rng.randint(1, self.max_side)

    def encoded(self, arr: Any) -> bytes:
        fmt = self.rng.choice(["PNG", "JPEG", "TIFF"])
        return _encode(arr if arr.shape[2] > 1 else arr[..., 0], fmt)

    def raw(self, arr: Any, dtype: int | None = None) -> Any:
        pb = self.pb
        names = {pb.DTYPE_UINT8: "<u1", pb.DTYPE_UINT16: "<u2", pb.DTYPE_FLOAT32: "<f4"}
        dtype = pb.DTYPE_UINT8 if dtype is None else dtype
        data = arr.astype(names.get(dtype, "<u1")).tobytes()
        return pb.Image(raw=pb.RawArray(data=data, shape=arr.shape, dtype=dtype))

    def image(self, arr: Any) -> Any:
        if self.rng.random() < 0.4:
            return self.raw(arr)
        return self.pb.Image(encoded=self.encoded(arr))

    def valid_options(self) -> Any:
        pb = self.pb
        model = self.rng.choice(self.models)
        opts = pb.DetectOptions(
            model=model,
            model_version=self.rng.choice(["", self.versions[model]]),
            stride=self.rng.choice([0, 4, 8, 16, 32]),
            outputs=self.rng.sample([1, 2, 3, 4], self.rng.randint(0, 4)),
            probability_encoding=self.rng.randint(0, 2),
            min_region_area_px=self.rng.choice([0, 1, 10, 1000]),
        )
        if self.rng.random() < 0.5:
            opts.threshold = self.rng.random()
        return opts

    def pair_request(self, before: Any, after: Any, options: Any = None) -> Any:
        return self.pb.DetectChangeRequest(
            before=before,
            after=after,
            options=options if options is not None else self.valid_options(),
            request_id=f"fuzz-{self.rng.randrange(10**9)}",
        )

    # -- kinds
    def case(self, kind: str) -> Case:
        return getattr(self, "_" + kind.replace("-", "_"))()

    def _valid(self) -> Case:
        h, w = self.size()
        arr = self.pixels(h, w)
        after = self.pixels(h, w) if self.rng.random() < 0.5 else arr
        request = self.pair_request(self.image(arr), self.image(after))
        return Case("valid", "DetectChange", request, frozenset({"OK"}), (h, w))

    def _with_broken(self, kind: str, broken: Any, allowed: set[str]) -> Case:
        """One image broken (before or after), the other valid, the options valid."""
        h, w = self.size()
        good = self.image(self.pixels(h, w))
        pair = (broken, good) if self.rng.random() < 0.5 else (good, broken)
        return Case(kind, "DetectChange", self.pair_request(*pair), frozenset(allowed))

    def _random_bytes(self) -> Case:
        magic = self.rng.choice(
            [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*"]
        )
        data = magic + self.rng.randbytes(self.rng.randint(0, 2048))
        return self._with_broken("random-bytes", self.pb.Image(encoded=data), {"INVALID_ARGUMENT"})

    def _truncated(self) -> Case:
        h, w = self.size()
        data = self.encoded(self.pixels(h, w))
        cut = data[: self.rng.randint(0, len(data) - 1)]
        # a file cut after its last pixel may still decode, whole: then the pair may be valid
        return self._with_broken(
            "truncated", self.pb.Image(encoded=cut), {"INVALID_ARGUMENT", "OK"}
        )

    def _corrupted(self) -> Case:
        h, w = self.size()
        data = bytearray(self.encoded(self.pixels(h, w)))
        for _ in range(self.rng.randint(1, 8)):
            position = self.rng.randrange(len(data))
            if self.rng.random() < 0.7:
                data[position] = self.rng.randrange(256)
            else:
                data[position:position] = self.rng.randbytes(self.rng.randint(1, 16))
        # corrupt pixels (not headers) may decode into another valid image
        return self._with_broken(
            "corrupted", self.pb.Image(encoded=bytes(data)), {"INVALID_ARGUMENT", "OK"}
        )

    def _huge_declared(self) -> Case:
        side = lambda: self.rng.choice(  # noqa: E731
            [self.rng.randint(257, 65535), self.rng.randint(65536, 2**31 - 1), 2**32 - 1]
        )
        width, height = side(), side()
        maker = self.rng.choice(["png", "tiff", "jpeg"])
        if maker == "png":
            data = _png_header_only(width, height, *self.rng.choice([(8, 2), (16, 6), (1, 0)]))
        elif maker == "tiff":
            data = _tiff_header_only(width, height, self.rng.choice([1, 3, 4]), 8)
        else:
            width, height = min(width, 65535), min(height, 65535)
            data = _jpeg_declaring(_encode(self.pixels(8, 8), "JPEG"), width, height)
        return self._with_broken("huge-declared", self.pb.Image(encoded=data), {"INVALID_ARGUMENT"})

    def _raw_wrong(self) -> Case:
        pb, np = self.pb, self.np
        h, w = self.size()
        arr = self.pixels(h, w)
        image = self.raw(arr)
        match self.rng.choice(["dtype-enum", "uint16", "float32", "shape", "bytes", "grey"]):
            case "dtype-enum":
                image.raw.dtype = self.rng.choice([0, 4, 99, 2**31 - 1, -1])
            case "uint16":
                image = self.raw(arr, pb.DTYPE_UINT16)  # decodes; the model takes uint8
            case "float32":
                image = self.raw(arr, pb.DTYPE_FLOAT32)
            case "shape":
                del image.raw.shape[:]
                image.raw.shape.extend(
                    self.rng.choice(
                        [[], [h * w * 3], [h, w, 3, 1], [h, -w, 3], [0, w, 3], [2**40, 2**40, 3]]
                    )
                )
            case "bytes":
                image.raw.data = image.raw.data[: -self.rng.randint(1, 3)] if arr.size > 3 else b""
            case "grey":
                image = self.raw(np.ascontiguousarray(arr[..., :1]))  # 1 band; the model takes 3
        return self._with_broken("raw-wrong", image, {"INVALID_ARGUMENT"})

    def _nan_inf(self) -> Case:
        h, w = self.size()
        arr = self.pixels(h, w).astype("<f4")
        for _ in range(self.rng.randint(1, 4)):
            arr[self.rng.randrange(h), self.rng.randrange(w), self.rng.randrange(3)] = (
                self.rng.choice([math.nan, math.inf, -math.inf])
            )
        return self._with_broken(
            "nan-inf", self.raw(arr, self.pb.DTYPE_FLOAT32), {"INVALID_ARGUMENT"}
        )

    def _bad_options(self) -> Case:
        h, w = self.size()
        arr = self.pixels(h, w)
        options = self.valid_options()
        match self.rng.choice(["stride", "threshold", "outputs", "stride-1-big"]):
            case "stride":
                options.stride = self.rng.choice([33, 64, 1000, 2**32 - 1])
            case "threshold":
                options.threshold = self.rng.choice([math.nan, math.inf, -math.inf, -0.1, 1.5])
            case "outputs":
                options.outputs.append(self.rng.choice([0, 5, 99, -7, 2**31 - 1]))
            case "stride-1-big":  # too many patches for the queue, refused before tiling
                arr = self.pixels(256, 256) * 0  # 287 x 287 patches at stride 1
                options.stride = 1
                options.ClearField("outputs")
        request = self.pair_request(self.image(arr), self.image(arr), options)
        return Case("bad-options", "DetectChange", request, frozenset({"INVALID_ARGUMENT"}))

    def _unknown_model(self) -> Case:
        h, w = self.size()
        arr = self.pixels(h, w)
        options = self.valid_options()
        if self.rng.random() < 0.7:
            options.model = self.rng.choice(
                [
                    *("nope", "../synthetic-thin", "/etc/passwd", "file:///etc/passwd"),
                    *("synthetic-thin/", "SYNTHETIC-THIN", " synthetic-thin", "synthetic-thin\x00"),
                    "aerial-rgb/../x",
                ]
            )
        else:
            options.model_version = self.rng.choice(["0.1", "0.1.0 ", "latest", "../0.1.0", "2"])
        request = self.pair_request(self.image(arr), self.image(arr), options)
        return Case("unknown-model", "DetectChange", request, frozenset({"NOT_FOUND"}))

    def _wire_bytes(self) -> Case:
        from google.protobuf.message import DecodeError

        pb, kpb = self.pb, self.kpb
        methods = {
            "/rarechange.v1.ChangeDetection/DetectChange": pb.DetectChangeRequest,
            "/rarechange.v1.ChangeDetection/GetModel": pb.GetModelRequest,
            "/rarechange.v1.ChangeDetection/ListModels": pb.ListModelsRequest,
            "/inference.GRPCInferenceService/ModelInfer": kpb.ModelInferRequest,
            "/inference.GRPCInferenceService/ModelMetadata": kpb.ModelMetadataRequest,
        }
        method = self.rng.choice(sorted(methods))
        if self.rng.random() < 0.4:
            data = self.rng.randbytes(self.rng.randint(0, 512))
        else:
            data = bytearray(self._valid().request.SerializeToString())
            for _ in range(self.rng.randint(1, 6)):
                position = self.rng.randrange(max(1, len(data)))
                match self.rng.choice(["set", "cut", "insert"]):
                    case "set" if data:
                        data[position] = self.rng.randrange(256)
                    case "cut":
                        del data[position:]
                    case _:
                        data[position:position] = bytes([self.rng.randrange(256)])
            data = bytes(data)
        try:
            methods[method].FromString(data)
        except DecodeError:
            allowed = {"INVALID_ARGUMENT"}  # exactly: never INTERNAL
        else:
            allowed = {"OK", "INVALID_ARGUMENT", "NOT_FOUND"}
        return Case("wire-bytes", "wire:" + method, data, frozenset(allowed))

    def _stream(self) -> Case:
        pb = self.pb
        h, w = self.size()
        parts, descriptors = [], []
        for which in ("before_chunk", "after_chunk"):
            arr = self.pixels(h, w)
            if self.rng.random() < 0.5:
                data = self.encoded(arr)
                descriptors.append(pb.ImageDescriptor(encoded=True, size_bytes=len(data)))
            else:
                data = arr.tobytes()
                raw = pb.RawArray(shape=[h, w, 3], dtype=pb.DTYPE_UINT8)
                descriptors.append(pb.ImageDescriptor(raw=raw, size_bytes=len(data)))
            step = self.rng.randint(1, max(1, len(data)))
            parts.append(
                [
                    pb.DetectChangeChunk(**{which: data[i : i + step]})
                    for i in range(0, len(data), step)
                ]
            )
        chunks = []
        while parts[0] or parts[1]:  # any interleaving, each image's chunks in order
            side = parts[0] if parts[0] and (not parts[1] or self.rng.random() < 0.5) else parts[1]
            chunks.append(side.pop(0))
        header = pb.StreamHeader(before=descriptors[0], after=descriptors[1])
        messages = [pb.DetectChangeChunk(header=header), *chunks]
        damage = self.rng.choice(
            ["none", "none", "none", "size", "no-header", "drop", "extra", "zero"]
        )
        match damage:
            case "size":
                messages[0].header.before.size_bytes += self.rng.choice([-1, 1, 1000])
            case "no-header":
                messages = messages[1:]
            case "drop":
                del messages[self.rng.randrange(1, len(messages))]
            case "extra":
                messages.append(pb.DetectChangeChunk(after_chunk=b"\x00"))
            case "zero":
                messages[0].header.after.size_bytes = 0
        allowed = {"OK"} if damage == "none" else {"INVALID_ARGUMENT"}
        size = (h, w) if damage == "none" else None
        return Case("stream", "DetectChangeStream", messages, frozenset(allowed), size)

    def _kserve(self) -> Case:
        kpb = self.kpb
        n = self.rng.randint(0, 4)
        request = kpb.ModelInferRequest(model_name=self.rng.choice(self.models))
        as_raw = self.rng.random() < 0.5
        for name in ("before", "after"):
            tensor = request.inputs.add(name=name, datatype="UINT8", shape=[n, 3, 32, 32])
            values = self.nprng.integers(0, 256, n * 3 * 32 * 32, dtype=self.np.uint8)
            if as_raw:
                request.raw_input_contents.append(values.tobytes())
            else:
                tensor.contents.uint_contents.extend(values.tolist())
        damage = self.rng.choice(
            ["none", "none", "name", "datatype", "shape", "count", "huge", "model", "output"]
        )
        allowed = {"INVALID_ARGUMENT"}
        match damage:
            case "none":
                allowed = {"OK"}
            case "name":
                request.inputs[self.rng.randrange(2)].name = self.rng.choice(["", "x", "before"])
                if request.inputs[0].name == "before" and request.inputs[1].name == "after":
                    allowed = {"OK"}
            case "datatype":
                request.inputs[0].datatype = self.rng.choice(
                    ["FP32", "UINT16", "INT8", "BYTES", ""]
                )
            case "shape":
                request.inputs[1].shape[self.rng.randrange(4)] += self.rng.choice([-1, 1])
            case "count":
                if as_raw:
                    request.raw_input_contents[0] += b"\x00"
                else:
                    request.inputs[0].contents.uint_contents.append(1)
            case "huge":  # int64 overflow of the element count (found by fuzzing)
                for tensor in request.inputs:
                    tensor.shape[0] = self.rng.choice([2**54, 2**62, 2**63 - 1])
            case "model":
                request.model_name = self.rng.choice(["nope", "../synthetic-thin", "/etc/passwd"])
                allowed = {"NOT_FOUND"}
            case "output":
                request.outputs.add(name=self.rng.choice(["prob", "", "../probability"]))
        return Case("kserve", "ModelInfer", request, frozenset(allowed))


@dataclass
class Tally:
    sent: collections.Counter = field(default_factory=collections.Counter)
    statuses: dict[str, collections.Counter] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    unexpected: list[str] = field(default_factory=list)
    crashes: int = 0
    hangs: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, case: Case, code: str, details: str, problem: str | None) -> None:
        with self.lock:
            self.sent[case.kind] += 1
            self.statuses[case.kind][code] += 1
            if code in ("INTERNAL", "UNKNOWN"):
                self.crashes += 1
            if code == "DEADLINE_EXCEEDED":
                self.hangs += 1
            if problem is not None:
                self.unexpected.append(f"{case.kind} {case.method}: {code} {details!r}: {problem}")


class Server:
    """``rarechange serve`` in its own process, as deployed; stopped with SIGTERM."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log.open("w")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("RARECHANGE_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serving.cli.main", "serve"],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=ROOT,
            env=full_env | env,
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], 180)
        line = self.proc.stdout.readline() if ready else ""
        if "serving on" not in line:
            self.stop()
            raise RuntimeError(f"the server did not start: {line}{Path(self.log.name).read_text()}")
        self.address = line.split()[-1]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def memory_mib(self) -> tuple[float, float]:
        """(current, peak) resident memory of the server process, MiB."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        kib = {
            k: int(v.split()[0]) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(.*)$", status, re.M)
        }
        return kib["VmRSS"] / 1024, kib["VmHWM"] / 1024

    def errors_logged(self) -> list[str]:
        text = Path(self.log.name).read_text(errors="replace")
        return [line for line in text.splitlines() if " ERROR " in line or "Traceback" in line]

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.log.close()
        return self.proc.returncode


def run_requests(
    count: int, workers: int, seed: int, deadline_s: float, work: Path
) -> dict[str, Any]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from serving.api import change_detection_pb2 as pb
    from serving.api import grpc_predict_v2_pb2 as kpb
    from serving.server import channel_options

    settings = {
        "RARECHANGE_MODELS_DIR": str(MODELS),
        "RARECHANGE_HOST": "127.0.0.1",
        "RARECHANGE_PORT": "0",
        "RARECHANGE_METRICS_PORT": "-1",
        "RARECHANGE_MAX_PIXELS": str(MAX_PIXELS),
        "RARECHANGE_MAX_QUEUE_SIZE": str(65536),
        "RARECHANGE_WORKERS": str(max(8, workers)),
        "RARECHANGE_GRACE_S": "0",
    }
    print(f"requests: starting rarechange serve ({settings})", file=sys.stderr, flush=True)
    server = Server(settings, work / "server.log")
    generator = Generator(seed)
    kinds = Generator.KINDS
    cases = [generator.case(kinds[i % len(kinds)]) for i in range(count)]
    random.Random(seed).shuffle(cases)
    tally = Tally()
    replies = {
        "DetectChange": pb.DetectChangeResponse,
        "DetectChangeStream": pb.DetectChangeResponse,
        "ModelInfer": kpb.ModelInferResponse,
    }
    health_checks: list[str] = []
    position = iter(range(len(cases)))
    position_lock = threading.Lock()

    def send(channel: grpc.Channel, case: Case) -> tuple[str, str, Any]:
        if case.method.startswith("wire:"):
            stub = channel.unary_unary(case.method[5:])
            call = lambda: stub(case.request, timeout=deadline_s)  # noqa: E731
        elif case.method == "DetectChangeStream":
            stub = channel.stream_unary(
                "/rarechange.v1.ChangeDetection/DetectChangeStream",
                request_serializer=pb.DetectChangeChunk.SerializeToString,
                response_deserializer=pb.DetectChangeResponse.FromString,
            )
            call = lambda: stub(iter(case.request), timeout=deadline_s)  # noqa: E731
        else:
            service = (
                "inference.GRPCInferenceService"
                if case.method == "ModelInfer"
                else ("rarechange.v1.ChangeDetection")
            )
            stub = channel.unary_unary(
                f"/{service}/{case.method}",
                request_serializer=type(case.request).SerializeToString,
                response_deserializer=replies[case.method].FromString,
            )
            call = lambda: stub(case.request, timeout=deadline_s)  # noqa: E731
        try:
            return "OK", "", call()
        except grpc.RpcError as exc:
            return exc.code().name, exc.details() or "", None

    def worker() -> None:
        options = channel_options(64 << 20)
        with grpc.insecure_channel(server.address, options=options) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                with position_lock:
                    i = next(position, None)
                if i is None or not server.alive():
                    return
                case = cases[i]
                code, details, response = send(channel, case)
                problem = None
                if code not in case.allowed:
                    problem = f"expected {'/'.join(sorted(case.allowed))}"
                elif code == "OK" and case.size is not None:
                    got = (response.height, response.width)
                    if got != case.size:
                        problem = f"response is {got}, the images {case.size}"
                tally.add(case, code, details, problem)
                if i % 1000 == 999:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                    health_checks.append(health_pb2.HealthCheckResponse.ServingStatus.Name(status))

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, name=f"fuzz-{i}") for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    alive = server.alive()
    final: dict[str, Any] = {"alive": alive}
    if alive:
        with grpc.insecure_channel(server.address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            final["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)
            final["valid_request_after"] = send(channel, generator._valid())[0]
        final["rss_mib"], final["peak_rss_mib"] = (round(v) for v in server.memory_mib())
    errors = server.errors_logged()
    exit_code = server.stop()
    crashes = tally.crashes + (0 if alive else 1)
    healthy = (
        alive
        and final.get("health") == "SERVING"
        and final.get("valid_request_after") == "OK"
        and all(h == "SERVING" for h in health_checks)
    )
    return {
        "requests": sum(tally.sent.values()),
        "seconds": round(elapsed, 1),
        "workers": workers,
        "seed": seed,
        "deadline_s": deadline_s,
        "server_settings": settings,
        "by_kind": {
            kind: {"sent": tally.sent[kind], **dict(tally.statuses[kind])} for kind in kinds
        },
        "statuses": dict(sum(tally.statuses.values(), collections.Counter())),
        "unexpected": len(tally.unexpected),
        "unexpected_examples": tally.unexpected[:20],
        "crashes": crashes,
        "hangs": tally.hangs,
        "server_errors_logged": len(errors),
        "server_error_examples": errors[:10],
        "health_checks_during_run": collections.Counter(health_checks),
        "final": final,
        "server_exit_code": exit_code,
        "healthy": healthy,
    }


# ============================================================================================
# the summary and the command line


def print_summary(atheris: list[AtherisResult] | None, requests: dict[str, Any] | None) -> None:
    if atheris:
        from importlib.metadata import version

        print(
            f"\ncoverage-guided: atheris {version('atheris')} (libFuzzer),"
            " serving and PIL instrumented"
        )
        print(
            f"  {'target':<8}{'seeds':>6}{'inputs run':>12}{'new units':>10}{'edges cov':>14}"
            f"{'features':>10}{'slowest':>9}{'peak RSS':>10}{'crashes':>9}{'hangs':>7}"
        )
        for r in atheris:
            print(
                f"  {r.target:<8}{r.seeds:>6}{r.runs:>12,}{r.new_units:>10}"
                f"{f'{r.cov_start}->{r.cov_end}':>14}{r.features:>10}{f'{r.slowest_unit_s} s':>9}"
                f"{f'{r.peak_rss_mb} MB':>10}{len(r.crashes):>9}{len(r.hangs):>7}"
            )
        total = sum(r.runs for r in atheris)
        print(f"  total inputs run: {total:,} in {sum(r.seconds for r in atheris):.0f} s")
        print("  lines executed by each target's final corpus (of the lines inside functions):")
        for r in atheris:
            parts = ", ".join(
                f"{Path(name).name} {hit}/{lines}" for name, (hit, lines) in r.lines.items() if hit
            )
            print(f"    {r.target:<8}{parts}")
        for r in atheris:
            for path in r.crashes + r.hangs:
                print(f"  ! {r.target}: {path}")
    if requests:
        print(
            f"\nrequests: {requests['requests']:,} to rarechange serve in {requests['seconds']} s"
            f" ({requests['workers']} client threads, seed {requests['seed']},"
            f" deadline {requests['deadline_s']} s per call)"
        )
        codes = sorted(requests["statuses"])
        print(f"  {'kind':<15}{'sent':>7}" + "".join(f"{c:>18}" for c in codes))
        for kind, row in requests["by_kind"].items():
            print(f"  {kind:<15}{row['sent']:>7}" + "".join(f"{row.get(c, 0):>18}" for c in codes))
        print(
            f"  {'total':<15}{requests['requests']:>7}"
            + "".join(f"{requests['statuses'][c]:>18}" for c in codes)
        )
        final = requests["final"]
        print(
            f"  unexpected statuses: {requests['unexpected']}, crashes: {requests['crashes']},"
            f" hangs: {requests['hangs']}, errors in the server log:"
            f" {requests['server_errors_logged']}"
        )
        print(
            f"  server healthy: {requests['healthy']} (alive {final['alive']},"
            f" health {final.get('health')},"
            f" a valid request after: {final.get('valid_request_after')},"
            f" checks during the run: {dict(requests['health_checks_during_run'])},"
            f" RSS {final.get('rss_mib')} MiB, peak {final.get('peak_rss_mib')} MiB)"
        )
        for line in requests["unexpected_examples"] + requests["server_error_examples"]:
            print(f"  ! {line}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_atheris-worker"]:
        target, rest = argv[1], argv[2:]
        atheris_worker(target, rest[1:] if rest[:1] == ["--"] else rest)
        return 0
    if argv[:1] == ["_coverage-worker"]:
        coverage_worker(argv[1], argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "part", nargs="?", default="all", choices=["all", "atheris", "requests", "corpus"]
    )
    parser.add_argument("--seconds", type=int, default=60, help="atheris: per target [60]")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--unit-timeout-s", type=int, default=10, help="atheris: a hang [10]")
    parser.add_argument("--rss-limit-mb", type=int, default=3072, help="atheris: a bomb [3072]")
    parser.add_argument("--count", type=int, default=10_000, help="requests to send [10000]")
    parser.add_argument("--workers", type=int, default=4, help="client threads [4]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline-s", type=float, default=30.0, help="per request [30]")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "fuzz")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.part == "corpus":
        files = write_corpus()
        print(
            f"wrote {len(files)} files to {CORPUS},"
            f" {min(files.values())}-{max(files.values())} bytes"
        )
        return 0
    atheris_results = requests_result = None
    if args.part in ("all", "atheris"):
        atheris_results = run_atheris(
            args.targets, args.seconds, args.work, args.unit_timeout_s, args.rss_limit_mb
        )
    if args.part in ("all", "requests"):
        requests_result = run_requests(
            args.count, args.workers, args.seed, args.deadline_s, args.work
        )
    print_summary(atheris_results, requests_result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "atheris": [vars(r) for r in atheris_results or []],
            "requests": requests_result,
        }
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    failed = any(r.crashes or r.hangs or r.exit_code for r in atheris_results or [])
    if requests_result:
        failed |= (
            bool(
                requests_result["crashes"]
                or requests_result["hangs"]
                or requests_result["unexpected"]
            )
            or not requests_result["healthy"]
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
