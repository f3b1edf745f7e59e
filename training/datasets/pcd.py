"""PCD (panoramic change detection, Sakurada and Okatani, BMVC 2015): street-view panoramas.

Two subsets, TSUNAMI and GSV (Google Street View), 100 pairs each of 1024x224 panoramas::

    <subset>/t0/<id>.jpg   before
    <subset>/t1/<id>.jpg   after
    <subset>/mask/<id>.png change mask

Files are matched by stem, whatever their extension.

**Mask polarity.** The raw panorama masks are drawn black on white: a changed pixel is black
(0), an unchanged one white (255). That is the reverse of every other set here, and public
loaders differ by release: C-3PO's ``PCD_Raw`` (raw 224x1024 panoramas) inverts the masks
("object: black(0) -> white(255)"), while its ``PCD_CV`` (the 256x256 crops used for five-fold
cross-validation) reads white as change. So the polarity is an argument, ``change_is``,
defaulting to ``"black"`` for the raw panoramas this module reads; pass ``"white"`` for the
cropped release. We have no real PCD files to check against: look at one mask beside its
images before training on a new copy.

Cite Sakurada and Okatani, BMVC 2015, and follow the release's terms of use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from training.datasets.scenes import DatasetNotFound, ScenePair, pair_files, scene_from_files

__all__ = ["CHANGE_IS", "FOLDERS", "SUBSETS", "load_pcd"]

ChangeIs = Literal["black", "white"]
CHANGE_IS: tuple[str, ...] = get_args(ChangeIs)
SUBSETS: tuple[str, ...] = ("TSUNAMI", "GSV")
FOLDERS = ("t0", "t1", "mask")  # before, after, mask


def load_pcd(path: Path | str, change_is: ChangeIs = "black") -> list[ScenePair]:
    """Every pair of a subset folder (holding t0/, t1/, mask/), or of each subset under
    ``path`` (TSUNAMI/, GSV/), named ``<subset>/<id>``, as (H, W, 3) uint8 scenes."""
    if change_is not in CHANGE_IS:
        raise ValueError(f"change_is must be one of {CHANGE_IS}, not {change_is!r}")
    path = Path(path)
    subsets = [path] if _is_subset(path) else [path / s for s in SUBSETS if _is_subset(path / s)]
    if not subsets:
        raise DatasetNotFound(
            f"pcd: {path} holds neither {'/, '.join(FOLDERS)}/ nor subset folders "
            f"{', '.join(SUBSETS)} holding them"
        )
    scenes = []
    for subset in subsets:
        for stem, files in pair_files({role: subset / role for role in FOLDERS}):
            scenes.append(
                scene_from_files(
                    f"{subset.name}/{stem}",
                    files["t0"],
                    files["t1"],
                    files["mask"],
                    changed_is_low=change_is == "black",
                )
            )
    return scenes


def _is_subset(folder: Path) -> bool:
    return all((folder / f).is_dir() for f in FOLDERS)
