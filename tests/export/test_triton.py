"""ONNX -> Triton model repository: the config read back through Triton's own ModelConfig proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper

from export.triton import TRT_ENGINE_CACHE_DIR, triton_data_type, write_triton_repo

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")

ROOT = Path(__file__).resolve().parents[2]
CHANNELS, PATCH = 3, 32


def make_model(
    path: Path,
    *,
    input_type: int = TensorProto.UINT8,
    input_names: tuple[str, str] = ("before", "after"),
    output_name: str = "probability",
    output_type: int = TensorProto.FLOAT,
    batch: str | int = "batch",
) -> Path:
    """A tiny change scorer with the exported graph's signature: sigmoid(mean(after - before))."""
    shape = [batch, CHANNELS, PATCH, PATCH]
    before, after = input_names
    nodes = [
        helper.make_node("Cast", [before], ["b"], to=TensorProto.FLOAT),
        helper.make_node("Cast", [after], ["a"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["a", "b"], ["d"]),
        helper.make_node("ReduceMean", ["d", "axes"], ["m"], keepdims=0),
        helper.make_node(
            "Sigmoid", ["m"], [output_name if output_type == TensorProto.FLOAT else "p"]
        ),
    ]
    if output_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["p"], [output_name], to=output_type))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [
            helper.make_tensor_value_info(before, input_type, shape),
            helper.make_tensor_value_info(after, input_type, shape),
        ],
        [helper.make_tensor_value_info(output_name, output_type, [batch])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def read_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def graph_tensors(path: Path) -> dict[str, tuple[int, list[int]]]:
    """name -> (elem type, shape with -1 for symbolic axes), inputs and outputs."""
    graph = onnx.load(str(path)).graph
    init = {t.name for t in graph.initializer}
    return {
        v.name: (
            v.type.tensor_type.elem_type,
            [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim],
        )
        for v in [*graph.input, *graph.output]
        if v.name not in init
    }


@pytest.fixture
def model(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    return make_model(tmp_path / "src" / "tiny.onnx")


def test_the_model_is_a_valid_change_scorer(model: Path) -> None:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    before = rng.integers(0, 200, (5, CHANNELS, PATCH, PATCH), dtype=np.uint8)
    after = before.copy()
    after[2:] += 50
    (p,) = session.run(["probability"], {"before": before, "after": after})
    assert p.shape == (5,) and p.dtype == np.float32
    np.testing.assert_allclose(p[:2], 0.5)
    np.testing.assert_allclose(p[2:], 1 / (1 + np.exp(-50.0)), rtol=1e-6)


def test_repository_layout_and_config(model: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    config_path = write_triton_repo(
        model, repo, name="tiny", max_batch_size=32, max_queue_delay_us=500, instances=2
    )
    assert config_path == repo / "tiny" / "config.pbtxt"
    assert sorted(p.name for p in (repo / "tiny").iterdir()) == ["1", "config.pbtxt"]
    assert [p.name for p in (repo / "tiny" / "1").iterdir()] == ["model.onnx"]
    assert (repo / "tiny" / "1" / "model.onnx").read_bytes() == model.read_bytes()

    cfg = read_config(config_path)
    assert cfg.name == "tiny"
    assert cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == 32

    graph = graph_tensors(model)
    assert [i.name for i in cfg.input] == ["before", "after"]
    for entry in cfg.input:
        elem_type, shape = graph[entry.name]
        assert entry.data_type == model_config_pb2.TYPE_UINT8
        assert model_config_pb2.DataType.Name(entry.data_type) == triton_data_type(elem_type)
        assert shape[0] == -1
        assert list(entry.dims) == shape[1:] == [CHANNELS, PATCH, PATCH]
        assert not entry.HasField("reshape")

    (out,) = cfg.output
    elem_type, shape = graph[out.name]
    assert out.name == "probability"
    assert out.data_type == model_config_pb2.TYPE_FP32
    assert model_config_pb2.DataType.Name(out.data_type) == triton_data_type(elem_type)
    # graph [batch] -> API [batch, 1], reshaped back to the model's [batch]
    assert shape == [-1]
    assert list(out.dims) == [1]
    assert out.HasField("reshape") and list(out.reshape.shape) == []

    assert cfg.HasField("dynamic_batching")
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert list(cfg.dynamic_batching.preferred_batch_size) == []
    (group,) = cfg.instance_group
    assert group.count == 2
    assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert not cfg.HasField("optimization")
    assert len(cfg.optimization.execution_accelerators.gpu_execution_accelerator) == 0


def test_tensorrt_fp16_accelerator(model: Path, tmp_path: Path) -> None:
    cfg = read_config(
        write_triton_repo(
            model, tmp_path / "repo", name="tiny", kind="KIND_AUTO", tensorrt_fp16=True
        )
    )
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_AUTO
    accelerators = cfg.optimization.execution_accelerators
    assert len(accelerators.cpu_execution_accelerator) == 0
    (trt,) = accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt"
    params = dict(trt.parameters)
    assert params["precision_mode"] == "FP16"
    assert int(params["max_workspace_size_bytes"]) > 0
    assert params["trt_engine_cache_enable"] == "1"
    assert params["trt_engine_cache_path"] == TRT_ENGINE_CACHE_DIR
    shape = f"{CHANNELS}x{PATCH}x{PATCH}"
    assert params["trt_profile_min_shapes"] == f"before:1x{shape},after:1x{shape}"
    assert params["trt_profile_max_shapes"] == f"before:64x{shape},after:64x{shape}"


def test_config_is_deterministic_and_rewrites_replace(model: Path, tmp_path: Path) -> None:
    first = write_triton_repo(model, tmp_path / "a", name="tiny", tensorrt_fp16=True)
    second = write_triton_repo(model, tmp_path / "b", name="tiny", tensorrt_fp16=True)
    assert first.read_bytes() == second.read_bytes()
    again = write_triton_repo(model, tmp_path / "a", name="tiny", instances=3)
    assert read_config(again).instance_group[0].count == 3
    # temporary files are renamed into place, never left behind
    assert sorted(p.name for p in (tmp_path / "a" / "tiny").rglob("*")) == [
        "1",
        "config.pbtxt",
        "model.onnx",
    ]


@pytest.mark.parametrize(
    ("elem_type", "triton"),
    [(TensorProto.UINT16, "TYPE_UINT16"), (TensorProto.FLOAT, "TYPE_FP32")],
)
def test_other_input_dtypes(tmp_path: Path, elem_type: int, triton: str) -> None:
    src = make_model(tmp_path / "m.onnx", input_type=elem_type)
    cfg = read_config(write_triton_repo(src, tmp_path / "repo", name="m", version=3))
    assert {model_config_pb2.DataType.Name(i.data_type) for i in cfg.input} == {triton}
    assert (tmp_path / "repo" / "m" / "3" / "model.onnx").read_bytes() == src.read_bytes()


def test_bundled_model(tmp_path: Path) -> None:
    """The real exported graph, not only the hand-made one, gives a config Triton parses."""
    src = ROOT / "models" / "synthetic-thin" / "model.onnx"
    cfg = read_config(write_triton_repo(src, tmp_path, name="synthetic-thin", kind="KIND_CPU"))
    graph = graph_tensors(src)
    for entry in cfg.input:
        assert list(entry.dims) == graph[entry.name][1][1:]
    assert list(cfg.output[0].dims) == [1]


def test_triton_data_type() -> None:
    assert triton_data_type(TensorProto.UINT8) == "TYPE_UINT8"
    assert triton_data_type(TensorProto.FLOAT16) == "TYPE_FP16"
    assert triton_data_type(TensorProto.BFLOAT16) == "TYPE_BF16"
    for elem_type in (
        TensorProto.BOOL,
        TensorProto.INT8,
        TensorProto.INT64,
        TensorProto.UINT64,
        TensorProto.DOUBLE,
        TensorProto.STRING,
    ):
        # every name it returns is one of Triton's DataType values
        model_config_pb2.DataType.Value(triton_data_type(elem_type))
    with pytest.raises(ValueError, match="COMPLEX64"):
        triton_data_type(TensorProto.COMPLEX64)


@pytest.mark.parametrize(
    ("graph", "match"),
    [
        ({"input_names": ("left", "right")}, "graph inputs"),
        ({"output_name": "score"}, "graph outputs"),
        ({"input_type": TensorProto.INT32}, "INT32"),
        ({"output_type": TensorProto.DOUBLE}, "DOUBLE"),
        ({"batch": 4}, "dynamic batch axis"),
    ],
)
def test_unexpected_graph(tmp_path: Path, graph: dict, match: str) -> None:
    src = make_model(tmp_path / "m.onnx", **graph)
    with pytest.raises(ValueError, match=match):
        write_triton_repo(src, tmp_path / "repo", name="m")
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"instances": 0}, "instances"),
        ({"max_queue_delay_us": -1}, "max_queue_delay_us"),
        ({"version": 0}, "version"),
        ({"kind": "KIND_TPU"}, "kind"),
        ({"kind": "KIND_CPU", "tensorrt_fp16": True}, "GPU"),
        ({"name": "../escape"}, "model name"),
        ({"name": ""}, "model name"),
    ],
)
def test_bad_options(model: Path, tmp_path: Path, options: dict, match: str) -> None:
    kwargs = {"name": "tiny", **options}
    with pytest.raises(ValueError, match=match):
        write_triton_repo(model, tmp_path / "repo", **kwargs)
    assert not (tmp_path / "repo").exists()


def test_imports_without_torch() -> None:
    code = "import sys; sys.modules['torch'] = None; import export.triton"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
