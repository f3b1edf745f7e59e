"""`make bench`'s runner: it runs a real benchmark and writes the page with machine, versions,
command and output (the quick settings, one short script, so the runner cannot rot)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_all(out: Path, only: str) -> str:
    """`bench/run_all.py --quick --only ONLY --out OUT`; the page it wrote."""
    proc = subprocess.run(
        [sys.executable, "bench/run_all.py", "--quick", "--only", only, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out.read_text()


def test_run_all_writes_the_page(tmp_path: Path) -> None:
    page = run_all(tmp_path / "benchmarks.md", "ort_vs_torch,gpu_providers")
    assert page.startswith("# Benchmarks") and "do not edit by hand" in page
    for field in ("* date:", "* machine:", "onnxruntime ", "* GPU:"):
        assert field in page
    assert "Command: `python bench/ort_vs_torch.py --rounds 2`" in page
    assert "onnxruntime / pytorch eager:" in page  # the script's own ratio line
    assert "GPU: TensorRT FP16 vs CUDA fp32 vs CPU" in page  # reported, never faked


def test_only_keeps_the_sections_it_does_not_rerun(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    kept = (
        "## Precision variants: int8 and fp16 vs fp32 (CPU)\n\nCommand: `python bench/variants.py`"
        " (2026-01-01 00:00 UTC, 4 s)\n\n```\n## a heading inside the output\nint8 1.34x\n```\n"
    )
    stale = "## GPU: TensorRT FP16 vs CUDA fp32 vs CPU\n\nan old text\n"
    out.write_text("# Benchmarks\n\nold header\n\n" + stale + "\n" + kept)
    page = run_all(out, "gpu_providers")
    assert "old header" not in page and "sections not rerun keep the time of their run" in page
    assert kept in page  # verbatim, its inner "## " line included
    assert "an old text" not in page  # the section asked for was written again
    assert page.index("## Precision variants") < page.index("## GPU: TensorRT")  # SCRIPTS order
