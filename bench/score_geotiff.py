"""Batch scoring of GeoTIFF pairs: throughput against the backend alone, and peak memory by size.

One run, side by side:

* **throughput**: ``rarechange score`` (read, tile, batcher, ONNX Runtime, stitch, COG, polygons,
  quicklook) on a pair, as megapixels per second of the whole command and of its scoring stage,
  against the backend alone (the same ONNX Runtime session settings, batches of
  ``max_batch_size`` pre-cut patches in a loop) scoring as many patches as the scene's tile grid
  holds. Backend, score, backend, score, ... backend: each score is set against the mean of the
  backend runs either side of it, so a machine whose speed drifts shifts both alike, and the
  median of ``--rounds`` rounds is reported. Both are warmed up first (the model's first batches
  allocate: a cost of loading, paid once per process). Target: score >= 0.8 x the backend.
* **memory**: peak RSS of a ``rarechange score`` process for 1k, 4k and 16k pairs (each in its own
  process; ``ru_maxrss``). Target: growth from 1k to 16k under 10 %. The 16k pair is scored at
  ``--memory-stride`` (default 32, the patch size) so that it takes about a minute on 2 cores;
  memory does not depend on the stride beyond the block's patch buffer, which is bounded.

Pairs are written once into ``--data`` (tiled uint8 RGB GeoTIFFs, block by block, so writing a
16k pair does not need 16k in memory) and reused. ``--mask-rule cva-gated`` measures the same
under the gated mask rule (its three extra passes over the blocks, and the scene's fused scores
kept on disk for Otsu: 4 bytes a pixel while the run lasts).

Usage: python bench/score_geotiff.py [--sizes 1024,4096,16384] [--throughput-size 2048]
       [--mask-rule threshold|cva-gated]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "aerial-rgb"


def write_pair(folder: Path, size: int, block: int = 1024) -> tuple[Path, Path]:
    before, after = folder / f"before_{size}.tif", folder / f"after_{size}.tif"
    if before.exists() and after.exists():
        return before, after
    profile = {
        "driver": "GTiff",
        "height": size,
        "width": size,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": Affine(1.0, 0.0, 400_000.0, 0.0, -1.0, 5_000_000.0),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
    }
    rng = np.random.default_rng(size)
    tmp_b, tmp_a = before.with_suffix(".tmp"), after.with_suffix(".tmp")
    with rasterio.open(tmp_b, "w", **profile) as db, rasterio.open(tmp_a, "w", **profile) as da:
        for r in range(0, size, block):
            for c in range(0, size, block):
                h, w = min(block, size - r), min(block, size - c)
                # smooth fields plus texture: aerial-like enough for the model to run as usual
                base = rng.integers(70, 150, (3, 1, 1)) + rng.integers(0, 40, (3, h, w))
                b = base.astype(np.uint8)
                a = np.clip(b.astype(np.int16) + rng.integers(-6, 7, (3, h, w)), 0, 255)
                a = a.astype(np.uint8)
                if rng.random() < 0.3:  # a planted "roof"
                    y, x = rng.integers(0, max(1, h - 40)), rng.integers(0, max(1, w - 40))
                    a[:, y : y + 40, x : x + 40] = np.array([230, 225, 210])[:, None, None]
                window = rasterio.windows.Window(c, r, w, h)
                db.write(b, window=window)
                da.write(a, window=window)
    os.replace(tmp_b, before)
    os.replace(tmp_a, after)
    return before, after


def child(args: argparse.Namespace) -> None:
    """One measurement in a fresh process; prints one JSON line."""
    from serving.config import ServerSettings
    from serving.memory import tune_malloc
    from serving.scoring.pair import ModelScorer, ScoreOptions, score_pair

    # warmed up as `rarechange score` does when it loads the model (the backend alone, too)
    settings = ServerSettings(
        models_dir=ROOT / "models", metrics_port=-1, warmup=True, intra_op_threads=args.threads
    )
    if args.child == "backend":
        print(json.dumps(backend_alone(settings, args.patches, args.seconds)))
        return
    before, after = Path(args.before), Path(args.after)
    tune_malloc()  # as `rarechange score` does
    with tempfile.TemporaryDirectory() as tmp, ModelScorer(settings, MODEL) as scorer:
        t0 = time.perf_counter()
        summary = score_pair(
            before,
            after,
            Path(tmp) / "out",
            scorer,
            ScoreOptions(stride=args.stride, block_size=args.block_size, mask_rule=args.mask_rule),
            progress=False,
        )
        wall = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"summary": summary, "wall_s": wall, "peak_rss_mb": rss_mb}))


def backend_alone(settings: object, patches: int, seconds: float) -> dict[str, float]:
    """Patches per second of the backend alone: batches of max_batch_size in a loop."""
    from serving.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(
        ROOT / "models" / MODEL / "model.onnx",
        intra_op_threads=settings.intra_op_threads,  # type: ignore[attr-defined]
        providers=settings.providers,  # type: ignore[attr-defined]
        max_batch_size=settings.max_batch_size,  # type: ignore[attr-defined]
    )
    meta = backend.metadata
    n = settings.max_batch_size  # type: ignore[attr-defined]
    rng = np.random.default_rng(0)
    shape = (n, meta.channels, meta.patch_size, meta.patch_size)
    b = rng.integers(0, 256, shape, dtype=np.uint8)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    backend.infer(b, a)  # warm-up
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        backend.infer(b, a)
        done += n
    rate = done / (time.perf_counter() - t0)
    backend.close()
    return {"patches_per_s": rate}


def run_child(*extra: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *extra], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"child {extra} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def grid_patches(size: int, patch: int, stride: int) -> int:
    from serving.tiling import axis_origins

    return len(axis_origins(size, patch, stride)) ** 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="1024,4096,16384")
    p.add_argument("--throughput-size", type=int, default=2048)
    p.add_argument("--memory-stride", type=int, default=32)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mask-rule", choices=["threshold", "cva-gated"], default="threshold")
    p.add_argument("--seconds", type=float, default=6.0, help="backend-alone timing")
    p.add_argument("--rounds", type=int, default=3, help="score runs, each between backend runs")
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "rarechange-bench")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--before", default=None, help=argparse.SUPPRESS)
    p.add_argument("--after", default=None, help=argparse.SUPPRESS)
    p.add_argument("--stride", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--patches", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    args.data.mkdir(parents=True, exist_ok=True)
    common = [
        *("--threads", str(args.threads), "--block-size", str(args.block_size)),
        *("--mask-rule", args.mask_rule),
    ]
    print(
        f"# rarechange score benchmark, {platform.node()}, {os.cpu_count()} CPUs, "
        f"threads {args.threads}, block {args.block_size}, mask rule {args.mask_rule}"
    )

    # throughput at the model's recommended stride
    size = args.throughput_size
    before, after = write_pair(args.data, size)
    back = ["--child", "backend", "--seconds", str(args.seconds), *common]
    score = ["--child", "score", "--before", str(before), "--after", str(after), *common]
    # backend, score, backend, score, ... backend: each score against the mean of the backend
    # runs either side of it, and the median round reported (the machine's speed drifts)
    rates = [run_child(*back)["patches_per_s"]]
    rounds = []
    for _ in range(args.rounds):
        s = run_child(*score)
        rates.append(run_child(*back)["patches_per_s"])
        summ = s["summary"]
        stride = summ["stride"]
        n = grid_patches(size, summ["model"]["patch_size"], stride)
        mpx = size * size / 1e6
        backend_mpx = mpx / (n / ((rates[-2] + rates[-1]) / 2))
        total_mpx = mpx / summ["timings_s"]["total"]
        scoring_mpx = mpx / summ["timings_s"]["scoring"]
        rounds.append((total_mpx / backend_mpx, scoring_mpx, total_mpx, backend_mpx, summ))
    rounds.sort(key=lambda r: r[0])
    _, scoring_mpx, total_mpx, backend_mpx, summ = rounds[len(rounds) // 2]
    print(
        f"\n## Throughput, {size}x{size} pair, stride {stride} ({n} grid patches; "
        f"{summ['counts']['patches_scored_this_run']} scored); median of "
        f"{args.rounds} rounds\n"
    )
    print("| path | Mpx/s | ratio to backend alone |")
    print("|---|---|---|")
    print(
        f"| backend alone (ONNX Runtime, batches of 256; runs around the scores: "
        f"{', '.join(f'{r:.0f}' for r in rates)} patches/s) | {backend_mpx:.3f} | 1.00 |"
    )
    print(
        f"| rarechange score, scoring stage (read, tile, batcher, stitch, staging) | "
        f"{scoring_mpx:.3f} | {scoring_mpx / backend_mpx:.2f} |"
    )
    print(
        f"| rarechange score, whole command (+ checksums, COGs, polygons, quicklook) | "
        f"{total_mpx:.3f} | {total_mpx / backend_mpx:.2f} |"
    )
    whole = sorted(r[0] for r in rounds)
    print(f"\nwhole-command ratio by round, sorted: {', '.join(f'{r:.2f}' for r in whole)}")
    print(f"\ntimings (s): {json.dumps(summ['timings_s'])}")

    # memory by size
    print(f"\n## Peak RSS by scene size (stride {args.memory_stride}, block {args.block_size})\n")
    print("| pair | pixels | peak RSS (MB) | growth vs smallest | scoring s | total s |")
    print("|---|---|---|---|---|---|")
    first = None
    for size in (int(v) for v in args.sizes.split(",")):
        before, after = write_pair(args.data, size)
        m = run_child(
            "--child",
            "score",
            "--before",
            str(before),
            "--after",
            str(after),
            "--stride",
            str(args.memory_stride),
            *common,
        )
        rss = m["peak_rss_mb"]
        first = first or rss
        t = m["summary"]["timings_s"]
        print(
            f"| {size}x{size} | {size * size / 1e6:.1f} M | {rss:.0f} | "
            f"{100 * (rss / first - 1):+.1f} % | {t['scoring']:.1f} | {t['total']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
