"""The paper's Figures 4 and 5 and the separability scores (training/figures.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from training.experiments.table3 import MNIST_MODEL
from training.figures import (
    centroid_accuracy,
    decode,
    embed_2d,
    embedding_figure,
    encode,
    interpolate,
    interpolation_figure,
    lda_2d,
    linear_probe_accuracy,
    load_pretrained_vae,
    make_figures,
    pca_2d,
    swap_effect,
)
from training.model import DisentangledVAE, ModelConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vae() -> DisentangledVAE:
    torch.manual_seed(0)
    return DisentangledVAE(MNIST_MODEL).eval()


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    """20 random uint8 "digits" (N, 1, 28, 28) and their classes."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (20, 1, 28, 28), dtype=np.uint8), np.arange(20) % 10


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in path.parent.iterdir() if p != path and "tmp" in p.name]


# ----------------------------------------------------------------------------------- Figure 4


def test_interpolation_endpoints_decode_the_means(
    vae: DisentangledVAE, images: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = images
    a, b = x[:3], x[3:6]
    grids = interpolate(vae, a, b, steps=5)
    assert grids["common"].shape == grids["specific"].shape == (3, 5, 1, 28, 28)
    qa, qb = encode(vae, a), encode(vae, b)
    recon_a = decode(vae, qa.mu_c, qa.mu_s)
    np.testing.assert_allclose(grids["common"][:, 0], recon_a, atol=1e-6)
    np.testing.assert_allclose(grids["specific"][:, 0], recon_a, atol=1e-6)
    # the far ends: B's common with A's specific features, and the other way round
    np.testing.assert_allclose(grids["common"][:, -1], decode(vae, qb.mu_c, qa.mu_s), atol=1e-6)
    np.testing.assert_allclose(grids["specific"][:, -1], decode(vae, qa.mu_c, qb.mu_s), atol=1e-6)
    assert grids["common"].min() >= 0.0 and grids["common"].max() <= 1.0


def test_interpolation_rejects_bad_arguments(
    vae: DisentangledVAE, images: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = images
    with pytest.raises(ValueError, match="steps"):
        interpolate(vae, x[:2], x[2:4], steps=1)
    with pytest.raises(ValueError, match="images B"):
        interpolate(vae, x[:2], x[2:5])


def test_interpolation_figure_writes_png_atomically(
    vae: DisentangledVAE, images: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, d = images
    path = tmp_path / "interp.png"
    out = interpolation_figure(vae, x[:2], x[2:4], path, steps=4, digits_a=d[:2], digits_b=d[2:4])
    assert out == path
    assert_png(path)
    assert vae.training is False  # the mode is left as it was


def test_encode_keeps_training_mode(images: tuple[np.ndarray, np.ndarray]) -> None:
    model = DisentangledVAE(MNIST_MODEL).train()
    q1, q2 = encode(model, images[0][:4]), encode(model, images[0][:4])
    torch.testing.assert_close(q1.mu_c, q2.mu_c)  # means, no sampling
    assert model.training


# ----------------------------------------------------------------------------------- Figure 5


def test_pca_2d_shape_and_axes() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 6)) * np.array([10.0, 3.0, 0.1, 0.1, 0.1, 0.1])
    coords, ratio = pca_2d(x)
    assert coords.shape == (200, 2)
    assert ratio[0] > ratio[1] > 0 and ratio.sum() <= 1.0
    # the first axis is the widest direction, the second the next one
    assert abs(np.corrcoef(coords[:, 0], x[:, 0])[0, 1]) > 0.99
    assert abs(np.corrcoef(coords[:, 1], x[:, 1])[0, 1]) > 0.99
    assert embed_2d(x, "pca").shape == (200, 2)


def test_lda_2d_finds_the_discriminative_direction() -> None:
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1, 2], 100)
    x = rng.normal(size=(300, 5)) * np.array([20.0, 1, 1, 1, 1])  # wide but uninformative
    x[:, 3] += 3.0 * y  # narrow but discriminative
    coords = lda_2d(x, y)
    assert coords.shape == (300, 2)
    assert abs(np.corrcoef(coords[:, 0], y)[0, 1]) > 0.9
    with pytest.raises(ValueError, match="labels"):
        embed_2d(x, "lda")


def test_tsne_needs_sklearn_or_works() -> None:
    x = np.random.default_rng(3).normal(size=(30, 4))
    if importlib.util.find_spec("sklearn") is None:
        with pytest.raises(ImportError, match="scikit-learn"):
            embed_2d(x, "tsne")
    else:
        assert embed_2d(x, "tsne").shape == (30, 2)
    with pytest.raises(ValueError, match="method"):
        embed_2d(x, "umap")


@pytest.mark.parametrize("method", ["pca", "lda"])
def test_embedding_figure_writes_png_atomically(
    vae: DisentangledVAE, images: tuple[np.ndarray, np.ndarray], tmp_path: Path, method: str
) -> None:
    x, d = images
    path = tmp_path / "sub" / "embed.png"
    assert embedding_figure(vae, x, d, path, method=method) == path
    assert_png(path)
    with pytest.raises(ValueError, match="digit labels"):
        embedding_figure(vae, x, d[:5], tmp_path / "bad.png")


# -------------------------------------------------------------------------------- separability


def test_centroid_accuracy_on_separable_and_hand_made_examples() -> None:
    rng = np.random.default_rng(4)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    fy = np.repeat([0, 1, 2], 50)
    ey = np.repeat([2, 0, 1], 20)
    fx = centres[fy] + rng.normal(scale=0.5, size=(150, 2))
    ex = centres[ey] + rng.normal(scale=0.5, size=(60, 2))
    assert centroid_accuracy(fx, fy, ex, ey) == 1.0
    assert centroid_accuracy(fx, fy, ex, (ey + 1) % 3) == 0.0  # every label wrong
    # 1-D by hand: centroids 0 (class 5) and 10 (class 7); 4 -> 5, 6 -> 7, 4.9 -> 5
    fit_x, fit_y = np.array([[-1.0], [1.0], [9.0], [11.0]]), np.array([5, 5, 7, 7])
    eval_x = np.array([[4.0], [6.0], [4.9]])
    assert centroid_accuracy(fit_x, fit_y, eval_x, np.array([5, 7, 5])) == 1.0
    assert centroid_accuracy(fit_x, fit_y, eval_x, np.array([5, 5, 5])) == pytest.approx(2 / 3)


def test_centroid_accuracy_standardises_scales() -> None:
    # dimension 0 separates the classes; dimension 1 is huge noise that swamps raw distances
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], 200)
    x = np.stack([y + rng.normal(scale=0.1, size=400), rng.normal(scale=1000.0, size=400)], 1)
    raw = centroid_accuracy(x[::2], y[::2], x[1::2], y[1::2], standardise=False)
    std = centroid_accuracy(x[::2], y[::2], x[1::2], y[1::2], standardise=True)
    assert std > 0.95 > raw


def test_linear_probe_accuracy() -> None:
    rng = np.random.default_rng(6)
    y = np.repeat(np.arange(4), 50)
    x = rng.normal(size=(200, 8))
    x[:, 0] += 4 * (y % 2)
    x[:, 1] += 4 * (y // 2)
    assert linear_probe_accuracy(x[::2], y[::2], x[1::2], y[1::2]) > 0.9
    noise = rng.normal(size=(200, 8))
    assert linear_probe_accuracy(noise[::2], y[::2], noise[1::2], y[1::2]) < 0.6


def test_swap_effect(vae: DisentangledVAE, images: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = images
    same = swap_effect(vae, x[:4], x[:4])
    assert same == pytest.approx(
        {"swap_change_common": 0, "swap_change_specific": 0, "swap_change_both": 0}, abs=1e-6
    )
    moved = swap_effect(vae, x[:4], x[4:8])
    qa, qb = encode(vae, x[:4]), encode(vae, x[4:8])
    expected = np.abs(decode(vae, qb.mu_c, qa.mu_s) - decode(vae, qa.mu_c, qa.mu_s)).mean()
    assert moved["swap_change_common"] == pytest.approx(100 * expected, rel=1e-5)
    assert moved["swap_change_both"] > 0


# --------------------------------------------------------------------------------- checkpoints


def test_load_pretrained_vae_round_trips(vae: DisentangledVAE, tmp_path: Path) -> None:
    path = tmp_path / "pretrain_last.pt"
    opt = torch.optim.Adam(vae.parameters())
    history = [{"epoch": 0, "step": 0, "loss": 1.0}]
    payload = {"model": vae.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}
    torch.save({**payload, "history": history}, path)
    loaded = load_pretrained_vae(path, MNIST_MODEL)
    assert not loaded.training
    for k, v in vae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(loaded.encoder(x).mu_s, vae.encoder(x).mu_s)
    other = ModelConfig(**{**MNIST_MODEL.to_dict(), "z_common": 8})
    with pytest.raises(ValueError, match="model config"):
        load_pretrained_vae(path, other)


# ---------------------------------------------------------------------------- end to end, real data


@pytest.fixture(scope="module")
def pretrained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 pre-training steps on real MNIST-R negatives, saved as an EpochCheckpoints file."""
    from training.data import PatchSet
    from training.datasets.augmented_mnist import MnistNotFound, make_pairs
    from training.train import TrainConfig, pretrain

    try:
        pairs = make_pairs("MNIST-R", "train", 300, 0, seed=0)
    except MnistNotFound as err:
        pytest.skip(f"real MNIST not present: {err}")
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("pre")
    torch.manual_seed(0)
    model = DisentangledVAE(MNIST_MODEL)
    negatives = PatchSet(pairs.before, pairs.after, np.zeros(len(pairs), np.float32))
    cfg = TrainConfig(pretrain_steps=30, batch_size=32, activation_weight=50.0)
    pretrain(model, negatives, cfg, progress=False, run_dir=run_dir)
    return run_dir / "pretrain_last.pt"


@pytest.mark.shared_data
def test_make_figures_end_to_end(pretrained_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "figs"
    paths, scores = make_figures(
        pretrained_checkpoint, "MNIST-R", out, n_per_class=100, n_pairs=3, steps=5, n_embed=200
    )
    assert paths == [out / "interpolation_MNIST-R.png", out / "embedding_MNIST-R.png"]
    for p in paths:
        assert_png(p)
    for k in ("centroid_acc_common", "centroid_acc_specific", "linear_acc_common"):
        assert 0.0 <= scores[k] <= 100.0
    assert scores["n_fit"] == scores["n_eval"] == 200
    assert 10.0 <= scores["chance_acc"] < 30.0
    assert scores["swap_change_both"] > 0
