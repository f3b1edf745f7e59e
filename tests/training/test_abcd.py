"""ABCD loader on small files written in the real format (6-band GeoTIFF pairs, 5-fold CSVs):
the set itself cannot be downloaded here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from training.datasets.abcd import abcd_folder, load_abcd, read_fold_list
from training.datasets.scenes import DatasetError, DatasetNotFound

N = 10
SIDES = {"fixed-scale": 160, "resized": 128}


def pixels(i: int, side: int) -> np.ndarray:
    """(6, side, side) uint8 whose value tells the pair (i) and the band."""
    band = np.arange(6, dtype=np.uint8)[:, None, None]
    return np.broadcast_to(band * 40 + i, (6, side, side)).copy()


def write_tif(path: Path, data: np.ndarray) -> None:
    c, h, w = data.shape
    with rasterio.open(
        path, "w", driver="GTiff", width=w, height=h, count=c, dtype=data.dtype,
        crs="EPSG:32654", transform=Affine(0.4, 0, 560000, 0, -0.4, 4250000),
    ) as ds:  # fmt: skip
        ds.write(data)


def labels() -> dict[str, int]:
    return {f"patch-pair_{i}.tif": int(i % 3 == 0) for i in range(1, N + 1)}


def write_abcd(root: Path, variant: str = "fixed-scale") -> Path:
    """ABCDdataset/<variant>/: N pairs, 5 folds of 2 test files each; CSVs without a header."""
    folder = root / "ABCDdataset" / variant
    (folder / "patch-pairs").mkdir(parents=True)
    (folder / "5fold-list").mkdir()
    for i in range(1, N + 1):
        write_tif(folder / "patch-pairs" / f"patch-pair_{i}.tif", pixels(i, SIDES[variant]))
    names = list(labels())
    order = [names[i] for i in np.random.default_rng(0).permutation(N)]
    for fold in range(1, 6):
        test = order[2 * (fold - 1) : 2 * fold]
        train = [n for n in order if n not in test]
        for split, rows in (("train", train), ("test", test)):
            text = "".join(f"{n},{labels()[n]}\n" for n in rows)
            (folder / "5fold-list" / f"cv{fold}-{split}.csv").write_text(text)
    return folder


@pytest.fixture
def abcd(tmp_path: Path) -> Path:
    write_abcd(tmp_path)
    return tmp_path


def test_fold_splits_shapes_labels_and_bands(abcd: Path) -> None:
    train = load_abcd(abcd, fold=1, split="train")
    test = load_abcd(abcd, fold=1, split="test")
    assert len(train) == 8 and len(test) == 2
    assert train.before.shape == train.after.shape == (8, 3, 160, 160)
    assert train.before.dtype == np.uint8 and train.label.dtype == np.int64
    assert train.bands == ("red", "green", "blue")
    assert set(train.names).isdisjoint(test.names)
    for pairs in (train, test):
        for name, label, before, after in zip(
            pairs.names, pairs.label, pairs.before, pairs.after, strict=True
        ):
            i = int(name.removeprefix("patch-pair_").removesuffix(".tif"))
            assert label == labels()[name]  # 1 = washed-away
            assert np.array_equal(before, pixels(i, 160)[:3])  # bands 1-3: pre-tsunami RGB
            assert np.array_equal(after, pixels(i, 160)[3:])  # bands 4-6: post-tsunami RGB


def test_every_fold_covers_the_set(abcd: Path) -> None:
    folder = abcd_folder(abcd)
    tested = []
    for fold in range(1, 6):
        train = {n for n, _ in read_fold_list(folder, fold, "train")}
        test = {n for n, _ in read_fold_list(folder, fold, "test")}
        assert train | test == set(labels()) and not train & test
        tested += test
    assert sorted(tested) == sorted(labels())  # each pair tested once


def test_all_is_the_whole_set_in_file_number_order(abcd: Path) -> None:
    pairs = load_abcd(abcd)  # fold 1, train + test
    assert pairs.names == tuple(f"patch-pair_{i}.tif" for i in range(1, N + 1))
    assert pairs.label.tolist() == list(labels().values())
    ps = pairs.to_patchset()
    assert ps.labels(0.5).tolist() == pairs.label.tolist()


def test_resized_variant_and_path_forms(tmp_path: Path) -> None:
    write_abcd(tmp_path, "resized")
    for path in (tmp_path, tmp_path / "ABCDdataset", tmp_path / "ABCDdataset" / "resized"):
        pairs = load_abcd(path, fold=2, split="test", variant="resized")
        assert pairs.before.shape == (2, 3, 128, 128)
    with pytest.raises(DatasetNotFound, match="fixed-scale"):
        load_abcd(tmp_path)  # the default variant is not there


def test_header_line_is_tolerated(abcd: Path) -> None:
    lists = abcd / "ABCDdataset" / "fixed-scale" / "5fold-list"
    path = lists / "cv3-test.csv"
    path.write_text("filename,label\n" + path.read_text())
    assert len(read_fold_list(lists.parent, 3, "test")) == 2


@pytest.mark.parametrize(
    ("line", "match"),
    [("patch-pair_1.tif,2\n", r"cv1-test\.csv:3"), ("patch-pair_1.tif\n", "filename,label")],
)
def test_bad_csv_rows(abcd: Path, line: str, match: str) -> None:
    path = abcd / "ABCDdataset" / "fixed-scale" / "5fold-list" / "cv1-test.csv"
    path.write_text(path.read_text() + line)
    with pytest.raises(DatasetError, match=match):
        load_abcd(abcd, fold=1, split="test")


def test_file_in_train_and_test_is_refused(abcd: Path) -> None:
    lists = abcd / "ABCDdataset" / "fixed-scale" / "5fold-list"
    test_rows = (lists / "cv1-test.csv").read_text()
    first = test_rows.splitlines()[0] + "\n"
    (lists / "cv1-train.csv").write_text((lists / "cv1-train.csv").read_text() + first)
    with pytest.raises(DatasetError, match="both train and test"):
        load_abcd(abcd, fold=1)


def test_listed_file_missing(abcd: Path) -> None:
    folder = abcd / "ABCDdataset" / "fixed-scale"
    (name, _), *_ = read_fold_list(folder, 4, "test")
    (folder / "patch-pairs" / name).unlink()
    with pytest.raises(DatasetError, match=name):
        load_abcd(abcd, fold=4, split="test")


def test_wrong_band_count_and_mixed_sizes(abcd: Path) -> None:
    folder = abcd / "ABCDdataset" / "fixed-scale"
    write_tif(folder / "patch-pairs" / "patch-pair_1.tif", pixels(1, 160)[:3])
    with pytest.raises(DatasetError, match="3 bands, expected 6"):
        load_abcd(abcd)
    write_tif(folder / "patch-pairs" / "patch-pair_1.tif", pixels(1, 128))
    with pytest.raises(DatasetError, match="share a size"):
        load_abcd(abcd)


def test_bad_arguments(abcd: Path) -> None:
    with pytest.raises(ValueError, match="fold"):
        load_abcd(abcd, fold=6)
    with pytest.raises(ValueError, match="split"):
        load_abcd(abcd, split="val")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="variant"):
        load_abcd(abcd, variant="tiny")  # type: ignore[arg-type]
    (abcd / "ABCDdataset" / "fixed-scale" / "5fold-list" / "cv5-train.csv").unlink()
    with pytest.raises(DatasetNotFound, match="cv5-train"):
        load_abcd(abcd, fold=5, split="train")
