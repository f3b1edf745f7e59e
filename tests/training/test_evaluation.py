"""`rarechange evaluate` and training/evaluation.py: metrics by hand, the command end to end on a
written folder dataset (bundled model and CVA), the real SZTAKI/OSCD data, errors, no torch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from PIL import Image
from rasterio.transform import Affine

from serving.cli.main import cli
from serving.config import ServerSettings
from serving.cva import cva, gated_mask
from serving.detector import ChangeDetectionCore, DetectRequest
from serving.models import ModelRepository
from serving.quality import auroc, binary_scores
from training.datasets.folder import load_folder
from training.datasets.scenes import ScenePair
from training.evaluation import (
    Counts,
    CvaScorer,
    IncompatibleData,
    ModelInfo,
    PatchCounts,
    PooledRoc,
    fit_pair,
    overlay_panels,
    parse_bands,
    patch_counts,
    pixel_counts,
    scale_to_uint8,
)
from training.synthetic import SceneConfig, render_pair

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "models"
THIN = "synthetic-thin"


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process server's ONNX Runtime on one thread: the test machine is shared."""
    monkeypatch.setenv("RARECHANGE_INTRA_OP_THREADS", "1")


# ------------------------------------------------------------------------------ metrics by hand


def test_pixel_metrics_hand_computed() -> None:
    truth = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], bool)
    pred = np.array([[1, 1, 1], [0, 0, 0], [0, 0, 0]], bool)
    c = pixel_counts(pred, truth)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 1, 5)
    s = c.scores()
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3) and s["iou"] == pytest.approx(2 / 4)
    # pooled = counts added: a second pair with TP 1, FP 3, FN 0, TN 5
    pooled = c + pixel_counts(np.array([1, 1, 1, 1, 0, 0, 0, 0, 0]), np.array([1] + [0] * 8))
    assert pooled == Counts(3, 4, 1, 10)
    assert pooled.scores()["f1"] == pytest.approx(2 * 3 / (2 * 3 + 4 + 1))


def test_count_scores_follow_serving_quality_conventions() -> None:
    rng = np.random.default_rng(0)
    cases = [(rng.random(50) < p, rng.random(50) < q) for p in (0, 0.3) for q in (0, 0.2)]
    for pred, truth in cases:
        ours, theirs = pixel_counts(pred, truth).scores(), binary_scores(pred, truth)
        for key in ("precision", "recall", "f1", "iou"):
            assert ours[key] == pytest.approx(theirs[key]), key


def test_auroc_hand_computed_and_pooled_histogram() -> None:
    # positives 0.35, 0.8 against negatives 0.1, 0.4: 3 of 4 orderings right
    scores, labels = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    assert auroc(scores, labels) == 0.75
    roc = PooledRoc()
    roc.add(scores[:2], labels[:2])  # pooled over two "pairs"
    roc.add(scores[2:], labels[2:])
    assert roc.auroc() == 0.75
    tie = PooledRoc()
    tie.add(np.array([0.5, 0.5]), np.array([0, 1]))
    assert tie.auroc() == 0.5  # ties count half
    assert math.isnan(PooledRoc().auroc())
    rng = np.random.default_rng(1)
    s = rng.random(20000).astype(np.float32)
    lab = rng.random(20000) < s * 0.3
    hist = PooledRoc()
    hist.add(s, lab)
    assert hist.auroc() == pytest.approx(auroc(s, lab), abs=1e-5)


def test_patch_balanced_accuracy_hand_computed() -> None:
    """8x8 image, 4 px patches at stride 4: four patches.

    top-left 16/16 changed, mean p 0.9 -> positive, predicted: TP
    top-right 8/16 changed (exactly half), mean p 0.2 -> positive, missed: FN
    bottom-left 1/16 changed -> ambiguous, left out
    bottom-right unchanged, mean p 0.6 -> negative, predicted: FP
    BA = (TPR 1/2 + TNR 0/1) / 2 = 0.25
    """
    truth = np.zeros((8, 8), np.uint8)
    truth[:4, :4] = 1
    truth[:4, 4:6] = 1
    truth[4, 0] = 1
    prob = np.zeros((8, 8), np.float32)
    prob[:4, :4] = 0.9
    prob[:4, 4:] = 0.2
    prob[4:, 4:] = np.array([0.4, 0.8] * 8).reshape(4, 4)  # mean 0.6
    pc = patch_counts(prob, truth, patch=4, stride=4, threshold=0.5)
    assert pc.counts == Counts(tp=1, fp=1, fn=1, tn=0) and pc.ambiguous == 1
    assert pc.balanced_accuracy == pytest.approx(0.25)
    assert pc.as_dict()["positive"] == 2 and pc.as_dict()["negative"] == 1
    assert math.isnan(PatchCounts(Counts(tn=3)).balanced_accuracy)  # no positive patch
    assert patch_counts(prob, truth, patch=16, stride=4, threshold=0.5) == PatchCounts()


def test_patch_counts_match_a_loop_at_any_stride() -> None:
    rng = np.random.default_rng(2)
    truth = np.zeros((37, 45), np.uint8)
    truth[5:20, 10:30] = 1
    prob = rng.random((37, 45)).astype(np.float32)
    for patch, stride in ((8, 3), (8, 8), (5, 1)):
        tp = fp = fn = tn = amb = 0
        for r in range(0, 37 - patch + 1, stride):
            for c in range(0, 45 - patch + 1, stride):
                frac = truth[r : r + patch, c : c + patch].mean()
                pred = prob[r : r + patch, c : c + patch].mean() >= 0.5
                if frac >= 0.5:
                    tp, fn = tp + pred, fn + (not pred)
                elif frac == 0:
                    fp, tn = fp + pred, tn + (not pred)
                else:
                    amb += 1
        got = patch_counts(prob, truth, patch, stride, 0.5)
        assert got == PatchCounts(Counts(tp, fp, fn, tn), amb), (patch, stride)


# ------------------------------------------------------------------------- bands and pixel types


def four_band_pair(h: int = 20, w: int = 30) -> ScenePair:
    rng = np.random.default_rng(3)
    before = rng.integers(0, 5000, (h, w, 4), dtype=np.uint16)
    after = rng.integers(0, 5000, (h, w, 4), dtype=np.uint16)
    mask = np.zeros((h, w), np.uint8)
    return ScenePair("city", before, after, mask, ("red", "green", "blue", "nir"))


THIN_INFO = ModelInfo(
    THIN, "0.1.0", "served", 32, 8, 0.9, "f1", 3, "uint8", ("red", "green", "blue")
)


def test_bands_select_and_order() -> None:
    pair = four_band_pair()
    got = fit_pair(pair, CvaScorer().info, bands=(4, 1))
    assert got.bands == ("nir", "red")
    assert np.array_equal(got.before, pair.before[..., [3, 0]])
    assert parse_bands("1,2,3") == (1, 2, 3)
    for bad in ("a", "0,1", ""):
        with pytest.raises(ValueError):
            parse_bands(bad)
    with pytest.raises(IncompatibleData, match="only 4 bands"):
        fit_pair(pair, THIN_INFO, bands=(1, 2, 5))


def test_scale_to_uint8_maps_the_pairs_percentiles() -> None:
    before = np.arange(0, 101, dtype=np.uint16).reshape(1, 101, 1)  # 0..100
    after = before.copy()
    b, a = scale_to_uint8(before, after)  # percentiles 2 and 98 of both dates: 2 and 98
    assert b.dtype == np.uint8 and np.array_equal(a, b)
    assert b[0, :3, 0].tolist() == [0, 0, 0] and b[0, -3:, 0].tolist() == [255, 255, 255]
    assert b[0, 50, 0] == round((50 - 2) / 96 * 255)


def test_mismatch_says_which_flags_fit() -> None:
    pair = four_band_pair()
    with pytest.raises(IncompatibleData) as exc:
        fit_pair(pair, THIN_INFO)
    message = str(exc.value)
    assert "takes 3 bands of uint8" in message and "4 bands (red, green, blue, nir)" in message
    assert "--bands 1,2,3" in message and "--scale-to-uint8" in message
    with pytest.raises(IncompatibleData, match="--scale-to-uint8") as exc:
        fit_pair(pair, THIN_INFO, bands=(1, 2, 3))
    assert "--bands" not in str(exc.value)
    fitted = fit_pair(pair, THIN_INFO, bands=(1, 2, 3), to_uint8=True)
    assert fitted.before.dtype == np.uint8 and fitted.bands == ("red", "green", "blue")


def test_overlay_panels_colours_and_downscale() -> None:
    h, w = 6, 10
    image = np.full((h, w, 3), 100, np.uint8)
    truth = np.zeros((h, w), bool)
    truth[0, :2] = True
    pred = np.zeros((h, w), bool)
    pred[0, 1:3] = True
    pic = overlay_panels(image, image, truth, pred, gap=2)
    assert pic.shape == (h, 4 * w + 3 * 2, 3) and pic.dtype == np.uint8
    truth_panel = pic[:, 2 * (w + 2) : 2 * (w + 2) + w]
    pred_panel = pic[:, 3 * (w + 2) :]
    assert truth_panel[0, 0].tolist() == [255, 255, 255] and truth_panel[1, 0].tolist() == [0] * 3
    assert pred_panel[0, 0].tolist() == [0, 128, 255]  # missed
    assert pred_panel[0, 1].tolist() == [255, 255, 255]  # hit
    assert pred_panel[0, 2].tolist() == [255, 0, 0]  # false alarm
    big = overlay_panels(
        np.zeros((100, 900, 3), np.uint8),
        np.zeros((100, 900, 3), np.uint8),
        np.zeros((100, 900), bool),
        np.zeros((100, 900), bool),
    )
    assert big.shape[1] == 2000 and big.shape[0] == round(100 * 2000 / (4 * 900 + 24))


# ------------------------------------------------------------------------------- the command


def write_folder(root: Path, n: int = 2, h: int = 96, w: int = 128) -> Path:
    """A folder dataset (A/, B/, label/) of generated aerial-like pairs with planted changes."""
    for sub in ("A", "B", "label"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        pair = render_pair(10 + i, SceneConfig(height=h, width=w, n_changes=2))
        Image.fromarray(pair.before).save(root / "A" / f"p{i}.png")
        Image.fromarray(pair.after).save(root / "B" / f"p{i}.png")
        Image.fromarray(pair.mask * 255).save(root / "label" / f"p{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("folder"))


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["evaluate", *args])
    return result.exit_code, result.output


def read_results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def repository() -> Iterator[ModelRepository]:
    repo = ModelRepository.load(
        ServerSettings(models_dir=BUNDLED, metrics_port=-1, intra_op_threads=1)
    ).start()
    yield repo
    repo.stop()


def check_outputs(out: Path, names: list[str]) -> dict:
    assert (out / "report.md").is_file()
    for name in names:
        with Image.open(out / "overlays" / f"{name}.png") as im:
            assert im.mode == "RGB" and im.size[0] <= 2000
    assert not list(out.rglob("*.tmp"))  # atomic writes leave nothing behind
    results = read_results(out)
    assert [p["name"] for p in results["pairs"]] == names
    return results


def test_bundled_model_end_to_end(
    folder: Path, tmp_path: Path, repository: ModelRepository
) -> None:
    out = tmp_path / "thin"
    code, output = run(
        "--model",
        THIN,
        "--dataset",
        f"folder:{folder}",
        "--models-dir",
        str(BUNDLED),
        "--out",
        str(out),
    )
    assert code == 0, output
    assert "pooled F1" in output
    results = check_outputs(out, ["p0", "p1"])
    meta = repository.get(THIN).metadata
    assert results["model"]["name"] == THIN and results["model"]["version"] == meta.version
    assert results["model"]["threshold"] == meta.default_threshold
    assert results["model"]["stride"] == meta.recommended_stride
    # a direct computation through the same serving core agrees pixel for pixel
    core = ChangeDetectionCore(repository)
    total = Counts()
    for pair, got in zip(load_folder(folder), results["pairs"], strict=True):
        det = core.detect(DetectRequest(pair.before, pair.after, model=THIN))
        counts = pixel_counts(det.mask, pair.mask.astype(bool))
        total += counts
        assert {k: got["pixels"][k] for k in ("tp", "fp", "fn", "tn")} == counts.as_dict()
        assert got["pixels"]["auroc"] == pytest.approx(auroc(det.probability, pair.mask), abs=1e-6)
        patches = patch_counts(det.probability, pair.mask, 32, 8, meta.default_threshold)
        assert got["patches"]["tp"] == patches.counts.tp
        assert got["patches"]["tn"] == patches.counts.tn
    pooled = results["overall"]["pooled"]
    assert pooled["f1"] == pytest.approx(total.scores()["f1"])
    assert pooled["tp"] == total.tp and pooled["total"] == 2 * 96 * 128
    mean_f1 = np.mean([p["pixels"]["f1"] for p in results["pairs"]])
    assert results["overall"]["mean_over_pairs"]["f1"] == pytest.approx(mean_f1)
    report = (out / "report.md").read_text()
    assert f"rarechange evaluate --model {THIN} --dataset folder:{folder}" in report
    assert f"{THIN} {meta.version}" in report and f"{meta.default_threshold:.4f}" in report
    assert "terms are those of its source" in report
    assert "| p0 |" in report and "| p1 |" in report and "| pooled |" in report


def test_cva_end_to_end_with_threshold_and_stride(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "cva"
    code, output = run("--model", "cva", "--dataset", f"folder:{folder}", "--out", str(out))
    assert code == 0, output
    results = check_outputs(out, ["p0", "p1"])
    assert results["model"]["name"] == "cva" and results["settings"]["models_dir"] is None
    for pair, got in zip(load_folder(folder), results["pairs"], strict=True):
        direct = cva(pair.before, pair.after)
        counts = pixel_counts(direct.mask, pair.mask.astype(bool))
        assert {k: got["pixels"][k] for k in ("tp", "fp", "fn", "tn")} == counts.as_dict()
        assert got["threshold"] == pytest.approx(direct.probability_threshold)
        expected = auroc(direct.magnitude, pair.mask)  # the map is a monotone rescaling
        assert got["pixels"]["auroc"] == pytest.approx(expected, abs=1e-4)
    # a fixed threshold and another stride
    out2 = tmp_path / "cva2"
    code, output = run(
        "--model",
        "cva",
        "--dataset",
        f"folder:{folder}",
        "--out",
        str(out2),
        "--threshold",
        "0.3",
        "--stride",
        "16",
        "--limit",
        "1",
    )
    assert code == 0, output
    results = check_outputs(out2, ["p0"])
    assert results["model"]["stride"] == 16 and results["pairs"][0]["threshold"] == 0.3
    pair = load_folder(folder)[0]
    predicted = (cva(pair.before, pair.after).probability >= 0.3).sum()
    assert results["pairs"][0]["pixels"]["predicted"] == predicted


def test_cva_gated_mask_rule_end_to_end(
    folder: Path, tmp_path: Path, repository: ModelRepository
) -> None:
    out = tmp_path / "gated"
    args = ["--dataset", f"folder:{folder}", "--models-dir", str(BUNDLED), "--out", str(out)]
    code, output = run("--model", THIN, *args, "--mask-rule", "cva-gated")
    assert code == 0, output
    results = check_outputs(out, ["p0", "p1"])
    assert (
        results["model"]["threshold"] is None
        and "cva-gated" in results["model"]["threshold_method"]
    )
    core = ChangeDetectionCore(repository)
    for pair, got in zip(load_folder(folder), results["pairs"], strict=True):
        det = core.detect(DetectRequest(pair.before, pair.after, model=THIN, mask_rule="cva-gated"))
        mask, cut = gated_mask(pair.before, pair.after, det.probability)
        assert np.array_equal(det.mask, mask) and det.gated_cut == cut
        counts = pixel_counts(mask, pair.mask.astype(bool))
        assert {k: got["pixels"][k] for k in ("tp", "fp", "fn", "tn")} == counts.as_dict()
        assert got["threshold"] == pytest.approx(cut)
        # AUROC is the model's map's, whatever the mask rule
        assert got["pixels"]["auroc"] == pytest.approx(auroc(det.probability, pair.mask), abs=1e-6)
        patches = patch_counts(mask.astype(np.float32), pair.mask, 32, 8, 0.5)
        assert got["patches"]["tp"] == patches.counts.tp
    # a threshold means nothing to the gated rule, and CVA has no model to gate it
    code, output = run("--model", THIN, *args, "--mask-rule", "cva-gated", "--threshold", "0.5")
    assert code == 2 and "threshold" in output
    code, output = run("--model", "cva", *args, "--mask-rule", "cva-gated")
    assert code == 2 and "served model" in output


def test_default_out_folder(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, output = run("--model", "cva", "--dataset", f"folder:{folder}", "--limit", "1")
    assert code == 0, output
    assert (tmp_path / "out" / "evaluate" / "cva-folder" / "report.md").is_file()


def test_plain_progress_without_tqdm(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as on a serving-only install
    code, output = run("--model", "cva", "--dataset", f"folder:{folder}", "--out", str(tmp_path))
    assert code == 0, output
    assert "[1/2] p0: F1 " in output and "[2/2] p1: F1 " in output


def write_uint16_folder(root: Path) -> Path:
    """One 4-band uint16 GeoTIFF pair, like OSCD's stacks."""
    for sub in ("A", "B", "label"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(4)
    for sub in ("A", "B"):
        data = rng.integers(0, 4000, (4, 40, 48), dtype=np.uint16)
        with rasterio.open(
            root / sub / "c.tif",
            "w",
            driver="GTiff",
            width=48,
            height=40,
            count=4,
            dtype="uint16",
            crs="EPSG:32631",
            transform=Affine(10, 0, 500000, 0, -10, 5000000),
        ) as ds:
            ds.write(data)
    mask = np.zeros((40, 48), np.uint8)
    mask[10:30, 10:30] = 255
    Image.fromarray(mask).save(root / "label" / "c.png")
    return root


def test_band_and_dtype_mismatch(tmp_path: Path) -> None:
    data = f"folder:{write_uint16_folder(tmp_path / 'ds')}"
    base = ("--model", THIN, "--models-dir", str(BUNDLED), "--dataset", data)
    code, output = run(*base, "--out", str(tmp_path / "o"))
    assert code == 2
    assert "takes 3 bands of uint8" in output and "4 bands" in output and "uint16" in output
    assert "--bands 1,2,3" in output and "--scale-to-uint8" in output
    assert not (tmp_path / "o").exists()
    code, output = run(*base, "--bands", "1,2,3", "--out", str(tmp_path / "o"))
    assert code == 2 and "--scale-to-uint8" in output and "2nd-98th" in output
    code, output = run(*base, "--bands", "1,2,9")
    assert code == 2 and "only 4 bands" in output
    code, output = run(*base, "--bands", "x")
    assert code == 2 and "--bands" in output
    code, output = run(*base, "--bands", "1,2,3", "--scale-to-uint8", "--out", str(tmp_path / "o"))
    assert code == 0, output
    results = read_results(tmp_path / "o")
    assert results["settings"]["bands"] == [1, 2, 3] and results["settings"]["scale_to_uint8"]
    # cva takes every band of any type
    code, output = run("--model", "cva", "--dataset", data, "--out", str(tmp_path / "c"))
    assert code == 0, output


def test_unknown_model_missing_dataset_and_empty_models_dir(folder: Path, tmp_path: Path) -> None:
    code, output = run(
        "--model", "nope", "--dataset", f"folder:{folder}", "--models-dir", str(BUNDLED)
    )
    assert code == 1 and "no model named 'nope'" in output and THIN in output and "cva" in output
    code, output = run("--model", "cva", "--dataset", f"folder:{tmp_path / 'absent'}")
    assert code == 1 and "does not exist" in output
    code, output = run("--model", "cva", "--dataset", f"folder:{tmp_path}")
    assert code == 1 and "needs A/, B/ and label/" in output
    code, output = run("--model", "cva", "--dataset", "nosuchkind:x")
    assert code == 2 and "unknown dataset kind" in output
    empty = tmp_path / "empty"
    empty.mkdir()
    code, output = run("--model", THIN, "--dataset", f"folder:{folder}", "--models-dir", str(empty))
    assert code == 1 and "no models" in output


# ------------------------------------------------------------------------------ the real data


@pytest.mark.shared_data
def test_real_sztaki_cva_and_bundled_model(shared_data: Path, tmp_path: Path) -> None:
    if not (shared_data / "sztaki").is_dir():
        pytest.skip(f"no sztaki/ in {shared_data}")
    data = f"sztaki:{shared_data / 'sztaki'}"
    code, output = run(
        "--model", "cva", "--dataset", data, "--limit", "2", "--out", str(tmp_path / "cva")
    )
    assert code == 0, output
    results = read_results(tmp_path / "cva")
    assert [p["name"] for p in results["pairs"]] == ["Szada/1", "Szada/2"]
    assert (tmp_path / "cva" / "overlays" / "Szada_1.png").is_file()
    first = results["pairs"][0]
    assert first["pixels"]["total"] == 640 * 952 and first["pixels"]["changed"] == 24092
    # measured once: CVA is deterministic (numpy only)
    assert first["pixels"]["f1"] == pytest.approx(0.2399, abs=1e-3)
    assert first["pixels"]["auroc"] == pytest.approx(0.8075, abs=1e-3)
    code, output = run(
        "--model",
        THIN,
        "--models-dir",
        str(BUNDLED),
        "--dataset",
        data,
        "--limit",
        "1",
        "--out",
        str(tmp_path / "thin"),
    )
    assert code == 0, output
    (pair,) = read_results(tmp_path / "thin")["pairs"]
    assert pair["name"] == "Szada/1" and pair["threshold"] == pytest.approx(0.9462, abs=1e-4)
    assert 0.6 < pair["pixels"]["auroc"] < 0.85  # 0.727 measured: synthetic model, real photos


@pytest.mark.shared_data
def test_real_oscd_needs_bands_and_scaling_for_the_rgb_model(
    shared_data: Path, tmp_path: Path
) -> None:
    if not (shared_data / "oscd").is_dir():
        pytest.skip(f"no oscd/ in {shared_data}")
    data = f"oscd:{shared_data / 'oscd'}"
    base = ("--model", THIN, "--models-dir", str(BUNDLED), "--dataset", data, "--limit", "1")
    code, output = run(*base)
    assert code == 2 and "--bands 1,2,3" in output and "--scale-to-uint8" in output
    code, output = run(*base, "--bands", "1,2,3", "--scale-to-uint8", "--out", str(tmp_path))
    assert code == 0, output
    (pair,) = read_results(tmp_path)["pairs"]
    assert pair["name"] == "abudhabi" and pair["pixels"]["total"] == 785 * 799


# ------------------------------------------------------------------------------------ no torch


def test_evaluate_runs_with_torch_unimportable(folder: Path, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from click.testing import CliRunner
        from serving.cli.main import cli
        import training.evaluation, serving.cva
        for model, out in (("cva", "c"), ("{THIN}", "t")):
            r = CliRunner().invoke(cli, ["evaluate", "--model", model, "--dataset",
                                         "folder:{folder}", "--models-dir", "{BUNDLED}",
                                         "--out", "{tmp_path}/" + out, "--limit", "1"])
            assert r.exit_code == 0, r.output
        loaded = [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
        assert sys.modules["torch"] is None and loaded == ["torch"], loaded
        print("evaluated without torch")
        """
    )
    env = {**os.environ, "RARECHANGE_INTRA_OP_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "evaluated without torch" in done.stdout
    assert (tmp_path / "c" / "results.json").is_file() and (tmp_path / "t" / "report.md").is_file()


@pytest.mark.shared_data
def test_pairs_selects_held_out_pairs_by_name(shared_data: Path, tmp_path: Path) -> None:
    if not (shared_data / "sztaki").is_dir():
        pytest.skip(f"no sztaki/ in {shared_data}")
    data = f"sztaki:{shared_data / 'sztaki'}"
    out = tmp_path / "held-out"
    args = ["evaluate", "--model", "cva", "--dataset", data, "--out", str(out)]
    result = CliRunner().invoke(cli, [*args, "--pairs", "Szada/1,Tiszadob/2"])
    assert result.exit_code == 0, result.output
    names = [p["name"] for p in json.loads((out / "results.json").read_text())["pairs"]]
    assert sorted(names) == ["Szada/1", "Tiszadob/2"]
    bad = CliRunner().invoke(cli, [*args, "--pairs", "Szada/9"])
    assert bad.exit_code == 2 and "Szada/9" in bad.output
