"""The model repository: every ``<models_dir>/<name>/model.onnx``, loaded, validated and batched.

``settings.backend`` picks what scores the patches: ONNX Runtime in this process (on the providers
``settings.providers`` selects), or a Triton server serving the same model under the same name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from serving.backends.onnxruntime import OnnxRuntimeBackend, read_verified_model
from serving.batcher import DynamicBatcher
from serving.config import ServerSettings
from serving.errors import ModelLoadError, ModelNotFound
from serving.metadata import ModelMetadata

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    metadata: ModelMetadata
    path: Path
    backend_name: str
    batcher: DynamicBatcher
    backends: list[Any] = field(default_factory=list)  # closed when the repository stops


def load_backends(path: Path, settings: ServerSettings) -> list[Any]:
    """One backend per model instance (each its own session or channel), as settings say."""
    make: Callable[[], Any]
    if settings.backend == "triton":
        from serving.backends.triton import TritonBackend  # tritonclient is an optional extra

        make = partial(TritonBackend, path, url=settings.triton_url)
    else:
        make = partial(
            OnnxRuntimeBackend,
            path,
            intra_op_threads=settings.intra_op_threads,
            providers=settings.providers,
            max_batch_size=settings.max_batch_size,
        )
    backends: list[Any] = []
    try:
        for _ in range(settings.instances):
            backends.append(make())
    except BaseException:
        for backend in backends:
            backend.close()
        raise
    return backends


class ModelRepository:
    def __init__(self, models: dict[str, ServedModel], default: str) -> None:
        if default not in models:
            raise ModelNotFound(f"default model {default!r} is not among {sorted(models)}")
        self.models = models
        self.default = default

    @classmethod
    def load(cls, settings: ServerSettings, only: str = "") -> ModelRepository:
        """Load every model or none: a bad model stops start-up with a message naming it.

        ``only``: load just the model of that name (a batch run scores with one model; each
        other model would hold a session, its arena and a batcher thread for nothing)."""
        root = settings.models_dir
        paths = sorted(root.glob("*/model.onnx")) if root.is_dir() else []
        if not paths:
            raise ModelLoadError(
                f"no models in {root} (expected {root}/<name>/model.onnx); "
                "export one with `rarechange export` or set RARECHANGE_MODELS_DIR"
            )
        if only:
            paths = _paths_named(only, paths)
        models: dict[str, ServedModel] = {}
        for path in paths:
            backends = load_backends(path, settings)
            meta = backends[0].metadata
            if meta.name in models:
                raise ModelLoadError(
                    f"two models are named {meta.name!r}: {models[meta.name].path} and {path}"
                )
            batcher = DynamicBatcher(
                [b.infer for b in backends],
                max_batch_size=settings.max_batch_size,
                max_queue_delay_us=settings.max_queue_delay_us,
                max_queue_size=max(settings.max_queue_size, settings.max_batch_size),
                name=meta.name,
            )
            models[meta.name] = ServedModel(meta, path, backends[0].name, batcher, backends)
            log.info("loaded model %s %s from %s", meta.name, meta.version, path)
        default = only or settings.default_model or sorted(models)[0]
        return cls(models, default)

    def get(self, name: str = "", version: str = "") -> ServedModel:
        model = self.models.get(name or self.default)
        if model is None:
            raise ModelNotFound(f"no model named {name!r}; this server has {sorted(self.models)}")
        if version and version != model.metadata.version:
            raise ModelNotFound(
                f"model {model.metadata.name!r} is served at version {model.metadata.version!r}, "
                f"not {version!r}"
            )
        return model

    def start(self) -> ModelRepository:
        for m in self.models.values():
            m.batcher.start()
        return self

    def stop(self) -> None:
        for m in self.models.values():
            m.batcher.stop()
            for backend in m.backends:
                backend.close()


def _paths_named(name: str, paths: list[Path]) -> list[Path]:
    """The model files of the model called ``name``: its folder's, when the folder has the name
    (as export writes it), else any whose metadata says so (read without a session)."""
    by_folder = [p for p in paths if p.parent.name == name]
    if by_folder:
        return by_folder
    named = []
    for path in paths:
        try:
            _, meta = read_verified_model(path)
        except ModelLoadError:
            continue  # a damaged model that is not the one asked for stops nothing here
        if meta.name == name:
            named.append(path)
    if not named:
        have = sorted(p.parent.name for p in paths)
        raise ModelNotFound(f"no model named {name!r}; {paths[0].parent.parent} has {have}")
    return named
