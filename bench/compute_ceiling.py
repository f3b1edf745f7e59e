"""How much can batching gain on this CPU? The model's arithmetic against the machine's.

Dynamic batching can only make inference as fast as the hardware allows: a batch of patch pairs
is worth batching while one patch pair alone leaves the cores idle between small kernels. This
script counts the model's floating-point work per patch pair from its ONNX graph (Conv, Gemm and
MatMul multiply-adds, x2), times the ONNX Runtime session alone at several batch sizes, and times
square MatMuls in ONNX Runtime with the same thread count (the MLAS GEMM kernels the convolutions
run on; the fastest size is the attainable peak, as the best size depends on the caches).
GFLOP/s at batch 1 against that peak bounds what batching can give, whatever the server does
(issue 5's 3x target).

Usage: python bench/compute_ceiling.py [--model aerial-rgb] [--threads 2] [--seconds 2]
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, shape_inference

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.backends.onnxruntime import OnnxRuntimeBackend

ROOT = Path(__file__).resolve().parents[1]


def _dims(info: onnx.ValueInfoProto) -> list[int]:
    return [d.dim_value for d in info.type.tensor_type.shape.dim]


def model_flops(model: onnx.ModelProto) -> int:
    """Floating-point operations (2 per multiply-add) of one sample through Conv, Gemm and
    MatMul nodes; the elementwise rest is a few percent of these networks and is left out.
    The batch dimension is fixed to 1 and shapes inferred, so every operand's size is known."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]  # inferred again below, for a batch of 1
    for value in [*m.graph.input, *m.graph.output]:
        dim = value.type.tensor_type.shape.dim
        if dim:
            dim[0].ClearField("dim_param")
            dim[0].dim_value = 1
    m = shape_inference.infer_shapes(m, strict_mode=True)
    shapes = {v.name: _dims(v) for v in [*m.graph.input, *m.graph.value_info, *m.graph.output]}
    shapes.update({t.name: list(t.dims) for t in m.graph.initializer})
    flops = 0
    for node in m.graph.node:
        if node.op_type == "Conv":
            out, weight = shapes[node.output[0]], shapes[node.input[1]]
            # each output value: in_channels / groups x kernel multiply-adds
            flops += 2 * int(np.prod(out)) * int(np.prod(weight[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            a, out = shapes[node.input[0]], shapes[node.output[0]]
            trans_a = any(x.name == "transA" and x.i for x in node.attribute)
            inner = a[-2] if trans_a else a[-1]
            flops += 2 * int(np.prod(out)) * inner
    if not flops:
        raise ValueError("no Conv, Gemm or MatMul node with a known shape")
    return flops


def matmul_session(n: int, threads: int) -> tuple[ort.InferenceSession, dict[str, np.ndarray]]:
    """A session computing one n x n x n float32 MatMul, set up as the backend sets its own."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [n, n])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [n, n])
    w = helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [n, n])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm", [x, w], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(
        model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal((n, n), dtype=np.float32) for k in ("x", "w")}
    return session, feeds


def rate(work: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``work`` over about ``seconds`` (after one warm-up call)."""
    work()
    calls, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        work()
        calls += 1
    return calls / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="aerial-rgb", help="a bundled model")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads, as served")
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument(
        "--matmul", default="256,512,1024", help="square sizes; the best is the peak"
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved; medians reported")
    args = parser.parse_args()

    path = ROOT / "models" / args.model / "model.onnx"
    flops = model_flops(onnx.load(str(path)))
    backend = OnnxRuntimeBackend(path, intra_op_threads=args.threads)
    meta = backend.metadata
    rng = np.random.default_rng(0)
    shape = (meta.channels, meta.patch_size, meta.patch_size)
    batches = [int(b) for b in args.batches.split(",")]
    pairs = {
        b: tuple(rng.integers(0, 256, (b, *shape)).astype(meta.input_dtype) for _ in range(2))
        for b in batches
    }
    sizes = [int(n) for n in args.matmul.split(",")]
    matmuls = {n: matmul_session(n, args.threads) for n in sizes}
    measured: dict[str, list[float]] = {
        **{f"mm{n}": [] for n in sizes},
        **{str(b): [] for b in batches},
    }
    for _ in range(args.rounds):  # interleaved, so drift slows every point alike
        for n, (session, feeds) in matmuls.items():
            run = functools.partial(session.run, None, feeds)
            measured[f"mm{n}"].append(rate(run, args.seconds) * 2 * n**3)
        for b in batches:
            before, after = pairs[b]
            calls = rate(functools.partial(backend.infer, before, after), args.seconds)
            measured[str(b)].append(calls * b * flops)
    gflops = {k: statistics.median(v) / 1e9 for k, v in measured.items()}

    print(
        f"# compute ceiling ({platform.machine()}, {os.cpu_count()} CPUs, onnxruntime "
        f"{ort.__version__}, model {meta.name} {meta.version}, intra-op threads {args.threads})"
    )
    print(
        f"{flops / 1e6:.2f} MFLOP per patch pair (Conv + Gemm, both dates and both classifier "
        f"orders); median of {args.rounds} interleaved rounds of {args.seconds:g} s"
    )
    print()
    print("| what | batch | patch pairs/s | GFLOP/s | share of the MatMul peak |")
    print("|---|---|---|---|---|")
    peak = max(gflops[f"mm{n}"] for n in sizes)
    for n in sizes:
        g = gflops[f"mm{n}"]
        print(f"| MatMul {n} x {n} x {n} | - | - | {g:.1f} | {g / peak:.0%} |")
    for b in batches:
        g = gflops[str(b)]
        print(f"| session alone | {b} | {g * 1e9 / flops:.0f} | {g:.1f} | {g / peak:.0%} |")
    top = max(batches)
    print()
    print(
        f"batching gain, batch {top} / batch 1: {gflops[str(top)] / gflops['1']:.2f}x; the most "
        f"any batching could give here (the MatMul peak / batch 1): {peak / gflops['1']:.2f}x"
    )


if __name__ == "__main__":
    main()
