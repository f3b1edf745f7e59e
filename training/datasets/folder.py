"""A generic folder of pairs, LEVIR-CD style: ``A/`` before, ``B/`` after, ``label/`` masks.

Files are matched by stem (``A/0001.jpg``, ``B/0001.jpg``, ``label/0001.png``); images may be
PNG, JPEG, BMP or TIFF (TIFF keeps every band, its dtype and its georeferencing), masks 0/1 or
0/255 (white = change; anti-aliased edges are thresholded at half range). A file without its
counterparts, or a pair whose sizes differ, is an error naming the files: silently skipping
would shrink the dataset, and cropping would misalign labels.

LEVIR-CD ships ``train/``, ``val/``, ``test/`` each in this layout: pass one of them.
"""

from __future__ import annotations

from pathlib import Path

from training.datasets.scenes import DatasetNotFound, ScenePair, pair_files, scene_from_files

__all__ = ["load_folder"]


def load_folder(
    path: Path | str, before: str = "A", after: str = "B", label: str = "label"
) -> list[ScenePair]:
    """Every pair in ``path/{before,after,label}``, named by file stem, in natural order."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetNotFound(f"folder: {path} is not a folder")
    roles = {"before": path / before, "after": path / after, "label": path / label}
    absent = [str(f) for f in roles.values() if not f.is_dir()]
    if absent:
        splits = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / before).is_dir())
        hint = f"; its {', '.join(splits)} folders have that layout: pass one" if splits else ""
        need = f"{before}/, {after}/ and {label}/"
        raise DatasetNotFound(f"folder: {path} needs {need}; missing {', '.join(absent)}{hint}")
    return [
        scene_from_files(stem, f["before"], f["after"], f["label"]) for stem, f in pair_files(roles)
    ]
