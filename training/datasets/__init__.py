"""Datasets: each one file; each yields labelled image pairs."""

# Real-data loaders (numpy, rasterio, Pillow; never torch): each returns full-scene
# ScenePair objects (ABCD: PatchPairs). Resolved lazily so that importing one dataset module
# does not import them all.
_LAZY = {
    "load_dataset": "training.datasets.registry",
    "ScenePair": "training.datasets.scenes",
    "PatchPairs": "training.datasets.scenes",
    "unchanged_patches": "training.datasets.scenes",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
