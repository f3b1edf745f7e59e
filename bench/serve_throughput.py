"""Serving throughput: the ONNX Runtime session alone vs the gRPC service at rising concurrency,
and dynamic batching vs ``max_batch_size`` 1.

Requests as clients send them: by default a 256x256 tile pair at the model's recommended stride
(1,225 patch pairs of 32x32 for the bundled models), so that several requests share each batch.
The model is the service's default, ``aerial-rgb``; ``--model synthetic-thin`` measures the
smallest bundled network (3.4x less inference per patch), where the per-request work of the
service weighs most against the session.
``--size 128 --stride 32`` gives many small requests (16 patch pairs each), where the per-request
Python cost dominates.

* "session alone": one ONNX Runtime session per instance scoring batches of ``max_batch_size``
  in a loop: the limit the service could reach. The same at batch 1 bounds what dynamic
  batching can gain over ``max_batch_size`` 1 with this model on this CPU.
* "service": ``rarechange serve`` in its own process (as deployed), driven over localhost gRPC
  by N closed-loop client threads in this process, each on its own channel, each sending the
  next request when the last one returns (raw arrays; every output: tiles, PNG map and mask,
  regions).
* "service, batch 1": the same server with ``max_batch_size`` 1.

Same model, same ONNX Runtime thread settings everywhere. The points are measured in interleaved
rounds (each round visits every point once) and the throughput is the median over rounds, so
that a noisy machine shifts all of them alike; latency percentiles pool every round. The server
side breakdown (mean batch size, queue and inference time) comes from its /metrics, and the per
request one from the timings every response carries.

Usage: python bench/serve_throughput.py [--seconds 3] [--rounds 3] [--max-batch-size 256] ...

"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnxruntime
from prometheus_client.parser import text_string_to_metric_families

from serving.api import change_detection_pb2 as pb
from serving.api import change_detection_pb2_grpc as pb_grpc
from serving.backends.onnxruntime import OnnxRuntimeBackend
from serving.client import image_message
from serving.config import MiB
from serving.server import channel_options
from serving.tiling import extract_patches, grid
from training.synthetic import SceneConfig, render_pair

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "aerial-rgb"  # what `rarechange serve` serves when a request names none
TIMINGS = ("decode_ms", "queue_ms", "inference_ms", "stitch_ms", "total_ms")


@dataclass
class Point:
    """One row of the table: what was measured in every round, pooled."""

    name: str
    concurrency: int = 0
    max_batch_size: int = 0
    rates: list[float] = field(default_factory=list)  # patches/s, one per round
    request_rates: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds, client side
    timings: dict[str, float] = field(default_factory=dict)  # summed response timings, ms
    requests: int = 0
    server: dict[str, float] = field(default_factory=dict)  # /metrics deltas

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1e3 if self.latencies else float("nan")


class Server:
    """``rarechange serve`` in a child process, configured through RARECHANGE_* variables."""

    def __init__(self, models_dir: Path, args: argparse.Namespace, max_batch_size: int) -> None:
        self.model = args.model
        env = {
            **os.environ,
            "RARECHANGE_HOST": "127.0.0.1",
            "RARECHANGE_PORT": "0",
            "RARECHANGE_METRICS_PORT": "0",
            "RARECHANGE_MODELS_DIR": str(models_dir),
            "RARECHANGE_BACKEND": "onnxruntime",
            "RARECHANGE_PROVIDERS": "cpu",
            "RARECHANGE_MAX_BATCH_SIZE": str(max_batch_size),
            "RARECHANGE_MAX_QUEUE_DELAY_US": str(args.max_queue_delay_us),
            "RARECHANGE_INSTANCES": str(args.instances),
            "RARECHANGE_INTRA_OP_THREADS": str(args.intra_op_threads),
            "RARECHANGE_WORKERS": str(args.workers),
            "RARECHANGE_WARMUP": "true",
        }
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by close())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serving.cli.main", "serve"],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=ROOT,
            env=env,
        )
        line = self.proc.stdout.readline()
        if "serving on" not in line:
            self.log.seek(0)
            raise RuntimeError(f"the server did not start: {line}{self.log.read()}")
        self.address = line.split()[-1]
        self.metrics_url = self.proc.stdout.readline().split()[-1]

    def cpu_s(self) -> float:
        """CPU seconds (user + system, all threads) the server process has used; Linux only."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.metrics_url, timeout=30) as resp:
            text = resp.read().decode()
        wanted = {
            "rarechange_patches_total": "patches",
            "rarechange_batches_total": "batches",
            "rarechange_queue_seconds_sum": "queue_s",
            "rarechange_queue_seconds_count": "jobs",
            "rarechange_inference_seconds_sum": "inference_s",
        }
        out = dict.fromkeys(wanted.values(), 0.0)
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name in wanted and s.labels.get("model") == self.model:
                    out[wanted[s.name]] += s.value
        return out

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def drive(
    address: str, request: pb.DetectChangeRequest, concurrency: int, args: argparse.Namespace
) -> tuple[float, float, list[float], dict[str, float], int]:
    """Closed-loop clients: (patches/s, requests/s, latencies, summed timings, requests) of the
    requests that completed inside the measurement window (after ``--ramp`` seconds).

    Each client thread has its own channel and connection, as separate client processes would:
    64 calls at once on one HTTP/2 connection meet the server's max_concurrent_streams (64)."""
    lock = threading.Lock()
    latencies: list[float] = []
    timings = dict.fromkeys(TIMINGS, 0.0)
    patches = 0
    t_start = time.perf_counter() + args.ramp
    t_end = t_start + args.seconds
    errors: list[BaseException] = []
    options = [*channel_options(64 * MiB), ("grpc.use_local_subchannel_pool", 1)]

    def client_loop() -> None:
        nonlocal patches
        try:
            with grpc.insecure_channel(address, options=options) as channel:
                stub = pb_grpc.ChangeDetectionStub(channel)
                while True:
                    t0 = time.perf_counter()
                    if t0 >= t_end:
                        return
                    r = stub.DetectChange(request, timeout=120)
                    t1 = time.perf_counter()
                    if t_start <= t1 < t_end:
                        with lock:
                            latencies.append(t1 - t0)
                            patches += len(r.tiles.probability)
                            for k in TIMINGS:
                                timings[k] += getattr(r.timings, k)
        except BaseException as exc:  # reported below: a failed request invalidates the run
            errors.append(exc)

    threads = [threading.Thread(target=client_loop) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed: {errors[0]!r}")
    return patches / args.seconds, len(latencies) / args.seconds, latencies, timings, len(latencies)


def session_alone(
    model: Path, patches: tuple[np.ndarray, np.ndarray], args: argparse.Namespace
) -> float:
    """Patches/s of ``instances`` sessions, each in its own thread, scoring full batches."""
    before, after = patches
    backends = [
        OnnxRuntimeBackend(model, intra_op_threads=args.intra_op_threads)
        for _ in range(args.instances)
    ]
    for b in backends:
        b.infer(before, after)  # warm-up, as the server does
    counts = [0] * len(backends)
    t_end = time.perf_counter() + args.seconds

    def loop(i: int) -> None:
        while time.perf_counter() < t_end:
            backends[i].infer(before, after)
            counts[i] += len(before)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(backends))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="a bundled model taking 3-band uint8 pairs"
    )
    parser.add_argument("--size", type=int, default=256, help="pair height and width")
    parser.add_argument("--stride", type=int, default=0, help="0: the model's recommended stride")
    parser.add_argument("--concurrency", default="1,4,16,64", help="client threads per point")
    parser.add_argument("--seconds", type=float, default=3.0, help="measurement window per point")
    parser.add_argument("--ramp", type=float, default=0.5, help="unmeasured start of each point")
    parser.add_argument("--rounds", type=int, default=3)
    # the server's settings, explicit (the same names as ServerSettings / RARECHANGE_*)
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--intra-op-threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=16, help="gRPC handler threads")
    parser.add_argument(
        "--batch1-concurrency", type=int, default=16, help="concurrency of the batch-1 point"
    )
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    model = ROOT / "models" / args.model / "model.onnx"
    meta = OnnxRuntimeBackend(model).metadata
    if (meta.channels, meta.input_dtype) != (3, "uint8"):
        parser.error(
            f"{args.model} takes {meta.channels} x {meta.input_dtype}; the requests "
            "are RGB uint8 pairs"
        )
    stride = args.stride or meta.recommended_stride
    scene = render_pair(3, SceneConfig(height=args.size, width=args.size, n_changes=1))
    request = pb.DetectChangeRequest(
        before=image_message(scene.before),
        after=image_message(scene.after),
        options=pb.DetectOptions(stride=stride),  # every output
    )
    per_request = len(grid(args.size, args.size, meta.patch_size, stride))
    # the session's batch: patches of the same pair, repeated to max_batch_size
    tiles = grid(args.size, args.size, meta.patch_size, stride)
    b, a = extract_patches(scene.before, scene.after, tiles, meta.patch_size, stride)
    reps = -(-args.max_batch_size // len(b))
    batch = (
        np.concatenate([b] * reps)[: args.max_batch_size],
        np.concatenate([a] * reps)[: args.max_batch_size],
    )

    with tempfile.TemporaryDirectory() as tmp:
        models_dir = Path(tmp)
        (models_dir / args.model).symlink_to(model.parent)  # serve this model only
        dynamic = Server(models_dir, args, args.max_batch_size)
        batch1 = Server(models_dir, args, 1)
        try:
            alone = Point("ORT session alone", max_batch_size=args.max_batch_size)
            service = {
                c: Point("service", concurrency=c, max_batch_size=args.max_batch_size)
                for c in levels
            }
            single = Point(
                "service, batch 1", concurrency=args.batch1_concurrency, max_batch_size=1
            )
            alone1 = Point("ORT session alone", max_batch_size=1)
            one = (batch[0][:1], batch[1][:1])
            runs: list[tuple[Point, Callable[[], None]]] = [
                (alone, lambda: alone.rates.append(session_alone(model, batch, args))),
                (alone1, lambda: alone1.rates.append(session_alone(model, one, args))),
            ]

            def service_run(point: Point, server: Server) -> Callable[[], None]:
                def run() -> None:
                    m0 = server.metrics()
                    m0.update(cpu=server.cpu_s(), client_cpu=time.process_time())
                    m0["wall"] = time.perf_counter()
                    rate, rps, lat, timings, n = drive(
                        server.address, request, point.concurrency, args
                    )
                    m1 = server.metrics()
                    m1.update(cpu=server.cpu_s(), client_cpu=time.process_time())
                    m1["wall"] = time.perf_counter()
                    point.rates.append(rate)
                    point.request_rates.append(rps)
                    point.latencies += lat
                    point.requests += n
                    for k, v in timings.items():
                        point.timings[k] = point.timings.get(k, 0.0) + v
                    for k in m1:
                        point.server[k] = point.server.get(k, 0.0) + m1[k] - m0[k]

                return run

            runs += [(service[c], service_run(service[c], dynamic)) for c in levels]
            runs.append((single, service_run(single, batch1)))
            load_before = os.getloadavg()
            for r in range(args.rounds):
                for point, run in runs:
                    run()
                    print(
                        f"round {r + 1}/{args.rounds}: {point.name} @{point.concurrency}: "
                        f"{point.rates[-1]:.0f} patches/s",
                        file=sys.stderr,
                        flush=True,
                    )
            load_after = os.getloadavg()
        finally:
            dynamic.close()
            batch1.close()

    def med(xs: list[float]) -> float:
        return statistics.median(xs) if xs else float("nan")

    print(
        f"# serving throughput ({platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, onnxruntime {onnxruntime.__version__}, model {meta.name} "
        f"{meta.version}, {datetime.date.today()})"
    )
    print(
        f"requests: {args.size}x{args.size} pairs, stride {stride} (patch {meta.patch_size}): "
        f"{per_request} patch pairs each, every output; server: max_batch_size "
        f"{args.max_batch_size}, "
        f"max_queue_delay_us {args.max_queue_delay_us}, instances {args.instances}, "
        f"intra_op_threads {args.intra_op_threads}, workers {args.workers}"
    )
    print(
        f"{args.rounds} interleaved rounds of {args.seconds:g} s per point (median patches/s); "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    print()
    print("| path | clients | batch | patches/s | requests/s | p50 ms | p95 ms | p99 ms | "
          "mean batch |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for p in (alone, alone1):
        print(
            f"| {p.name} | - | {p.max_batch_size} | {med(p.rates):.0f} | - | - | - | - "
            f"| {p.max_batch_size} |"
        )
    for p in [*service.values(), single]:
        mean_batch = p.server["patches"] / p.server["batches"] if p.server.get("batches") else 0
        print(
            f"| {p.name} | {p.concurrency} | {p.max_batch_size} | {med(p.rates):.0f} | "
            f"{med(p.request_rates):.0f} | {p.percentile(50):.1f} | {p.percentile(95):.1f} | "
            f"{p.percentile(99):.1f} | {mean_batch:.1f} |"
        )
    print()
    print("Where a request's time goes (means per request, ms; server timings from responses):")
    print("| path | clients | client latency | server total | decode | queue | inference* | "
          "tiling+stitch+regions | outside the handler** |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for p in [*service.values(), single]:
        n = max(p.requests, 1)
        t = {k: v / n for k, v in p.timings.items()}
        client = statistics.fmean(p.latencies) * 1e3 if p.latencies else float("nan")
        print(
            f"| {p.name} | {p.concurrency} | {client:.2f} | {t['total_ms']:.2f} | "
            f"{t['decode_ms']:.2f} | {t['queue_ms']:.2f} | {t['inference_ms']:.2f} | "
            f"{t['stitch_ms']:.2f} | {client - t['total_ms']:.2f} |"
        )
    print(
        "* time of the batches the request's patches were in (shared with the other requests in "
        "them). ** client latency minus the server's total: gRPC transport, (de)serialisation, "
        "waiting for a handler thread, building the response and PNG encoding."
    )
    print()
    print("Server side, over whole points (ramp and drain included):")
    print("| path | clients | mean batch | ms per batch | session busy | server CPU ms/request | "
          "server cores | client CPU ms/request |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for p in [*service.values(), single]:
        d = p.server
        jobs, batches = max(d["jobs"], 1), max(d["batches"], 1)
        print(
            f"| {p.name} | {p.concurrency} | {d['patches'] / batches:.1f} | "
            f"{d['inference_s'] / batches * 1e3:.2f} | {d['inference_s'] / d['wall']:.0%} | "
            f"{d['cpu'] / jobs * 1e3:.2f} | {d['cpu'] / d['wall']:.2f} | "
            f"{d['client_cpu'] / jobs * 1e3:.2f} |"
        )
    print(
        "session busy: the share of wall time the ONNX Runtime session was running a batch; "
        "server cores: the server process's CPU seconds per wall second."
    )
    s16 = service.get(args.batch1_concurrency)
    if s16 is not None:
        print()
        ratios = bracketed(s16.rates, alone.rates)
        batching = [s / b for s, b in zip(s16.rates, single.rates, strict=True)]
        print(
            f"service @{s16.concurrency} / session alone: {med(ratios):.2f} (target >= 0.9); "
            f"dynamic batching / max_batch_size 1 @{s16.concurrency}: {med(batching):.2f} "
            f"(target >= 3); ORT alone, batch {args.max_batch_size} / batch 1: "
            f"{med(alone.rates) / med(alone1.rates):.2f}"
        )
        print(
            "medians of ratios by round (the session alone: the mean of its runs before and "
            "after the service's, as this machine's speed drifts over minutes); by round, "
            f"sorted: {', '.join(f'{r:.2f}' for r in sorted(ratios))} and "
            f"{', '.join(f'{r:.2f}' for r in sorted(batching))}"
        )


def bracketed(rates: list[float], reference: list[float]) -> list[float]:
    """Each round's rate over the reference measured around it: the reference runs first in
    every round, so round r's point lies between reference r and reference r + 1 (the last
    round has only the one before it)."""
    out = []
    for r, rate in enumerate(rates):
        around = reference[r : r + 2]
        out.append(rate / statistics.fmean(around))
    return out


if __name__ == "__main__":
    main()
