"""ONNX Runtime (what serving runs) vs PyTorch eager (what training runs) on the same model.

The bundled default's architecture (`aerial-rgb`: 3 x 32 x 32 uint8 patches, widths 32/64), with
the same weights in both: a detector built from the model config, wrapped with its input scaling
exactly as export wraps it, exported to ONNX in memory. Both score the same patch pairs at the
serving batch size with the same thread count, interleaved round by round so a noisy machine
slows both alike; the outputs are compared (max absolute difference) so the speed is for the
same answers. Prints patches/s and the ratio.

Usage: python bench/ort_vs_torch.py [--rounds 5] [--batch 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.onnx_export import RawInputDetector, to_onnx_bytes
from training.config import load_config
from training.model import ChangeDetector

AERIAL = load_config(preset="aerial-rgb").model  # the bundled default's architecture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=16, help="per round and engine")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    wrapper = RawInputDetector(ChangeDetector(AERIAL), 0.0, 1.0 / 255.0).eval()
    onnx_bytes = to_onnx_bytes(wrapper, AERIAL.in_channels, AERIAL.patch_size)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    rng = np.random.default_rng(0)
    shape = (args.batch, AERIAL.in_channels, AERIAL.patch_size, AERIAL.patch_size)
    before = rng.integers(0, 256, shape, dtype=np.uint8)
    after = rng.integers(0, 256, shape, dtype=np.uint8)
    tb, ta = torch.from_numpy(before), torch.from_numpy(after)

    def run_ort() -> np.ndarray:
        return session.run(None, {names[0]: before, names[1]: after})[0]

    def run_torch() -> np.ndarray:
        with torch.inference_mode():
            return wrapper(tb, ta).numpy()

    diff = float(np.abs(run_ort().reshape(-1) - run_torch().reshape(-1)).max())
    rates: dict[str, list[float]] = {"onnxruntime": [], "pytorch eager": []}
    for _ in range(args.rounds):
        for name, fn in (("onnxruntime", run_ort), ("pytorch eager", run_torch)):
            fn()  # warm
            t0 = time.perf_counter()
            for _ in range(args.batches):
                fn()
            rates[name].append(args.batches * args.batch / (time.perf_counter() - t0))

    print(
        f"# ONNX Runtime vs PyTorch eager ({platform.machine()}, threads {args.threads}, "
        f"onnxruntime {ort.__version__}, torch {torch.__version__}, Python "
        f"{platform.python_version()})"
    )
    print(f"model: aerial-rgb architecture, batch {args.batch}, {args.rounds} interleaved rounds")
    print("\n| engine | patches/s (median) | min | max |")
    print("|---|---|---|---|")
    for name, r in rates.items():
        print(f"| {name} | {statistics.median(r):.0f} | {min(r):.0f} | {max(r):.0f} |")
    ratio = statistics.median(rates["onnxruntime"]) / statistics.median(rates["pytorch eager"])
    print(f"\nonnxruntime / pytorch eager: {ratio:.2f}x; max |difference| of outputs {diff:.2e}")


if __name__ == "__main__":
    main()
