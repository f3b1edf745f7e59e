"""ScenePair, patches, unchanged patches and the shared file readers of the real-data loaders."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine

from training.data import PatchSet
from training.datasets.scenes import (
    DatasetError,
    PatchPairs,
    ScenePair,
    binarize_mask,
    pair_files,
    read_mask,
    read_raster,
    unchanged_patches,
)

ROOT = Path(__file__).resolve().parents[2]


def scene(h: int = 8, w: int = 12, dtype: type = np.uint8) -> ScenePair:
    rng = np.random.default_rng(0)
    before = rng.integers(0, 200, (h, w, 3)).astype(dtype)
    mask = np.zeros((h, w), np.uint8)
    mask[0:4, 0:4] = 1  # the whole first patch
    mask[0, 5] = 1  # one pixel of the second: 1/16, ambiguous at 0.25
    mask[4:6, 8:12] = 1  # half of the last: 0.5
    return ScenePair("toy", before, before + 1, mask, ("red", "green", "blue"))


# ------------------------------------------------------------------------------------ ScenePair


def test_patches_keep_negatives_and_positives_only() -> None:
    s = scene()
    every = s.all_patches(4, 4)
    assert len(every) == 6
    assert every.changed_fraction.tolist() == [1.0, 1 / 16, 0.0, 0.0, 0.0, 0.5]
    ps = s.patches(4, 4, positive_fraction=0.25)
    assert isinstance(ps, PatchSet)
    assert ps.changed_fraction.tolist() == [1.0, 0.0, 0.0, 0.0, 0.5]  # the ambiguous one left out
    assert ps.labels(0.25).tolist() == [1, 0, 0, 0, 1]
    neg, pos = ps.split(0.25)
    assert len(neg) == 3 and len(pos) == 2
    # labels agree with the mask under each patch
    assert np.array_equal(ps.before[0], s.before[0:4, 0:4].transpose(2, 0, 1))
    assert np.array_equal(ps.before[4], s.before[4:8, 8:12].transpose(2, 0, 1))
    assert len(s.patches(4, 4, positive_fraction=0.6)) == 4  # 0.5 is ambiguous now


def test_patches_keep_native_dtype() -> None:
    ps = scene(dtype=np.uint16).patches(4, 4, 0.25)
    assert ps.before.dtype == ps.after.dtype == np.uint16
    assert ps.before.shape == (5, 3, 4, 4)


@pytest.mark.parametrize(
    ("patch", "stride", "fraction", "match"),
    [(4, 0, 0.5, "stride"), (0, 4, 0.5, "patch"), (4, 4, 0.0, "positive_fraction"),
     (4, 4, 1.5, "positive_fraction"), (9, 4, 0.5, "does not fit")],
)  # fmt: skip
def test_patches_bad_arguments(patch: int, stride: int, fraction: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        scene().patches(patch, stride, fraction)


def test_unchanged_patches_have_no_changed_pixel() -> None:
    s = scene()
    neg = unchanged_patches(s, 4, 2)
    every = s.all_patches(4, 2)
    assert len(neg) == (every.changed_fraction == 0).sum() > 0
    assert (neg.changed_fraction == 0).all()
    both = unchanged_patches([s, s], 4, 2)
    assert len(both) == 2 * len(neg)
    with pytest.raises(ValueError, match="no scenes"):
        unchanged_patches([], 4, 2)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("after", np.zeros((8, 12, 4), np.uint8), "after"),
        ("after", np.zeros((8, 12, 3), np.uint16), "uint16"),
        ("mask", np.zeros((8, 11), np.uint8), "mask"),
        ("mask", np.zeros((8, 12), bool), "mask"),
        ("mask", np.full((8, 12), 255, np.uint8), "0/1"),
        ("bands", ("red",), "band names"),
    ],
)
def test_scene_pair_refuses_inconsistent_arrays(field: str, value: object, match: str) -> None:
    s = scene()
    args = {k: getattr(s, k) for k in ("name", "before", "after", "mask", "bands")}
    args[field] = value
    with pytest.raises(ValueError, match=match):
        ScenePair(**args)  # type: ignore[arg-type]


def test_patch_pairs_to_patchset() -> None:
    x = np.zeros((3, 3, 4, 4), np.uint8)
    pp = PatchPairs(x, x + 1, np.array([0, 1, 0]), ("a", "b", "c"), ("red", "green", "blue"))
    ps = pp.to_patchset()
    assert len(pp) == 3 and ps.labels(0.5).tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="labels"):
        PatchPairs(x, x, np.array([0, 1]), ("a", "b", "c"), ("red", "green", "blue"))


# ---------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize(
    ("values", "low", "expected"),
    [
        ([0, 1, 1], False, [0, 1, 1]),
        ([0, 255, 255], False, [0, 1, 1]),
        ([0, 127, 128], False, [0, 0, 1]),  # anti-aliased edges: half range
        ([0, 255, 255], True, [1, 0, 0]),  # black = change (PCD)
        ([0, 1, 1], True, [1, 0, 0]),
    ],
)
def test_binarize_mask(values: list[int], low: bool, expected: list[int]) -> None:
    out = binarize_mask(np.array([values], np.uint8), "m", changed_is_low=low)
    assert out.dtype == np.uint8 and out.tolist() == [expected]


def test_binarize_mask_uint16_and_refusals() -> None:
    assert binarize_mask(np.array([[0, 65535]], np.uint16), "m").tolist() == [[0, 1]]
    with pytest.raises(DatasetError, match="one band"):
        binarize_mask(np.zeros((2, 2, 3), np.uint8), "m")
    with pytest.raises(DatasetError, match="integer"):
        binarize_mask(np.zeros((2, 2), np.float32), "m")


def test_read_mask_palette_uses_indices_and_colour_uses_max(tmp_path: Path) -> None:
    idx = np.array([[0, 1], [1, 0]], np.uint8)
    pal = Image.fromarray(idx, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 1 drawn red
    pal.save(tmp_path / "p.png")
    assert read_mask(tmp_path / "p.png").tolist() == idx.tolist()
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 1] = (255, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    assert binarize_mask(read_mask(tmp_path / "c.png"), "c").tolist() == [[0, 1], [0, 0]]


# ---------------------------------------------------------------------------------------- images


def test_read_raster_formats(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    r = read_raster(tmp_path / "a.png")
    assert np.array_equal(r.array, rgb) and r.bands == ("red", "green", "blue") and r.crs is None
    Image.fromarray(np.dstack([rgb, np.full((5, 7), 9, np.uint8)])).save(tmp_path / "rgba.png")
    assert np.array_equal(read_raster(tmp_path / "rgba.png").array, rgb)  # alpha dropped
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.png")
    g = read_raster(tmp_path / "g.png")
    assert g.array.shape == (5, 7, 1) and g.bands == ("grey",)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    j = read_raster(tmp_path / "a.jpg").array
    assert j.shape == (5, 7, 3) and j.dtype == np.uint8


def test_read_raster_keeps_16_bit_and_georeferencing(tmp_path: Path) -> None:
    deep = np.arange(5 * 7 * 3, dtype=np.uint16).reshape(5, 7, 3) * 700
    with warnings.catch_warnings():  # a plain PNG has no georeferencing, on purpose
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(
            tmp_path / "deep.png", "w", driver="PNG", width=7, height=5, count=3, dtype="uint16"
        ) as ds:
            ds.write(deep.transpose(2, 0, 1))
    assert np.array_equal(read_raster(tmp_path / "deep.png").array, deep)
    transform = Affine(10, 0, 600000, 0, -10, 5000000)
    profile = {"driver": "GTiff", "width": 7, "height": 5, "count": 4, "dtype": "uint16"}
    with rasterio.open(
        tmp_path / "geo.tif", "w", crs="EPSG:32632", transform=transform, **profile
    ) as ds:
        ds.write(np.moveaxis(np.dstack([deep, deep[..., :1]]), -1, 0))
        ds.descriptions = ("B04", "B03", "B02", "B08")
    r = read_raster(tmp_path / "geo.tif")
    assert r.array.shape == (5, 7, 4) and r.array.dtype == np.uint16
    assert r.bands == ("B04", "B03", "B02", "B08")
    assert r.crs is not None and r.crs.to_epsg() == 32632 and r.transform == transform


def test_read_raster_corrupt_file(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DatasetError, match=r"bad\.png"):
        read_raster(tmp_path / "bad.png")


def test_pair_files_match_by_stem_in_natural_order(tmp_path: Path) -> None:
    for role, suffix in (("a", ".jpg"), ("b", ".jpg"), ("m", ".png")):
        (tmp_path / role).mkdir()
        for stem in ("10", "2", "x"):
            (tmp_path / role / f"{stem}{suffix}").touch()
    pairs = pair_files({r: tmp_path / r for r in ("a", "b", "m")})
    assert [s for s, _ in pairs] == ["2", "10", "x"]
    assert pairs[0][1]["m"].name == "2.png"
    (tmp_path / "b" / "10.jpg").unlink()
    with pytest.raises(DatasetError, match=r"has no file for 10"):
        pair_files({r: tmp_path / r for r in ("a", "b", "m")})


def test_loaders_never_import_torch() -> None:
    code = (
        "import sys\n"
        "import training.datasets.registry, training.datasets.sztaki, training.datasets.oscd\n"
        "import training.datasets.abcd, training.datasets.pcd, training.datasets.folder\n"
        "from training.datasets import load_dataset\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
