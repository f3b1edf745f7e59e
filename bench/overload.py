"""Overload: offer about 4x the measured capacity for 60 s; the server must shed the excess at once
(RESOURCE_EXHAUSTED) and keep the latency of what it admits under a bound, then be as it was.

1. Capacity: ``rarechange serve`` in its own process (its settings on the command line, the
   default unbounded queue), driven closed-loop by ``--capacity-clients`` clients (each on its
   own channel, sending the next request when the last returns) for ``--capacity-seconds``:
   requests/s and patch pairs/s it sustains; and one client alone: the unloaded latency.
2. The bound: the queue holds at most what the server scores in ``--headroom`` of
   ``--latency-bound-ms``: ``--max-queue-size = floor(patch pairs/s x bound x headroom)``. The
   batcher refuses a request that does not fit (RESOURCE_EXHAUSTED), so an admitted one waits at
   most about ``headroom x bound`` for the patch pairs ahead of it; the rest of the bound covers
   its own decoding, tiling, batches, stitching, PNG encoding and transfer (the unloaded
   latency). The throughput is first the closed-loop capacity; then (``--calibrate-seconds``, on
   a server with that queue) the throughput admitted requests actually get under this overload,
   which is lower: every refused request is still received, decoded and checked, and a client on
   the same machine competes for its CPUs. The measured server's queue is sized from that.
3. Overload: ``--rate-factor`` x capacity requests/s offered open loop (each sent at its due time
   whatever the replies, round robin over ``--channels`` channels, each call with a deadline of
   ``--deadline-s``) for ``--warmup-seconds``, then the server's RSS and open file descriptors
   (``/proc/<pid>/status`` VmRSS, ``/proc/<pid>/fd``) are read ("before"), then the same load for
   ``--seconds``, then, once every call has ended and ``--settle-s`` has passed, again ("after").
   Latency counts from the time a request was due, not from when it was sent, so a client that
   fell behind cannot hide the server's delay.

Pass (one line each, exit status 1 on any FAIL): every request ends OK or RESOURCE_EXHAUSTED (some
of each: the server was overloaded and still served); the p99 latency of the admitted (OK) ones is
under the bound; the server is healthy afterwards (health SERVING, a request OK); RSS after is
within ``--rss-tolerance`` (5 %) of before; and the load was offered as planned (every call sent,
99 % of them within 100 ms of their due time).

``--server-env MALLOC_ARENA_MAX=2`` (say) runs the server processes with that environment.

Usage: python bench/overload.py [--seconds 60] [--rate-factor 4] [--latency-bound-ms 1000] ...
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import platform
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from serving.api import change_detection_pb2 as pb
from serving.api import change_detection_pb2_grpc as pb_grpc
from serving.client import image_message
from serving.server import channel_options
from serving.tiling import grid
from training.synthetic import SceneConfig, render_pair

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
MAX_LAG_S = 0.1  # the open-loop client's p99 delay behind its schedule, at most
CHANNEL_OPTIONS = [*channel_options(64 * MiB), ("grpc.use_local_subchannel_pool", 1)]


# ---------------------------------------------------------------------- the server process
class ServerProcess:
    """``rarechange serve`` in a child process, configured by its command line only (RARECHANGE_*
    variables are removed from its environment), on free ports of 127.0.0.1."""

    def __init__(
        self,
        models_dir: Path,
        flags: list[str],
        env: dict[str, str] | None = None,
        start_timeout_s: float = 180.0,
    ) -> None:
        self.argv = [
            sys.executable, "-m", "serving.cli.main", "serve",
            "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
            "--models-dir", str(models_dir), *flags,
        ]  # fmt: skip
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RARECHANGE_")},
            **(env or {}),
        }
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by stop())
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT, env=env
        )
        self.returncode: int | None = None
        lines: queue.Queue[str] = queue.Queue()

        def read_two() -> None:  # readline() blocks: read in a thread, wait with a timeout
            for _ in range(2):
                lines.put(self.proc.stdout.readline())

        threading.Thread(target=read_two, daemon=True).start()
        try:
            first = lines.get(timeout=start_timeout_s)
            if "serving on" not in first:
                raise RuntimeError(first)
            self.address = first.split()[-1]
            self.metrics_url = lines.get(timeout=30).split()[-1]
        except (queue.Empty, RuntimeError) as exc:
            self.stop(grace_s=0)
            raise RuntimeError(f"the server did not start ({exc!r}):\n{self.stderr()}") from exc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def metrics(self) -> dict[str, float]:
        """DetectChange calls by final code, as the server counted them."""
        with urllib.request.urlopen(self.metrics_url, timeout=30) as resp:
            text = resp.read().decode()
        out: dict[str, float] = collections.Counter()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "rarechange_requests_total" and s.labels["method"] == "DetectChange":
                    out[s.labels["code"]] += s.value
        return dict(out)

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM (the graceful drain), SIGKILL if it has not exited within grace + 30 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s + 30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.returncode = self.proc.returncode
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.returncode

    def close(self) -> None:
        self.stop()
        self.log.close()


@dataclass
class Usage:
    """One reading of the server process's resources (Linux /proc)."""

    t: float  # seconds since the reader started
    rss_bytes: int
    fds: int
    threads: int


def usage_of(pid: int, t: float = 0.0) -> Usage:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_kb = int(fields["VmRSS"].split()[0])
    return Usage(t, rss_kb * 1024, len(os.listdir(f"/proc/{pid}/fd")), int(fields["Threads"]))


class Sampler:
    """Reads the server's usage every ``interval_s`` in a thread, until stopped."""

    def __init__(self, pid: int, interval_s: float) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[Usage] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def _run(self) -> None:
        while True:
            self.samples.append(usage_of(self.pid, time.perf_counter() - self._t0))
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def healthy(address: str, request: pb.DetectChangeRequest, tiles: int) -> tuple[bool, str]:
    """Health SERVING and one DetectChange answered in full, over a fresh channel."""
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
            response = pb_grpc.ChangeDetectionStub(channel).DetectChange(request, timeout=30)
        except grpc.RpcError as err:
            return False, f"{err.code().name}: {err.details()}"
    serving = status.status == health_pb2.HealthCheckResponse.SERVING
    if not serving or len(response.tiles.probability) != tiles:
        return False, f"health {status.status}, {len(response.tiles.probability)} of {tiles} tiles"
    return True, "health SERVING, DetectChange OK"


# ---------------------------------------------------------------------- requests and load
def make_request(size: int, stride: int, seed: int = 3) -> pb.DetectChangeRequest:
    """A synthetic size x size pair sent raw, every output asked for (as serve_throughput)."""
    scene = render_pair(seed, SceneConfig(height=size, width=size, n_changes=1))
    return pb.DetectChangeRequest(
        before=image_message(scene.before),
        after=image_message(scene.after),
        options=pb.DetectOptions(stride=stride),
    )


def model_info(address: str) -> pb.ModelInfo:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.ChangeDetectionStub(channel).GetModel(pb.GetModelRequest(), timeout=30)


def patches_per_request(info: pb.ModelInfo, size: int, stride: int) -> int:
    return len(grid(size, size, info.patch_size, stride or info.recommended_stride))


@dataclass
class Capacity:
    clients: int
    requests_per_s: float
    patches_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int


def closed_loop(
    address: str,
    request: pb.DetectChangeRequest,
    tiles: int,
    clients: int,
    seconds: float,
    ramp_s: float,
    deadline_s: float,
) -> Capacity:
    """Closed-loop clients, each on its own channel; what completes in the window after the ramp.
    Any failed call fails the measurement: capacity is measured without refusals."""
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[BaseException] = []
    t_start = time.perf_counter() + ramp_s
    t_end = t_start + seconds

    def client() -> None:
        try:
            with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
                stub = pb_grpc.ChangeDetectionStub(channel)
                while (t0 := time.perf_counter()) < t_end:
                    response = stub.DetectChange(request, timeout=deadline_s)
                    t1 = time.perf_counter()
                    if len(response.tiles.probability) != tiles:
                        raise RuntimeError(
                            f"{len(response.tiles.probability)} tiles, expected {tiles}"
                        )
                    if t_start <= t1 < t_end:
                        with lock:
                            latencies.append(t1 - t0)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed measuring capacity: {errors[0]!r}")
    if not latencies:
        raise RuntimeError(f"no request completed in {seconds} s: give more --capacity-seconds")
    n = len(latencies)
    return Capacity(
        clients,
        n / seconds,
        n * tiles / seconds,
        percentile_ms(latencies, 50),
        percentile_ms(latencies, 99),
        n,
    )


@dataclass
class Outcome:
    due_s: float  # when the request was due, seconds from the start of the load
    code: str  # the gRPC status name; WRONG_RESULT, CLIENT_ERROR or NO_REPLY otherwise
    latency_s: float  # from its due time to its end


@dataclass
class LoadResult:
    rate: float
    seconds: float
    planned: int
    sent: int
    max_lag_s: float
    outcomes: list[Outcome] = field(default_factory=list)
    lags_s: list[float] = field(default_factory=list)  # how late each call was sent

    @property
    def p99_lag_s(self) -> float:
        return float(np.percentile(self.lags_s, 99)) if self.lags_s else 0.0

    def as_planned(self) -> tuple[bool, str]:
        """Every call sent, 99 % of them within MAX_LAG_S of their due time (latency counts from
        the due time anyway: a late send cannot hide the server's delay, only lighten the load)."""
        ok = self.sent == self.planned and self.p99_lag_s <= MAX_LAG_S
        return ok, (
            f"{self.sent} of {self.planned} calls sent, p99 {self.p99_lag_s * 1e3:.0f} ms late "
            f"(limit {MAX_LAG_S * 1e3:.0f} ms), at most {self.max_lag_s * 1e3:.0f} ms"
        )

    def codes(self) -> collections.Counter[str]:
        return collections.Counter(o.code for o in self.outcomes)

    def latencies(self, code: str = "OK", since_s: float = 0.0) -> list[float]:
        return [o.latency_s for o in self.outcomes if o.code == code and o.due_s >= since_s]


class OpenLoop:
    """Requests at fixed times (``rate`` per second) from one thread, whatever the replies: each
    is an asynchronous call (``.future``) whose end a callback records."""

    def __init__(
        self,
        address: str,
        request: pb.DetectChangeRequest,
        tiles: int,
        channels: int,
        deadline_s: float,
    ) -> None:
        self.request, self.tiles, self.deadline_s = request, tiles, deadline_s
        self.channels = [
            grpc.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(channels)
        ]
        self.stubs = [pb_grpc.ChangeDetectionStub(c) for c in self.channels]
        self._cond = threading.Condition()
        self._outstanding = 0

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    def __enter__(self) -> OpenLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, rate: float, seconds: float) -> LoadResult:
        planned = max(1, round(rate * seconds))
        result = LoadResult(rate, seconds, planned, sent=0, max_lag_s=0.0)
        t0 = time.perf_counter() + 0.05
        for i in range(result.planned):
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            lag = time.perf_counter() - due
            result.lags_s.append(lag)
            result.max_lag_s = max(result.max_lag_s, lag)
            with self._cond:
                self._outstanding += 1
            call = self.stubs[i % len(self.stubs)].DetectChange.future(
                self.request, timeout=self.deadline_s
            )
            call.add_done_callback(partial(self._done, result, t0, due))
            result.sent += 1
        with self._cond:  # every call has a deadline, so gRPC ends it: this wait is a safeguard
            if not self._cond.wait_for(lambda: self._outstanding == 0, self.deadline_s + 30):
                lost = [Outcome(seconds, "NO_REPLY", float("nan"))] * self._outstanding
                result.outcomes += lost
        return result

    def _done(self, result: LoadResult, t0: float, due: float, call: grpc.Future) -> None:
        end = time.perf_counter()
        try:
            code = call.code().name
            if code == "OK" and len(call.result().tiles.probability) != self.tiles:
                code = "WRONG_RESULT"
        except Exception as exc:  # never lose an outcome to a bug here
            code = f"CLIENT_ERROR:{type(exc).__name__}"
        with self._cond:
            result.outcomes.append(Outcome(due - t0, code, end - due))
            self._outstanding -= 1
            self._cond.notify_all()


# ---------------------------------------------------------------------- shared pieces
def percentile_ms(latencies_s: list[float], q: float) -> float:
    return float(np.percentile(latencies_s, q)) * 1e3 if latencies_s else float("nan")


def queue_size_for(
    patches_per_s: float, bound_s: float, headroom: float, per_request: int, max_batch_size: int
) -> int:
    """The queue bound (patch pairs) that a request admitted behind a full queue drains in
    ``headroom x bound``."""
    size = math.floor(patches_per_s * bound_s * headroom)
    if size < max(per_request, max_batch_size):
        raise SystemExit(
            f"a {bound_s * 1e3:.0f} ms bound at {patches_per_s:.0f} patch pairs/s and headroom "
            f"{headroom} gives a queue of {size} patch pairs, less than one request "
            f"({per_request}) or batch ({max_batch_size}): raise --latency-bound-ms or --headroom,"
            " or send smaller requests (--size)"
        )
    return size


def server_flags(args: argparse.Namespace, max_queue_size: int | None = None) -> list[str]:
    flags = [
        "--backend", "onnxruntime", "--providers", "cpu",
        "--max-batch-size", str(args.max_batch_size),
        "--max-queue-delay-us", str(args.max_queue_delay_us),
        "--instances", str(args.instances),
        "--intra-op-threads", str(args.intra_op_threads),
        "--workers", str(args.workers),
        "--grace-s", str(args.grace_s),
    ]  # fmt: skip
    if max_queue_size is not None:
        flags += ["--max-queue-size", str(max_queue_size)]
    return flags


def server_env(args: argparse.Namespace) -> dict[str, str]:
    """--server-env KEY=VALUE ...: the server process's extra environment (the allocator's, say)."""
    env = {}
    for item in args.server_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--server-env {item!r}: give KEY=VALUE")
        env[key] = value
    return env


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options overload.py and soak.py share: request, server settings, capacity, bound."""
    parser.add_argument("--model", default="synthetic-thin", help="a model in models/")
    parser.add_argument("--size", type=int, default=256, help="request pair height and width")
    parser.add_argument("--stride", type=int, default=0, help="0: the model's recommended one")
    parser.add_argument("--capacity-clients", type=int, default=8)
    parser.add_argument("--capacity-seconds", type=float, default=10.0)
    parser.add_argument("--unloaded-seconds", type=float, default=3.0, help="one client alone")
    parser.add_argument("--ramp", type=float, default=2.0, help="unmeasured start, closed loop")
    parser.add_argument("--latency-bound-ms", type=float, default=1000.0)
    parser.add_argument(
        "--headroom", type=float, default=0.5, help="share of the bound the queue may fill"
    )
    parser.add_argument("--deadline-s", type=float, default=10.0, help="on every call")
    parser.add_argument("--channels", type=int, default=8, help="open-loop client channels")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    # the server's settings (ServerSettings names), on its command line
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--intra-op-threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=16, help="gRPC handler threads")
    parser.add_argument("--grace-s", type=float, default=30.0, help="drain time on SIGTERM")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment of the server process, e.g. MALLOC_ARENA_MAX=2 (repeatable)",
    )


@dataclass
class Setup:
    """What the capacity phase found, and the bound derived from it."""

    models_dir: Path
    request: pb.DetectChangeRequest
    info: pb.ModelInfo
    stride: int
    tiles: int
    capacity: Capacity
    unloaded: Capacity | None
    max_queue_size: int
    capacity_server_exit: int | None
    # the throughput the queue is sized from, and where it was measured
    sizing_patches_per_s: float = 0.0
    sizing_source: str = "closed-loop capacity"

    @property
    def queue_wait_ms(self) -> float:
        return self.max_queue_size / self.sizing_patches_per_s * 1e3

    def size_queue(self, args: argparse.Namespace, patches_per_s: float, source: str) -> None:
        self.max_queue_size = queue_size_for(
            patches_per_s, args.latency_bound_ms / 1e3, args.headroom, self.tiles,
            args.max_batch_size,
        )  # fmt: skip
        self.sizing_patches_per_s, self.sizing_source = patches_per_s, source


def measure_capacity(args: argparse.Namespace, models_dir: Path) -> Setup:
    """Phase 1 on its own server (the default, unbounded queue); then the bound's queue size."""
    request = make_request(args.size, args.stride)
    server = ServerProcess(models_dir, server_flags(args), server_env(args))
    try:
        info = model_info(server.address)
        stride = args.stride or info.recommended_stride
        tiles = patches_per_request(info, args.size, stride)
        log(f"capacity: {args.capacity_clients} closed-loop clients, {args.capacity_seconds:g} s")
        capacity = closed_loop(
            server.address, request, tiles, args.capacity_clients, args.capacity_seconds,
            args.ramp, args.deadline_s,
        )  # fmt: skip
        unloaded = None
        if args.unloaded_seconds > 0:
            unloaded = closed_loop(
                server.address, request, tiles, 1, args.unloaded_seconds, 0.5, args.deadline_s
            )
    finally:
        exit_code = server.stop()
        server.log.close()
    setup = Setup(models_dir, request, info, stride, tiles, capacity, unloaded, 0, exit_code)
    setup.size_queue(args, capacity.patches_per_s, "closed-loop capacity")
    return setup


def one_model_dir(tmp: Path, model: str) -> Path:
    """A models dir holding only ``model`` (the bundled one also holds variants)."""
    source = ROOT / "models" / model
    if not (source / "model.onnx").is_file():
        raise SystemExit(f"no model {model!r} in {ROOT / 'models'}")
    (tmp / model).symlink_to(source)
    return tmp


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def header(title: str, args: argparse.Namespace, setup: Setup) -> list[str]:
    import onnxruntime  # the version only; the server process has its own

    cap, info = setup.capacity, setup.info
    lines = [
        f"# {title} ({platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, onnxruntime {onnxruntime.__version__}, model {info.name} "
        f"{info.version}, {datetime.date.today()}, load average {os.getloadavg()[0]:.2f})",
        f"requests: {args.size}x{args.size} pairs sent raw, stride {setup.stride} (patch "
        f"{info.patch_size}): {setup.tiles} patch pairs each, every output",
        f"server: {' '.join([*args.server_env, 'rarechange serve'])} "
        f"{' '.join(server_flags(args, setup.max_queue_size))}",
        f"capacity (closed loop, {cap.clients} clients, {args.capacity_seconds:g} s): "
        f"{cap.requests_per_s:.1f} requests/s, {cap.patches_per_s:.0f} patch pairs/s, "
        f"p50 {cap.p50_ms:.0f} ms, p99 {cap.p99_ms:.0f} ms",
    ]
    if setup.unloaded is not None:
        u = setup.unloaded
        lines.append(
            f"unloaded (1 client, {args.unloaded_seconds:g} s): p50 {u.p50_ms:.0f} ms, p99 "
            f"{u.p99_ms:.0f} ms"
        )
    if setup.sizing_source.startswith("given"):
        lines.append(
            f"max_queue_size {setup.max_queue_size} patch pairs ({setup.sizing_source}; "
            f"{setup.max_queue_size / setup.tiles:.1f} requests): a request admitted behind a "
            f"full queue waits about {setup.queue_wait_ms:.0f} ms at the closed-loop capacity"
        )
        return lines
    lines.append(
        f"bound {args.latency_bound_ms:.0f} ms -> max_queue_size = floor("
        f"{setup.sizing_patches_per_s:.0f} patch pairs/s ({setup.sizing_source}) x "
        f"{args.latency_bound_ms / 1e3:g} s x headroom {args.headroom:g}) = "
        f"{setup.max_queue_size} patch pairs ({setup.max_queue_size / setup.tiles:.1f} requests): "
        f"a request admitted behind a full queue waits about {setup.queue_wait_ms:.0f} ms for "
        "the batches ahead of it"
    )
    return lines


class Verdicts:
    """PASS/FAIL lines; ``failed`` when any is FAIL."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, bool, str]] = []

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.lines.append((name, ok, detail))

    @property
    def failed(self) -> bool:
        return not all(ok for _, ok, _ in self.lines)

    def print(self) -> None:
        for name, ok, detail in self.lines:
            print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {name: {"pass": ok, "detail": detail} for name, ok, detail in self.lines}


def status_table(rows: list[tuple[str, LoadResult]]) -> list[str]:
    codes = sorted({c for _, r in rows for c in r.codes()}, key=lambda c: (c != "OK", c))
    out = [
        f"| phase | offered req/s | sent | {' | '.join(codes)} | OK p50 ms | OK p99 ms | "
        "OK max ms | refused p99 ms |",
        "|---|---|---|" + "---|" * len(codes) + "---|---|---|---|",
    ]
    for name, r in rows:
        counts = r.codes()
        ok, refused = r.latencies("OK"), r.latencies("RESOURCE_EXHAUSTED")
        cells = " | ".join(f"{counts.get(c, 0)}" for c in codes)
        out.append(
            f"| {name} | {r.rate:.1f} | {r.sent} | {cells} | {percentile_ms(ok, 50):.0f} | "
            f"{percentile_ms(ok, 99):.0f} | {max(ok) * 1e3 if ok else float('nan'):.0f} | "
            f"{percentile_ms(refused, 99):.0f} |"
        )
    return out


def mib(n: float) -> str:
    return f"{n / MiB:.1f}"


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(data, indent=1, default=str) + "\n")


# ---------------------------------------------------------------------- the overload run
def admitted_patches_per_s(result: LoadResult, tiles: int, skip_s: float) -> float:
    """Patch pairs/s of the OK calls that ended between ``skip_s`` (queue full by then) and the
    end of the load. Calls still queued when the load stops end later: counted, they would add
    a full queue's worth to the window and overestimate the throughput (the queue sized from it
    then holds more than the bound allows: admitted calls past their deadline on a slow
    machine, seen in CI with a 2-second window)."""
    ended = [
        o
        for o in result.outcomes
        if o.code == "OK" and skip_s <= o.due_s + o.latency_s <= result.seconds
    ]
    return len(ended) * tiles / max(result.seconds - skip_s, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser)
    parser.add_argument("--seconds", type=float, default=60.0, help="overload duration")
    parser.add_argument("--rate-factor", type=float, default=4.0, help="x measured capacity")
    parser.add_argument(
        "--calibrate-seconds",
        type=float,
        default=15.0,
        help="size the queue from the throughput admitted under this overload (0: from the "
        "closed-loop capacity)",
    )
    parser.add_argument("--warmup-seconds", type=float, default=20.0, help="same load, first")
    parser.add_argument("--settle-s", type=float, default=3.0, help="after the load, before RSS")
    parser.add_argument("--rss-tolerance", type=float, default=0.05)
    args = parser.parse_args()

    def offer(server: ServerProcess, rate: float, seconds: float) -> LoadResult:
        """Open-loop load on new channels, closed afterwards: before/after are read alike."""
        with OpenLoop(
            server.address, setup.request, setup.tiles, args.channels, args.deadline_s
        ) as load:
            return load.run(rate, seconds)

    with tempfile.TemporaryDirectory() as tmp:
        setup = measure_capacity(args, one_model_dir(Path(tmp), args.model))
        rate = args.rate_factor * setup.capacity.requests_per_s
        calibration: LoadResult | None = None
        if args.calibrate_seconds > 0:
            # refusing costs the server (each refused request is received, decoded and checked)
            # and on a shared machine the client competes too: the throughput left for admitted
            # requests under this very overload is what their queue wait depends on
            log(f"calibration: {rate:.1f} requests/s for {args.calibrate_seconds:g} s")
            server = ServerProcess(
                setup.models_dir, server_flags(args, setup.max_queue_size), server_env(args)
            )
            try:
                calibration = offer(server, rate, args.calibrate_seconds)
            finally:
                server.stop(args.grace_s)
                server.log.close()
            skip = min(3.0, args.calibrate_seconds / 3)
            admitted = admitted_patches_per_s(calibration, setup.tiles, skip)
            source = (
                f"admitted under this overload, calibration of {args.calibrate_seconds:g} s "
                f"with max_queue_size {setup.max_queue_size}; closed-loop capacity "
                f"{setup.capacity.patches_per_s:.0f}"
            )
            setup.size_queue(args, admitted, source)
        server = ServerProcess(
            setup.models_dir, server_flags(args, setup.max_queue_size), server_env(args)
        )
        try:
            cold = usage_of(server.pid)
            with Sampler(server.pid, 1.0) as sampler:
                log(f"warm-up: {rate:.1f} requests/s for {args.warmup_seconds:g} s")
                warmup = offer(server, rate, args.warmup_seconds)
                time.sleep(args.settle_s)
                before = usage_of(server.pid, sampler.elapsed())
                log(f"overload: {rate:.1f} requests/s for {args.seconds:g} s")
                overload = offer(server, rate, args.seconds)
                time.sleep(args.settle_s)
                after = usage_of(server.pid, sampler.elapsed())
            server_codes = server.metrics()
            is_healthy, health_detail = healthy(server.address, setup.request, setup.tiles)
        finally:
            exit_code = server.stop(args.grace_s)
            server.log.close()

    warm_peak = max((u for u in sampler.samples if u.t <= before.t), key=lambda u: u.rss_bytes)
    peak = max((u for u in sampler.samples if u.t > before.t), key=lambda u: u.rss_bytes)
    codes = overload.codes()
    ok = overload.latencies("OK")
    p99 = percentile_ms(ok, 99)
    rss_change = after.rss_bytes / before.rss_bytes - 1
    verdicts = Verdicts()
    others = {c: n for c, n in codes.items() if c not in ("OK", "RESOURCE_EXHAUSTED")}
    verdicts.check(
        "statuses",
        not others and codes["OK"] > 0 and codes["RESOURCE_EXHAUSTED"] > 0,
        f"OK {codes['OK']}, RESOURCE_EXHAUSTED {codes['RESOURCE_EXHAUSTED']}, anything else "
        f"{sum(others.values())} {others or ''}(needed: nothing else, and some of each)",
    )
    verdicts.check(
        "admitted latency",
        p99 < args.latency_bound_ms,
        f"p99 of OK {p99:.0f} ms < bound {args.latency_bound_ms:.0f} ms",
    )
    verdicts.check("healthy afterwards", is_healthy, health_detail)
    verdicts.check(
        "RSS after = before",
        abs(rss_change) <= args.rss_tolerance,
        f"{mib(after.rss_bytes)} MiB after vs {mib(before.rss_bytes)} MiB before: "
        f"{rss_change:+.1%} (tolerance {args.rss_tolerance:.0%})",
    )
    verdicts.check("load offered as planned", *overload.as_planned())

    sys.stderr.flush()
    lines = header("overload", args, setup)
    lines.append(
        f"offered: {rate:.1f} requests/s ({args.rate_factor:g} x capacity) open loop, "
        f"{args.warmup_seconds:g} s warm-up then {args.seconds:g} s measured, {args.channels} "
        f"channels, deadline {args.deadline_s:g} s per call; latency from each call's due time"
    )
    print("\n".join(lines))
    print()
    phases = [("warm-up", warmup), ("overload", overload)]
    if calibration is not None:
        phases.insert(0, ("calibration (other server)", calibration))
    print("\n".join(status_table(phases)))
    served = admitted_patches_per_s(overload, setup.tiles, 0)
    print(
        f"admitted throughput under overload: {served:.0f} patch pairs/s "
        f"({served / setup.tiles:.1f} requests/s; closed-loop capacity "
        f"{setup.capacity.requests_per_s:.1f}); the server's "
        f"own count of the calls (/metrics, warm-up, overload and the health request): "
        f"{dict(sorted(server_codes.items()))}"
    )
    print()
    print("| server process | RSS MiB | open fds | threads |")
    print("|---|---|---|---|")
    for name, u in (
        ("started (warm, idle)", cold),
        ("peak during warm-up", warm_peak),
        (f"before (after warm-up, +{args.settle_s:g} s)", before),
        ("peak during overload", peak),
        (f"after (+{args.settle_s:g} s)", after),
    ):
        print(f"| {name} | {mib(u.rss_bytes)} | {u.fds} | {u.threads} |")
    print(f"server exit status on SIGTERM: {exit_code} (capacity server: "
          f"{setup.capacity_server_exit})")  # fmt: skip
    print()
    verdicts.print()
    write_json(
        args.json,
        {
            "capacity": asdict(setup.capacity),
            "unloaded": asdict(setup.unloaded) if setup.unloaded else None,
            "max_queue_size": setup.max_queue_size,
            "sizing_patches_per_s": setup.sizing_patches_per_s,
            "tiles_per_request": setup.tiles,
            "rate": rate,
            "codes": dict(codes),
            "warmup_codes": dict(warmup.codes()),
            "calibration_codes": dict(calibration.codes()) if calibration else None,
            "server_codes": server_codes,
            "ok_p50_ms": percentile_ms(ok, 50),
            "ok_p99_ms": p99,
            "bound_ms": args.latency_bound_ms,
            "usage": {
                "cold": asdict(cold),
                "warmup_peak": asdict(warm_peak),
                "before": asdict(before),
                "peak": asdict(peak),
                "after": asdict(after),
            },
            "samples": [asdict(u) for u in sampler.samples],
            "exit_code": exit_code,
            "criteria": verdicts.as_dict(),
        },
    )
    sys.exit(1 if verdicts.failed else 0)


if __name__ == "__main__":
    main()
