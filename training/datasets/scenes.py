"""Full-scene change-detection pairs, the one shape every real-data loader returns.

A :class:`ScenePair` is a co-registered before/after pair of (H, W, C) arrays in their native
dtype (uint8 photos, uint16 Sentinel-2 reflectance) with an (H, W) uint8 0/1 change mask. Pixels
are never rescaled here: models record how to scale their input in their metadata, so a loader
that divided by 255 or 10000 would silently disagree with the served model.

Patch-level datasets (ABCD) have no mask, only one label per pair: :class:`PatchPairs`.

Also the small file readers the loaders share (:func:`read_raster`, :func:`read_mask`), so that
every dataset decodes PNG/JPEG/TIFF and binarises masks the same way. numpy, rasterio and Pillow
only: these loaders also run in the torch-free evaluation command.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.crs import CRS
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine

from serving.errors import RareChangeError
from training.data import PatchSet, extract_patches

__all__ = [
    "IMAGE_SUFFIXES",
    "RGB",
    "DatasetError",
    "DatasetNotFound",
    "PatchPairs",
    "Raster",
    "ScenePair",
    "binarize_mask",
    "check_same_size",
    "data_root",
    "matching_files",
    "natural_key",
    "open_raster",
    "pair_files",
    "read_mask",
    "read_raster",
    "unchanged_patches",
]

RGB: tuple[str, str, str] = ("red", "green", "blue")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_TIFF_SUFFIXES = (".tif", ".tiff")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class DatasetNotFound(RareChangeError, FileNotFoundError):
    """A dataset folder is not where we looked."""


class DatasetError(RareChangeError, ValueError):
    """The files are there but do not form a valid dataset (missing counterparts, sizes)."""


# ------------------------------------------------------------------------------------ containers


@dataclass(frozen=True, eq=False)
class ScenePair:
    """One co-registered full-scene pair and its change mask.

    ``crs`` and ``transform`` locate the (common) pixel grid for GeoTIFF sources, else None.
    ``meta`` holds source facts worth keeping (acquisition dates, how a raster was resampled).
    """

    name: str
    before: np.ndarray  # (H, W, C), native dtype
    after: np.ndarray  # (H, W, C), same dtype
    mask: np.ndarray  # (H, W) uint8: 1 changed, 0 unchanged
    bands: tuple[str, ...]
    crs: CRS | None = None
    transform: Affine | None = None
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        b, a, m = self.before, self.after, self.mask
        if b.ndim != 3 or a.shape != b.shape:
            raise ValueError(f"{self.name}: before {b.shape} and after {a.shape} must be (H, W, C)")
        if a.dtype != b.dtype:
            raise ValueError(f"{self.name}: before is {b.dtype}, after is {a.dtype}")
        if m.shape != b.shape[:2] or m.dtype != np.uint8:
            raise ValueError(f"{self.name}: mask {m.shape} {m.dtype} must be {b.shape[:2]} uint8")
        if m.size and m.max() > 1:
            raise ValueError(f"{self.name}: mask must hold 0/1, found {m.max()}")
        if len(self.bands) != b.shape[2]:
            raise ValueError(f"{self.name}: {len(self.bands)} band names for {b.shape[2]} bands")

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape  # type: ignore[return-value]

    @property
    def changed_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def patches(self, patch: int, stride: int, positive_fraction: float) -> PatchSet:
        """Training patches on a grid: negatives (no changed pixel) and positives (changed
        fraction >= ``positive_fraction``), in grid order. Ambiguous patches in between are left
        out, as :meth:`PatchSet.split` does, so the classifier learns a clean boundary."""
        if not 0 < positive_fraction <= 1:
            raise ValueError(f"positive_fraction must be in (0, 1], got {positive_fraction}")
        every = self.all_patches(patch, stride)
        frac = every.changed_fraction
        return every.select(np.flatnonzero((frac == 0) | (frac >= positive_fraction)))

    def all_patches(self, patch: int, stride: int) -> PatchSet:
        """Every patch on the grid, ambiguous ones included (for evaluation)."""
        _check_grid(patch, stride)
        h, w = self.shape
        if patch > h or patch > w:
            raise ValueError(f"{self.name}: patch {patch} does not fit in a {h}x{w} scene")
        return extract_patches(self.before, self.after, self.mask, patch, stride)


@dataclass(frozen=True, eq=False)
class PatchPairs:
    """Patch pairs with one label each (datasets labelled per pair, not per pixel, e.g. ABCD)."""

    before: np.ndarray  # (N, C, P, P), native dtype, as in PatchSet
    after: np.ndarray  # (N, C, P, P)
    label: np.ndarray  # (N,) int64: 1 changed, 0 unchanged
    names: tuple[str, ...]  # (N,) source file of each pair
    bands: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.label)
        if self.before.shape != self.after.shape or self.before.ndim != 4:
            raise ValueError(
                f"before {self.before.shape}, after {self.after.shape}: need (N,C,P,P)"
            )
        if len(self.before) != n or len(self.names) != n:
            raise ValueError(f"{len(self.before)} pairs, {n} labels, {len(self.names)} names")
        if len(self.bands) != self.before.shape[1]:
            raise ValueError(f"{len(self.bands)} band names for {self.before.shape[1]} bands")

    def __len__(self) -> int:
        return len(self.label)

    def to_patchset(self) -> PatchSet:
        """As a PatchSet whose changed fraction is the label (0 or 1): any threshold agrees."""
        return PatchSet(self.before, self.after, self.label.astype(np.float32))


def unchanged_patches(scenes: ScenePair | Iterable[ScenePair], patch: int, stride: int) -> PatchSet:
    """Patches with no changed pixel from one or more scenes: the negatives for pre-training,
    where the model must learn which differences (season, light, registration) are trivial."""
    scenes = [scenes] if isinstance(scenes, ScenePair) else list(scenes)
    if not scenes:
        raise ValueError("no scenes given")
    sets = []
    for scene in scenes:
        every = scene.all_patches(patch, stride)
        sets.append(every.select(np.flatnonzero(every.changed_fraction == 0)))
    return PatchSet.concat(sets)


def _check_grid(patch: int, stride: int) -> None:
    if patch < 1 or stride < 1:
        raise ValueError(f"patch and stride must be >= 1, got {patch} and {stride}")


# ---------------------------------------------------------------------------------------- files


def data_root(
    root: Path | str | None, folder: str, looks_right: Callable[[Path], bool], expect: str
) -> Path:
    """Where dataset ``folder`` lives: ``root`` itself when ``looks_right`` says so, else
    ``root/folder``; with no ``root``, ``<shared data>/folder`` ($RARECHANGE_DATA, else
    ../shared/data). So callers can pass either the dataset folder or the data folder."""
    if root is None:
        from serving.config import shared_data_dir

        shared = shared_data_dir()
        if shared is None:
            raise DatasetNotFound(
                f"{folder}: no data folder ($RARECHANGE_DATA is unset or not a folder, and "
                "../shared/data beside the checkout does not exist); set RARECHANGE_DATA or "
                "pass the dataset's path"
            )
        root = shared
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFound(f"{folder}: {root} is not a folder")
    for candidate in (root, root / folder):
        if candidate.is_dir() and looks_right(candidate):
            return candidate
    raise DatasetNotFound(
        f"{folder}: neither {root} nor {root / folder} holds {expect}; pass the dataset folder"
    )


@dataclass(frozen=True, eq=False)
class Raster:
    """An image read from disk: (H, W, C) pixels and, for GeoTIFFs, where they lie."""

    array: np.ndarray  # (H, W, C)
    bands: tuple[str, ...]
    crs: CRS | None = None
    transform: Affine | None = None


def read_raster(path: Path) -> Raster:
    """(H, W, C) pixels of a PNG, JPEG, BMP or TIFF in their native dtype, alpha dropped.

    TIFF (and 16-bit colour PNG, which Pillow would cut to 8 bits) through GDAL, keeping every
    band, the CRS and the transform; the rest through Pillow, palettes expanded to RGB."""
    path = Path(path)
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES or _is_16bit_colour_png(path):
            return _read_gdal(path)
        return _read_pillow(path)
    except FileNotFoundError:
        raise
    except (OSError, rasterio.errors.RasterioError) as exc:  # corrupt, truncated, not an image
        raise DatasetError(f"{path}: cannot read the image ({exc})") from exc


def _is_16bit_colour_png(path: Path) -> bool:
    if path.suffix.lower() != ".png":
        return False
    with path.open("rb") as f:
        head = f.read(26)
    ihdr = len(head) == 26 and head.startswith(_PNG_MAGIC) and head[12:16] == b"IHDR"
    return ihdr and head[24] == 16 and head[25] in (2, 6)  # 16-bit RGB or RGBA


def open_raster(path: Path) -> rasterio.io.DatasetReader:
    """Open with rasterio; plain (non-geo) images are fine here: no NotGeoreferencedWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path)


def _read_gdal(path: Path) -> Raster:
    with open_raster(path) as ds:
        keep = [i + 1 for i, ci in enumerate(ds.colorinterp) if ci != ColorInterp.alpha]
        if len(keep) == 1 and ds.colorinterp[keep[0] - 1] == ColorInterp.palette:
            raise DatasetError(f"{path}: palette TIFF images are not supported; write RGB")
        pixels = np.ascontiguousarray(np.moveaxis(ds.read(indexes=keep), 0, -1))  # (H, W, C)
        names = tuple(_band_name(ds, i, len(keep)) for i in keep)
        if ds.crs is None:
            return Raster(pixels, names)
        return Raster(pixels, names, ds.crs, ds.transform)


def _band_name(ds: rasterio.io.DatasetReader, index: int, count: int) -> str:
    if ds.descriptions[index - 1]:
        return str(ds.descriptions[index - 1])
    interp = ds.colorinterp[index - 1]
    if interp in (ColorInterp.red, ColorInterp.green, ColorInterp.blue):
        return interp.name
    if count == 1:
        return "grey"
    if count == 3:
        return RGB[index - 1]
    return f"band{index}"


def _read_pillow(path: Path) -> Raster:
    with Image.open(path) as im:
        mode = im.mode
        if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
            return Raster(np.array(im).astype(np.uint16)[..., None], ("grey",))
        if mode in ("1", "L", "LA", "La"):
            return Raster(np.array(im.convert("L"))[..., None], ("grey",))
        if mode in ("P", "PA"):
            im.info.pop("transparency", None)  # alpha is dropped anyway; no RGBA warning
        if mode not in ("P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"):
            raise DatasetError(f"{path}: pixel mode {mode} is not supported; write grey or RGB")
        return Raster(np.array(im.convert("RGB")), RGB)


def read_mask(path: Path) -> np.ndarray:
    """The raw (H, W) values of a mask file, before binarising.

    Palette images give their indices (the class, whatever colour it is drawn in); colour images
    give the maximum over channels, so a mark in any colour counts."""
    path = Path(path)
    if path.suffix.lower() in _TIFF_SUFFIXES:
        try:
            with open_raster(path) as ds:
                return ds.read(1)
        except rasterio.errors.RasterioError as exc:
            raise DatasetError(f"{path}: cannot read the mask ({exc})") from exc
    try:
        with Image.open(path) as im:
            if im.mode in ("P", "L", "1", "I;16", "I;16L", "I;16B", "I;16N", "I"):
                values = np.array(im)
            else:
                values = np.array(im.convert("RGB")).max(axis=2)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the mask ({exc})") from exc
    if values.dtype == bool:
        values = values.astype(np.uint8)
    elif values.dtype == np.int32 and values.size and values.min() >= 0 and values.max() <= 65535:
        values = values.astype(np.uint16)  # 16-bit grey that Pillow holds as mode "I"
    return values


def binarize_mask(values: np.ndarray, name: str, changed_is_low: bool = False) -> np.ndarray:
    """(H, W) uint8 0/1 change mask from raw mask values.

    0/1 masks are taken as they are; anything else (0/255, anti-aliased or JPEG-noisy edges)
    is thresholded at half the dtype's range. ``changed_is_low`` inverts the polarity, for masks
    drawn black-on-white (PCD)."""
    values = np.asarray(values)
    if values.ndim != 2:
        raise DatasetError(f"{name}: a mask must be one band, got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.integer):
        raise DatasetError(f"{name}: mask dtype {values.dtype} is not an integer type")
    if values.size and values.min() < 0:
        raise DatasetError(f"{name}: mask holds negative values")
    if values.size == 0 or values.max() <= 1:
        high = values.astype(bool)
    else:
        high = values >= (int(np.iinfo(values.dtype).max) + 1) // 2
    return (~high if changed_is_low else high).astype(np.uint8)


def matching_files(folder: Path) -> dict[str, Path]:
    """Image files of ``folder`` by file stem (``0001.jpg`` and ``0001.png`` match as ``0001``);
    two images with one stem is an error, as we could not tell which one is meant."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in found:
            raise DatasetError(f"{folder}: both {found[path.stem].name} and {path.name}")
        found[path.stem] = path
    return found


def pair_files(folders: dict[str, Path]) -> list[tuple[str, dict[str, Path]]]:
    """Match image files across role folders (e.g. before/after/mask) by stem, sorted by stem;
    a file without a counterpart in every folder is an error that names the first few."""
    listed = {role: matching_files(folder) for role, folder in folders.items()}
    stems = set().union(*listed.values())
    problems = []
    for role, files in listed.items():
        missing = sorted(stems - files.keys())
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            shown = ", ".join(missing[:5]) + more
            problems.append(f"{folders[role]} has no file for {shown}")
    if problems:
        raise DatasetError("missing counterpart files: " + "; ".join(problems))
    if not stems:
        raise DatasetError(f"no image files in {', '.join(str(f) for f in folders.values())}")
    return [
        (s, {role: listed[role][s] for role in folders}) for s in sorted(stems, key=natural_key)
    ]


def natural_key(stem: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key putting numbers in numeric order ("train_2" before "train_10")."""
    parts = re.split(r"(\d+)", stem)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts if p)


def check_same_size(name: str, **arrays: np.ndarray) -> None:
    """Refuse a pair whose images and mask are not the same height and width."""
    sizes = {k: v.shape[:2] for k, v in arrays.items()}
    if len(set(sizes.values())) > 1:
        described = ", ".join(f"{k} {h}x{w}" for k, (h, w) in sizes.items())
        raise DatasetError(
            f"{name}: sizes differ ({described}, as HxW); register and crop the pair first"
        )


def scene_from_files(
    name: str, before: Path, after: Path, mask: Path, *, changed_is_low: bool = False
) -> ScenePair:
    """A ScenePair from three image files, refusing pairs that cannot be compared pixel by pixel
    (sizes, band counts, bit depths or georeferenced grids that differ)."""
    b, a = read_raster(before), read_raster(after)
    raw = read_mask(mask)
    check_same_size(name, before=b.array, after=a.array, mask=raw)
    if b.array.shape[2] != a.array.shape[2] or b.array.dtype != a.array.dtype:
        raise DatasetError(
            f"{name}: before is {b.array.shape[2]} bands of {b.array.dtype}, after "
            f"{a.array.shape[2]} of {a.array.dtype}; write both with the same bands and depth"
        )
    if (b.transform is not None and a.transform is not None) and (
        b.crs != a.crs or not b.transform.almost_equals(a.transform)
    ):
        raise DatasetError(f"{name}: before and after are not on the same grid; resample")
    return ScenePair(
        name,
        b.array,
        a.array,
        binarize_mask(raw, name, changed_is_low),
        b.bands,
        b.crs,
        b.transform,
    )
