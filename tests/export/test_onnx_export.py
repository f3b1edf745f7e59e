"""Checkpoint -> ONNX: graph signature, metadata, parity, and how the file is written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export import onnx_export
from export.onnx_export import (
    PARITY_TOLERANCE,
    ExportError,
    ExportResult,
    RawInputDetector,
    check_parity,
    export_checkpoint,
    parity_inputs,
)
from serving.integrity import weights_sha256
from serving.metadata import ModelMetadata
from training.data import PatchSet, synthetic_patches
from training.model import ModelConfig
from training.train import DataInfo, TrainConfig, detector_from_checkpoint, load_checkpoint, train

MODEL = ModelConfig(
    patch_size=32, widths=(8, 16), hidden=32, z_common=4, z_specific=3, classifier_hidden=8
)


@pytest.fixture(scope="module")
def patches() -> PatchSet:
    return synthetic_patches(range(4), patch=32, stride=16, size=128)


@pytest.fixture(scope="module")
def checkpoint(patches: PatchSet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = TrainConfig(batch_size=8, pretrain_steps=3, finetune_steps=3)
    data = DataInfo(name="tiny synthetic", licence="Apache-2.0")
    out = tmp_path_factory.mktemp("run")
    return train(patches, MODEL, cfg, out, data, progress=False).checkpoint


def real_pairs(patches: PatchSet) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(patches.before[:16], patches.after[:16]), (patches.before[-3:], patches.after[-3:])]


@pytest.fixture(scope="module")
def exported(
    checkpoint: Path, patches: PatchSet, tmp_path_factory: pytest.TempPathFactory
) -> ExportResult:
    out = tmp_path_factory.mktemp("models") / "tiny"
    return export_checkpoint(
        checkpoint, out, name="tiny", version="0.0.1", real_inputs=real_pairs(patches)
    )


@pytest.fixture(scope="module")
def session(exported: ExportResult) -> ort.InferenceSession:
    return ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])


def wrapper_of(checkpoint: Path) -> RawInputDetector:
    detector = detector_from_checkpoint(load_checkpoint(checkpoint))
    return RawInputDetector(detector, offset=0.0, scale=1.0 / 255.0).eval()


def test_writes_model_and_card(exported: ExportResult) -> None:
    out = exported.path.parent
    assert exported.path == out / "model.onnx"
    # the model card is README.md beside the model (docs/architecture.md, serving/cli/export.py)
    assert sorted(os.listdir(out)) == ["README.md", "model.onnx"]  # nothing *.tmp left behind
    card = (out / "README.md").read_text()
    assert "# Model card: tiny 0.0.1" in card
    assert exported.metadata.weights_sha256 in card
    onnx.checker.check_model(onnx.load(str(exported.path)))


def test_signature(session: ort.InferenceSession) -> None:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    assert [i.name for i in inputs] == ["before", "after"]
    for i in inputs:
        assert i.type == "tensor(uint8)"
        assert isinstance(i.shape[0], str)  # symbolic batch axis
        assert i.shape[1:] == [3, 32, 32]
    assert [o.name for o in outputs] == ["probability"]
    assert outputs[0].type == "tensor(float)"
    assert len(outputs[0].shape) == 1 and isinstance(outputs[0].shape[0], str)


def test_batch_sizes_1_7_64_give_the_same_per_sample_output(session: ort.InferenceSession) -> None:
    rng = np.random.default_rng(3)
    before = rng.integers(0, 256, (64, 3, 32, 32), dtype=np.uint8)
    after = rng.integers(0, 256, (64, 3, 32, 32), dtype=np.uint8)
    (whole,) = session.run(["probability"], {"before": before, "after": after})
    for n in (1, 7):
        parts = [
            session.run(["probability"], {"before": before[i : i + n], "after": after[i : i + n]})[
                0
            ]
            for i in range(0, 64, n)
        ]
        np.testing.assert_allclose(np.concatenate(parts), whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n", [1, 5])
def test_dynamic_batch(session: ort.InferenceSession, n: int) -> None:
    rng = np.random.default_rng(n)
    before = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    after = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    (prob,) = session.run(["probability"], {"before": before, "after": after})
    assert prob.shape == (n,)
    assert prob.dtype == np.float32
    assert np.all((prob > 0) & (prob < 1))


def test_metadata_matches_checkpoint(exported: ExportResult, checkpoint: Path) -> None:
    model = onnx.load(str(exported.path))
    props = {p.key: p.value for p in model.metadata_props}
    meta = ModelMetadata.from_props(props)
    assert meta == exported.metadata
    payload = load_checkpoint(checkpoint)
    assert meta.name == "tiny" and meta.version == "0.0.1"
    assert meta.patch_size == payload["model_config"]["patch_size"] == 32
    assert meta.channels == payload["model_config"]["in_channels"] == 3
    assert meta.band_names == ("red", "green", "blue")
    assert meta.input_dtype == "uint8"
    assert meta.scale == pytest.approx(1 / 255)
    assert meta.recommended_stride == payload["recommended_stride"]
    assert meta.default_threshold == pytest.approx(np.clip(payload["threshold"], 1e-4, 1 - 1e-4))
    assert meta.threshold_method == payload["threshold_method"]
    assert meta.training_data[0].name == payload["data"]["name"]
    assert meta.weights_sha256 == weights_sha256(model)
    assert meta.precision == "fp32"
    assert model.producer_name == "rarechange"


def test_parity_on_random_and_real_patches(
    exported: ExportResult, checkpoint: Path, patches: PatchSet
) -> None:
    assert 0.0 <= exported.parity_max_abs_diff <= PARITY_TOLERANCE
    inputs = parity_inputs(3, 32, real_pairs(patches), seed=1)
    assert len(inputs) == 5
    worst = check_parity(wrapper_of(checkpoint), exported.path.read_bytes(), inputs)
    assert worst <= 1e-5


def test_parity_check_catches_a_different_model(exported: ExportResult, checkpoint: Path) -> None:
    onnx_bytes = exported.path.read_bytes()
    wrapper = wrapper_of(checkpoint)
    with torch.no_grad():
        wrapper.detector.classifier.net[-1].bias += 1.0  # changed after the bytes were made
    with pytest.raises(ExportError, match="disagree"):
        check_parity(wrapper, onnx_bytes, parity_inputs(3, 32, None))


def test_decoder_is_not_in_the_graph(exported: ExportResult) -> None:
    graph = onnx.load(str(exported.path)).graph
    ops = {n.op_type for n in graph.node}
    assert "Conv" in ops
    assert "ConvTranspose" not in ops
    assert not any("decoder" in i.name for i in graph.initializer)


def test_weights_sha256_is_stable_and_sensitive(exported: ExportResult) -> None:
    a = onnx.load(str(exported.path))
    b = onnx.load(str(exported.path))
    assert weights_sha256(a) == weights_sha256(b) == exported.metadata.weights_sha256
    del b.metadata_props[:]  # the metadata is not part of the digest
    assert weights_sha256(b) == weights_sha256(a)
    init = b.graph.initializer[0]
    arr = onnx.numpy_helper.to_array(init).copy()
    arr.flat[0] += 1e-3
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    assert weights_sha256(a) != weights_sha256(b)


def test_reexport_replaces_the_file_atomically(
    exported: ExportResult, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "tiny"
    shutil.copytree(exported.path.parent, out)  # a folder with a model already in it
    old = (out / "model.onnx").read_bytes()
    replaced: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def spy(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        # the target is never written in place: a complete temporary file is renamed onto it
        assert Path(src).parent == Path(dst).parent
        assert Path(src) != Path(dst)
        assert Path(src).stat().st_size > 0
        replaced.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(onnx_export.os, "replace", spy)
    result = export_checkpoint(checkpoint, out, name="tiny", version="0.0.2")
    assert (out / "model.onnx") in [dst for _, dst in replaced]
    assert (out / "README.md") in [dst for _, dst in replaced]
    assert sorted(os.listdir(out)) == ["README.md", "model.onnx"]  # no *.tmp left behind
    assert result.path.read_bytes() != old
    assert result.metadata.version == "0.0.2"
    assert result.metadata.weights_sha256 == exported.metadata.weights_sha256


# ------------------------------------------------------- input scaling from the checkpoint


def graph_ops(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    graph = onnx.load(str(path)).graph
    return [(n.op_type, tuple(n.input)) for n in graph.node]


def test_uint8_graph_is_unchanged_by_recorded_scaling(
    exported: ExportResult, checkpoint: Path, tmp_path: Path
) -> None:
    """A checkpoint from before scaling was recorded exports to the same graph: uint8 / 255."""
    payload = load_checkpoint(checkpoint)
    assert payload["input_scaling"]["input_dtype"] == "uint8"
    del payload["input_scaling"]
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    again = export_checkpoint(old, tmp_path / "old", name="tiny", version="0.0.1")
    assert graph_ops(again.path) == graph_ops(exported.path)
    assert again.metadata.weights_sha256 == exported.metadata.weights_sha256
    assert "Clip" not in {op for op, _ in graph_ops(exported.path)}
    m = exported.metadata
    assert (m.input_dtype, m.input_range, m.offset, m.scale) == ("uint8", (0, 255), 0, 1 / 255)
    assert (
        "scaled inside the graph by (x - 0) * 0.00392157 |"
        in (exported.path.parent / "README.md").read_text()
    )


def test_uint8_parity_inputs_are_the_same_draws_as_before() -> None:
    rng = np.random.default_rng(0)
    for (b, a), n in zip(parity_inputs(3, 32, None), (1, 7, 64), strict=True):
        assert np.array_equal(b, rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8))
        assert np.array_equal(a, rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8))


@pytest.fixture(scope="module")
def uint16_export(patches: PatchSet, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    """Trained on uint16 patches (the synthetic ones x 40: up to 10,200) scaled by 1/5000 and
    clipped to [0, 1], as the Sentinel-2 preset does."""
    from training.train import InputScaling

    wide = PatchSet(
        patches.before.astype(np.uint16) * 40,
        patches.after.astype(np.uint16) * 40,
        patches.changed_fraction,
    )
    scaling = InputScaling("uint16", (0.0, 10000.0), 0.0, 1 / 5000, (0.0, 1.0))
    cfg = TrainConfig(batch_size=8, pretrain_steps=3, finetune_steps=3)
    data = DataInfo(name="tiny wide", licence="Apache-2.0", band_names=("r", "g", "b"))
    out = tmp_path_factory.mktemp("run16")
    result = train(wide, MODEL, cfg, out, data, progress=False, scaling=scaling)
    assert result is not None
    real = [(wide.before[:16], wide.after[:16])]
    return export_checkpoint(
        result.checkpoint, out / "model", name="tiny16", version="0.0.1", real_inputs=real
    )


def test_uint16_export_takes_uint16_and_clips(uint16_export: ExportResult) -> None:
    m = uint16_export.metadata
    assert (m.input_dtype, m.input_range, m.offset, m.scale) == ("uint16", (0, 10000), 0, 1 / 5000)
    assert m.band_names == ("r", "g", "b")
    assert 0.0 <= uint16_export.parity_max_abs_diff <= PARITY_TOLERANCE
    session = ort.InferenceSession(str(uint16_export.path), providers=["CPUExecutionProvider"])
    assert [i.type for i in session.get_inputs()] == ["tensor(uint16)"] * 2
    assert "Clip" in {op for op, _ in graph_ops(uint16_export.path)}
    # everything at or above 5000 is the same input once clipped
    at = np.full((2, 3, 32, 32), 5000, np.uint16)
    top = np.full((2, 3, 32, 32), 65535, np.uint16)
    low = np.full((2, 3, 32, 32), 1000, np.uint16)
    (p_at,) = session.run(None, {"before": at, "after": low})
    (p_top,) = session.run(None, {"before": top, "after": low})
    np.testing.assert_array_equal(p_at, p_top)
    card = (uint16_export.path.parent / "README.md").read_text()
    assert (
        "uint16 in [0, 10000], scaled inside the graph by (x - 0) * 0.0002, clipped to [0, 1]"
        in (card)
    )


def test_uint16_parity_inputs_cover_the_input_range() -> None:
    from training.train import InputScaling

    scaling = InputScaling("uint16", (0.0, 10000.0), 0.0, 1 / 5000, (0.0, 1.0))
    inputs = parity_inputs(4, 16, None, scaling=scaling)
    assert [b.shape[0] for b, _ in inputs] == [1, 7, 64]
    values = np.concatenate([x.ravel() for pair in inputs for x in pair])
    assert values.dtype == np.uint16 and values.max() > 9000 and values.max() <= 10000
