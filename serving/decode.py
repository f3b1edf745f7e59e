"""Turn what a client sent into a numpy image, refusing anything unsafe before decoding it.

Everything here handles untrusted bytes, so the rules are:

* the format comes from magic bytes, never from the client's say-so;
* the size declared in the header is checked against ``max_pixels`` *before* pixel data is
  decoded, so a few-KB decompression bomb cannot make the server allocate gigabytes;
* GDAL only ever sees bytes through ``/vsimem`` (``MemoryFile``) with sidecar lookups off, so a
  client can never make the server read a file path;
* bad bytes only ever raise :class:`~serving.errors.InvalidInput` (INVALID_ARGUMENT).

Returned arrays are (H, W, C), C-contiguous, writeable and never views of the request bytes.
"""

from __future__ import annotations

import io
import operator
import re
import struct
import threading
import warnings
from collections.abc import Sequence

import numpy as np
import rasterio
from PIL import Image
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile

from serving.errors import InvalidInput

__all__ = ["MAX_BANDS", "SUPPORTED_DTYPES", "array_from_raw", "check_pair", "decode_image"]

SUPPORTED_DTYPES = ("uint8", "uint16", "float32")
MAX_BANDS = 64
"""Most bands (C) accepted; more is almost surely a mistaken shape, and it bounds memory."""

_ADVICE_FORMAT = "send PNG, JPEG or TIFF bytes, or raw pixels with their shape and dtype"
_ADVICE_SIZE = "downsample or tile the pair and send the pieces"

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_KNOWN_UNSUPPORTED = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
)

# No directory listing, no .aux.xml, no world files: GDAL must read nothing but the bytes we
# give it (sidecar lookups would stay inside /vsimem anyway, this keeps them from happening).
_GDAL_OPTIONS = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_PAM_ENABLED": "NO",
    "GDAL_GEOREF_SOURCES": "INTERNAL",
    "GTIFF_IGNORE_READ_ERRORS": "NO",
}
# Tiles bigger than this are refused even for small images: libtiff allocates a whole block.
_MAX_BLOCK_PIXELS = 4096 * 4096

_PILLOW_LIMIT_LOCK = threading.Lock()
_GDAL_OPEN_LOCK = threading.Lock()
# Object reprs and /vsimem/<uuid>/<uuid>.tif names in library messages mean nothing to clients.
_NOISE = re.compile(
    r"<[\w.]+ object at 0x[0-9a-fA-F]+>|\S*[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}[\w./]*"
)


def decode_image(data: bytes, *, max_pixels: int, name: str = "image") -> np.ndarray:
    """Decode encoded PNG, JPEG or TIFF bytes into an (H, W, C) uint8, uint16 or float32 array.

    Grey becomes C=1, palettes are expanded to RGB and alpha is dropped (the model never sees
    transparency). 16-bit PNG and uint16/float32 TIFF keep their depth; multi-band TIFF keeps
    every non-alpha band. ``name`` ("before", "after") is used in error messages.
    """
    _check_max_pixels(max_pixels)
    if not isinstance(data, bytes):
        data = bytes(data)
    if not data:
        raise InvalidInput(f"{name}: no image bytes were sent; {_ADVICE_FORMAT}")
    if data.startswith(_PNG_MAGIC):
        ihdr = _png_header(data)
        if ihdr is not None and ihdr[2] == 16 and ihdr[3] in (2, 4, 6):
            # Pillow silently reduces 16-bit colour PNG to 8 bits; GDAL keeps all 16.
            return _decode_gdal(data, "PNG", max_pixels=max_pixels, name=name)
        return _decode_pillow(data, "PNG", max_pixels=max_pixels, name=name)
    if data.startswith(_JPEG_MAGIC):
        return _decode_pillow(data, "JPEG", max_pixels=max_pixels, name=name)
    if data.startswith(_TIFF_MAGICS):
        return _decode_gdal(data, "GTiff", max_pixels=max_pixels, name=name)
    for magic, fmt in _KNOWN_UNSUPPORTED:
        if data.startswith(magic):
            raise InvalidInput(f"{name}: {fmt} images are not supported; {_ADVICE_FORMAT}")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        raise InvalidInput(f"{name}: WebP images are not supported; {_ADVICE_FORMAT}")
    raise InvalidInput(f"{name}: not a PNG, JPEG or TIFF file; {_ADVICE_FORMAT}")


def array_from_raw(
    data: bytes,
    shape: Sequence[int],
    dtype: str,
    *,
    max_pixels: int,
    name: str = "image",
) -> np.ndarray:
    """Wrap a raw little-endian, row-major pixel buffer of shape (H, W) or (H, W, C).

    Every check runs before anything is allocated, so a lying shape costs nothing. Floats must
    be finite because NaN/Inf silently poison the model's normalisation.
    """
    _check_max_pixels(max_pixels)
    if not isinstance(dtype, str) or dtype not in SUPPORTED_DTYPES:
        raise InvalidInput(
            f"{name}: dtype {dtype!r} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}"
        )
    dims = _check_shape(shape, name)
    height, width = dims[0], dims[1]
    bands = dims[2] if len(dims) == 3 else 1
    _check_size(height, width, bands, max_pixels=max_pixels, name=name, what="raw shape")
    item = np.dtype(dtype).itemsize
    expected = height * width * bands * item
    got = memoryview(data).nbytes
    if got != expected:
        raise InvalidInput(
            f"{name}: raw buffer has {got} bytes but shape {_dims(dims)} of {dtype} needs "
            f"{expected}; send exactly H*W*C little-endian values in row-major order"
        )
    little = np.dtype(dtype).newbyteorder("<")
    # astype always copies: the result is native-endian, writeable and owns its memory.
    arr = np.frombuffer(data, dtype=little).reshape(height, width, bands).astype(dtype)
    _check_finite(arr, name)
    return arr


def check_pair(before: np.ndarray, after: np.ndarray) -> None:
    """Refuse a before/after pair that cannot be compared pixel by pixel."""
    advice = []
    if before.shape[:2] != after.shape[:2] or before.ndim != after.ndim:
        advice.append("register and crop the pair to the same size first")
    elif before.shape != after.shape:
        advice.append("send both images with the same bands")
    if before.dtype != after.dtype:
        advice.append("send both images at the same bit depth")
    if advice:
        raise InvalidInput(
            f"before is {_describe(before)}, after is {_describe(after)}; {'; '.join(advice)}"
        )


# --------------------------------------------------------------------------------------------
# Pillow: PNG and JPEG


def _decode_pillow(data: bytes, fmt: str, *, max_pixels: int, name: str) -> np.ndarray:
    """Decode with Pillow, checking the header's size before ``load`` touches pixel data."""
    _let_pillow_allow(max_pixels)
    try:
        # formats= stops Pillow from trying every other plugin on bytes we already identified.
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            _check_size(
                im.height, im.width, len(im.getbands()), max_pixels=max_pixels, name=name, what=fmt
            )
            arr = _pillow_to_array(im, fmt, name)
    except (InvalidInput, MemoryError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(
            f"{name}: {fmt} declares more pixels than this server accepts; {_ADVICE_SIZE}"
        ) from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, zlib.error...
        raise InvalidInput(f"{name}: {fmt} is corrupt or truncated ({_reason(exc)})") from exc
    return _finish(arr)


def _pillow_to_array(im: Image.Image, fmt: str, name: str) -> np.ndarray:
    """Map Pillow modes to grey/RGB uint8 or uint16, dropping alpha and expanding palettes."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.array(im).astype(np.uint16)
    if mode == "I":  # 16-bit grey in older Pillow versions, held as int32
        arr = np.array(im)
        if arr.size and (arr.min() < 0 or arr.max() > 0xFFFF):
            raise InvalidInput(f"{name}: {fmt} holds values outside 0..65535; send 16-bit data")
        return arr.astype(np.uint16)
    if mode in ("1", "L", "LA", "La"):
        target = "L"
    elif mode in ("P", "PA"):
        # Alpha is dropped anyway; removing tRNS first avoids Pillow's "convert to RGBA" warning.
        im.info.pop("transparency", None)
        target = "RGB"
    elif mode in ("RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"):
        target = "RGB"
    else:
        raise InvalidInput(
            f"{name}: {fmt} pixel mode {mode} is not supported; send grey or RGB images"
        )
    if mode == target:
        im.load()
        return np.array(im)
    return np.array(im.convert(target))


def _let_pillow_allow(max_pixels: int) -> None:
    """Raise Pillow's global bomb limit to ``max_pixels`` so only our own check decides.

    Pillow warns above ``MAX_IMAGE_PIXELS`` and refuses above twice that; we check the exact
    limit ourselves, so Pillow's may only be looser. It is process-global and only ever grows.
    """
    with _PILLOW_LIMIT_LOCK:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and current < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels


def _png_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) from IHDR, or None if it is malformed."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, colour


# --------------------------------------------------------------------------------------------
# GDAL (rasterio): TIFF of any band count, 16-bit colour PNG


def _decode_gdal(data: bytes, driver: str, *, max_pixels: int, name: str) -> np.ndarray:
    """Decode through GDAL from /vsimem, checking size, bands and dtype before reading pixels."""
    what = "TIFF" if driver == "GTiff" else driver
    try:
        with rasterio.Env(**_GDAL_OPTIONS), MemoryFile(data) as memfile:
            # Ordinary images carry no georeferencing and rasterio warns about that on open.
            # catch_warnings swaps a process-global filter list (not thread-aware before
            # Python 3.14), so overlapping blocks could restore each other's state; the lock
            # keeps ours from overlapping. Opening reads only the header, so it is quick.
            with _GDAL_OPEN_LOCK, warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                dataset = memfile.open(driver=driver)
            with dataset:
                arr = _read_dataset(dataset, memfile.name, what, max_pixels=max_pixels, name=name)
    except (InvalidInput, MemoryError):
        raise
    except Exception as exc:  # RasterioIOError, CPLE_* errors, ValueError...
        reason = _reason(exc, innermost=True)
        raise InvalidInput(f"{name}: {what} is corrupt or truncated ({reason})") from exc
    _check_finite(arr, name)
    return _finish(arr)


def _read_dataset(
    dataset: rasterio.io.DatasetReader, vsi_name: str, what: str, *, max_pixels: int, name: str
) -> np.ndarray:
    """Validate an open GDAL dataset's header, then read it as (H, W, C)."""
    if any(path != vsi_name for path in dataset.files):
        raise InvalidInput(f"{name}: {what} refers to other files; send a self-contained file")
    _check_size(
        dataset.height, dataset.width, dataset.count, max_pixels=max_pixels, name=name, what=what
    )
    for block_h, block_w in dataset.block_shapes:
        if block_h * block_w > max(max_pixels, _MAX_BLOCK_PIXELS):
            raise InvalidInput(
                f"{name}: {what} uses {block_h}x{block_w} blocks, too large to decode safely; "
                "rewrite it with ordinary tiles or strips"
            )
    dtypes = sorted(set(dataset.dtypes))
    if len(dtypes) != 1 or dtypes[0] not in SUPPORTED_DTYPES:
        raise InvalidInput(
            f"{name}: {what} band type {'/'.join(dtypes)} is not supported; "
            f"convert it to one of {', '.join(SUPPORTED_DTYPES)}"
        )
    interp = dataset.colorinterp
    if dataset.count == 1 and interp[0] == ColorInterp.palette:
        return _expand_palette(dataset.read(1), dataset.colormap(1))
    keep = [i + 1 for i, ci in enumerate(interp) if ci != ColorInterp.alpha]
    if not keep:
        raise InvalidInput(f"{name}: {what} has only alpha bands; send image bands")
    bands = dataset.read(indexes=keep)  # (C, H, W)
    return np.ascontiguousarray(np.moveaxis(bands, 0, -1))


def _expand_palette(index: np.ndarray, colormap: dict[int, tuple[int, ...]]) -> np.ndarray:
    """Palette indices -> RGB uint8, like Pillow's P -> RGB (entries beyond the map are black)."""
    lut = np.zeros((int(np.iinfo(index.dtype).max) + 1, 3), dtype=np.uint8)
    for key, rgba in colormap.items():
        if 0 <= key < len(lut):
            lut[key] = rgba[:3]
    return lut[index]


# --------------------------------------------------------------------------------------------
# shared checks


def _check_max_pixels(max_pixels: int) -> None:
    """A broken limit is a server bug, not bad input: raise plain ValueError (-> INTERNAL)."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")


def _check_shape(shape: Sequence[int], name: str) -> tuple[int, ...]:
    """Raw shapes must be (H, W) or (H, W, C) of positive ints."""
    try:
        if isinstance(shape, str | bytes) or any(isinstance(d, bool) for d in shape):
            raise TypeError
        dims = tuple(operator.index(d) for d in shape)
    except TypeError as exc:
        raise InvalidInput(
            f"{name}: shape {shape!r} is not a list of integers; send [H, W] or [H, W, C]"
        ) from exc
    if len(dims) not in (2, 3):
        raise InvalidInput(
            f"{name}: shape {_dims(dims)} has {len(dims)} dimensions; send [H, W] or [H, W, C]"
        )
    if any(d <= 0 for d in dims):
        raise InvalidInput(f"{name}: shape {_dims(dims)} has an empty dimension")
    return dims


def _check_size(
    height: int, width: int, bands: int, *, max_pixels: int, name: str, what: str
) -> None:
    """Refuse empty, oversized or absurdly many-banded images using header values only."""
    if height <= 0 or width <= 0 or bands <= 0:
        raise InvalidInput(f"{name}: {what} declares an empty {height}x{width}x{bands} image")
    if height * width > max_pixels:
        raise InvalidInput(
            f"{name}: {what} is {height}x{width} = {height * width} pixels, more than the "
            f"{max_pixels} this server accepts; {_ADVICE_SIZE}"
        )
    if bands > MAX_BANDS:
        raise InvalidInput(
            f"{name}: {what} has {bands} bands, more than the {MAX_BANDS} supported; "
            "check the shape or send fewer bands"
        )


def _check_finite(arr: np.ndarray, name: str) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InvalidInput(
            f"{name}: float pixels contain NaN or Inf; fill nodata with a finite value first"
        )


def _finish(arr: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W, 1), C-contiguous and writeable."""
    if arr.ndim == 2:
        arr = arr[:, :, np.newaxis]
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:
        arr = arr.copy()
    return arr


def _reason(exc: BaseException, *, innermost: bool = False) -> str:
    """A short, single-line cause for the client, without internal names or addresses.

    rasterio wraps GDAL's specific error ("Read error at scanline 4; got 6061 bytes, expected
    8064") in a generic one ("Read failed. See previous exception"): ``innermost`` digs it out.
    Pillow is the other way round (its own message wraps a bare struct.error), so it doesn't.
    """
    for _ in range(10 if innermost else 0):
        if exc.__cause__ is None:
            break
        exc = exc.__cause__
    text = " ".join(_NOISE.sub("", str(exc)).split()).strip(" :,") or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _dims(dims: Sequence[int]) -> str:
    return "x".join(str(d) for d in dims)


def _describe(arr: np.ndarray) -> str:
    return f"{_dims(arr.shape)} {arr.dtype}"
