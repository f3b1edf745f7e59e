"""`make bench`: run every performance benchmark and rewrite docs/benchmarks.md from their output.

Each script measures its ratios side by side in one run and prints its own tables and targets;
this runner records the machine, the versions, the date, the load before and after each script,
the exact command and its output, so the page is reproducible and never edited by hand.
Interpretation and the history of earlier runs: docs/benchmarks_notes.md. The reliability
scripts (overload, soak, fuzz) have their own page, docs/reliability.md.

Usage: python bench/run_all.py [--quick] [--only NAME,...] [--out docs/benchmarks.md]

``--only`` reruns some scripts and keeps the other sections of an existing page as they were
(each section says when it ran).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, title, arguments, quick arguments)
SCRIPTS: list[tuple[str, str, list[str], list[str]]] = [
    (
        "service_vs_backend",
        "Service overhead: DetectChange over gRPC vs ONNX Runtime alone",
        [],
        ["--repeats", "2", "--size", "256"],
    ),
    (
        "serve_throughput",
        "Serving throughput and latency quantiles by concurrency; dynamic batching vs batch 1 "
        "(the default model, aerial-rgb)",
        ["--seconds", "6"],  # about 10 requests/s: 6 s windows hold enough of them
        ["--seconds", "1", "--rounds", "1", "--concurrency", "1,16"],
    ),
    (
        "serve_throughput",
        "Serving throughput with the smallest model (synthetic-thin, 3.4x less inference per "
        "patch): the service's own work weighs most",
        ["--model", "synthetic-thin"],
        ["--model", "synthetic-thin", "--seconds", "1", "--rounds", "1", "--concurrency", "16"],
    ),
    (
        "compute_ceiling",
        "Compute ceiling: the default model's GFLOP/s by batch size against ONNX Runtime's "
        "MatMul peak (how much batching can gain on this CPU)",
        [],
        ["--seconds", "0.5", "--rounds", "1"],
    ),
    (
        "ort_vs_torch",
        "ONNX Runtime vs PyTorch eager, same model and weights",
        [],
        ["--rounds", "2"],
    ),
    ("variants", "Precision variants: int8 and fp16 vs fp32 (CPU)", [], ["--rounds", "2"]),
    (
        "score_geotiff",
        "Batch scoring of GeoTIFF pairs: Mpx/s vs the backend alone, peak RSS by raster size",
        [],
        ["--sizes", "512,1024", "--throughput-size", "512", "--seconds", "2", "--rounds", "1"],
    ),
    (
        "score_geotiff",
        "Batch scoring under the cva-gated mask rule: Mpx/s and peak RSS by raster size",
        ["--mask-rule", "cva-gated", "--rounds", "1"],
        [
            "--mask-rule",
            "cva-gated",
            "--sizes",
            "512,1024",
            "--throughput-size",
            "512",
            "--seconds",
            "2",
            "--rounds",
            "1",
        ],
    ),
    ("gpu_providers", "GPU: TensorRT FP16 vs CUDA fp32 vs CPU", [], []),
]


def previous_sections(page: Path) -> dict[str, str]:
    """The sections of an existing page by title: from a "## " line up to the next one outside
    the code blocks (the scripts' own output has "## " headings inside them)."""
    if not page.exists():
        return {}
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    fenced = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif line.startswith("## ") and not fenced:
            current = sections.setdefault(line[3:], [])
        if current is not None:
            current.append(line)
    return {title: "\n".join(lines).rstrip("\n") + "\n" for title, lines in sections.items()}


def versions() -> str:
    names = ("numpy", "onnxruntime", "torch", "grpcio", "rasterio", "protobuf", "rarechange")
    out = []
    for n in names:
        try:
            out.append(f"{n} {importlib.metadata.version(n)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{n} (not installed)")
    try:
        import rasterio

        out.append(f"GDAL {rasterio.__gdal_version__}")
    except ImportError:
        pass
    return ", ".join(out)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def has_gpu() -> bool:
    try:
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs (checks the scripts)")
    parser.add_argument("--only", default="", help="comma-separated script names")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    only = {s for s in args.only.split(",") if s}

    started = datetime.datetime.now(datetime.UTC)
    kept = previous_sections(args.out) if only else {}
    sections = []
    failed = []
    for name, title, full, quick in SCRIPTS:
        if only and name not in only:
            if title in kept:
                sections.append(kept[title])
            continue
        argv = [sys.executable, f"bench/{name}.py", *(quick if args.quick else full)]
        command = shlex.join(["python", *argv[1:]])
        if name == "gpu_providers" and not has_gpu():
            sections.append(
                f"## {title}\n\nCommand: `bench/gpu_check.sh` (runs `{command}` on a GPU "
                "machine)\n\nNot measured: no CUDA execution provider on this machine. "
                "`bench/gpu_check.sh` runs it, with the TensorRT export test, where an NVIDIA "
                "GPU and onnxruntime-gpu are present.\n"
            )
            continue
        print(f"== {command}", flush=True)
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(
            argv,
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        seconds = time.perf_counter() - t0
        load1 = os.getloadavg()[0]
        output = proc.stdout.strip()
        if proc.returncode != 0:
            failed.append(name)
            output += f"\n\n[exit {proc.returncode}]\n{proc.stderr.strip()[-3000:]}"
        print(output, flush=True)
        ran = datetime.datetime.now(datetime.UTC)
        sections.append(
            f"## {title}\n\nCommand: `{command}` ({ran:%Y-%m-%d %H:%M} UTC, {seconds:.0f} s; "
            f"load average {load0:.2f} before, {load1:.2f} after)\n\n```\n{output}\n```\n"
        )

    header = (
        "# Benchmarks\n\n"
        "Generated by `make bench` (`bench/run_all.py`"
        f"{' --quick' if args.quick else ''}); do not edit by hand. Every ratio is measured side "
        "by side within one run of its script (these machines are noisy: compare ratios, not "
        "absolute times). What the numbers mean, the targets, and what was changed because of "
        "them: [benchmarks_notes.md](benchmarks_notes.md).\n\n"
        f"* date: {started:%Y-%m-%d %H:%M} UTC"
        f"{' (sections not rerun keep the time of their run)' if only else ''}\n"
        f"* machine: {platform.node()}, {cpu_model()}, {os.cpu_count()} CPUs, "
        f"{platform.system()} {platform.release()}, {platform.machine()}\n"
        f"* Python {platform.python_version()}; {versions()}\n"
        f"* GPU: {'CUDA provider available' if has_gpu() else 'none'}\n\n"
    )
    text = header + "\n".join(sections)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
