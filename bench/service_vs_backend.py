"""The service's overhead: DetectChange over gRPC vs ONNX Runtime alone on the same patches.

Both run in one process, interleaved, on the same pair, so the ratio is robust to a noisy machine.
Usage: python bench/service_vs_backend.py [--size 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import onnxruntime

from serving.backends.onnxruntime import OnnxRuntimeBackend
from serving.client import ChangeDetectionClient
from serving.config import ServerSettings
from serving.server import create_server
from serving.tiling import extract_patches, grid
from training.synthetic import SceneConfig, render_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    settings = ServerSettings(port=0, metrics_port=-1)
    server = create_server(settings).start()
    served = server.repository.get()
    meta = served.metadata
    backend = OnnxRuntimeBackend(served.path, intra_op_threads=settings.intra_op_threads)
    pair = render_pair(1, SceneConfig(height=args.size, width=args.size))
    tiles = grid(args.size, args.size, meta.patch_size, meta.recommended_stride)
    before, after = extract_patches(
        pair.before, pair.after, tiles, meta.patch_size, meta.recommended_stride
    )
    n = len(tiles)

    def backend_alone() -> None:
        for i in range(0, n, settings.max_batch_size):
            backend.infer(
                before[i : i + settings.max_batch_size], after[i : i + settings.max_batch_size]
            )

    with ChangeDetectionClient(server.address) as client:

        def service() -> None:
            client.detect(pair.before, pair.after)

        service(), backend_alone()  # warm-up
        times: dict[str, list[float]] = {"backend": [], "service": []}
        for _ in range(args.repeats):
            for name, fn in (("backend", backend_alone), ("service", service)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    server.stop(0)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"# service vs ONNX Runtime alone ({platform.processor() or platform.machine()}, "
        f"onnxruntime {onnxruntime.__version__}, model {meta.name} {meta.version})"
    )
    print(
        f"pair {args.size}x{args.size}, patch {meta.patch_size}, stride "
        f"{meta.recommended_stride}: {n} patch pairs, batch {settings.max_batch_size}, "
        f"median of {args.repeats}"
    )
    print("| path | seconds | patch pairs/s |")
    print("|---|---|---|")
    for k in ("backend", "service"):
        print(f"| {k} | {med[k]:.3f} | {n / med[k]:.0f} |")
    print(f"service / backend time ratio: {med['service'] / med['backend']:.2f}")


if __name__ == "__main__":
    main()
