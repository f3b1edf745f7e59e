"""SZTAKI AirChange benchmark: aerial RGB pairs, 1.5 m/px, 5 to 23 years apart.

Layout: ``<sztaki>/{Szada,Tiszadob}/<n>/im1.png`` (before), ``im2.png`` (after), ``gt.png``
(hand-drawn mask of relevant changes, 0/255). Seasonal and illumination differences are not
changes: exactly the trivial differences the model must learn to ignore.

Measured on the shared copy (8 pairs: Szada 1-5, Tiszadob 1-3): every im1, im2 and gt is
952x640 (W x H), images RGB uint8, gt grey with only 0 and 255; changed fraction 0.2 %
(Tiszadob/1) to 14.5 % (Tiszadob/3). A gt whose size differs from the images is refused
(:class:`DatasetError`), never resized: a stretched hand-drawn mask would mislabel the edges of
every change, and cropping would drop labelled area silently.

Licence: free for scientific use; cite Benedek and Sziranyi, IEEE TGRS 47(10) 2009 and ICPR 2008.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.datasets.scenes import (
    RGB,
    DatasetError,
    DatasetNotFound,
    ScenePair,
    binarize_mask,
    check_same_size,
    data_root,
    natural_key,
    read_mask,
    read_raster,
)

__all__ = ["FILES", "SITES", "list_sztaki", "load_sztaki", "read_sztaki_pair"]

SITES: tuple[str, ...] = ("Szada", "Tiszadob")
FILES = ("im1.png", "im2.png", "gt.png")  # before, after, mask


def list_sztaki(root: Path | str | None = None) -> list[Path]:
    """The pair folders (``<site>/<n>``, holding the three files), Szada first, numbered order."""
    folder = _sztaki_dir(root)
    pairs = []
    for site in SITES:
        if (folder / site).is_dir():
            numbered = [p for p in (folder / site).iterdir() if p.is_dir()]
            pairs += sorted(numbered, key=lambda p: natural_key(p.name))
    return pairs


def load_sztaki(
    root: Path | str | None = None, names: Sequence[str] | None = None
) -> list[ScenePair]:
    """All pairs (or those ``names``, e.g. ``["Szada/1"]``) as (640, 952, 3) uint8 scenes.

    ``root`` is the sztaki folder or the data folder holding it; default: the shared data."""
    folders = list_sztaki(root)
    if names is not None:
        by_name = {_name(f): f for f in folders}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise DatasetNotFound(
                f"sztaki: no pair {', '.join(unknown)}; have {', '.join(by_name)}"
            )
        folders = [by_name[n] for n in names]
    if not folders:
        raise DatasetNotFound(f"sztaki: no pair folders under {_sztaki_dir(root)}")
    return [read_sztaki_pair(f) for f in folders]


def read_sztaki_pair(folder: Path) -> ScenePair:
    """One pair folder: im1.png before, im2.png after, gt.png 0/255 mask."""
    folder = Path(folder)
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise DatasetError(f"{folder}: missing {', '.join(missing)} (need {', '.join(FILES)})")
    name = _name(folder)
    before = read_raster(folder / FILES[0]).array
    after = read_raster(folder / FILES[1]).array
    raw = read_mask(folder / FILES[2])
    check_same_size(name, im1=before, im2=after, gt=raw)
    if before.shape[2] != 3 or after.shape[2] != 3:
        raise DatasetError(f"{name}: expected RGB images, got {before.shape} and {after.shape}")
    values = np.unique(raw)
    if not set(values.tolist()) <= {0, 255}:
        raise DatasetError(f"{name}: gt.png should hold 0 and 255 only, found {values[:10]}")
    return ScenePair(name, before, after, binarize_mask(raw, name), RGB)


def _sztaki_dir(root: Path | str | None) -> Path:
    return data_root(
        root, "sztaki", lambda p: any((p / s).is_dir() for s in SITES), "Szada/ or Tiszadob/"
    )


def _name(folder: Path) -> str:
    return f"{folder.parent.name}/{folder.name}"
