"""Soak: a steady load at about 70 % of the measured capacity for 10 minutes (by default); the
server's memory and open file descriptors must stay flat, and no request may fail.

1. Capacity and the queue bound exactly as bench/overload.py does them (closed loop on a first
   ``rarechange serve``, then ``--max-queue-size`` from ``--latency-bound-ms`` and
   ``--headroom``), so that the soaked server runs with the bound a deployment would.
2. ``--load-factor`` x capacity requests/s offered open loop to a second server for
   ``--seconds`` (warm-up included), every call with a deadline of ``--deadline-s``; the server's
   RSS (``/proc/<pid>/status`` VmRSS), open file descriptors (``/proc/<pid>/fd``) and threads are
   read every ``--sample-s``.
3. Flatness: samples of the first ``--warmup-seconds`` are left out (allocator arenas, gRPC and
   ONNX Runtime buffers reach their working size there); the baseline is the median of the next
   three samples, the end the median of the last three; growth = end / baseline - 1. The largest
   sample and the least-squares slope after warm-up are reported too.

Pass (one line each, exit status 1 on any FAIL): every request OK (no refusal, no deadline,
nothing else); RSS and open fds each grow less than ``--growth-tolerance`` (5 %) after warm-up;
the server is healthy afterwards; the load was offered as planned.

Usage: python bench/soak.py [--seconds 600] [--warmup-seconds 60] [--load-factor 0.7] ...
(the request, server and bound options are overload.py's; see --help)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
from overload import (
    OpenLoop,
    Sampler,
    ServerProcess,
    Usage,
    Verdicts,
    add_common_arguments,
    header,
    healthy,
    log,
    measure_capacity,
    mib,
    one_model_dir,
    percentile_ms,
    server_env,
    server_flags,
    usage_of,
    write_json,
)


def growth(samples: list[Usage], key: str) -> tuple[float, float, float, float]:
    """(baseline, end, end growth, largest growth) of ``key`` over the samples after warm-up."""
    values = [float(getattr(u, key)) for u in samples]
    base = statistics.median(values[:3])
    end = statistics.median(values[-3:])
    return base, end, end / base - 1, max(values) / base - 1


def slope_per_min(samples: list[Usage], key: str) -> float:
    """Least-squares slope of ``key`` per minute."""
    t = np.array([u.t for u in samples])
    y = np.array([float(getattr(u, key)) for u in samples])
    return float(np.polyfit(t, y, 1)[0]) * 60 if len(samples) > 1 and np.ptp(t) > 0 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser)
    parser.add_argument("--seconds", type=float, default=600.0, help="total, warm-up included")
    parser.add_argument("--warmup-seconds", type=float, default=60.0)
    parser.add_argument("--load-factor", type=float, default=0.7, help="x measured capacity")
    parser.add_argument("--sample-s", type=float, default=5.0, help="RSS/fd reading interval")
    parser.add_argument("--windows", type=int, default=10, help="rows of the per-window table")
    parser.add_argument("--growth-tolerance", type=float, default=0.05)
    parser.add_argument(
        "--max-queue-size",
        type=int,
        default=0,
        help="the soaked server's queue; 0: from the bound, as overload.py sizes it",
    )
    args = parser.parse_args()
    if args.warmup_seconds + 6 * args.sample_s > args.seconds:
        parser.error("--seconds must leave at least 6 samples (--sample-s) after the warm-up")

    with tempfile.TemporaryDirectory() as tmp:
        setup = measure_capacity(args, one_model_dir(Path(tmp), args.model))
        if args.max_queue_size:
            setup.max_queue_size = args.max_queue_size
            setup.sizing_source = "given: --max-queue-size"
        rate = args.load_factor * setup.capacity.requests_per_s
        server = ServerProcess(
            setup.models_dir, server_flags(args, setup.max_queue_size), server_env(args)
        )
        try:
            cold = usage_of(server.pid)
            log(f"soak: {rate:.1f} requests/s for {args.seconds:g} s")
            with (
                OpenLoop(
                    server.address, setup.request, setup.tiles, args.channels, args.deadline_s
                ) as load,
                Sampler(server.pid, args.sample_s) as sampler,
            ):
                soak = load.run(rate, args.seconds)
            server_codes = server.metrics()
            is_healthy, health_detail = healthy(server.address, setup.request, setup.tiles)
        finally:
            exit_code = server.stop(args.grace_s)
            server.log.close()

    during = [u for u in sampler.samples if u.t <= args.seconds]
    steady = [u for u in during if u.t >= args.warmup_seconds]
    rss = growth(steady, "rss_bytes")
    fds = growth(steady, "fds")
    codes = soak.codes()
    others = {c: n for c, n in codes.items() if c != "OK"}
    verdicts = Verdicts()
    verdicts.check(
        "no error",
        not others and codes["OK"] > 0,
        f"{codes['OK']} of {len(soak.outcomes)} requests OK; others: {others or 'none'}",
    )
    verdicts.check(
        "RSS flat",
        rss[2] < args.growth_tolerance,
        f"{mib(rss[0])} MiB after warm-up -> {mib(rss[1])} MiB at the end: {rss[2]:+.1%} "
        f"(largest {rss[3]:+.1%}; slope {slope_per_min(steady, 'rss_bytes') / 2**20:+.2f} "
        f"MiB/min; tolerance {args.growth_tolerance:.0%})",
    )
    verdicts.check(
        "open fds flat",
        fds[2] < args.growth_tolerance,
        f"{fds[0]:.0f} after warm-up -> {fds[1]:.0f} at the end: {fds[2]:+.1%} (largest "
        f"{fds[3]:+.1%})",
    )
    verdicts.check("healthy afterwards", is_healthy, health_detail)
    verdicts.check("load offered as planned", *soak.as_planned())

    sys.stderr.flush()
    lines = header("soak", args, setup)
    lines.append(
        f"offered: {rate:.1f} requests/s ({args.load_factor:g} x capacity) open loop for "
        f"{args.seconds:g} s ({args.warmup_seconds:g} s warm-up), {args.channels} channels, "
        f"deadline {args.deadline_s:g} s per call; server read every {args.sample_s:g} s"
    )
    print("\n".join(lines))
    print()
    width = args.seconds / args.windows
    print("| window s | requests | OK | other | OK p50 ms | OK p99 ms | RSS MiB | open fds | "
          "threads |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for w in range(args.windows):
        lo, hi = w * width, (w + 1) * width
        inside = [o for o in soak.outcomes if lo <= o.due_s < hi]
        ok = [o.latency_s for o in inside if o.code == "OK"]
        last = [u for u in during if u.t < hi][-1]
        print(
            f"| {lo:.0f}-{hi:.0f} | {len(inside)} | {len(ok)} | {len(inside) - len(ok)} | "
            f"{percentile_ms(ok, 50):.0f} | {percentile_ms(ok, 99):.0f} | "
            f"{mib(last.rss_bytes)} | {last.fds} | {last.threads} |"
        )
    ok_all = soak.latencies("OK")
    print(
        f"all: OK p50 {percentile_ms(ok_all, 50):.0f} ms, p99 {percentile_ms(ok_all, 99):.0f} ms;"
        f" server at start {mib(cold.rss_bytes)} MiB, {cold.fds} fds; its own count of the calls"
        f" (/metrics): {dict(sorted(server_codes.items()))}; exit status on SIGTERM {exit_code}"
    )
    print()
    verdicts.print()
    write_json(
        args.json,
        {
            "capacity": asdict(setup.capacity),
            "max_queue_size": setup.max_queue_size,
            "rate": rate,
            "codes": dict(codes),
            "server_codes": server_codes,
            "ok_p50_ms": percentile_ms(ok_all, 50),
            "ok_p99_ms": percentile_ms(ok_all, 99),
            "rss": dict(zip(("baseline", "end", "growth", "largest_growth"), rss, strict=True)),
            "fds": dict(zip(("baseline", "end", "growth", "largest_growth"), fds, strict=True)),
            "samples": [asdict(u) for u in during],
            "exit_code": exit_code,
            "criteria": verdicts.as_dict(),
        },
    )
    sys.exit(1 if verdicts.failed else 0)


if __name__ == "__main__":
    main()
