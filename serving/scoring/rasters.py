"""The two dates of a GeoTIFF pair, on one grid, read window by window.

The before image is the reference grid (CRS, transform, shape). An after image on another grid is
warped onto it on the fly (a WarpedVRT: nothing is materialised), so every window of the pair is
read from disk as it is scored and memory does not grow with the scene. A pixel is valid when it
is valid in both dates: not nodata, not masked (internal mask or ``.msk`` sidecar, alpha), not NaN,
and (after warping) inside the after image's footprint.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from serving.errors import InvalidInput
from serving.metadata import ModelMetadata

RESAMPLING = ("nearest", "bilinear", "cubic", "average", "lanczos")
WARP_TOLERANCE_PX = 1e-9


class PairError(InvalidInput):
    """The pair cannot be scored: unreadable, not alignable, footprints apart. The pair fails
    (exit 1 / a failed manifest row); the message says why."""


class UnreadableInput(PairError):
    """A file could not be opened or read: maybe transient (network storage), so retried."""


class UsageProblem(PairError):
    """The request does not fit the pair or the model (bands, pixel type, flags): bad usage
    (exit 2 for a single pair); the message names the flag that fixes it."""


@dataclass(frozen=True)
class Grid:
    """The reference grid every output is written on."""

    crs: Any  # rasterio CRS, or None for rasters without georeferencing
    transform: Any  # affine.Affine
    height: int
    width: int

    @property
    def pixels(self) -> int:
        return self.height * self.width


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    """'3,2,1' -> (3, 2, 1): 1-based band numbers, in the model's channel order."""
    if text is None or not str(text).strip():
        return None
    try:
        bands = tuple(int(b) for b in str(text).split(","))
    except ValueError as exc:
        raise UsageProblem(f"bands {text!r}: give 1-based band numbers such as 3,2,1") from exc
    if any(b < 1 for b in bands):
        raise UsageProblem(f"bands {text!r}: band numbers start at 1")
    return bands


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class RasterPair:
    """Open with :meth:`open`; close (or use as a context manager) when done."""

    before_path: Path
    after_path: Path
    grid: Grid
    bands_before: tuple[int, ...]
    bands_after: tuple[int, ...]
    dtype: np.dtype  # the model's input type: what :meth:`read` returns
    rescale: tuple[float, float] | None
    model_range: tuple[float, float]
    warped: str | None  # why the after image was warped, or None when it shares the grid
    resampling: str
    _before: Any = field(repr=False, default=None)
    _after_src: Any = field(repr=False, default=None)
    _after: Any = field(repr=False, default=None)

    @classmethod
    def open(
        cls,
        before: Path,
        after: Path,
        meta: ModelMetadata,
        bands_before: tuple[int, ...] | None = None,
        bands_after: tuple[int, ...] | None = None,
        resampling: str = "bilinear",
        rescale: tuple[float, float] | None = None,
    ) -> RasterPair:
        if resampling not in RESAMPLING:
            raise UsageProblem(f"resampling {resampling!r}: choose one of {', '.join(RESAMPLING)}")
        if rescale is not None and not rescale[0] < rescale[1]:
            raise UsageProblem(f"rescale {rescale}: give LOW,HIGH with LOW < HIGH")
        b = _open(before, "before")
        try:
            a = _open(after, "after")
        except BaseException:
            b.close()
            raise
        try:
            pair = cls._build(b, a, meta, bands_before, bands_after, resampling, rescale)
        except BaseException:
            b.close()
            a.close()
            raise
        return pair

    @classmethod
    def _build(
        cls,
        b: Any,
        a: Any,
        meta: ModelMetadata,
        bands_before: tuple[int, ...] | None,
        bands_after: tuple[int, ...] | None,
        resampling: str,
        rescale: tuple[float, float] | None,
    ) -> RasterPair:
        bb = _choose_bands(b, bands_before, meta.channels, "before")
        ba = _choose_bands(a, bands_after, meta.channels, "after")
        dtype = np.dtype(meta.input_dtype)
        for ds, bands, role in ((b, bb, "before"), (a, ba, "after")):
            have = {np.dtype(ds.dtypes[i - 1]) for i in bands}
            if rescale is None and have != {dtype}:
                raise UsageProblem(
                    f"{role} image {ds.name} holds {'/'.join(sorted(map(str, have)))} pixels; "
                    f"model {meta.name!r} reads {dtype} ({meta.input_range[0]:g} to "
                    f"{meta.input_range[1]:g}); pass --rescale LOW,HIGH to map the raster's "
                    "values onto that range"
                )
        grid = Grid(b.crs, b.transform, b.height, b.width)
        warped = _grid_difference(b, a)
        after = a
        if warped is not None:
            if (b.crs is None) != (a.crs is None):
                raise PairError(
                    f"only one of the images is georeferenced ({b.name if b.crs else a.name}); "
                    "cannot align them"
                )
            if b.crs is None:
                raise PairError(
                    f"the images are not georeferenced and their grids differ ({warped}); "
                    "give both the same size, or georeference them"
                )
            _check_overlap(b, a)
            after = WarpedVRT(
                a,
                crs=b.crs,
                transform=b.transform,
                width=b.width,
                height=b.height,
                resampling=Resampling[resampling],
                # outside the after footprint must read as masked, whatever nodata it has (an
                # alpha band of the after's own is warped and does that; GDAL refuses a second)
                add_alpha=a.nodata is None and ColorInterp.alpha not in a.colorinterp,
                # GDAL's default approximate transformer (0.125 px) interpolates coordinates
                # along each requested row, so a pixel's value would depend on the window it
                # is read in: blocks would differ from the whole scene (up to 3 DN here). A
                # tolerance this small transforms every pixel exactly (tolerance=0 is refused)
                tolerance=WARP_TOLERANCE_PX,
            )
        return cls(
            before_path=Path(b.name),
            after_path=Path(a.name),
            grid=grid,
            bands_before=bb,
            bands_after=ba,
            dtype=dtype,
            rescale=rescale,
            model_range=tuple(meta.input_range),
            warped=warped,
            resampling=resampling,
            _before=b,
            _after_src=a,
            _after=after,
        )

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(before (h, w, C), after (h, w, C), valid (h, w) bool) of one window of the grid.

        Where only one date is valid its pixels are copied into the other, and where neither is
        they are zero in both: patches that reach into nodata then see no difference there, so
        nodata never reads as change next to valid pixels."""
        before, vb = self._read(self._before, self.bands_before, window)
        after, va = self._read(self._after, self.bands_after, window)
        valid = vb & va
        if valid.all():
            return before, after, valid
        only_b, only_a = vb & ~va, va & ~vb
        after[only_b] = before[only_b]
        before[only_a] = after[only_a]
        neither = ~(vb | va)
        before[neither] = 0
        after[neither] = 0
        return before, after, valid

    def _read(
        self, ds: Any, bands: tuple[int, ...], window: Window
    ) -> tuple[np.ndarray, np.ndarray]:
        # read straight into (h, w, C), the layout the patches are cut from: GDAL writes through
        # the transposed view's strides, so no (C, h, w) copy is made and transposed afterwards
        shape = (round(window.height), round(window.width), len(bands))
        pixels = np.empty(shape, ds.dtypes[bands[0] - 1])
        data = ds.read(list(bands), window=window, out=pixels.transpose(2, 0, 1))  # (C, h, w)
        if all(ds.mask_flag_enums[b - 1] == [MaskFlags.all_valid] for b in bands):
            valid = np.ones(data.shape[1:], bool)  # no nodata, mask or alpha: nothing to read
        else:
            valid = ds.read_masks(list(bands), window=window).min(axis=0) > 0
        if np.issubdtype(data.dtype, np.floating):
            valid &= np.isfinite(data).all(axis=0)
        if self.rescale is not None:
            lo, hi = self.rescale
            m_lo, m_hi = self.model_range
            unit = np.clip((data.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)
            scaled = np.nan_to_num(unit * (m_hi - m_lo) + m_lo)
            if np.issubdtype(self.dtype, np.integer):
                scaled = np.rint(scaled)
            data = scaled.astype(self.dtype)
        elif np.issubdtype(data.dtype, np.floating):
            data = np.nan_to_num(data, copy=False)
        # `pixels` itself unless rescaled (then one copy): transposing back is a no-op view
        return np.ascontiguousarray(data.transpose(1, 2, 0)), valid

    def describe(self) -> dict[str, Any]:
        return {
            "grid": {
                "crs": self.grid.crs.to_string() if self.grid.crs else None,
                "transform": list(self.grid.transform)[:6],
                "height": self.grid.height,
                "width": self.grid.width,
            },
            "bands_before": list(self.bands_before),
            "bands_after": list(self.bands_after),
            "warped": self.warped,
            "resampling": self.resampling if self.warped else None,
            "rescale": list(self.rescale) if self.rescale else None,
        }

    def close(self) -> None:
        for ds in (self._after, self._after_src, self._before):
            if ds is not None and not ds.closed:
                ds.close()

    def __enter__(self) -> RasterPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open(path: Path, role: str) -> Any:
    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        raise UnreadableInput(f"cannot read the {role} image {path}: {exc}") from exc


def _choose_bands(
    ds: Any, bands: tuple[int, ...] | None, channels: int, role: str
) -> tuple[int, ...]:
    if bands is None:
        # an alpha band is a mask, not a channel (the data bands carry MaskFlags.alpha; the
        # alpha band itself is known by its colour interpretation)
        interp = ds.colorinterp
        data = tuple(i for i in range(1, ds.count + 1) if interp[i - 1] != ColorInterp.alpha)
        if len(data) != channels:
            raise UsageProblem(
                f"the {role} image {ds.name} has {len(data)} bands, the model reads {channels}: "
                f"pass --bands (e.g. --bands {','.join(map(str, range(1, channels + 1)))})"
            )
        return data
    if len(bands) != channels:
        raise UsageProblem(
            f"--bands for the {role} image picks {len(bands)} bands; the model reads {channels}"
        )
    if max(bands) > ds.count:
        raise UsageProblem(f"--bands {bands}: the {role} image {ds.name} has {ds.count} bands")
    return bands


def _grid_difference(b: Any, a: Any) -> str | None:
    """Why the after image is not on the before grid, or None when it is."""
    reasons = []
    if b.crs != a.crs:
        reasons.append(f"CRS {a.crs} vs {b.crs}")
    if (a.height, a.width) != (b.height, b.width):
        reasons.append(f"shape {a.height}x{a.width} vs {b.height}x{b.width}")
    res = max(abs(b.transform.a), abs(b.transform.e), 1e-12)
    if not a.transform.almost_equals(b.transform, precision=1e-6 * res):
        reasons.append("transform differs")
    return "; ".join(reasons) or None


def _check_overlap(b: Any, a: Any) -> None:
    left, bottom, right, top = transform_bounds(a.crs, b.crs, *a.bounds, densify_pts=21)
    bl, bb, br, bt = b.bounds
    ix = min(right, br) - max(left, bl)
    iy = min(top, bt) - max(bottom, bb)
    if not (ix > 0 and iy > 0) or any(math.isnan(v) for v in (left, bottom, right, top)):
        raise PairError(
            f"the footprints do not overlap: after {a.name} covers {_fmt(left, bottom, right, top)}"
            f" and before {b.name} covers {_fmt(bl, bb, br, bt)} (in {b.crs})"
        )


def _fmt(*v: float) -> str:
    return "(" + ", ".join(f"{x:.6g}" for x in v) + ")"
