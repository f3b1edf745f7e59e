"""SZTAKI AirChange loader: the real 8 pairs, and written pairs for the error cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.datasets.scenes import DatasetError, DatasetNotFound, ScenePair
from training.datasets.sztaki import list_sztaki, load_sztaki

# changed fraction of each real pair, measured once (gt.png pixels that are 255)
REAL_FRACTIONS = {
    "Szada/1": 0.0395,
    "Szada/2": 0.0578,
    "Szada/3": 0.0197,
    "Szada/4": 0.0904,
    "Szada/5": 0.0309,
    "Tiszadob/1": 0.0022,
    "Tiszadob/2": 0.0774,
    "Tiszadob/3": 0.1452,
}


@pytest.fixture(scope="module")
def real(shared_data: Path) -> list[ScenePair]:
    if not (shared_data / "sztaki").is_dir():
        pytest.skip(f"no sztaki/ in {shared_data}")
    return load_sztaki(shared_data)


def write_pair(
    folder: Path, h: int = 16, w: int = 24, gt_size: tuple[int, int] | None = None
) -> None:
    """A pair folder in the real format: RGB im1/im2 PNG, grey 0/255 gt.png."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(str(folder)))
    for name in ("im1.png", "im2.png"):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    gh, gw = gt_size or (h, w)
    gt = np.zeros((gh, gw), np.uint8)
    gt[: gh // 4, : gw // 4] = 255
    Image.fromarray(gt).save(folder / "gt.png")


@pytest.mark.shared_data
def test_real_pairs_counts_shapes_dtypes(real: list[ScenePair]) -> None:
    assert [s.name for s in real] == list(REAL_FRACTIONS)
    for s in real:
        assert s.before.shape == s.after.shape == (640, 952, 3)  # 952x640 as W x H
        assert s.before.dtype == s.after.dtype == np.uint8
        assert s.mask.shape == (640, 952) and s.mask.dtype == np.uint8
        assert set(np.unique(s.mask).tolist()) == {0, 1}
        assert s.bands == ("red", "green", "blue") and s.crs is None
        assert s.changed_fraction == pytest.approx(REAL_FRACTIONS[s.name], abs=5e-4)
        assert not np.array_equal(s.before, s.after)


@pytest.mark.shared_data
def test_real_mask_is_gt_png(real: list[ScenePair], shared_data: Path) -> None:
    gt = np.asarray(Image.open(shared_data / "sztaki" / "Szada" / "1" / "gt.png"))
    assert np.array_equal(real[0].mask, (gt == 255).astype(np.uint8))


@pytest.mark.shared_data
def test_real_patches_labels_follow_the_mask(real: list[ScenePair]) -> None:
    s = real[3]  # Szada/4, 9 % changed
    ps = s.patches(64, 32, positive_fraction=0.1)
    neg, pos = ps.split(0.1)
    assert len(neg) > 100 and len(pos) > 10
    assert len(ps) == len(neg) + len(pos) < len(s.all_patches(64, 32))
    # recompute each kept patch's fraction from the mask at its grid position
    every = s.all_patches(64, 32)
    cols = len(range(0, 952 - 64 + 1, 32))
    kept = np.flatnonzero((every.changed_fraction == 0) | (every.changed_fraction >= 0.1))
    for i, k in enumerate(kept):
        r, c = divmod(int(k), cols)
        rows, cols_ = slice(r * 32, r * 32 + 64), slice(c * 32, c * 32 + 64)
        assert ps.changed_fraction[i] == pytest.approx(s.mask[rows, cols_].mean())
        assert ps.labels(0.1)[i] == (s.mask[rows, cols_].mean() >= 0.1)
        assert np.array_equal(ps.after[i], s.after[rows, cols_].transpose(2, 0, 1))
    assert len(kept) == len(ps)


@pytest.mark.shared_data
def test_real_names_select_pairs(shared_data: Path) -> None:
    (pair,) = load_sztaki(shared_data / "sztaki", names=["Tiszadob/1"])
    assert pair.name == "Tiszadob/1"
    with pytest.raises(DatasetNotFound, match="Tiszadob/9"):
        load_sztaki(shared_data, names=["Tiszadob/9"])


def test_written_pairs_load_in_natural_order(tmp_path: Path) -> None:
    for site, n in (("Szada", "10"), ("Szada", "2"), ("Tiszadob", "1")):
        write_pair(tmp_path / "sztaki" / site / n)
    assert [p.name for p in list_sztaki(tmp_path)] == ["2", "10", "1"]
    scenes = load_sztaki(tmp_path)  # the data folder holding sztaki/
    assert [s.name for s in scenes] == ["Szada/2", "Szada/10", "Tiszadob/1"]
    assert scenes[0].before.shape == (16, 24, 3)
    assert scenes[0].mask.sum() == 4 * 6 and scenes[0].changed_fraction == pytest.approx(1 / 16)


def test_gt_size_mismatch_is_refused(tmp_path: Path) -> None:
    write_pair(tmp_path / "Szada" / "1", gt_size=(12, 24))
    with pytest.raises(DatasetError, match=r"Szada/1: sizes differ .*gt 12x24"):
        load_sztaki(tmp_path)


def test_gt_must_be_0_or_255(tmp_path: Path) -> None:
    write_pair(tmp_path / "Szada" / "1")
    gt = np.zeros((16, 24), np.uint8)
    gt[0, 0] = 128
    Image.fromarray(gt).save(tmp_path / "Szada" / "1" / "gt.png")
    with pytest.raises(DatasetError, match="0 and 255"):
        load_sztaki(tmp_path)


def test_missing_file_and_missing_folder(tmp_path: Path) -> None:
    write_pair(tmp_path / "Szada" / "1")
    (tmp_path / "Szada" / "1" / "im2.png").unlink()
    with pytest.raises(DatasetError, match=r"im2\.png"):
        load_sztaki(tmp_path)
    with pytest.raises(DatasetNotFound, match="Szada/ or Tiszadob/"):
        load_sztaki(tmp_path / "Szada")
