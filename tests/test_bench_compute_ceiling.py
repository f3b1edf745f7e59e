"""bench/compute_ceiling.py: the FLOP count it divides by, checked by hand on small graphs and on
the bundled default model's architecture; and the script runs end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.test_bench_scripts import load_bench

ROOT = Path(__file__).resolve().parent.parent


def conv_gemm_model(batch: str | int = "batch") -> onnx.ModelProto:
    """x (N, 3, 8, 8) -> Conv 3->4, 3x3, stride 1, pad 1 -> Flatten -> Gemm 256->5."""
    import numpy as np

    w = numpy_helper.from_array(np.zeros((4, 3, 3, 3), np.float32), "w")
    g = numpy_helper.from_array(np.zeros((5, 256), np.float32), "g")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("Gemm", ["f", "g"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])],
        initializer=[w, g],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_flops_by_hand() -> None:
    ceiling = load_bench("compute_ceiling")
    conv = 2 * (4 * 8 * 8) * (3 * 3 * 3)  # each output: 27 multiply-adds
    gemm = 2 * 5 * 256
    assert ceiling.model_flops(conv_gemm_model()) == conv + gemm
    assert ceiling.model_flops(conv_gemm_model(batch=7)) == conv + gemm  # always per sample


def test_flops_of_the_bundled_default() -> None:
    """aerial-rgb: two dates through conv 3->32 and 32->64 (4x4, stride 2) and fc 4096->256->32,
    then the classifier 48->64->1 in both orders."""
    ceiling = load_bench("compute_ceiling")
    encoder = 16 * 16 * 32 * 3 * 16 + 8 * 8 * 64 * 32 * 16 + 4096 * 256 + 256 * 32
    classifier = 48 * 64 + 64
    expected = 2 * (2 * encoder + 2 * classifier)
    model = onnx.load(str(ROOT / "models" / "aerial-rgb" / "model.onnx"))
    assert ceiling.model_flops(model) == expected


def test_no_arithmetic_is_refused() -> None:
    ceiling = load_bench("compute_ceiling")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    with pytest.raises(ValueError, match="no Conv"):
        ceiling.model_flops(helper.make_model(graph))


def test_the_script_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "bench/compute_ceiling.py", "--model", "synthetic-thin", "--seconds",
         "0.2", "--rounds", "1", "--batches", "1,8", "--matmul", "64,128"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| session alone | 8 |" in proc.stdout and "the most any batching" in proc.stdout
