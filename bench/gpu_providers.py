"""TensorRT FP16 vs ONNX Runtime CUDA fp32 vs CPU: patches per second, side by side in one run.

Builds (or loads from its cache) the TensorRT engine first, checks every provider against CPU on
the same patches, then interleaves the providers round by round. Needs an NVIDIA GPU with
onnxruntime-gpu (and TensorRT for the TensorRT row); a provider that is missing is reported and
skipped, never faked. Run through bench/gpu_check.sh.
Usage: python bench/gpu_providers.py [--model models/synthetic-thin/model.onnx] [--batch 64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from export.tensorrt import PROVIDER as TRT
from export.tensorrt import build_engine, provider_options
from serving.metadata import INPUT_NAMES, OUTPUT_NAME, ModelMetadata

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=ROOT / "models/synthetic-thin/model.onnx")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--patches", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    meta = ModelMetadata.from_props({p.key: p.value for p in onnx.load(args.model).metadata_props})
    available = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__}; providers here: {available}")
    cache = Path(tempfile.mkdtemp(prefix="rarechange-trt-"))
    sessions: dict[str, ort.InferenceSession] = {}
    if TRT in available:
        build = build_engine(args.model, cache, batch_sizes=(1, args.batch))
        print(
            f"TensorRT engine built/loaded in {build.seconds:.1f} s, max |TRT-CPU| "
            f"{build.max_abs_diff_vs_cpu:.2g}"
        )
        sessions["tensorrt-fp16"] = ort.InferenceSession(
            str(args.model),
            providers=[
                (TRT, provider_options(cache, meta, (1, args.batch))),
                "CUDAExecutionProvider",
            ],
        )
    else:
        print(f"SKIP tensorrt-fp16: {TRT} not available")
    if "CUDAExecutionProvider" in available:
        sessions["cuda-fp32"] = ort.InferenceSession(
            str(args.model), providers=["CUDAExecutionProvider"]
        )
    else:
        print("SKIP cuda-fp32: CUDAExecutionProvider not available")
    sessions["cpu-fp32"] = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    shape = (args.patches, meta.channels, meta.patch_size, meta.patch_size)
    before = rng.integers(0, 256, shape, dtype=np.uint8)
    after = rng.integers(0, 256, shape, dtype=np.uint8)

    def run(s: ort.InferenceSession) -> np.ndarray:
        return np.concatenate(
            [
                s.run(
                    [OUTPUT_NAME],
                    {
                        INPUT_NAMES[0]: before[i : i + args.batch],
                        INPUT_NAMES[1]: after[i : i + args.batch],
                    },
                )[0]
                for i in range(0, args.patches, args.batch)
            ]
        )

    ref = run(sessions["cpu-fp32"])
    for name, s in sessions.items():
        print(f"{name}: max |p - cpu| = {np.max(np.abs(run(s) - ref)):.2g}")  # also warms up
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(args.rounds):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            run(s)
            times[name].append(time.perf_counter() - t0)
    cpu = statistics.median(times["cpu-fp32"])
    print(f"{args.patches} patch pairs, batch {args.batch}, {args.rounds} interleaved rounds")
    print(f"{'provider':14} {'patches/s':>10} {'vs cpu':>8}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:14} {args.patches / med:10.0f} {cpu / med:8.2f}x")


if __name__ == "__main__":
    main()
