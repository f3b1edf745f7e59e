"""TensorRT FP16 engines for an exported model, through ONNX Runtime's TensorRT execution provider.

The engine is built once per batch-size profile and kept in an engine cache beside the model, so
that a server started with the same cache directory loads it instead of rebuilding (minutes). It
needs an NVIDIA GPU, TensorRT and onnxruntime-gpu; without them ``TensorRTUnavailable`` says which
part is missing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from serving.metadata import INPUT_NAMES, OUTPUT_NAME, ModelMetadata

log = logging.getLogger(__name__)

PROVIDER = "TensorrtExecutionProvider"
DEFAULT_BATCH_SIZES = (1, 16, 64)  # serving's DynamicBatcher fills up to max_batch_size (64)


class TensorRTUnavailable(RuntimeError):
    """No usable TensorRT here; the message names the missing part."""


@dataclass(frozen=True)
class EngineBuild:
    cache_dir: Path
    batch_sizes: tuple[int, ...]
    seconds: float
    max_abs_diff_vs_cpu: float


def require_tensorrt() -> None:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if PROVIDER not in available:
        raise TensorRTUnavailable(
            f"ONNX Runtime {ort.__version__} here has no {PROVIDER} (providers: {available}); "
            "TensorRT needs an NVIDIA GPU, the TensorRT libraries and "
            "pip install 'rarechange[gpu]' (onnxruntime-gpu)"
        )


def provider_options(
    cache_dir: Path, metadata: ModelMetadata, batch_sizes: tuple[int, ...], fp16: bool = True
) -> dict[str, str]:
    """One optimisation profile spanning the batch sizes serving sends, engines cached on disk."""
    shape = f"{metadata.channels}x{metadata.patch_size}x{metadata.patch_size}"

    def profile(n: int) -> str:
        return ",".join(f"{name}:{n}x{shape}" for name in INPUT_NAMES)

    return {
        "trt_fp16_enable": "True" if fp16 else "False",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache_dir),
        "trt_profile_min_shapes": profile(min(batch_sizes)),
        "trt_profile_opt_shapes": profile(max(batch_sizes)),
        "trt_profile_max_shapes": profile(max(batch_sizes)),
    }


def build_engine(
    model_path: Path,
    cache_dir: Path | None = None,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    fp16: bool = True,
) -> EngineBuild:
    """Build (or load from the cache) the engine and check it against CPU on random patches."""
    import onnxruntime as ort

    require_tensorrt()
    model = onnx.load(model_path)
    meta = ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
    cache_dir = cache_dir or model_path.parent / "trt_cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    trt = ort.InferenceSession(
        str(model_path),
        providers=[(PROVIDER, provider_options(cache_dir, meta, batch_sizes, fp16))],
    )
    cpu = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    worst = 0.0
    for n in sorted(set(batch_sizes)):
        shape = (n, meta.channels, meta.patch_size, meta.patch_size)
        feeds = {name: rng.integers(0, 256, shape, dtype=np.uint8) for name in INPUT_NAMES}
        got = trt.run([OUTPUT_NAME], feeds)[0]
        ref = cpu.run([OUTPUT_NAME], feeds)[0]
        worst = max(worst, float(np.max(np.abs(got - ref))))
    seconds = time.perf_counter() - t0
    log.info("TensorRT engine in %s (%.1f s); max |TRT - CPU| %.3g", cache_dir, seconds, worst)
    return EngineBuild(cache_dir, tuple(sorted(set(batch_sizes))), seconds, worst)
