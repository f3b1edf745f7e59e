"""Finished blocks on disk, and the Cloud-Optimized GeoTIFFs assembled from them.

A run keeps every finished block as its own ``.npy`` file, written to a temporary name and renamed,
so a run killed at any instant (SIGKILL included) leaves only whole blocks behind and ``--resume``
scores just the missing ones. The rasters are assembled from the blocks at the end, one block in
memory at a time: a tiled, compressed GeoTIFF first, then GDAL's COG driver (overviews, header
layout), each to a temporary name renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import threading
import warnings
from collections.abc import Iterable, Iterator
from html import escape
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rasterio
import rasterio.errors
import rasterio.shutil
from affine import Affine
from rasterio.io import MemoryFile
from rasterio.windows import Window

from serving.errors import RareChangeError
from serving.scoring.blocks import Block
from serving.scoring.rasters import Grid

PROBABILITY_NODATA = -1.0  # float32 probability rasters
UINT8_NODATA = 255  # scaled probability (0..254 = 0..1) and mask (0/1) rasters
UINT8_SCALE = 254
COG_BLOCK = 512
DIRECT_LEVELS = 2  # overview levels halved from blocks in memory; the rest from the files

ProbabilityType = Literal["float32", "uint8"]
# below this much free space after a failed write, the filesystem counts as full: numpy and GDAL
# report ENOSPC without an errno ("4096 requested and 4064 written", "TIFFAppendToStrip: Seek
# error"), and a write that ran out of space has used all there was
FULL_BYTES = 1024 * 1024


class OutputWriteError(RareChangeError, OSError):
    """A run's files could not be written, a full disk above all. Every file goes to a temporary
    name first, so nothing final-named is half-written and the run stays unfinished (no
    ``summary.json``); the message says where, how much space is left and what to do next."""


@contextlib.contextmanager
def writing(folder: Path, blocks: Path | None = None) -> Iterator[None]:
    """An error while writing into ``folder`` when its disk is full (ENOSPC or EDQUOT in the
    error's chain, or under FULL_BYTES left) becomes an OutputWriteError that says so, with the
    number of finished blocks kept in ``blocks``; any other error passes unchanged. Enter it
    inside any clean-up that deletes temporaries: that gives space back."""
    try:
        yield
    except RareChangeError:
        raise
    except Exception as exc:
        try:
            free: int | None = shutil.disk_usage(folder).free
        except OSError:
            free = None
        space_errors = (errno.ENOSPC, errno.EDQUOT)
        chain = [exc, *_causes(exc)]
        if not any(getattr(e, "errno", None) in space_errors for e in chain) and (
            free is None or free >= FULL_BYTES
        ):
            raise
        left = "unknown" if free is None else f"{free / 2**20:.1f} MiB"
        kept = "its scored blocks are kept"
        if blocks is not None and blocks.is_dir():
            kept = f"its {len(list(blocks.glob('*.npy')))} scored block(s) are kept"
        raise OutputWriteError(
            errno.ENOSPC,
            f"no space left on the device of {folder} (free: {left}; {exc}); the run is "
            f"unfinished, {kept}: free space or choose another --out, then run the same "
            "command with --resume",
        ) from exc


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen = {id(exc)}
    while (exc := exc.__cause__ or exc.__context__) is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc


_NPY_HEADER_LOCK = threading.Lock()


class BlockStore:
    """``folder/<index>.npy``: the float32 probability of one finished block, NaN = nodata."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        return self.folder / f"{index:07d}.npy"

    def has(self, index: int) -> bool:
        return self.path(index).exists()

    def save(self, index: int, prob: np.ndarray) -> None:
        final = self.path(index)
        tmp = final.with_name(f".{final.name}.tmp")
        try:
            # a full disk is recognised before the clean-up below gives space back
            with writing(self.folder, self.folder), open(tmp, "wb") as f:
                np.save(f, prob.astype(np.float32, copy=False))
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # give back the space a failed write took
            raise
        os.replace(tmp, final)

    def load(self, index: int) -> np.ndarray:
        # np.load parses the header with ast.literal_eval, and CPython 3.11's AST builder keeps
        # its recursion depth in state shared by all threads: two threads loading at once fail
        # with "SystemError: AST constructor recursion depth mismatch" (gh-106905; CI hit it when
        # the COGs read blocks on two threads; loads are on one thread now, the lock keeps it so)
        with _NPY_HEADER_LOCK:
            return np.load(self.path(index))


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def probability_pixels(prob: np.ndarray, dtype: ProbabilityType) -> np.ndarray:
    invalid = np.isnan(prob)
    if dtype == "float32":
        out = prob.astype(np.float32)  # one copy, then nodata in place
        out[invalid] = PROBABILITY_NODATA
        return out
    scaled = np.rint(np.nan_to_num(prob) * UINT8_SCALE).astype(np.uint8)
    scaled[invalid] = UINT8_NODATA
    return scaled


def mask_pixels(prob: np.ndarray, threshold: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # NaN (nodata) compares False, then is marked nodata
        out = (prob >= threshold).astype(np.uint8)
    out[np.isnan(prob)] = UINT8_NODATA
    return out


class CogWriter:
    """A COG at ``path`` assembled from blocks as they arrive, so that the staging rasters are
    written while the scene is still being scored: ``add`` every block of ``blocks`` (in any
    order, one thread at a time), then ``finish``. Leaving the ``with`` block unfinished, or any
    failure, deletes every temporary; the COG appears at ``path`` only when complete.

    The overview levels are made here and handed to GDAL's COG driver through a VRT that lists
    them: GDAL's own overview pass works on strips of the full raster width (32 MB at 16k
    float32) and its memory would grow with the scene. Levels whose 2 x 2 cells never straddle
    two blocks are halved from each block in memory as it is added; any further ones from the
    level below, window by window. ``resampling``: "average" (nodata-aware mean) or "nearest"."""

    def __init__(
        self,
        path: Path,
        grid: Grid,
        blocks: Iterable[Block],
        dtype: str,
        nodata: float,
        resampling: str,
        tags: dict[str, str] | None = None,
        scale: float | None = None,
        description: str = "",
        work: Path | None = None,
    ) -> None:
        self.path, self.grid, self.dtype, self.nodata = path, grid, dtype, nodata
        self.resampling, self.tags, self.scale = resampling, tags or {}, scale
        self.description = description
        work = work or path.parent
        work.mkdir(parents=True, exist_ok=True)
        self.final_tmp = path.with_name(f".{path.name}.tmp")
        self.vrt = work / f".{path.stem}.staging.vrt"
        self.shapes = [(grid.height, grid.width)]
        while max(self.shapes[-1]) > COG_BLOCK:
            self.shapes.append((-(-self.shapes[-1][0] // 2), -(-self.shapes[-1][1] // 2)))
        self.levels = [work / f".{path.stem}.staging.tif"] + [
            work / f".{path.stem}.staging.ov{2**k}.tif" for k in range(1, len(self.shapes))
        ]
        # at most DIRECT_LEVELS are open at once, so that the rasters held open (each with its
        # own GDAL and compression state) do not grow in number with the scene's level count
        self.direct = min(
            [len(self.shapes) - 1, DIRECT_LEVELS, *(_aligned_levels(b, grid) for b in blocks)]
        )
        self._files = contextlib.ExitStack()
        self._done = False
        try:
            with writing(path.parent):
                self._outs = [
                    self._files.enter_context(
                        rasterio.open(
                            self.levels[k], "w", **_staging_profile(h, w, dtype, nodata, grid, 2**k)
                        )
                    )
                    for k, (h, w) in enumerate(self.shapes[: self.direct + 1])
                ]
        except BaseException:
            self.abort()
            raise

    def add(self, block: Block, data: np.ndarray) -> None:
        try:
            with writing(self.path.parent):
                self._outs[0].write(data, 1, window=block.window)
                for k in range(1, self.direct + 1):
                    data = _halve_array(data, self.nodata, self.resampling).astype(self.dtype)
                    window = Window(block.col >> k, block.row >> k, *data.shape[::-1])
                    self._outs[k].write(data, 1, window=window)
        except BaseException:
            self.abort()
            raise

    def finish(self) -> Path:
        levels, dtype, nodata = self.levels, self.dtype, self.nodata
        try:
            with writing(self.path.parent):  # a full disk recognised before the clean-up
                self._files.close()
                for level in levels[: self.direct + 1]:
                    check_complete(level, read=False)
                for k in range(self.direct + 1, len(self.shapes)):
                    _halve(
                        levels[k - 1], levels[k], *self.shapes[k], dtype, nodata, self.resampling
                    )
                    check_complete(levels[k], read=False)
                self.vrt.write_text(
                    _vrt(self.grid, dtype, nodata, levels, self.tags, self.scale, self.description)
                )
                rasterio.shutil.copy(
                    self.vrt,
                    self.final_tmp,
                    driver="COG",
                    COMPRESS="DEFLATE",
                    PREDICTOR="YES" if dtype == "float32" else "NO",
                    BLOCKSIZE=COG_BLOCK,
                    OVERVIEWS="FORCE_USE_EXISTING",
                    BIGTIFF="IF_SAFER",
                )
                check_complete(self.final_tmp, read=True)
        except BaseException:
            self.abort()
            raise
        for f in (self.vrt, *levels):
            f.unlink()
        os.replace(self.final_tmp, self.path)
        self._done = True
        return self.path

    def abort(self) -> None:
        """Give back the space the temporaries took (GDAL may also leave a file it could not
        finish: rasterio 1.4 does not raise for a write that fails when the file is closed)."""
        with contextlib.suppress(Exception):
            self._files.close()
        for f in (self.vrt, self.final_tmp, *self.levels):
            with contextlib.suppress(OSError):
                f.unlink(missing_ok=True)

    def __enter__(self) -> CogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort()


def check_complete(path: Path, read: bool) -> None:
    """Every block of every level of the GeoTIFF at ``path`` is on disk (and, with ``read``,
    reads back). rasterio 1.4 does not raise for a write GDAL fails when it closes a file (a full
    disk: the error only reaches stderr), which leaves blocks unwritten (read as nodata, without
    an error) or truncated (GDAL's COG copy even returns success): such a file must never be
    renamed into place. Reading the final COG back costs about a tenth of writing it."""
    with rasterio.open(path) as ds:
        levels: list[dict[str, int]] = [{}]
        levels += [{"overview_level": i} for i in range(len(ds.overviews(1)))]
    for level in levels:
        with rasterio.open(path, **level) as ds:
            for (row, col), window in ds.block_windows(1):
                offset = ds.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=1)
                if offset in (None, "", "0"):
                    raise rasterio.errors.RasterioIOError(
                        f"{path}: block ({row}, {col}) of {level or 'full resolution'} was "
                        "never written"
                    )
                if read:
                    ds.read(1, window=window)


def _staging_profile(
    height: int, width: int, dtype: str, nodata: float, grid: Grid | Any, factor: int = 1
) -> dict:
    return {
        "transform": grid.transform @ Affine.scale(factor),
        "driver": "GTiff",
        "height": height,
        "width": width,
        "count": 1,
        "dtype": dtype,
        "crs": grid.crs,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": COG_BLOCK,
        "blockysize": COG_BLOCK,
        **_staging_compression(),
        "BIGTIFF": "IF_SAFER",
    }


@functools.cache
def _staging_compression() -> dict[str, Any]:
    """Staging rasters are read back once: ZSTD level 1 (5x faster than DEFLATE level 1 for the
    same size on a float32 map), or DEFLATE level 1 where GDAL was built without ZSTD. The
    finished COGs stay DEFLATE, which every GeoTIFF reader opens."""
    probe = {"driver": "GTiff", "height": 1, "width": 1, "count": 1, "dtype": "uint8"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with MemoryFile() as mem, mem.open(**probe, compress="zstd") as ds:
                ds.write(np.zeros((1, 1, 1), np.uint8))
        return {"compress": "zstd", "zstd_level": 1}
    except (rasterio.errors.RasterioError, ValueError):
        return {"compress": "deflate", "zlevel": 1}


def _halve(
    src: Path,
    dst: Path,
    height: int,
    width: int,
    dtype: str,
    nodata: float,
    resampling: str,
    window: int = 512,
) -> None:
    """One overview level: every 2 x 2 cell of ``src`` -> one pixel, ``window`` rows at a time."""
    with (
        rasterio.open(src) as s,
        rasterio.open(dst, "w", **_staging_profile(height, width, dtype, nodata, s, factor=2)) as d,
    ):
        for r in range(0, height, window):
            for c in range(0, width, window):
                h, w = min(window, height - r), min(window, width - c)
                src_win = Window(
                    2 * c, 2 * r, min(2 * w, s.width - 2 * c), min(2 * h, s.height - 2 * r)
                )
                data = _halve_array(s.read(1, window=src_win), nodata, resampling)
                d.write(data.astype(dtype), 1, window=Window(c, r, w, h))


def _halve_array(data: np.ndarray, nodata: float, resampling: str) -> np.ndarray:
    """(h, w) -> (ceil(h / 2), ceil(w / 2)); a missing row or column past the edge is nodata.

    The four pixels of each 2 x 2 cell are read as four strided views, so the only arrays made
    are a quarter of the block's size: the staging thread halves a 1024-pixel float32 block with
    about 5 MB of temporaries instead of 20, which kept the scoring run's peak memory higher on
    a big scene (where staging overlaps scoring) than on a one-block one."""
    if data.shape[0] % 2 or data.shape[1] % 2:  # only at the scene's last row or column
        even = np.full(
            (data.shape[0] + data.shape[0] % 2, data.shape[1] + data.shape[1] % 2),
            nodata,
            data.dtype,
        )
        even[: data.shape[0], : data.shape[1]] = data
        data = even
    # in the order of the cell's pixels: top-left, top-right, bottom-left, bottom-right
    quarters = [data[0::2, 0::2], data[0::2, 1::2], data[1::2, 0::2], data[1::2, 1::2]]
    return _reduce(quarters, nodata, resampling)


def _aligned_levels(block: Block, grid: Grid) -> int:
    """How many times ``block`` halves on its own: its 2^k x 2^k cells never reach into
    another block (it starts on a multiple of 2^k, and its size is one unless it ends the
    scene, where the cells are padded with nodata exactly as a whole level is)."""
    k = 0
    while k < 30:
        n = 2 ** (k + 1)
        rows = block.row % n == 0 and (
            block.height % n == 0 or block.row + block.height == grid.height
        )
        cols = block.col % n == 0 and (
            block.width % n == 0 or block.col + block.width == grid.width
        )
        if not (rows and cols):
            break
        k += 1
    return k


def _reduce(quarters: list[np.ndarray], nodata: float, resampling: str) -> np.ndarray:
    """Four (h, w) pixels of 2 x 2 cells -> (h, w): the mean of the valid ones, or the first
    valid one (in the order given)."""
    if resampling == "nearest":
        out = quarters[-1].copy()  # nodata unless an earlier pixel is valid
        for q in reversed(quarters[:-1]):
            np.copyto(out, q, where=q != nodata)
        return out
    # float32 holds a sum of four probabilities (or four bytes) well within the rtol of 1e-6
    total = np.zeros(quarters[0].shape, np.float32)
    count = np.zeros(quarters[0].shape, np.uint8)
    for q in quarters:
        valid = q != nodata
        np.add(total, q, out=total, where=valid)
        count += valid
    mean = np.divide(total, np.maximum(count, 1), out=total)
    if np.issubdtype(quarters[0].dtype, np.integer):
        mean = np.rint(mean, out=mean)
    mean[count == 0] = nodata
    return mean


def _vrt(
    grid: Grid,
    dtype: str,
    nodata: float,
    levels: list[Path],
    tags: dict[str, str],
    scale: float | None,
    description: str,
) -> str:
    """A VRT of the full-resolution staging raster whose overviews are ``levels[1:]``."""
    gdal_type = {"float32": "Float32", "uint8": "Byte"}[dtype]
    srs = f"<SRS>{escape(grid.crs.to_wkt())}</SRS>" if grid.crs is not None else ""
    geo = ", ".join(repr(float(v)) for v in grid.transform.to_gdal())
    metadata = "".join(f'<MDI key="{escape(k)}">{escape(v)}</MDI>' for k, v in tags.items())
    band_extra = f"<Description>{escape(description)}</Description>" if description else ""
    if scale is not None:
        band_extra += f"<Scale>{scale!r}</Scale><Offset>0</Offset>"
    overviews = "".join(
        f'<Overview><SourceFilename relativeToVRT="0">{escape(str(p))}</SourceFilename>'
        "<SourceBand>1</SourceBand></Overview>"
        for p in levels[1:]
    )
    return (
        f'<VRTDataset rasterXSize="{grid.width}" rasterYSize="{grid.height}">{srs}'
        f"<GeoTransform>{geo}</GeoTransform><Metadata>{metadata}</Metadata>"
        f'<VRTRasterBand dataType="{gdal_type}" band="1">{band_extra}'
        f"<NoDataValue>{nodata!r}</NoDataValue>"
        f'<SimpleSource><SourceFilename relativeToVRT="0">{escape(str(levels[0]))}'
        "</SourceFilename><SourceBand>1</SourceBand></SimpleSource>"
        f"{overviews}</VRTRasterBand></VRTDataset>\n"
    )


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
