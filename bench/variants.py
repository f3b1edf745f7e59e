"""Patches per second of each precision variant against fp32, measured side by side in one run.

Runs each bundled variant of a model (models/NAME, models/NAME-fp16, models/NAME-int8) through the
ONNX Runtime backend serving uses, on the same patch pairs, at serving's batch size, interleaving
the variants round by round so that a noisy machine slows them alike. Prints ratios to fp32.
Usage: python bench/variants.py [--model synthetic-thin] [--rounds 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime

from serving.backends.onnxruntime import OnnxRuntimeBackend

MODELS = Path(__file__).resolve().parent.parent / "models"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="synthetic-thin")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--patches", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per session")
    args = parser.parse_args()

    backends = {
        precision: OnnxRuntimeBackend(path, intra_op_threads=args.threads)
        for precision, path in (
            ("fp32", MODELS / args.model / "model.onnx"),
            ("fp16", MODELS / f"{args.model}-fp16" / "model.onnx"),
            ("int8", MODELS / f"{args.model}-int8" / "model.onnx"),
        )
        if path.is_file()
    }
    meta = backends["fp32"].metadata
    rng = np.random.default_rng(0)
    shape = (args.patches, meta.channels, meta.patch_size, meta.patch_size)
    before = rng.integers(0, 256, shape, dtype=np.uint8)
    after = rng.integers(0, 256, shape, dtype=np.uint8)

    def run(backend: OnnxRuntimeBackend) -> None:
        for i in range(0, args.patches, args.batch):
            backend.infer(before[i : i + args.batch], after[i : i + args.batch])

    for backend in backends.values():
        run(backend)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in backends}
    for _ in range(args.rounds):
        for name, backend in backends.items():
            t0 = time.perf_counter()
            run(backend)
            times[name].append(time.perf_counter() - t0)

    print(
        f"{args.model}: {args.patches} patch pairs of {meta.channels}x{meta.patch_size}x"
        f"{meta.patch_size}, batch {args.batch}, {args.threads} intra-op thread(s), "
        f"{args.rounds} interleaved rounds; onnxruntime {onnxruntime.__version__}, "
        f"{platform.processor() or platform.machine()}"
    )
    base = statistics.median(times["fp32"])
    print(f"{'variant':8} {'patches/s':>10} {'vs fp32':>8}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:8} {args.patches / med:10.0f} {base / med:8.2f}x")


if __name__ == "__main__":
    main()
