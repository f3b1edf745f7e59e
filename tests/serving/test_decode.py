"""serving.decode: client bytes -> (H, W, C) arrays, and nothing but InvalidInput for bad bytes."""

from __future__ import annotations

import io
import resource
import struct
import time
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile

from serving.decode import (
    MAX_BANDS,
    SUPPORTED_DTYPES,
    array_from_raw,
    check_pair,
    decode_image,
)
from serving.errors import InvalidInput, RareChangeError
from serving.pictures import encode_tiff

MP = 1_000_000
RNG = np.random.default_rng(1234)


# --------------------------------------------------------------------------------------------
# builders


def _pil(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


_tiff = encode_tiff


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _png(width: int, height: int, depth: int, colour: int, idat: bytes) -> bytes:
    """A PNG written by hand, so tests can declare sizes Pillow would never let us allocate."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _png16(arr: np.ndarray, colour: int) -> bytes:
    """16-bit PNG (colour type 2 = RGB, 4 = grey+alpha, 6 = RGBA) from an (H, W, C) uint16 array."""
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in arr)
    return _png(arr.shape[1], arr.shape[0], 16, colour, zlib.compress(rows))


def _zero_png_bomb(side: int) -> bytes:
    """A valid 1-bit side x side all-black PNG, compressed row block by row block."""
    row = b"\x00" * (1 + (side + 7) // 8)
    block_rows = 1000
    comp = zlib.compressobj(9)
    parts = []
    for start in range(0, side, block_rows):
        parts.append(comp.compress(row * min(block_rows, side - start)))
    parts.append(comp.flush())
    return _png(side, side, 1, 0, b"".join(parts))


def _rgb(h: int = 24, w: int = 32) -> np.ndarray:
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _assert_image(arr: np.ndarray, shape: tuple[int, ...], dtype: str) -> None:
    assert isinstance(arr, np.ndarray)
    assert arr.shape == shape
    assert arr.dtype == np.dtype(dtype)
    assert arr.flags.c_contiguous
    assert arr.flags.writeable


# --------------------------------------------------------------------------------------------
# errors


def test_error_hierarchy_keeps_builtin_meaning() -> None:
    from serving import errors

    pairs = {
        errors.InvalidInput: ValueError,
        errors.ModelNotFound: LookupError,
        errors.ModelLoadError: OSError,
        errors.Overloaded: RuntimeError,
        errors.DeadlineExceeded: TimeoutError,
        errors.BackendUnavailable: ConnectionError,
    }
    for cls, builtin in pairs.items():
        assert issubclass(cls, RareChangeError)
        assert issubclass(cls, builtin)


# --------------------------------------------------------------------------------------------
# PNG / JPEG round trips (Pillow)


def test_png_rgb_round_trip() -> None:
    arr = _rgb()
    out = decode_image(_pil(Image.fromarray(arr), "PNG"), max_pixels=MP)
    _assert_image(out, (24, 32, 3), "uint8")
    np.testing.assert_array_equal(out, arr)


def test_png_grey_becomes_one_band() -> None:
    arr = RNG.integers(0, 256, size=(17, 9), dtype=np.uint8)
    out = decode_image(_pil(Image.fromarray(arr), "PNG"), max_pixels=MP)
    _assert_image(out, (17, 9, 1), "uint8")
    np.testing.assert_array_equal(out[..., 0], arr)


def test_png_rgba_drops_alpha() -> None:
    arr = RNG.integers(0, 256, size=(10, 12, 4), dtype=np.uint8)
    out = decode_image(_pil(Image.fromarray(arr, "RGBA"), "PNG"), max_pixels=MP)
    _assert_image(out, (10, 12, 3), "uint8")
    np.testing.assert_array_equal(out, arr[..., :3])


def test_png_grey_alpha_drops_alpha() -> None:
    arr = RNG.integers(0, 256, size=(10, 12, 2), dtype=np.uint8)
    out = decode_image(_pil(Image.fromarray(arr, "LA"), "PNG"), max_pixels=MP)
    _assert_image(out, (10, 12, 1), "uint8")
    np.testing.assert_array_equal(out[..., 0], arr[..., 0])


@pytest.mark.parametrize("transparency", [None, 0, bytes([0, 128, 255])], ids=str)
def test_png_palette_expands_to_rgb(transparency: int | bytes | None) -> None:
    index = RNG.integers(0, 16, size=(8, 11), dtype=np.uint8)
    img = Image.fromarray(index, "L").convert("P")
    palette = RNG.integers(0, 256, size=256 * 3, dtype=np.uint8)
    img.putpalette(palette.tolist())
    kwargs = {} if transparency is None else {"transparency": transparency}
    out = decode_image(_pil(img, "PNG", **kwargs), max_pixels=MP)
    _assert_image(out, (8, 11, 3), "uint8")
    np.testing.assert_array_equal(out, palette.reshape(256, 3)[index])


def test_png_one_bit_is_grey_uint8() -> None:
    bits = RNG.integers(0, 2, size=(9, 13), dtype=np.uint8).astype(bool)
    out = decode_image(_pil(Image.fromarray(bits), "PNG"), max_pixels=MP)
    _assert_image(out, (9, 13, 1), "uint8")
    np.testing.assert_array_equal(out[..., 0], bits.astype(np.uint8) * 255)


def test_png_16bit_grey_keeps_16_bits() -> None:
    arr = RNG.integers(0, 65536, size=(12, 10), dtype=np.uint16)
    out = decode_image(_pil(Image.fromarray(arr), "PNG"), max_pixels=MP)
    _assert_image(out, (12, 10, 1), "uint16")
    np.testing.assert_array_equal(out[..., 0], arr)


@pytest.mark.parametrize(("colour", "bands"), [(2, 3), (6, 4), (4, 2)])
def test_png_16bit_colour_keeps_16_bits(colour: int, bands: int) -> None:
    arr = RNG.integers(0, 65536, size=(7, 5, bands), dtype=np.uint16)
    out = decode_image(_png16(arr, colour), max_pixels=MP)
    kept = 3 if bands >= 3 else 1
    _assert_image(out, (7, 5, kept), "uint16")
    np.testing.assert_array_equal(out, arr[..., :kept])


def test_jpeg_rgb_round_trip_is_close() -> None:
    yy, xx = np.mgrid[0:32, 0:48]
    arr = np.stack([xx * 5, yy * 7, (xx + yy) * 3], axis=-1).astype(np.uint8)
    out = decode_image(_pil(Image.fromarray(arr), "JPEG", quality=95), max_pixels=MP)
    _assert_image(out, (32, 48, 3), "uint8")
    assert np.abs(out.astype(int) - arr).mean() < 3


def test_jpeg_grey_and_cmyk() -> None:
    grey = np.full((16, 16), 77, dtype=np.uint8)
    out = decode_image(_pil(Image.fromarray(grey), "JPEG"), max_pixels=MP)
    _assert_image(out, (16, 16, 1), "uint8")
    cmyk = Image.new("CMYK", (8, 6), (0, 255, 255, 0))
    out = decode_image(_pil(cmyk, "JPEG"), max_pixels=MP)
    _assert_image(out, (6, 8, 3), "uint8")


# --------------------------------------------------------------------------------------------
# TIFF round trips (rasterio / GDAL)


@pytest.mark.parametrize(
    ("count", "dtype", "profile"),
    [
        (3, "uint8", {}),
        (4, "uint16", {}),
        (6, "uint8", {}),
        (1, "float32", {}),
        (13, "uint16", {"compress": "deflate", "tiled": True, "blockxsize": 16, "blockysize": 16}),
        (4, "uint8", {"photometric": "minisblack"}),
        (2, "float32", {"BIGTIFF": "YES", "interleave": "band"}),
    ],
    ids=[
        "3xu8",
        "4xu16-sentinel2",
        "6xu8",
        "1xf32",
        "13xu16-tiled-deflate",
        "4xu8-minisblack",
        "2xf32-bigtiff",
    ],
)
def test_tiff_round_trip(count: int, dtype: str, profile: dict[str, object]) -> None:
    if dtype == "float32":
        bands = RNG.normal(size=(count, 20, 33)).astype(np.float32)
    else:
        bands = RNG.integers(0, np.iinfo(dtype).max, size=(count, 20, 33), dtype=dtype)
    out = decode_image(_tiff(bands, **profile), max_pixels=MP)
    _assert_image(out, (20, 33, count), dtype)
    np.testing.assert_array_equal(out, np.moveaxis(bands, 0, -1))


def test_tiff_rgba_drops_alpha_band() -> None:
    # GDAL tags a default 4-band uint8 TIFF as RGBA, like Pillow's RGBA TIFF.
    rgba = RNG.integers(0, 256, size=(9, 7, 4), dtype=np.uint8)
    for data in (_tiff(np.moveaxis(rgba, -1, 0)), _pil(Image.fromarray(rgba, "RGBA"), "TIFF")):
        out = decode_image(data, max_pixels=MP)
        _assert_image(out, (9, 7, 3), "uint8")
        np.testing.assert_array_equal(out, rgba[..., :3])


def test_tiff_written_by_pillow_and_big_endian() -> None:
    arr = RNG.integers(0, 65536, size=(11, 6), dtype=np.uint16)
    out = decode_image(_pil(Image.fromarray(arr), "TIFF"), max_pixels=MP)
    _assert_image(out, (11, 6, 1), "uint16")
    np.testing.assert_array_equal(out[..., 0], arr)
    rgb = _rgb(5, 4)
    big_endian = _pil(Image.fromarray(rgb), "TIFF", tiffinfo={}, compression="tiff_lzw")
    np.testing.assert_array_equal(decode_image(big_endian, max_pixels=MP), rgb)


def test_tiff_palette_expands_to_rgb() -> None:
    index = RNG.integers(0, 4, size=(1, 6, 5), dtype=np.uint8)
    colours = {0: (0, 0, 0, 255), 1: (255, 0, 0, 255), 2: (0, 255, 0, 255), 3: (1, 2, 3, 255)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile() as memfile:
            with memfile.open(
                driver="GTiff", width=5, height=6, count=1, dtype="uint8", photometric="palette"
            ) as dataset:
                dataset.write(index)
                dataset.write_colormap(1, colours)
            data = bytes(memfile.read())
    out = decode_image(data, max_pixels=MP)
    _assert_image(out, (6, 5, 3), "uint8")
    lut = np.array([colours[i][:3] for i in range(4)], dtype=np.uint8)
    np.testing.assert_array_equal(out, lut[index[0]])


def test_concurrent_decodes_agree() -> None:
    """The server decodes from a thread pool; GDAL/Pillow state must not leak between calls."""
    tiff_bands = RNG.integers(0, 65536, size=(4, 16, 16), dtype=np.uint16)
    rgb = _rgb(16, 16)
    jobs = [
        (_tiff(tiff_bands), np.moveaxis(tiff_bands, 0, -1)),
        (_pil(Image.fromarray(rgb), "PNG"), rgb),
    ]

    def work(i: int) -> bool:
        data, expected = jobs[i % 2]
        return bool(np.array_equal(decode_image(data, max_pixels=MP), expected))

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(work, range(400)))


# --------------------------------------------------------------------------------------------
# raw buffers


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (5, 7, 3), (2, 3, MAX_BANDS)], ids=str)
def test_raw_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    if dtype == "float32":
        arr = RNG.normal(size=shape).astype(np.float32)
    else:
        arr = RNG.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype)
    data = arr.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    out = array_from_raw(data, shape, dtype, max_pixels=MP)
    expected_shape = shape if len(shape) == 3 else (*shape, 1)
    _assert_image(out, expected_shape, dtype)
    assert out.flags.owndata
    np.testing.assert_array_equal(out, arr.reshape(expected_shape))


def test_raw_copies_mutable_input() -> None:
    buf = bytearray(range(12))
    out = array_from_raw(buf, [2, 2, 3], "uint8", max_pixels=MP)
    buf[0] = 99
    assert out[0, 0, 0] == 0
    out[0, 0, 0] = 7  # writeable


# --------------------------------------------------------------------------------------------
# invalid inputs: every one is InvalidInput, naming the image


def _truncated_png() -> bytes:
    data = _pil(Image.fromarray(_rgb(64, 64)), "PNG")
    return data[: len(data) // 2]


def _corrupt_png() -> bytes:
    data = bytearray(_pil(Image.fromarray(_rgb(16, 16)), "PNG"))
    data[100] ^= 0xFF  # inside the compressed IDAT data (Pillow does not check IDAT's CRC)
    return bytes(data)


def _truncated_jpeg() -> bytes:
    data = _pil(Image.fromarray(_rgb(64, 64)), "JPEG")
    return data[: len(data) // 3]


def _truncated_tiff(fraction: float) -> bytes:
    data = _tiff(np.moveaxis(_rgb(64, 64), -1, 0))
    return data[: int(len(data) * fraction)]


def _decode(data: bytes, max_pixels: int = MP) -> Callable[[], object]:
    return lambda: decode_image(data, max_pixels=max_pixels, name="before")


def _raw(data: bytes, shape: object, dtype: object, max_pixels: int = MP) -> Callable[[], object]:
    return lambda: array_from_raw(data, shape, dtype, max_pixels=max_pixels, name="before")


_F32_2x2 = np.zeros((2, 2), np.float32)

INVALID = [
    pytest.param(_decode(b""), "no image bytes", id="empty"),
    pytest.param(_decode(RNG.bytes(1000)), "not a PNG, JPEG or TIFF", id="random-bytes"),
    pytest.param(_decode(b"GIF89a" + bytes(20)), "GIF", id="gif"),
    pytest.param(_decode(b"\x89PNG\r\n\x1a\n"), "PNG", id="png-magic-only"),
    pytest.param(_decode(_truncated_png()), "PNG", id="truncated-png"),
    pytest.param(_decode(_corrupt_png()), "PNG", id="png-corrupt-idat"),
    pytest.param(
        _decode(_png16(np.zeros((4, 4, 3), np.uint16), 2)[:45]), "PNG", id="truncated-png16"
    ),
    pytest.param(_decode(_truncated_jpeg()), "JPEG", id="truncated-jpeg"),
    pytest.param(_decode(b"II*\x00"), "TIFF", id="tiff-magic-only"),
    pytest.param(_decode(_truncated_tiff(0.5)), "TIFF", id="truncated-tiff-half"),
    pytest.param(_decode(_truncated_tiff(0.98)), "TIFF", id="truncated-tiff-tail"),
    pytest.param(_decode(_tiff(np.zeros((1, 4, 4), np.int16))), "int16", id="tiff-int16"),
    pytest.param(_decode(_tiff(np.full((1, 4, 4), np.nan, np.float32))), "NaN", id="tiff-nan"),
    pytest.param(
        _decode(_tiff(np.zeros((MAX_BANDS + 1, 2, 2), np.uint8))), "bands", id="tiff-too-many-bands"
    ),
    pytest.param(
        _decode(_pil(Image.fromarray(_rgb(20, 20)), "PNG"), max_pixels=399),
        "pixels",
        id="png-too-many-pixels",
    ),
    pytest.param(
        _decode(_pil(Image.fromarray(_rgb(20, 20)), "JPEG"), max_pixels=399),
        "pixels",
        id="jpeg-too-many-pixels",
    ),
    pytest.param(
        _decode(_tiff(np.zeros((1, 20, 20), np.uint8)), max_pixels=399),
        "pixels",
        id="tiff-too-many-pixels",
    ),
    pytest.param(_raw(bytes(11), (2, 2, 3), "uint8"), "needs 12", id="raw-short"),
    pytest.param(_raw(bytes(13), (2, 2, 3), "uint8"), "needs 12", id="raw-long"),
    pytest.param(_raw(bytes(12), (2, 2, 3), "uint16"), "needs 24", id="raw-wrong-itemsize"),
    pytest.param(_raw(b"", (0, 4), "uint8"), "empty dimension", id="raw-zero-dim"),
    pytest.param(_raw(b"", (4, -4, 1), "uint8"), "empty dimension", id="raw-negative-dim"),
    pytest.param(_raw(bytes(16), (2, 2, 2, 2), "uint8"), "dimensions", id="raw-4d"),
    pytest.param(_raw(bytes(4), (4,), "uint8"), "dimensions", id="raw-1d"),
    pytest.param(_raw(bytes(4), (2.0, 2), "uint8"), "integers", id="raw-float-dim"),
    pytest.param(_raw(bytes(4), (True, 4), "uint8"), "integers", id="raw-bool-dim"),
    pytest.param(_raw(bytes(4), "22", "uint8"), "integers", id="raw-str-shape"),
    pytest.param(_raw(bytes(8), (2, 2), "int16"), "int16", id="raw-int16"),
    pytest.param(_raw(bytes(32), (2, 2), "float64"), "float64", id="raw-float64"),
    pytest.param(_raw(bytes(8), (2, 2), "<u2"), "not supported", id="raw-dtype-spelling"),
    pytest.param(_raw(bytes(4), (2, 2), np.uint8), "not supported", id="raw-dtype-object"),
    pytest.param(_raw(bytes(2 * 2 * 65), (2, 2, 65), "uint8"), "bands", id="raw-65-bands"),
    pytest.param(_raw(b"", (100_000, 100_000, 3), "uint8"), "pixels", id="raw-too-many-pixels"),
    pytest.param(
        _raw(bytes(400), (20, 20), "uint8", max_pixels=399), "pixels", id="raw-over-limit-by-one"
    ),
]
for _value in (np.nan, np.inf, -np.inf):
    _bad = _F32_2x2.copy()
    _bad[1, 0] = _value
    INVALID.append(
        pytest.param(
            _raw(_bad.astype("<f4").tobytes(), (2, 2), "float32"), "NaN or Inf", id=f"raw-{_value}"
        )
    )


@pytest.mark.parametrize(("call", "message"), INVALID)
def test_invalid_inputs_raise_invalid_input(call: Callable[[], object], message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        call()
    text = str(info.value)
    assert text.startswith("before:"), text
    assert message in text, text
    assert "/vsimem" not in text, text
    assert " object at 0x" not in text, text
    assert ".tif" not in text, text


def test_limit_is_inclusive() -> None:
    arr = array_from_raw(bytes(400), (20, 20), "uint8", max_pixels=400)
    assert arr.shape == (20, 20, 1)
    png = _pil(Image.fromarray(_rgb(20, 20)), "PNG")
    assert decode_image(png, max_pixels=400).shape == (20, 20, 3)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_max_pixels_is_a_server_bug_not_invalid_input(bad: object) -> None:
    with pytest.raises(ValueError) as info:
        decode_image(b"", max_pixels=bad)  # type: ignore[arg-type]
    assert not isinstance(info.value, InvalidInput)


# --------------------------------------------------------------------------------------------
# decompression bombs: refused from the header, fast and without allocating


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@pytest.mark.parametrize("side", [40_000, 5_000], ids=["pillow-would-refuse", "only-we-refuse"])
def test_png_decompression_bomb_is_refused(side: int) -> None:
    bomb = _zero_png_bomb(side)
    assert len(bomb) < 300_000  # ~1.6e9 pixels in a few hundred KB
    rss = _peak_rss_mib()
    start = time.perf_counter()
    with pytest.raises(InvalidInput, match="pixels"):
        decode_image(bomb, max_pixels=16_000_000, name="after")
    assert time.perf_counter() - start < 1.0
    assert _peak_rss_mib() - rss < 64


def test_tiff_decompression_bomb_is_refused() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile() as memfile:
            with memfile.open(
                driver="GTiff",
                width=40_000,
                height=40_000,
                count=3,
                dtype="uint16",
                tiled=True,
                blockxsize=1024,
                blockysize=1024,
                compress="deflate",
                sparse_ok=True,
            ):
                pass  # nothing written: every tile is sparse, yet the header says 40000x40000
            bomb = bytes(memfile.read())
    assert len(bomb) < 100_000
    rss = _peak_rss_mib()
    start = time.perf_counter()
    with pytest.raises(InvalidInput, match="pixels"):
        decode_image(bomb, max_pixels=16_000_000)
    assert time.perf_counter() - start < 1.0
    assert _peak_rss_mib() - rss < 64


def test_tiff_with_huge_blocks_is_refused() -> None:
    data = _tiff(np.zeros((1, 8, 8), np.uint8), tiled=True, blockxsize=8192, blockysize=8192)
    with pytest.raises(InvalidInput, match="blocks"):
        decode_image(data, max_pixels=MP)


# --------------------------------------------------------------------------------------------
# check_pair


def test_check_pair_accepts_matching_pair() -> None:
    check_pair(np.zeros((4, 5, 3), np.uint8), np.ones((4, 5, 3), np.uint8))


@pytest.mark.parametrize(
    ("before", "after", "message"),
    [
        (
            (512, 512, 3),
            (512, 500, 3),
            "before is 512x512x3 uint8, after is 512x500x3 uint8; register and crop",
        ),
        ((8, 8, 3), (8, 8, 4), "same bands"),
        ((8, 8, 3), (8, 8), "register and crop"),
    ],
    ids=["width", "bands", "ndim"],
)
def test_check_pair_shape_mismatch(
    before: tuple[int, ...], after: tuple[int, ...], message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        check_pair(np.zeros(before, np.uint8), np.zeros(after, np.uint8))


def test_check_pair_dtype_mismatch() -> None:
    with pytest.raises(InvalidInput, match=r"uint8.*uint16.*bit depth"):
        check_pair(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint16))


# --------------------------------------------------------------------------------------------
# properties: whatever the bytes, an ndarray or InvalidInput, nothing else


def _check_any_bytes(data: bytes) -> None:
    try:
        out = decode_image(data, max_pixels=4096, name="fuzz")
    except InvalidInput:
        return
    assert isinstance(out, np.ndarray)
    assert out.ndim == 3
    assert out.dtype.name in SUPPORTED_DTYPES


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_decode_or_invalid_input(data: bytes) -> None:
    _check_any_bytes(data)


_MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"II+\x00"]
_SAMPLES = [
    _pil(Image.fromarray(_rgb(8, 8)), "PNG"),
    _pil(Image.fromarray(_rgb(8, 8)), "JPEG"),
    _png16(RNG.integers(0, 65536, size=(4, 4, 3), dtype=np.uint16), 2),
    _tiff(RNG.integers(0, 65536, size=(4, 8, 8), dtype=np.uint16)),
    _tiff(RNG.normal(size=(1, 8, 8)).astype(np.float32), compress="deflate"),
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_MAGICS), st.binary(max_size=2000))
def test_magic_prefixed_bytes_decode_or_invalid_input(magic: bytes, tail: bytes) -> None:
    _check_any_bytes(magic + tail)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(_SAMPLES),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    st.integers(0, 10_000),
)
def test_mutated_files_decode_or_invalid_input(
    sample: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(sample)
    for pos, value in flips:
        data[pos % len(data)] = value
    _check_any_bytes(bytes(data[: max(1, len(data) - cut % len(data))]))
