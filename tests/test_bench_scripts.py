"""bench/overload.py and bench/soak.py, run for a few seconds with tiny settings so that they
cannot rot: every phase runs (capacity, the queue bound, open-loop load, /proc readings, the
verdicts) and the JSON they write holds every criterion. The machine's verdicts on latency and
memory belong to the full runs (docs/reliability.md); here only what holds on any machine is
asserted: nothing but OK and RESOURCE_EXHAUSTED (overload) or OK (soak), and a healthy server."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--capacity-clients", "4",
    "--capacity-seconds", "1",
    "--ramp", "0.5",
    "--channels", "2",
    "--grace-s", "5",
]  # fmt: skip


def run_script(name: str, tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, f"bench/{name}.py", *TINY, *args, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: a criterion failed, said below
    results = json.loads(out.read_text())
    failed = [name for name, c in results["criteria"].items() if not c["pass"]]
    assert proc.returncode == (1 if failed else 0)
    for name, criterion in results["criteria"].items():
        assert f"{'PASS' if criterion['pass'] else 'FAIL'}  {name}: " in proc.stdout
    return proc, results


def load_bench(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_admitted_throughput_counts_only_calls_ended_in_the_window() -> None:
    """The queue of the measured server is sized from this: calls still queued when the load
    stops end afterwards and must not count, or the queue outgrows the latency bound."""
    overload = load_bench("overload")
    result = overload.LoadResult(rate=10, seconds=4.0, planned=6, sent=6, max_lag_s=0.0)
    result.outcomes = [
        overload.Outcome(due_s=0.1, code="OK", latency_s=0.5),  # ended before the skip
        overload.Outcome(due_s=1.0, code="OK", latency_s=0.5),
        overload.Outcome(due_s=2.0, code="OK", latency_s=1.9),
        overload.Outcome(due_s=2.5, code="RESOURCE_EXHAUSTED", latency_s=0.01),
        overload.Outcome(due_s=3.5, code="OK", latency_s=0.6),  # ended after the load
        overload.Outcome(due_s=3.9, code="OK", latency_s=2.0),
    ]
    assert overload.admitted_patches_per_s(result, tiles=10, skip_s=1.0) == 2 * 10 / 3.0


def test_serve_throughput_ratio_pairs_each_round_with_the_session_around_it() -> None:
    """The machine drifts over minutes: a round's service rate is divided by the session-alone
    runs just before and after it, not by a median taken from other minutes."""
    bench = load_bench("serve_throughput")
    alone = [100.0, 80.0, 60.0]  # the machine slows down through the run
    service = [81.0, 63.0, 54.0]
    assert bench.bracketed(service, alone) == pytest.approx([0.9, 0.9, 0.9])
    # the ratio of medians would have said 63 / 80: the drift, not the service
    assert statistics.median(service) / statistics.median(alone) == pytest.approx(0.7875)


@pytest.mark.slow
def test_overload_runs_every_phase(tmp_path: Path) -> None:
    proc, results = run_script(
        "overload",
        tmp_path,
        "--unloaded-seconds", "0",
        "--rate-factor", "8",  # overloaded even if a 1 s measurement underestimates capacity
        "--calibrate-seconds", "3",  # a short calibration overestimates on a slow machine
        "--warmup-seconds", "1",
        "--seconds", "2",
        "--settle-s", "0.2",
    )  # fmt: skip
    criteria = results["criteria"]
    assert list(criteria) == [
        "statuses",
        "admitted latency",
        "healthy afterwards",
        "RSS after = before",
        "load offered as planned",
    ]
    assert criteria["statuses"]["pass"], criteria["statuses"]
    assert criteria["healthy afterwards"]["pass"], criteria["healthy afterwards"]
    assert results["codes"]["OK"] > 0 and results["codes"]["RESOURCE_EXHAUSTED"] > 0
    assert results["max_queue_size"] >= results["tiles_per_request"]
    assert results["usage"]["before"]["rss_bytes"] > 0 and results["exit_code"] == 0
    assert "| overload |" in proc.stdout and "max_queue_size = floor(" in proc.stdout


@pytest.mark.slow
def test_soak_runs_every_phase(tmp_path: Path) -> None:
    proc, results = run_script(
        "soak",
        tmp_path,
        "--unloaded-seconds", "0",
        "--load-factor", "0.3",  # not overloaded even if 1 s overestimates capacity
        "--seconds", "4",
        "--warmup-seconds", "1",
        "--sample-s", "0.25",
        "--windows", "4",
    )  # fmt: skip
    criteria = results["criteria"]
    assert list(criteria) == [
        "no error",
        "RSS flat",
        "open fds flat",
        "healthy afterwards",
        "load offered as planned",
    ]
    assert criteria["no error"]["pass"], criteria["no error"]
    assert criteria["healthy afterwards"]["pass"], criteria["healthy afterwards"]
    assert len(results["samples"]) >= 6 and results["exit_code"] == 0
    assert proc.stdout.count("\n| ") >= 4  # the per-window table
