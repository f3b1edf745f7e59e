"""ABCD (AIST Building Change Detection): pre/post-tsunami aerial patch pairs, one label each.

Layout, as unzipped (Fujita et al., MVA 2017)::

    ABCDdataset/{fixed-scale,resized}/patch-pairs/patch-pair_<n>.tif
    ABCDdataset/{fixed-scale,resized}/5fold-list/cv{1..5}-{train,test}.csv

Each .tif is a 6-band GeoTIFF, bands 1-3 the pre-tsunami RGB patch and 4-6 the post-tsunami one,
160x160 (fixed-scale, 40 cm/px) or 128x128 (resized: three times the target building, then
resized). CSV rows are ``filename,label`` without a header, 1 = washed-away (changed), 0 =
surviving: the label is about the building at the centre, so there is no pixel mask and pairs
come as :class:`PatchPairs`. Each fold's train and test lists together are the whole set.

The set cannot be downloaded on our machines, so this reads the format the authors describe;
the tests write small files in it. Non-commercial licence.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import rasterio

from training.datasets.scenes import (
    RGB,
    DatasetError,
    DatasetNotFound,
    PatchPairs,
    natural_key,
    open_raster,
)

__all__ = ["FOLDS", "SPLITS", "VARIANTS", "abcd_folder", "load_abcd", "read_fold_list"]

Variant = Literal["fixed-scale", "resized"]
Split = Literal["train", "test", "all"]
VARIANTS: tuple[str, ...] = get_args(Variant)
SPLITS: tuple[str, ...] = get_args(Split)
FOLDS = (1, 2, 3, 4, 5)
PAIRS_DIR = "patch-pairs"
LISTS_DIR = "5fold-list"


def abcd_folder(path: Path | str, variant: Variant = "fixed-scale") -> Path:
    """The variant folder (holding patch-pairs/ and 5fold-list/): ``path`` itself, or
    ``path/<variant>``, or ``path/ABCDdataset/<variant>``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    path = Path(path)
    candidates = [path, path / variant, path / "ABCDdataset" / variant]
    for folder in candidates:
        if (folder / PAIRS_DIR).is_dir() and (folder / LISTS_DIR).is_dir():
            return folder
    raise DatasetNotFound(
        f"abcd: no {PAIRS_DIR}/ and {LISTS_DIR}/ in {', '.join(str(c) for c in candidates)}; "
        "pass the ABCDdataset folder or one of its fixed-scale/ or resized/ folders"
    )


def read_fold_list(folder: Path, fold: int, split: Split) -> list[tuple[str, int]]:
    """(file name, label) rows of ``cv<fold>-<split>.csv``; ``all`` is train then test."""
    if fold not in FOLDS:
        raise ValueError(f"fold must be one of {FOLDS}, not {fold!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if split == "all":
        train, test = read_fold_list(folder, fold, "train"), read_fold_list(folder, fold, "test")
        both = {n for n, _ in train} & {n for n, _ in test}
        if both:
            raise DatasetError(f"abcd: cv{fold} lists {sorted(both)[:5]} in both train and test")
        return train + test
    path = Path(folder) / LISTS_DIR / f"cv{fold}-{split}.csv"
    if not path.is_file():
        raise DatasetNotFound(f"abcd: {path} does not exist")
    rows = []
    with path.open(newline="") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip():
                continue
            if line_no == 1 and [c.strip().lower() for c in row] == ["filename", "label"]:
                continue  # tolerate a header line
            if len(row) != 2 or row[1].strip() not in ("0", "1"):
                raise DatasetError(f"{path}:{line_no}: expected 'filename,label' (0/1), got {row}")
            rows.append((row[0].strip(), int(row[1])))
    names = [n for n, _ in rows]
    if len(set(names)) != len(names):
        raise DatasetError(f"{path}: a file is listed twice")
    return rows


def load_abcd(
    path: Path | str,
    fold: int = 1,
    split: Split = "all",
    variant: Variant = "fixed-scale",
) -> PatchPairs:
    """The patch pairs of one fold's split (``all``: the whole set, in file-number order),
    before and after as (N, 3, P, P) in the files' dtype, label 1 = washed-away.

    Everything listed is read into memory: the whole fixed-scale set (8,506 pairs of 6 x 160 x
    160 bytes) is about 1.3 GB, so prefer one split when that matters."""
    folder = abcd_folder(path, variant)
    rows = read_fold_list(folder, fold, split)
    if split == "all":
        rows.sort(key=lambda r: natural_key(r[0]))
    if not rows:
        raise DatasetError(f"abcd: cv{fold}-{split} lists no files")
    missing = [n for n, _ in rows if not (folder / PAIRS_DIR / n).is_file()]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DatasetError(
            f"abcd: {folder / PAIRS_DIR} lacks files listed in cv{fold}-{split}: "
            f"{', '.join(missing[:5])}{more}"
        )
    before, after = [], []
    for name, _ in rows:
        chw = _read_pair(folder / PAIRS_DIR / name)  # (6, P, P)
        if before and (chw.shape[1:] != before[0].shape[1:] or chw.dtype != before[0].dtype):
            raise DatasetError(
                f"abcd: {name} is {chw.shape[1:]} {chw.dtype}, {rows[0][0]} is "
                f"{before[0].shape[1:]} {before[0].dtype}; one variant's patches share a size"
            )
        before.append(chw[:3])
        after.append(chw[3:])
    return PatchPairs(
        np.stack(before),  # (N, 3, P, P)
        np.stack(after),  # (N, 3, P, P)
        np.array([label for _, label in rows], dtype=np.int64),
        tuple(n for n, _ in rows),
        RGB,
    )


def _read_pair(path: Path) -> np.ndarray:
    """All six bands as (6, P, P), whatever colour interpretation the file declares."""
    try:
        with open_raster(path) as ds:
            if ds.count != 6:
                raise DatasetError(f"abcd: {path.name} has {ds.count} bands, expected 6")
            return ds.read()
    except rasterio.errors.RasterioError as exc:
        raise DatasetError(f"abcd: cannot read {path} ({exc})") from exc
