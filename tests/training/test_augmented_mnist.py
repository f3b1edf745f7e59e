"""Tests for the Augmented MNIST pairs (MNIST-R, MNIST-B, MNIST-R-B) on the real MNIST."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from serving.config import shared_data_dir
from training.data import PatchSet
from training.datasets.augmented_mnist import (
    FILES,
    VARIANTS,
    MnistNotFound,
    PairSet,
    augment,
    build_pair_indices,
    load_mnist,
    make_pairs,
    texture_bank,
    texture_source,
)


@pytest.fixture(scope="module")
def data_root() -> Path:
    """The data folder holding mnist/; skips when MNIST is not there."""
    root = shared_data_dir()
    try:
        load_mnist("test", root)
    except MnistNotFound as err:
        pytest.skip(f"real MNIST not present: {err}")
    assert root is not None
    return root


@pytest.fixture(scope="module")
def test_digits(data_root: Path) -> tuple[np.ndarray, np.ndarray]:
    return load_mnist("test", data_root)


def _mnist_only_root(data_root: Path, tmp_path: Path) -> Path:
    """A data folder with the real MNIST (symlinked) and nothing else."""
    (tmp_path / "mnist").mkdir()
    for name in (n for pair in FILES.values() for n in pair):
        (tmp_path / "mnist" / name).symlink_to(data_root / "mnist" / name)
    return tmp_path


# ------------------------------------------------------------------------------------- load_mnist


@pytest.mark.shared_data
def test_load_test_split(test_digits: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = test_digits
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert set(np.unique(labels)) == set(range(10))
    assert images.max() == 255 and images[:, 0, :].max() == 0  # ink, and an empty border row
    assert labels[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first test digits


@pytest.mark.shared_data
def test_load_train_split(data_root: Path) -> None:
    images, labels = load_mnist("train", data_root)
    assert images.shape == (60000, 28, 28) and labels.shape == (60000,)
    assert labels[:5].tolist() == [5, 0, 4, 1, 9]


@pytest.mark.shared_data
def test_md5_mismatch_is_rejected(data_root: Path, tmp_path: Path) -> None:
    root = _mnist_only_root(data_root, tmp_path)
    name = FILES["test"][1]
    raw = bytearray(gzip.decompress((data_root / "mnist" / name).read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # one label changed
    (root / "mnist" / name).unlink()
    (root / "mnist" / name).write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(ValueError, match="md5"):
        load_mnist("test", root)
    images, labels = load_mnist("test", root, verify=False)
    assert len(images) == len(labels) == 10000


def test_missing_mnist_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(MnistNotFound, match="RARECHANGE_DATA") as err:
        load_mnist("test", tmp_path)
    assert str(tmp_path) in str(err.value)


# ----------------------------------------------------------------------------- build_pair_indices


def test_pair_indices_counts_and_labels() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=500)
    labels[:2] = 3  # and a class with only a few images is fine
    a, b, lab = build_pair_indices(labels, 1003, 257, np.random.default_rng(1))
    assert len(a) == len(b) == len(lab) == 1260
    assert a.dtype == b.dtype == lab.dtype == np.int64
    assert (lab == 0).sum() == 1003 and (lab == 1).sum() == 257
    neg, pos = lab == 0, lab == 1
    assert (labels[a[neg]] == labels[b[neg]]).all()
    assert (a[neg] != b[neg]).all()
    assert (labels[a[pos]] != labels[b[pos]]).all()
    per_class = np.bincount(labels[a[neg]], minlength=10)
    assert per_class.max() - per_class.min() <= 1  # spread evenly over the classes
    assert 0 < lab[:630].sum() < 257  # shuffled, not negatives first
    assert len(set(b[pos].tolist())) > 150  # second images spread, not one per class


def test_pair_indices_deterministic_and_edge_counts() -> None:
    labels = np.repeat(np.arange(4), 2)  # two images per class: negatives are (i, j) or (j, i)
    first = build_pair_indices(labels, 10, 5, np.random.default_rng(7))
    second = build_pair_indices(labels, 10, 5, np.random.default_rng(7))
    for x, y in zip(first, second, strict=True):
        assert np.array_equal(x, y)
    a, b, lab = build_pair_indices(labels, 0, 0, np.random.default_rng(0))
    assert len(a) == len(b) == len(lab) == 0
    with pytest.raises(ValueError):
        build_pair_indices(np.array([0, 1, 1]), 2, 0, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------- augment


@pytest.mark.shared_data
@pytest.mark.parametrize("variant", VARIANTS)
def test_augment_keeps_shape_and_dtype(
    variant: str, test_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    images = test_digits[0][:50]
    backgrounds = np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8)
    out = augment(images, variant, np.random.default_rng(0), backgrounds)  # type: ignore[arg-type]
    assert out.shape == images.shape and out.dtype == np.uint8
    assert not np.shares_memory(out, images)


@pytest.mark.shared_data
def test_rotation_keeps_ink_and_rotates(test_digits: tuple[np.ndarray, np.ndarray]) -> None:
    images = test_digits[0][:500]
    out = augment(images, "MNIST-R", np.random.default_rng(0))
    mass_in = images.reshape(500, -1).sum(1).astype(np.float64)
    mass_out = out.reshape(500, -1).sum(1)
    assert np.all(np.abs(mass_out / mass_in - 1) < 0.15)
    changed = np.abs(out.astype(int) - images.astype(int)).reshape(500, -1).max(1) > 0
    assert changed.mean() > 0.98
    # each image its own angle: the same digit twice comes out differently
    twice = augment(np.repeat(images[:1], 2, axis=0), "MNIST-R", np.random.default_rng(1))
    assert not np.array_equal(twice[0], twice[1])


@pytest.mark.shared_data
def test_background_fills_empty_regions(test_digits: tuple[np.ndarray, np.ndarray]) -> None:
    images = test_digits[0][:200]
    backgrounds = np.random.default_rng(0).integers(0, 256, (30, 28, 28), dtype=np.uint8)
    out = augment(images, "MNIST-B", np.random.default_rng(0), backgrounds)
    empty = images == 0
    assert out[empty].mean() > 30
    assert out[empty].max() <= round(255 * 0.8)  # texture contrast at most 0.8
    assert (out >= images).all()  # max(digit, texture): the digit stays


# ------------------------------------------------------------------------------------- make_pairs


@pytest.mark.shared_data
def test_make_pairs_counts_and_determinism(data_root: Path) -> None:
    pairs = make_pairs("MNIST-R-B", "test", 60, 40, seed=3, root=data_root)
    assert isinstance(pairs, PairSet) and len(pairs) == 100
    assert pairs.before.shape == pairs.after.shape == (100, 1, 28, 28)
    assert pairs.before.dtype == pairs.after.dtype == np.uint8
    assert (pairs.label == 0).sum() == 60 and (pairs.label == 1).sum() == 40
    assert np.array_equal(pairs.label, (pairs.digits_a != pairs.digits_b).astype(np.int64))
    neg = pairs.label == 0
    same = (pairs.before[neg] == pairs.after[neg]).reshape(60, -1).all(1)
    assert not same.any()

    again = make_pairs("MNIST-R-B", "test", 60, 40, seed=3, root=data_root)
    for field in ("before", "after", "label", "digits_a", "digits_b"):
        assert np.array_equal(getattr(pairs, field), getattr(again, field))
    other = make_pairs("MNIST-R-B", "test", 60, 40, seed=4, root=data_root)
    assert not np.array_equal(pairs.before, other.before)

    patches = pairs.to_patchset()
    assert isinstance(patches, PatchSet) and len(patches) == 100
    assert patches.changed_fraction.dtype == np.float32
    assert np.array_equal(patches.labels(0.5), pairs.label)


@pytest.mark.shared_data
def test_negatives_do_not_depend_on_positive_count(data_root: Path) -> None:
    def negatives(n_positive: int) -> set[bytes]:
        p = make_pairs("MNIST-R", "test", 30, n_positive, seed=0, root=data_root)
        neg = p.label == 0
        return {x.tobytes() + y.tobytes() for x, y in zip(p.before[neg], p.after[neg], strict=True)}

    assert negatives(5) == negatives(50)


# --------------------------------------------------------------------------------------- textures


@pytest.mark.shared_data
def test_texture_bank_from_sztaki(data_root: Path) -> None:
    if texture_source(data_root) != "sztaki":
        pytest.skip("SZTAKI AirChange photos not in the data folder")
    bank = texture_bank(data_root, n=64, seed=0)
    assert bank.shape == (64, 28, 28) and bank.dtype == np.uint8
    assert bank.reshape(64, -1).std(1).min() > 0  # textured, not flat
    assert np.array_equal(bank, texture_bank(data_root, n=64, seed=0))
    assert not np.array_equal(bank, texture_bank(data_root, n=64, seed=1))


@pytest.mark.shared_data
def test_texture_bank_falls_back_to_digit_fragments(data_root: Path, tmp_path: Path) -> None:
    root = _mnist_only_root(data_root, tmp_path)
    assert texture_source(root) == "mnist-fragments"
    bank = texture_bank(root, n=32, seed=0)
    assert bank.shape == (32, 28, 28) and bank.dtype == np.uint8
    assert (bank.reshape(32, -1).max(1) > 100).all()  # every crop has digit strokes
    assert np.array_equal(bank, texture_bank(root, n=32, seed=0))
    pairs = make_pairs("MNIST-B", "test", 4, 4, seed=0, root=root)  # the -B variants still work
    assert pairs.before.shape == (8, 1, 28, 28)
