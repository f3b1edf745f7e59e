"""Property-based fuzzing of serving.decode: whatever the bytes, an image or InvalidInput.

The inputs are what a hostile or broken client sends: random bytes, real PNG/JPEG/TIFF files cut
short or corrupted, hand-written headers with valid checksums that declare enormous sizes or
nonsense layouts (decompression bombs), raw pixel buffers with the wrong dtype, shape or length,
and floats that are NaN or Inf. Each property also says what a success must look like (shape from
the header, no partial images, exact raw values), so a decoder that returned garbage instead of
refusing would fail here too, and every call must finish in seconds (no hang).

Examples per property: ``RARECHANGE_FUZZ_EXAMPLES`` (200 by default; thousands for a long run,
e.g. ``RARECHANGE_FUZZ_EXAMPLES=5000 pytest tests/serving/test_fuzz_decode.py``).
"""

from __future__ import annotations

import io
import math
import os
import struct
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from serving.decode import MAX_BANDS, SUPPORTED_DTYPES, array_from_raw, decode_image
from serving.errors import InvalidInput
from serving.pictures import encode_tiff

EXAMPLES = int(os.environ.get("RARECHANGE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # timing is asserted per call below, with a bound a busy machine still meets
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_PIXELS = 64 * 64
"""Small, so that most declared sizes are over it and any that pass decode in microseconds."""
HANG_S = 10.0
"""No single decode of a few KB may take longer (they take milliseconds): longer is a hang."""

RNG = np.random.default_rng(20240611)


# --------------------------------------------------------------------------------------------
# the oracle shared by every property


def _decode(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray | None:
    """decode_image's result, None for InvalidInput; anything else raised fails the test."""
    start = time.perf_counter()
    try:
        out = decode_image(data, max_pixels=max_pixels, name="fuzz")
    except InvalidInput as exc:
        out = None
        message = str(exc)
        assert message.startswith("fuzz: ") and "\n" not in message, message
        assert " object at 0x" not in message and "/vsimem" not in message, message
    elapsed = time.perf_counter() - start
    assert elapsed < HANG_S, f"decoding {len(data)} bytes took {elapsed:.1f} s"
    event("decoded" if out is not None else "refused")  # --hypothesis-show-statistics
    if out is not None:
        assert isinstance(out, np.ndarray)
        assert out.ndim == 3 and 1 <= out.shape[2] <= MAX_BANDS
        assert out.shape[0] * out.shape[1] <= max_pixels
        assert out.dtype.name in SUPPORTED_DTYPES
        assert out.flags.c_contiguous and out.flags.writeable
        assert not data or not np.shares_memory(out, np.frombuffer(data, np.uint8))
        if out.dtype.kind == "f":
            assert np.isfinite(out).all()
    return out


# --------------------------------------------------------------------------------------------
# real files, as libraries write them


def _pil(arr: np.ndarray, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


_tiff = encode_tiff


def _real_files() -> dict[str, bytes]:
    rgb = RNG.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    grey16 = RNG.integers(0, 65536, size=(9, 7), dtype=np.uint16)
    bands16 = RNG.integers(0, 65536, size=(4, 10, 12), dtype=np.uint16)
    floats = RNG.normal(size=(2, 8, 8)).astype(np.float32)
    palette = RNG.integers(0, 4, size=(8, 8), dtype=np.uint8)
    return {
        "png-rgb": _pil(rgb, "PNG"),
        "png-rgba": _pil(np.dstack([rgb, rgb[..., :1]]), "PNG"),
        "png-grey16": _pil(grey16, "PNG"),
        "png-palette": _pil(palette, "PNG", bits=2),
        "png-1bit": _pil(rgb[..., 0] > 127, "PNG"),
        "jpeg-rgb": _pil(rgb, "JPEG", quality=90),
        "jpeg-progressive": _pil(rgb, "JPEG", progressive=True),
        "jpeg-grey": _pil(rgb[..., 0], "JPEG"),
        "tiff-rgb": _tiff(np.moveaxis(rgb, -1, 0)),
        "tiff-4xu16-deflate": _tiff(bands16, compress="deflate"),
        "tiff-4xu16-tiled-lzw": _tiff(
            bands16, tiled=True, blockxsize=16, blockysize=16, compress="lzw"
        ),
        "tiff-2xf32-predictor": _tiff(floats, compress="deflate", predictor=3),
        "tiff-bigtiff": _tiff(np.moveaxis(rgb, -1, 0), BIGTIFF="YES"),
        "tiff-pillow-lzw": _pil(rgb, "TIFF", compression="tiff_lzw"),
    }


REAL = _real_files()
ORIGINAL = {name: decode_image(data, max_pixels=MAX_PIXELS) for name, data in REAL.items()}
real_names = st.sampled_from(sorted(REAL))


def test_the_real_files_decode() -> None:
    """The seeds are valid, so the properties below start from files that do decode."""
    assert {a.shape[:2] for a in ORIGINAL.values()} >= {(12, 16), (9, 7), (10, 12), (8, 8)}
    assert {a.dtype.name for a in ORIGINAL.values()} == set(SUPPORTED_DTYPES)


# --------------------------------------------------------------------------------------------
# random and corrupted bytes

_MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"]


@FUZZ
@given(st.one_of(st.binary(max_size=4096), st.tuples(st.sampled_from(_MAGICS), st.binary())))
def test_random_bytes_are_an_image_or_invalid(data: bytes | tuple[bytes, bytes]) -> None:
    _decode(data if isinstance(data, bytes) else b"".join(data))


@FUZZ
@given(real_names, st.data())
def test_truncated_files_are_refused_never_half_decoded(name: str, data: st.DataObject) -> None:
    """A file cut anywhere decodes to the whole original image or not at all: never zero-filled
    or partial rows (GTIFF_IGNORE_READ_ERRORS=NO, Pillow's LOAD_TRUNCATED_IMAGES off)."""
    full = REAL[name]
    cut = data.draw(st.integers(0, len(full) - 1), label="cut")
    out = _decode(full[:cut])
    if out is not None:
        np.testing.assert_array_equal(out, ORIGINAL[name])


@FUZZ
@given(
    real_names,
    st.lists(
        st.tuples(
            st.sampled_from(["set", "insert", "delete", "zero-run"]),
            st.integers(0, 1 << 16),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=12,
    ),
)
def test_corrupted_files_are_an_image_or_invalid(
    name: str, edits: list[tuple[str, int, int]]
) -> None:
    data = bytearray(REAL[name])
    for op, position, value in edits:
        at = position % max(1, len(data))
        if op == "set" and data:
            data[at] = value
        elif op == "insert":
            data[at:at] = bytes([value]) * (1 + value % 8)
        elif op == "delete":
            del data[at : at + 1 + value % 16]
        elif op == "zero-run":
            data[at : at + value] = bytes(len(data[at : at + value]))
    _decode(bytes(data))


# --------------------------------------------------------------------------------------------
# PNG written by hand: valid CRCs, any header


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel in the file
_PNG_BANDS = {0: 1, 2: 3, 3: 3, 4: 1, 6: 3}  # colour type -> bands decoded (no alpha, palettes RGB)
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
small = st.integers(1, 64)
dimension = st.one_of(
    small,
    small,  # half of the sizes fit the limit, so that headers get past the size check
    st.integers(0, 2**32 - 1),
    st.sampled_from([0, 64, 65, 4096, 46341, 65535, 2**31 - 1, 2**32 - 1]),
)
png_layout = st.one_of(
    st.sampled_from([(d, c) for c, depths in _PNG_DEPTHS.items() for d in depths]),
    st.tuples(st.integers(0, 255), st.integers(0, 255)),
)


@FUZZ
@given(
    width=dimension,
    height=dimension,
    layout=png_layout,
    interlace=st.sampled_from([0, 0, 1]) | st.integers(0, 255),
    body=st.sampled_from(["zero-rows", "zero-rows", "random-deflated", "random"]),
    palette=st.sampled_from([0, 256]) | st.integers(0, 300),
    junk=st.binary(max_size=512),
)
@example(40_000, 40_000, (1, 0), 0, "random-deflated", 0, b"")  # the classic bomb header
def test_png_headers_with_valid_crcs(
    width: int,
    height: int,
    layout: tuple[int, int],
    interlace: int,
    body: str,
    palette: int,
    junk: bytes,
) -> None:
    """Checksums right, so the header's claims reach the decoder: a size over the limit is
    refused from the header alone; what decodes has the declared size and the promised bands,
    and an all-zero image decodes to zeros."""
    depth, colour = layout
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    # all-zero pixels for any size up to 4x the limit: a size check that is missing shows
    zero_rows = body == "zero-rows" and width * height <= 4 * MAX_PIXELS and colour in _PNG_SAMPLES
    if zero_rows:  # filter byte 0 and zero samples, row by row (interlaced: a little too long)
        row_bytes = math.ceil(width * _PNG_SAMPLES[colour] * depth / 8)
        idat = zlib.compress(bytes((1 + row_bytes) * height * (2 if interlace else 1)))
    elif body == "random":
        idat = junk
    else:
        idat = zlib.compress(junk)
    chunks = [_chunk(b"IHDR", ihdr)]
    if palette:
        chunks.append(_chunk(b"PLTE", (bytes(range(256)) * 4)[: 3 * palette]))
    chunks += [_chunk(b"IDAT", idat), _chunk(b"IEND", b"")]
    out = _decode(b"\x89PNG\r\n\x1a\n" + b"".join(chunks))
    if width * height > MAX_PIXELS:
        assert out is None
    if out is not None:
        assert out.shape == (height, width, _PNG_BANDS[colour])
        assert out.dtype == (np.uint16 if depth == 16 else np.uint8)
        if zero_rows and colour != 3:
            assert not out.any()


# --------------------------------------------------------------------------------------------
# TIFF written by hand: any tags


def _tiff_file(tags: dict[int, list[int]], pixels: bytes, big_endian: bool) -> bytes:
    """A classic TIFF: header, pixel bytes at offset 8, one IFD, then the long tag values."""
    e = ">" if big_endian else "<"
    head = b"MM\x00*" if big_endian else b"II*\x00"
    pixels += b"\x00" * (len(pixels) % 2)
    ifd_at = 8 + len(pixels)
    extra_at = ifd_at + 2 + 12 * len(tags) + 4
    entries, extra = b"", b""
    for tag in sorted(tags):
        values = [v % 2**32 for v in tags[tag]] or [0]
        kind, fmt = (3, "H") if max(values) < 2**16 else (4, "I")
        payload = struct.pack(f"{e}{len(values)}{fmt}", *values)
        if len(payload) <= 4:
            field = payload.ljust(4, b"\x00")
        else:
            field = struct.pack(e + "I", extra_at + len(extra))
            extra += payload + b"\x00" * (len(payload) % 2)
        entries += struct.pack(e + "HHI", tag, kind, len(values)) + field
    ifd = struct.pack(e + "H", len(tags)) + entries + struct.pack(e + "I", 0)
    return head + struct.pack(e + "I", ifd_at) + pixels + ifd + extra


_TIFF_TYPES = {(8, 1): "u1", (16, 1): "u2", (32, 3): "f4"}  # (bits, sample format) -> dtype
_ANY_TAG = {
    256: dimension,  # width
    257: dimension,  # height
    258: st.sampled_from([0, 1, 4, 12, 24, 64, 65535]),  # bits per sample
    259: st.sampled_from([5, 7, 8, 32773, 34712]) | st.integers(0, 65535),  # compression
    262: st.sampled_from([0, 2, 3, 5, 6]) | st.integers(0, 65535),  # photometric
    273: st.integers(0, 2**32 - 1),  # strip offsets
    277: st.sampled_from([0, MAX_BANDS, MAX_BANDS + 1, 65535]),  # samples per pixel
    278: st.integers(0, 2**32 - 1),  # rows per strip
    279: st.integers(0, 2**32 - 1),  # strip byte counts
    284: st.integers(0, 3),  # planar configuration
    322: st.sampled_from([16, 256]) | st.integers(0, 2**32 - 1),  # tile width
    323: st.sampled_from([16, 256]) | st.integers(0, 2**32 - 1),  # tile length
    338: st.integers(0, 3),  # extra samples (alpha)
    339: st.integers(0, 8),  # sample format
}


@st.composite
def tiff_headers(draw: st.DrawFn) -> tuple[int, int, bytes, np.ndarray | None]:
    """A valid grey TIFF (its pixels known), then maybe some tags set to anything.

    Returns (declared width, declared height, file, expected pixels or None when unknown).
    """
    width, height = draw(small), draw(small)
    spp = draw(st.integers(1, 4))
    bits, fmt = draw(st.sampled_from(sorted(_TIFF_TYPES)))
    dtype = np.dtype(_TIFF_TYPES[bits, fmt])
    big_endian = draw(st.booleans())
    pixels = draw(st.binary(min_size=width * height * spp * dtype.itemsize))
    pixels = pixels[: width * height * spp * dtype.itemsize]
    tags: dict[int, list[int]] = {
        256: [width],
        257: [height],
        258: [bits] * spp,
        259: [1],  # no compression
        262: [1],  # min-is-black: every sample is a band, none is alpha
        273: [8],
        277: [spp],
        278: [height],
        279: [len(pixels)],
        284: [1],
        339: [fmt] * spp,
    }
    changed = draw(st.sets(st.sampled_from(sorted(_ANY_TAG)), max_size=4))
    for tag in changed:
        tags[tag] = [draw(_ANY_TAG[tag])]
    if 322 in changed or 323 in changed:  # tiles replace strips
        tags.setdefault(322, [16])
        tags.setdefault(323, [16])
        tags[324], tags[325] = tags.pop(273), tags.pop(279)
        del tags[278]
    if tags[262] == [3]:  # a palette needs a colour map of 3 * 2**bits entries
        tags[320] = list(range(3 * 2 ** min(tags[258][0], 8)))
    data = _tiff_file(tags, pixels, big_endian)
    expected = None
    if not changed:
        order = ">" if big_endian else "<"
        expected = np.frombuffer(pixels, dtype.newbyteorder(order)).reshape(height, width, spp)
        if not np.isfinite(expected).all():
            expected = np.empty(0)  # NaN or Inf among the floats: must be refused
    return tags[256][0], tags[257][0], data, expected


@FUZZ
@given(tiff_headers())
@example((40_000, 40_000, _tiff_file({256: [40_000], 257: [40_000], 258: [8]}, b"", False), None))
def test_tiff_headers_with_any_tags(header: tuple[int, int, bytes, np.ndarray | None]) -> None:
    """GDAL reads the header only, then our checks decide; what decodes has the declared size,
    and an untouched file decodes to exactly its pixels."""
    width, height, data, expected = header
    out = _decode(data)
    if width * height > MAX_PIXELS:
        assert out is None
    if expected is not None and not expected.size:
        assert out is None
    elif expected is not None:
        assert out is not None
        np.testing.assert_array_equal(out, expected)
    if out is not None:
        assert out.shape[:2] == (height, width)


# --------------------------------------------------------------------------------------------
# JPEG with a rewritten frame header


@FUZZ
@given(
    st.sampled_from(["jpeg-rgb", "jpeg-progressive", "jpeg-grey"]),
    small | st.integers(0, 65535),
    small | st.integers(0, 65535),
    st.integers(0, 255),
)
def test_jpeg_frame_declaring_any_size(name: str, height: int, width: int, bands: int) -> None:
    data = bytearray(REAL[name])
    sof = next(i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    if bands != ORIGINAL[name].shape[2]:
        data[sof + 9] = bands
    out = _decode(bytes(data))
    if width * height > MAX_PIXELS:
        assert out is None
    if out is not None:
        assert out.shape[:2] == (height, width)


@pytest.mark.parametrize("limit", [16384 * 16384, 4096 * 4096])
@settings(max_examples=max(20, EXAMPLES // 10), deadline=None)
@given(side=st.integers(16385, 2**31 - 1), kind=st.sampled_from(["png", "tiff"]))
def test_bombs_over_the_production_limit_are_refused_at_once(
    limit: int, side: int, kind: str
) -> None:
    """At the server's real default limit, a header over it costs a few milliseconds."""
    if kind == "png":
        ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
        data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b""))
    else:
        data = _tiff_file({256: [side], 257: [side], 258: [8], 273: [8], 279: [1]}, b"", False)
    start = time.perf_counter()
    with pytest.raises(InvalidInput, match="pixels"):
        decode_image(data, max_pixels=limit)
    assert time.perf_counter() - start < 2.0


# --------------------------------------------------------------------------------------------
# raw pixel buffers: an exact model of what must be accepted

shape_entry = st.one_of(
    st.integers(-3, 70),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, 1, 3, MAX_BANDS, MAX_BANDS + 1, 2**31, 2**62]),
)
raw_dtypes = st.one_of(
    st.sampled_from(SUPPORTED_DTYPES),
    st.sampled_from(["float64", "int8", "int16", "int32", "bool", "<u2", ">f4", "uint64", "O"]),
    st.text(max_size=8),
)


def _raw_expected(data: bytes, shape: list[int], dtype: str) -> np.ndarray | None:
    """What array_from_raw must return, None where it must raise InvalidInput."""
    if dtype not in SUPPORTED_DTYPES or len(shape) not in (2, 3) or min(shape) < 1:
        return None
    height, width, bands = shape[0], shape[1], shape[2] if len(shape) == 3 else 1
    if height * width > MAX_PIXELS or bands > MAX_BANDS:
        return None
    if len(data) != height * width * bands * np.dtype(dtype).itemsize:
        return None
    arr = np.frombuffer(data, np.dtype(dtype).newbyteorder("<")).reshape(height, width, bands)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        return None
    return arr


@st.composite
def raw_buffers(draw: st.DrawFn) -> tuple[bytes, list[int], str]:
    dtype = draw(raw_dtypes)
    shape = draw(st.lists(shape_entry, max_size=5))
    if draw(st.booleans()) and len(shape) in (2, 3) and 0 < math.prod(shape) <= 4 * MAX_PIXELS:
        # the byte count the shape needs, give or take a few: the near misses matter most
        itemsize = np.dtype(dtype).itemsize if dtype in SUPPORTED_DTYPES else 1
        size = math.prod(shape) * itemsize + draw(st.sampled_from([0, 0, 0, -1, 1, -itemsize]))
        return draw(st.binary(min_size=max(0, size), max_size=max(0, size))), shape, dtype
    return draw(st.binary(max_size=1024)), shape, dtype


@FUZZ
@given(raw_buffers())
def test_raw_buffers_match_an_exact_model(raw: tuple[bytes, list[int], str]) -> None:
    data, shape, dtype = raw
    expected = _raw_expected(data, shape, dtype)
    if expected is None:
        with pytest.raises(InvalidInput):
            array_from_raw(data, shape, dtype, max_pixels=MAX_PIXELS, name="fuzz")
        return
    out = array_from_raw(data, shape, dtype, max_pixels=MAX_PIXELS, name="fuzz")
    assert out.dtype == np.dtype(dtype) and out.flags.writeable
    assert not np.shares_memory(out, np.frombuffer(data, np.uint8))
    np.testing.assert_array_equal(out, expected)


@FUZZ
@given(st.lists(st.one_of(st.floats(), st.text(max_size=3), st.none(), st.booleans()), max_size=4))
def test_raw_shapes_of_the_wrong_type_are_invalid(shape: list[object]) -> None:
    assume(not all(isinstance(d, int) and not isinstance(d, bool) for d in shape))
    with pytest.raises(InvalidInput):
        array_from_raw(b"\x00" * 64, shape, "uint8", max_pixels=MAX_PIXELS)


# --------------------------------------------------------------------------------------------
# NaN and Inf

float_pixels = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=12).filter(lambda s: s[2] <= 4),
    elements=st.floats(width=32),  # NaN, +-Inf, subnormals, -0.0 and everything between
)


@FUZZ
@given(float_pixels)
def test_non_finite_raw_floats_are_refused_finite_ones_kept(arr: np.ndarray) -> None:
    data = arr.astype("<f4").tobytes()
    if np.isfinite(arr).all():
        out = array_from_raw(data, arr.shape, "float32", max_pixels=MAX_PIXELS)
        np.testing.assert_array_equal(out, arr)
    else:
        with pytest.raises(InvalidInput, match="NaN or Inf"):
            array_from_raw(data, arr.shape, "float32", max_pixels=MAX_PIXELS)


@FUZZ
@given(float_pixels, st.sampled_from([{}, {"compress": "deflate", "predictor": 3}]))
def test_non_finite_float_tiffs_are_refused_finite_ones_kept(
    arr: np.ndarray, profile: dict[str, object]
) -> None:
    out = _decode(_tiff(np.moveaxis(arr, -1, 0), **profile))
    if np.isfinite(arr).all():
        assert out is not None
        np.testing.assert_array_equal(out, arr)
    else:
        assert out is None


# --------------------------------------------------------------------------------------------
# valid inputs still decode exactly: the properties above are not passed by refusing everything


@FUZZ
@given(
    hnp.arrays(
        st.sampled_from([np.uint8, np.uint16]),
        hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=24).filter(
            lambda s: s[2] in (1, 3)
        ),
    ),
    st.sampled_from(["png", "tiff", "tiff-deflate", "raw"]),
)
def test_valid_images_round_trip_exactly(arr: np.ndarray, kind: str) -> None:
    if kind == "png":
        if arr.dtype == np.uint16 and arr.shape[2] == 3:
            assume(False)  # Pillow cannot write 16-bit colour PNG (test_decode writes it by hand)
        data = _pil(arr[..., 0] if arr.shape[2] == 1 else arr, "PNG")
        out = _decode(data, max_pixels=24 * 24)
    elif kind.startswith("tiff"):
        profile = {"compress": "deflate"} if kind == "tiff-deflate" else {}
        out = _decode(_tiff(np.moveaxis(arr, -1, 0), **profile), max_pixels=24 * 24)
    else:
        data = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        out = array_from_raw(data, arr.shape, arr.dtype.name, max_pixels=24 * 24)
    assert out is not None
    np.testing.assert_array_equal(out, arr)
    assert out.dtype == arr.dtype
