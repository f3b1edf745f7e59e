"""Runs on real scene pairs (data.kind = "scenes"), input scaling from training to the ONNX graph,
and the from-scratch siamese baseline.

Most tests write small labelled folders (PNG uint8 RGB, GeoTIFF uint16 4-band) from synthetic
scenes, so they run on a fresh clone; the presets' smoke runs need the shared SZTAKI and OSCD
copies and skip without them. Every training here is a few steps on one thread.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from rasterio.transform import Affine

from export.onnx_export import RawInputDetector, export_checkpoint
from serving.backends.onnxruntime import OnnxRuntimeBackend
from serving.config import ServerSettings
from training.config import ConfigError, RunConfig, ScenesData, load_config, parse_override
from training.data import PatchSet
from training.evaluation import evaluate, served_scorer
from training.model import ModelConfig
from training.recipes import (
    calibration_patches,
    held_out_patches,
    load_run_config,
    load_scene_split,
    nuisance_copy,
    run,
)
from training.synthetic import SceneConfig, render_pair
from training.train import (
    UINT8,
    DataInfo,
    InputScaling,
    TrainConfig,
    detector_from_checkpoint,
    load_checkpoint,
    to_unit,
    train,
)

SIZE = 96
S2_SCALING = InputScaling("uint16", (0.0, 10000.0), 0.0, 1 / 5000, (0.0, 1.0))
TINY_MODEL = {
    "patch_size": 32,
    "widths": [8, 16],
    "hidden": 32,
    "z_common": 4,
    "z_specific": 3,
    "classifier_hidden": 8,
}
TINY_TRAIN = {"batch_size": 8, "pretrain_steps": 3, "finetune_steps": 3, "device": "cpu"}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scene(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = render_pair(seed, SceneConfig(height=SIZE, width=SIZE, change_rate=40.0))
    return p.before, p.after, p.mask


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four uint8 RGB pairs as PNG, LEVIR-CD layout."""
    root = tmp_path_factory.mktemp("rgb")
    for sub in ("A", "B", "label"):
        (root / sub).mkdir()
    for i in range(4):
        before, after, mask = scene(i)
        Image.fromarray(before).save(root / "A" / f"p{i}.png")
        Image.fromarray(after).save(root / "B" / f"p{i}.png")
        Image.fromarray(mask * 255).save(root / "label" / f"p{i}.png")
    return root


@pytest.fixture(scope="module")
def s2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three uint16 4-band pairs (RGB x 16 plus a NIR-like band, some above the clip) as
    GeoTIFF, with band descriptions."""
    root = tmp_path_factory.mktemp("s2")
    for sub in ("A", "B", "label"):
        (root / sub).mkdir()
    profile = {"driver": "GTiff", "width": SIZE, "height": SIZE, "crs": "EPSG:32631"}
    transform = Affine(10, 0, 500000, 0, -10, 4000000)
    for i in range(3):
        before, after, mask = scene(10 + i)
        for sub, img in (("A", before), ("B", after)):
            rgb = img.astype(np.uint16) * 16
            nir = (img[..., 1].astype(np.uint16) * 30)[..., None]  # up to 7650: clipped
            data = np.moveaxis(np.concatenate([rgb, nir], axis=2), -1, 0)
            with rasterio.open(
                root / sub / f"c{i}.tif",
                "w",
                count=4,
                dtype="uint16",
                transform=transform,
                **profile,
            ) as ds:
                ds.write(data)
                ds.descriptions = ("red", "green", "blue", "nir")
        with rasterio.open(
            root / "label" / f"c{i}.tif",
            "w",
            count=1,
            dtype="uint8",
            transform=transform,
            **profile,
        ) as ds:
            ds.write(mask[None])
    return root


def rgb_config(folder: Path, *overrides: str) -> RunConfig:
    data = {"kind": "scenes", "dataset": f"folder:{folder}", "val_pairs": ["p3"], "stride": 16}
    return with_overrides({"model": TINY_MODEL, "train": TINY_TRAIN, "data": data}, overrides)


def s2_config(folder: Path, *overrides: str) -> RunConfig:
    data = {
        "kind": "scenes",
        "dataset": f"folder:{folder}",
        "val_pairs": [2],
        "bands": [4, 1, 2],  # nir, red, green
        "stride": 16,
        "scaling": {
            "input_dtype": "uint16",
            "input_range": [0.0, 10000.0],
            "scale": 1 / 5000,
            "clip": [0.0, 1.0],
        },
    }
    model = {**TINY_MODEL, "in_channels": 3}
    return with_overrides({"model": model, "train": TINY_TRAIN, "data": data}, overrides)


def with_overrides(data: dict[str, Any], overrides: tuple[str, ...]) -> RunConfig:
    """A config built in code plus ``section.field=value`` overrides, as load_config takes them."""
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return RunConfig.model_validate(data)


# ------------------------------------------------------------------------------ pair selection


def test_val_pairs_by_name_train_on_the_rest(rgb_folder: Path) -> None:
    fit, val = load_scene_split(rgb_config(rgb_folder))
    assert [s.name for s in fit] == ["p0", "p1", "p2"] and [s.name for s in val] == ["p3"]


def test_pairs_by_index_and_explicit_train_pairs(rgb_folder: Path) -> None:
    cfg = rgb_config(rgb_folder, "data.val_pairs=[0]", 'data.train_pairs=["p2", 3]')
    fit, val = load_scene_split(cfg)
    assert [s.name for s in fit] == ["p2", "p3"] and [s.name for s in val] == ["p0"]


def test_loader_options_reach_the_loader(rgb_folder: Path, tmp_path: Path) -> None:
    for role, sub in (("im1", "A"), ("im2", "B"), ("gt", "label")):
        (tmp_path / role).symlink_to(rgb_folder / sub, target_is_directory=True)
    options = 'data.options={before = "im1", after = "im2", label = "gt"}'
    cfg = rgb_config(tmp_path, options)
    fit, val = load_scene_split(cfg)
    assert [s.name for s in fit + val] == ["p0", "p1", "p2", "p3"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ('data.val_pairs=["nope"]', "data.val_pairs: no pair 'nope'"),
        ('data.val_pairs=["p3", 3]', "names a pair twice"),
        ("data.val_pairs=[9]", "data.val_pairs: index 9"),
        ('data.train_pairs=[3, "p0"]', "also val_pairs"),  # p3 is index 3
        ('data.scaling.input_dtype="uint16"', "data.scaling.input_dtype is uint16"),
        ("model.in_channels=4", "model.in_channels is 4"),
    ],
)
def test_data_that_does_not_fit_the_config_is_refused(
    rgb_folder: Path, override: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_scene_split(rgb_config(rgb_folder, override))


def test_bands_are_selected_in_the_given_order(s2_folder: Path) -> None:
    fit, val = load_scene_split(s2_config(s2_folder))
    assert [s.name for s in fit] == ["c0", "c1"] and [s.name for s in val] == ["c2"]
    with rasterio.open(s2_folder / "A" / "c0.tif") as ds:
        raw = ds.read()  # (4, H, W)
    assert fit[0].bands == ("nir", "red", "green") and fit[0].before.dtype == np.uint16
    assert np.array_equal(fit[0].before, np.moveaxis(raw[[3, 0, 1]], 0, -1))
    with pytest.raises(ConfigError, match="has 4 bands"):
        load_scene_split(s2_config(s2_folder, "data.bands=[5, 1, 2]"))


def test_held_out_and_calibration_patches(s2_folder: Path) -> None:
    cfg = s2_config(s2_folder)
    fit, val = load_scene_split(cfg)
    held, positive_fraction = held_out_patches(cfg)
    assert positive_fraction == cfg.train.positive_fraction
    expected = val[0].all_patches(32, 16)  # the validation pair, ambiguous patches included
    assert np.array_equal(held.before, expected.before)
    assert np.array_equal(held.changed_fraction, expected.changed_fraction)
    cal = calibration_patches(cfg, n=20)
    assert len(cal) == 20 and cal.before.dtype == np.uint16 and cal.before.shape[1] == 3
    pool = {p.tobytes() for s in fit for p in s.all_patches(32, 16).before}
    assert all(p.tobytes() in pool for p in cal.before)  # from the training pairs only


# ---------------------------------------------------------------------- nuisance augmentation


@pytest.mark.parametrize("kind", ["rgb", "s2"])
def test_nuisance_copy_keeps_shape_dtype_and_mask(
    kind: str, rgb_folder: Path, s2_folder: Path
) -> None:
    cfg = rgb_config(rgb_folder) if kind == "rgb" else s2_config(s2_folder)
    assert isinstance(cfg.data, ScenesData)
    pair = load_scene_split(cfg)[0][0]
    copy = nuisance_copy(pair, cfg.data.scaling, 1.0, (0, 0, 0))
    assert copy.before.shape == pair.before.shape and copy.before.dtype == pair.before.dtype
    assert np.array_equal(copy.mask, pair.mask) and copy.bands == pair.bands
    assert not np.array_equal(copy.after, pair.after)
    # trivial differences, not new content: still close to the original on average
    diff = np.abs(copy.after.astype(float) - pair.after.astype(float)).mean()
    assert 0 < diff < 0.25 * float(pair.after.max())
    again = nuisance_copy(pair, cfg.data.scaling, 1.0, (0, 0, 0))
    assert np.array_equal(again.after, copy.after)  # deterministic in the seed
    assert not np.array_equal(
        nuisance_copy(pair, cfg.data.scaling, 1.0, (0, 0, 1)).after, copy.after
    )


def test_nuisance_strength_zero_is_the_identity_for_uint8(rgb_folder: Path) -> None:
    pair = load_scene_split(rgb_config(rgb_folder))[0][0]
    copy = nuisance_copy(pair, UINT8, 0.0, (1,))
    assert np.array_equal(copy.before, pair.before) and np.array_equal(copy.after, pair.after)


def test_augmented_negatives_are_added(rgb_folder: Path, tmp_path: Path) -> None:
    plain = run(rgb_config(rgb_folder), tmp_path / "plain", progress=False)
    more = run(rgb_config(rgb_folder, "data.augment.copies=1"), tmp_path / "aug", progress=False)
    assert plain is not None and more is not None
    a, b = load_checkpoint(plain.checkpoint), load_checkpoint(more.checkpoint)
    assert b["n_negatives"] > a["n_negatives"] and b["n_positives"] == a["n_positives"]
    assert "nuisance-augmented" in b["data"]["description"]


# ------------------------------------------------------------------- runs, scaling and export


def test_scenes_run_records_data_scaling_and_uses_the_val_pairs(
    s2_folder: Path, tmp_path: Path
) -> None:
    cfg = s2_config(s2_folder, "data.licence='CC0 test data'")
    result = run(cfg, tmp_path / "run", progress=False)
    assert result is not None
    payload = load_checkpoint(result.checkpoint)
    assert payload["input_scaling"] == {
        "input_dtype": "uint16",
        "input_range": (0.0, 10000.0),
        "offset": 0.0,
        "scale": 1 / 5000,
        "clip": (0.0, 1.0),
    }
    data = payload["data"]
    assert data["band_names"] == ("nir", "red", "green") and data["licence"] == "CC0 test data"
    assert "trained on c0, c1" in data["description"] and "on c2" in data["description"]
    assert payload["recommended_stride"] == 16
    assert "1 held-out scenes" in payload["threshold_method"]
    _, val = load_scene_split(cfg)
    every = val[0].all_patches(32, 16)
    neg, pos = every.split(cfg.train.positive_fraction)
    assert payload["metrics"]["n_negative"] == len(neg)  # the val pair's patches, not a split
    assert payload["metrics"]["n_positive"] == len(pos)
    assert load_run_config(tmp_path / "run") == cfg


def test_uint16_export_scales_like_training(s2_folder: Path, tmp_path: Path) -> None:
    cfg = s2_config(s2_folder)
    result = run(cfg, tmp_path / "run", progress=False)
    assert result is not None
    held, _ = held_out_patches(cfg)
    exported = export_checkpoint(
        result.checkpoint,
        tmp_path / "models" / "s2",
        name="s2",
        version="0.0.1",
        real_inputs=[(held.before[:16], held.after[:16])],
    )
    meta = exported.metadata
    assert (meta.input_dtype, meta.input_range) == ("uint16", (0.0, 10000.0))
    assert (meta.offset, meta.scale) == (0.0, 1 / 5000)
    assert (meta.channels, meta.band_names) == (3, ("nir", "red", "green"))
    card = (exported.path.parent / "README.md").read_text()
    assert (
        "uint16 in [0, 10000], scaled inside the graph by (x - 0) * 0.0002, clipped to [0, 1]"
        in card
    )
    # the served graph and training's to_unit give the same probabilities, clip region included
    detector = detector_from_checkpoint(load_checkpoint(result.checkpoint))
    rng = np.random.default_rng(3)
    before = rng.integers(0, 65535, (5, 3, 32, 32), dtype=np.uint16)  # far above the clip too
    after = rng.integers(0, 65535, (5, 3, 32, 32), dtype=np.uint16)
    with torch.no_grad():
        trained = detector(to_unit(before, "cpu", S2_SCALING), to_unit(after, "cpu", S2_SCALING))
    with OnnxRuntimeBackend(exported.path) as backend:
        served = backend.infer(before, after)
    np.testing.assert_allclose(served, trained.numpy(), atol=1e-5)


def test_to_unit_default_is_the_old_uint8_formula() -> None:
    x = np.random.default_rng(0).integers(0, 256, (4, 3, 8, 8), dtype=np.uint8)
    old = torch.from_numpy(x).float().div_(255.0)
    assert torch.equal(to_unit(x), old) and torch.equal(to_unit(x, "cpu", UINT8), old)
    assert torch.equal(to_unit(x, "cpu", InputScaling()), old)


def test_to_unit_matches_the_export_wrapper() -> None:
    x = np.random.default_rng(1).integers(0, 65535, (2, 4, 8, 8), dtype=np.uint16)
    x[0, 0, 0, :3] = (0, 50, 99)  # below the offset: clipped to 0
    scaling = InputScaling("uint16", (0.0, 65535.0), 100.0, 1 / 3000, (0.0, 1.5))
    seen: list[torch.Tensor] = []

    class Probe(torch.nn.Module):
        def forward(self, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
            seen.append(b)
            return b.mean(dim=(1, 2, 3))

    wrapper = RawInputDetector(Probe(), scaling.offset, scaling.scale, scaling.clip)  # type: ignore[arg-type]
    wrapper(torch.from_numpy(x.astype(np.int32)), torch.from_numpy(x.astype(np.int32)))
    assert torch.equal(seen[0], to_unit(x, "cpu", scaling))
    assert float(seen[0].min()) == 0.0 and float(seen[0].max()) == 1.5


def test_old_checkpoints_without_scaling_are_uint8() -> None:
    assert InputScaling.from_payload(None) == UINT8
    assert InputScaling.from_payload({}) == UINT8


# ----------------------------------------------------------------------- from-scratch baseline


def synthetic_set() -> PatchSet:
    from training.data import synthetic_patches

    return synthetic_patches(range(4), patch=32, stride=16, size=128, change_rate=40.0)


def test_from_scratch_skips_pretraining_and_trains_the_encoder_fully(tmp_path: Path) -> None:
    model = ModelConfig(**{**TINY_MODEL, "widths": (8, 16)})
    cfg = TrainConfig(
        **TINY_TRAIN, from_scratch=True, encoder_lr_scale=0.01, freeze_encoder_steps=100
    )
    data = DataInfo(name="tiny", licence="Apache-2.0")
    result = train(synthetic_set(), model, cfg, tmp_path, data, progress=False)
    assert result is not None
    assert not (tmp_path / "pretrain_last.pt").exists()
    assert {row["stage"] for row in result.history} == {"finetune"}
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    stages = {json.loads(line)["stage"] for line in lines}
    assert stages == {"finetune"}
    payload = load_checkpoint(result.checkpoint)
    tc = payload["train_config"]
    assert tc["from_scratch"] and tc["encoder_lr_scale"] == 1.0 and tc["freeze_encoder_steps"] == 0
    # the encoder learned from step 0 (it starts from the untrained VAE's encoder)
    start = {k[len("encoder.") :]: v for k, v in payload["vae_state"].items() if "encoder." in k}
    end = {k[len("encoder.") :]: v for k, v in payload["detector_state"].items() if "encoder." in k}
    assert start.keys() == end.keys()
    assert any(not torch.equal(start[k], end[k]) for k in start)


def test_from_scratch_finetune_stage_needs_no_pretraining(tmp_path: Path) -> None:
    model = ModelConfig(**{**TINY_MODEL, "widths": (8, 16)})
    data = DataInfo(name="tiny", licence="Apache-2.0")
    with pytest.raises(FileNotFoundError, match="pre-training"):
        train(
            synthetic_set(),
            model,
            TrainConfig(**TINY_TRAIN),
            tmp_path / "a",
            data,
            progress=False,
            stage="finetune",
        )
    cfg = TrainConfig(**TINY_TRAIN, from_scratch=True)
    assert (
        train(synthetic_set(), model, cfg, tmp_path / "b", data, progress=False, stage="finetune")
        is not None
    )


def test_from_scratch_through_run_and_export(rgb_folder: Path, tmp_path: Path) -> None:
    cfg = rgb_config(rgb_folder, "train.from_scratch=true")
    result = run(cfg, tmp_path / "run", progress=False)
    assert result is not None and not (tmp_path / "run" / "pretrain_last.pt").exists()
    exported = export_checkpoint(result.checkpoint, tmp_path / "m", name="scratch", version="1")
    assert exported.metadata.input_dtype == "uint8" and exported.metadata.scale == 1 / 255


def test_distance_head_trains_only_its_two_parameters_and_exports(
    rgb_folder: Path, tmp_path: Path
) -> None:
    cfg = rgb_config(rgb_folder, "model.classifier='distance'", "train.encoder_lr_scale=0")
    result = run(cfg, tmp_path / "run", progress=False)
    assert result is not None
    payload = load_checkpoint(result.checkpoint)
    state, vae = payload["detector_state"], payload["vae_state"]
    assert set(k for k in state if k.startswith("classifier.")) == {
        "classifier.norm",
        "classifier.log_gain",
        "classifier.bias",
    }
    assert float(state["classifier.norm"]) != 1.0  # calibrated on the negatives
    for k, v in state.items():  # the frozen encoder is the pre-trained one, bit for bit
        if k.startswith("encoder."):
            assert torch.equal(v, vae[k]), k
    exported = export_checkpoint(result.checkpoint, tmp_path / "m", name="dist", version="1")
    assert exported.parity_max_abs_diff < 1e-4


# ------------------------------------------------------------- the presets on the shared data


def smoke(preset: str, out: Path, stride: int) -> tuple[RunConfig, Path]:
    """The preset with tiny training (5 steps each stage) and a coarser grid, through run()."""
    overrides = [
        "train.pretrain_steps=5",
        "train.finetune_steps=5",
        "train.batch_size=8",
        'train.device="cpu"',
        f"data.stride={stride}",
    ]
    cfg = load_config(preset=preset, overrides=overrides)
    result = run(cfg, out / "run", progress=False)
    assert result is not None
    return cfg, result.checkpoint


@pytest.mark.parametrize(
    ("preset", "stride", "dtype", "bands", "scale", "licence"),
    [
        ("aerial-rgb", 32, "uint8", ("red", "green", "blue"), 1 / 255, "free for scientific use"),
        ("sentinel2-rgbn", 16, "uint16", ("red", "green", "blue", "nir"), 1 / 5000, "CC BY-NC-SA"),
    ],
)
def test_preset_smoke_run_exports_and_serves(
    shared_data: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    preset: str,
    stride: int,
    dtype: str,
    bands: tuple[str, ...],
    scale: float,
    licence: str,
) -> None:
    monkeypatch.setenv("RARECHANGE_DATA", str(shared_data))
    cfg, checkpoint = smoke(preset, tmp_path, stride)
    held, _ = held_out_patches(cfg)
    models = tmp_path / "models"
    exported = export_checkpoint(
        checkpoint,
        models / preset,
        name=preset,
        version="0.0.1",
        real_inputs=[(held.before[:32], held.after[:32])],
    )
    meta = exported.metadata
    assert (meta.input_dtype, meta.channels, meta.band_names) == (dtype, len(bands), bands)
    assert meta.scale == scale and meta.patch_size == cfg.model.patch_size
    assert meta.recommended_stride == stride
    assert licence in meta.training_data[0].licence
    assert held.before.dtype == np.dtype(dtype)
    with OnnxRuntimeBackend(exported.path) as backend:
        probs = backend.infer(held.before[:8], held.after[:8])
    assert probs.shape == (8,) and np.all((probs >= 0) & (probs <= 1))
    # and the evaluation path (the serving core) scores a validation pair with it
    _, val = load_scene_split(cfg)
    settings = ServerSettings(models_dir=models, metrics_port=-1, intra_op_threads=1)
    with served_scorer(settings) as scorer:
        ev = evaluate(val[:1], scorer)
    assert ev.pairs[0].name == val[0].name


def test_sztaki_leave_one_out_split(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RARECHANGE_DATA", str(shared_data))
    fit, val = load_scene_split(load_config(preset="aerial-rgb"))
    assert [s.name for s in val] == ["Szada/1"] and len(fit) == 7
    assert "Szada/1" not in {s.name for s in fit}


def test_a_fixed_threshold_is_used_and_said(rgb_folder: Path, tmp_path: Path) -> None:
    chosen = run(rgb_config(rgb_folder), tmp_path / "chosen", progress=False)
    fixed = run(rgb_config(rgb_folder, "train.threshold=0.37"), tmp_path / "fixed", progress=False)
    assert chosen is not None and fixed is not None
    a, b = load_checkpoint(chosen.checkpoint), load_checkpoint(fixed.checkpoint)
    assert b["threshold"] == 0.37 and "fixed by train.threshold" in b["threshold_method"]
    assert "max pixel F1" in a["threshold_method"]
    np.testing.assert_equal(b["metrics"]["pixel_auroc"], a["metrics"]["pixel_auroc"])  # same model
    with pytest.raises(ValueError, match=r"train\.threshold must be in"):
        rgb_config(rgb_folder, "train.threshold=1.5")
