"""``load_dataset("KIND:PATH")``: one string names a real dataset, for configs and the CLI.

KIND is one of :data:`KINDS`. PATH may be left out for ``sztaki`` and ``oscd``, meaning the
shared data folder ($RARECHANGE_DATA, else ../shared/data); the others need it. Keyword options
go to the loader (``cities=`` for oscd, ``fold=``/``split=``/``variant=`` for abcd,
``change_is=`` for pcd, ``before=``/``after=``/``label=`` for folder).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.datasets.scenes import DatasetNotFound, PatchPairs, ScenePair

__all__ = ["KINDS", "load_dataset", "parse_spec"]

KINDS: tuple[str, ...] = ("sztaki", "oscd", "abcd", "pcd", "folder")
_PATH_OPTIONAL = ("sztaki", "oscd")


def parse_spec(spec: str) -> tuple[str, Path | None]:
    """``"KIND:PATH"`` or ``"KIND"`` -> (kind, path or None); the path may itself hold colons."""
    kind, _, path = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise ValueError(
            f"unknown dataset kind {kind!r} in {spec!r}; use one of {', '.join(KINDS)}"
        )
    if not path.strip():
        if kind not in _PATH_OPTIONAL:
            raise ValueError(f"{kind} needs a path: {kind}:PATH (only sztaki and oscd default)")
        return kind, None
    return kind, Path(path.strip()).expanduser()


def load_dataset(spec: str, **options: Any) -> list[ScenePair] | PatchPairs:
    """The scenes of the dataset ``spec`` names (for abcd: its patch pairs)."""
    kind, path = parse_spec(spec)
    if path is not None and not path.exists():
        raise DatasetNotFound(f"{spec}: {path} does not exist")
    return _loader(kind)(path, **options)


def _loader(kind: str) -> Callable[..., list[ScenePair] | PatchPairs]:
    """Imported on demand, so naming one dataset never needs another's dependencies."""
    match kind:
        case "sztaki":
            from training.datasets.sztaki import load_sztaki

            return load_sztaki
        case "oscd":
            from training.datasets.oscd import load_oscd

            return load_oscd
        case "abcd":
            from training.datasets.abcd import load_abcd

            return load_abcd
        case "pcd":
            from training.datasets.pcd import load_pcd

            return load_pcd
        case _:
            from training.datasets.folder import load_folder

            return load_folder
