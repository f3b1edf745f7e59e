"""serving.tiling: the grid covers every pixel evenly, stitching is seam-free, and the vectorised
extract/stitch equal the original tile-by-tile loops (kept below as the reference)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving import tiling
from serving.tiling import Tile, axis_origins, blend_window, extract_patches, grid, stitch

RNG = np.random.default_rng(20190616)
# the lattice path sums float64 products of the 1-D window; the loop summed float32 products of
# the rounded 2-D window: maps in [0, 1] agree to one float32 ulp (2**-24 below 1), we allow two
ULP = 2.0**-23

# (H, W, patch, stride): multiples and non-multiples, images smaller than a patch, stride == patch,
# stride 1, strides that do not divide the patch
SHAPES = [
    (32, 32, 8, 4),
    (37, 29, 8, 4),
    (33, 31, 16, 8),
    (20, 21, 6, 4),
    (19, 23, 8, 3),
    (17, 13, 5, 5),
    (16, 16, 8, 8),
    (10, 9, 4, 1),
    (12, 7, 3, 2),
    (5, 7, 8, 4),
    (5, 7, 16, 8),
    (3, 2, 8, 5),
    (1, 1, 4, 1),
    (1, 1, 4, 2),
    (1, 1, 1, 1),
    (1, 9, 4, 2),
    (9, 1, 4, 4),
]


# --------------------------------------------------------------------------------------------
# the original loops, verbatim: the reference the vectorised versions must equal


def _ref_extract(
    before: np.ndarray, after: np.ndarray, tiles: list[Tile], patch: int, stride: int
) -> tuple[np.ndarray, np.ndarray]:
    top, _, left, _ = tiling.padding(before.shape[0], before.shape[1], patch, stride)
    out = []
    for image in (before, after):
        padded = tiling.pad_image(image, patch, stride)
        cut = np.empty((len(tiles), image.shape[2], patch, patch), image.dtype)
        for i, t in enumerate(tiles):
            r, c = t.row + top, t.col + left
            cut[i] = padded[r : r + patch, c : c + patch].transpose(2, 0, 1)
        out.append(cut)
    return out[0], out[1]


def _ref_stitch(
    probabilities: np.ndarray, tiles: list[Tile], height: int, width: int, patch: int
) -> np.ndarray:
    window = blend_window(patch)
    acc = np.zeros((height, width), np.float64)
    weight = np.zeros((height, width), np.float64)
    for p, tile in zip(probabilities, tiles, strict=True):
        r0, c0, h, w = tile.clipped(height, width)
        wr, wc = r0 - tile.row, c0 - tile.col
        win = window[wr : wr + h, wc : wc + w]
        acc[r0 : r0 + h, c0 : c0 + w] += p * win
        weight[r0 : r0 + h, c0 : c0 + w] += win
    return (acc / weight).astype(np.float32)


# --------------------------------------------------------------------------------------------
# helpers


def _coverage(height: int, width: int, patch: int, stride: int) -> np.ndarray:
    count = np.zeros((height, width), np.int64)
    for t in grid(height, width, patch, stride):
        r0, c0, h, w = t.clipped(height, width)
        assert h > 0 and w > 0, f"{t} does not touch the {height}x{width} image"
        count[r0 : r0 + h, c0 : c0 + w] += 1
    return count


def _check_coverage(height: int, width: int, patch: int, stride: int) -> None:
    count = _coverage(height, width, patch, stride)
    assert count.min() >= 1, "a pixel no tile covers"
    lo, hi = patch // stride, -(-patch // stride)
    assert lo**2 <= count.min() and count.max() <= hi**2
    if patch % stride == 0:  # every pixel exactly patch / stride times per axis
        assert (count == (patch // stride) ** 2).all()
    # per axis, the 2-D count is the product of the 1-D counts
    for length in (height, width):
        axis = np.zeros(length, np.int64)
        for o in axis_origins(length, patch, stride):
            axis[max(o, 0) : o + patch] += 1
        assert lo <= axis.min() and axis.max() <= hi
        if patch % stride == 0:
            assert (axis == patch // stride).all()


def _images(height: int, width: int, channels: int = 3, dtype: type = np.uint8):
    before = RNG.integers(0, 255, (height, width, channels)).astype(dtype)
    after = RNG.integers(0, 255, (height, width, channels)).astype(dtype)
    return before, after


# --------------------------------------------------------------------------------------------
# grid coverage


@pytest.mark.parametrize(("height", "width", "patch", "stride"), SHAPES)
def test_grid_covers_every_pixel(height: int, width: int, patch: int, stride: int) -> None:
    _check_coverage(height, width, patch, stride)


def test_grid_is_row_major_on_the_lattice() -> None:
    tiles = grid(10, 7, 4, 2)
    rows, cols = axis_origins(10, 4, 2), axis_origins(7, 4, 2)
    assert rows[0] == -2 and cols[0] == -2 and rows[-1] == 8 and cols[-1] == 6
    assert [(t.row, t.col) for t in tiles] == [(r, c) for r in rows for c in cols]
    assert all(t.size == 4 for t in tiles)


@settings(max_examples=200, deadline=None)
@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    patch=st.integers(1, 12),
    data=st.data(),
)
def test_grid_coverage_property(height: int, width: int, patch: int, data: st.DataObject) -> None:
    stride = data.draw(st.integers(1, patch), label="stride")
    _check_coverage(height, width, patch, stride)


@pytest.mark.parametrize(
    ("height", "width", "patch", "stride"),
    [(0, 5, 4, 2), (5, 0, 4, 2), (5, 5, 0, 1), (5, 5, 4, 0), (5, 5, 4, 5), (5, 5, 4, -1)],
)
def test_grid_rejects_bad_sizes(height: int, width: int, patch: int, stride: int) -> None:
    with pytest.raises(ValueError):
        grid(height, width, patch, stride)


def test_stride_over_patch_message() -> None:
    with pytest.raises(ValueError, match="stride 9 > patch 8"):
        axis_origins(20, 8, 9)


# --------------------------------------------------------------------------------------------
# the blend window


@pytest.mark.parametrize(("patch", "stride"), [(8, 4), (8, 2), (8, 1), (16, 4), (32, 8), (6, 3)])
def test_window_copies_sum_to_a_constant(patch: int, stride: int) -> None:
    """Shifted copies at a stride dividing P/2 are a partition of unity up to (P / 2S)^2."""
    window = blend_window(patch).astype(np.float64)
    assert window.shape == (patch, patch) and window.min() > 0
    n = 4 * patch // stride
    total = np.zeros((n * stride + patch, n * stride + patch))
    for i in range(n):
        for j in range(n):
            total[i * stride : i * stride + patch, j * stride : j * stride + patch] += window
    inner = total[patch : n * stride, patch : n * stride]  # where every shift contributes
    np.testing.assert_allclose(inner, (patch / (2 * stride)) ** 2, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# stitching


@pytest.mark.parametrize(("height", "width", "patch", "stride"), SHAPES)
@pytest.mark.parametrize("p", [0.0, 1.0, 0.3, 0.7310586, 1e-7])
def test_uniform_probability_stitches_to_itself(
    height: int, width: int, patch: int, stride: int, p: float
) -> None:
    tiles = grid(height, width, patch, stride)
    out = stitch(np.full(len(tiles), p, np.float32), tiles, height, width, patch)
    assert out.shape == (height, width) and out.dtype == np.float32
    assert (out == np.float32(p)).all()


@pytest.mark.parametrize("stride", [8, 4, 2, 1, 3, 5, 7])
def test_planted_change_peaks_inside_the_square(stride: int) -> None:
    height, width, patch = 96, 80, 8
    r0, r1, c0, c1 = 40, 56, 24, 40  # the changed square
    tiles = grid(height, width, patch, stride)
    p = np.array(
        [
            float(t.row < r1 and t.row + patch > r0 and t.col < c1 and t.col + patch > c0)
            for t in tiles
        ],
        np.float32,
    )
    out = stitch(p, tiles, height, width, patch)
    inside = np.zeros((height, width), bool)
    inside[r0:r1, c0:c1] = True
    # every tile over a pixel of the square overlaps the square, so the peak is there; just
    # outside, pixels between lattice origins may see only overlapping tiles too
    assert (out[inside] == 1.0).all() and out.max() == 1.0
    peak = np.zeros_like(inside)
    peak[r0 - stride + 1 : r1 + stride - 1, c0 - stride + 1 : c1 + stride - 1] = True
    assert not (out[~peak] == 1.0).any()
    # the >= 0.5 region hugs the square: within P/2 when the stride divides P/2 (symmetric
    # window sums), within the reach of the overlapping tiles otherwise
    reach = patch // 2 if (patch // 2) % stride == 0 else patch - 1
    near = np.zeros_like(inside)
    near[r0 - reach : r1 + reach, c0 - reach : c1 + reach] = True
    assert not (out[~near] >= 0.5).any()
    far = np.ones_like(inside)
    far[r0 - patch : r1 + patch, c0 - patch : c1 + patch] = False
    assert (out[far] == 0.0).all()


@pytest.mark.parametrize(("patch", "stride"), [(16, 8), (16, 4), (32, 8), (32, 16), (8, 4)])
def test_linear_ramp_has_no_seams(patch: int, stride: int) -> None:
    """Tile probabilities linear in the tile centre give a smooth, monotone map: steps between
    neighbouring pixels stay near the ramp's slope, where a hard tile border would jump by about
    stride x slope. (The blend ripples with period ``stride``; it never jumps.)"""
    height, width = 120, 104
    tiles = grid(height, width, patch, stride)
    centres_r = np.array([t.row + patch / 2 for t in tiles])
    centres_c = np.array([t.col + patch / 2 for t in tiles])
    slope_r, slope_c = 0.6 / height, 0.3 / width
    p = (0.05 + slope_r * centres_r + slope_c * centres_c).astype(np.float32)
    out = stitch(p, tiles, height, width, patch).astype(np.float64)
    for axis, slope in ((0, slope_r), (1, slope_c)):
        step = np.diff(out, axis=axis) / slope
        assert step.min() > 0.05 and step.max() < 1.6 < stride / 2
        assert np.abs(np.diff(out, 2, axis=axis)).max() < 0.8 * slope
        assert abs(step.mean() - 1.0) < 0.02
    # and the ramp is reproduced where the lattice is symmetric about the pixel: tile centres
    mid_r = [t.row + patch // 2 for t in tiles if 0 < t.row + patch // 2 < height]
    np.testing.assert_allclose(
        out[mid_r, 40] - out[mid_r[0], 40], slope_r * (np.array(mid_r) - mid_r[0]), atol=0.002
    )


def test_stitch_rejects_a_length_mismatch() -> None:
    tiles = grid(8, 8, 4, 2)
    with pytest.raises(ValueError, match="probabilities for"):
        stitch(np.zeros(len(tiles) - 1, np.float32), tiles, 8, 8, 4)


# --------------------------------------------------------------------------------------------
# extraction


def test_extract_interior_tiles_are_plain_slices() -> None:
    height, width, patch, stride = 23, 30, 8, 4
    before, after = _images(height, width)
    tiles = grid(height, width, patch, stride)
    b, a = extract_patches(before, after, tiles, patch, stride)
    assert b.shape == a.shape == (len(tiles), 3, patch, patch)
    assert b.dtype == a.dtype == np.uint8 and b.flags.c_contiguous and a.flags.c_contiguous
    interior = 0
    for i, t in enumerate(tiles):
        if t.row >= 0 and t.col >= 0 and t.row + patch <= height and t.col + patch <= width:
            interior += 1
            sl = (slice(t.row, t.row + patch), slice(t.col, t.col + patch))
            assert np.array_equal(b[i], before[sl].transpose(2, 0, 1))
            assert np.array_equal(a[i], after[sl].transpose(2, 0, 1))
    assert interior > 10


def test_extract_border_tiles_are_mirrored() -> None:
    height, width, patch, stride = 6, 5, 4, 2
    before = np.arange(height * width * 2, dtype=np.float32).reshape(height, width, 2)
    tiles = grid(height, width, patch, stride)
    b, a = extract_patches(before, before + 1000, tiles, patch, stride)
    assert np.array_equal(a, b + 1000)

    # symmetric padding: index -1 reads 0, -2 reads 1; n reads n - 1, n + 1 reads n - 2
    def mirror(i: int, n: int) -> int:
        return -i - 1 if i < 0 else 2 * n - i - 1 if i >= n else i

    seen_border = 0
    for i, t in enumerate(tiles):
        for y in range(patch):
            for x in range(patch):
                sr, sc = mirror(t.row + y, height), mirror(t.col + x, width)
                assert np.array_equal(b[i, :, y, x], before[sr, sc]), (t, y, x)
        seen_border += t.row < 0 or t.col < 0 or t.row + patch > height or t.col + patch > width
    assert seen_border > 0
    top_left = tiles.index(Tile(-2, -2, patch))
    assert np.array_equal(b[top_left, 0, :2, :2], before[[1, 0]][:, [1, 0], 0])


def test_extract_image_smaller_than_a_patch() -> None:
    before, after = _images(1, 1, channels=2)
    tiles = grid(1, 1, 4, 2)
    b, a = extract_patches(before, after, tiles, 4, 2)
    assert b.shape == (len(tiles), 2, 4, 4)
    assert (b == before[0, 0][None, :, None, None]).all()
    assert (a == after[0, 0][None, :, None, None]).all()


# --------------------------------------------------------------------------------------------
# the vectorised versions equal the loops


@pytest.mark.parametrize(("height", "width", "patch", "stride"), [*SHAPES, (95, 64, 32, 8)])
def test_stitch_equals_reference(height: int, width: int, patch: int, stride: int) -> None:
    tiles = grid(height, width, patch, stride)
    p = RNG.random(len(tiles)).astype(np.float32)
    out = stitch(p, tiles, height, width, patch)
    ref = _ref_stitch(p, tiles, height, width, patch)
    assert out.dtype == ref.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=ULP)


def test_stitch_equals_reference_full_size() -> None:
    height, width, patch, stride = 952, 640, 32, 8
    tiles = grid(height, width, patch, stride)
    p = RNG.random(len(tiles)).astype(np.float32)
    np.testing.assert_allclose(
        stitch(p, tiles, height, width, patch),
        _ref_stitch(p, tiles, height, width, patch),
        rtol=0,
        atol=ULP,
    )


def test_stitch_takes_the_lattice_path_for_grid_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_loop(*args: object) -> None:
        raise AssertionError("grid tiles went through the tile-by-tile loop")

    monkeypatch.setattr(tiling, "_stitch_loop", no_loop)
    for height, width, patch, stride in SHAPES:
        tiles = grid(height, width, patch, stride)
        if len(tiles) > 1:
            stitch(np.zeros(len(tiles), np.float32), tiles, height, width, patch)


def _not_a_lattice(height: int, width: int, patch: int, stride: int) -> dict[str, list[Tile]]:
    tiles = grid(height, width, patch, stride)
    shuffled = tiles[:]
    random.Random(7).shuffle(shuffled)
    return {
        "shuffled": shuffled,
        "reversed": tiles[::-1],
        "duplicate": [*tiles, tiles[len(tiles) // 2]],
        "without_first_row": [t for t in tiles if t.row != tiles[0].row],
        "mixed_strides": [*tiles, *grid(height, width, patch, 1)],
    }


@pytest.mark.parametrize("kind", list(_not_a_lattice(8, 8, 4, 2)))
@pytest.mark.parametrize(("height", "width", "patch", "stride"), [(21, 17, 8, 4), (9, 6, 4, 3)])
def test_stitch_falls_back_for_other_tile_lists(
    kind: str, height: int, width: int, patch: int, stride: int
) -> None:
    tiles = _not_a_lattice(height, width, patch, stride)[kind]
    p = RNG.random(len(tiles)).astype(np.float32)
    out = stitch(p, tiles, height, width, patch)
    assert np.array_equal(out, _ref_stitch(p, tiles, height, width, patch))


def test_stitch_accepts_a_list_and_float64() -> None:
    tiles = grid(13, 11, 4, 2)
    p = RNG.random(len(tiles))
    ref = _ref_stitch(p, tiles, 13, 11, 4)
    np.testing.assert_allclose(stitch(p, tiles, 13, 11, 4), ref, rtol=0, atol=ULP)
    np.testing.assert_allclose(stitch(list(p), tiles, 13, 11, 4), ref, rtol=0, atol=ULP)


@pytest.mark.parametrize(("height", "width", "patch", "stride"), [*SHAPES, (95, 64, 32, 8)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_extract_equals_reference(
    height: int, width: int, patch: int, stride: int, dtype: type
) -> None:
    before, after = _images(height, width, channels=3, dtype=dtype)
    tiles = grid(height, width, patch, stride)
    b, a = extract_patches(before, after, tiles, patch, stride)
    rb, ra = _ref_extract(before, after, tiles, patch, stride)
    assert b.dtype == rb.dtype and a.dtype == ra.dtype
    assert b.flags.c_contiguous and a.flags.c_contiguous
    assert np.array_equal(b, rb) and np.array_equal(a, ra)


def test_extract_any_tile_order_and_subset() -> None:
    before, after = _images(19, 14, channels=4, dtype=np.float32)
    tiles = grid(19, 14, 8, 4)
    picked = [tiles[i] for i in RNG.permutation(len(tiles))[: len(tiles) // 2]] + [tiles[0]]
    for chosen in (picked, [], tiles[::-1]):
        b, a = extract_patches(before, after, chosen, 8, 4)
        rb, ra = _ref_extract(before, after, chosen, 8, 4)
        assert b.shape == (len(chosen), 4, 8, 8)
        assert np.array_equal(b, rb) and np.array_equal(a, ra)


def test_stitch_tiles_of_another_size_fail_like_the_loop() -> None:
    tiles = [Tile(t.row, t.col, 5) for t in grid(9, 9, 4, 2)]
    p = np.zeros(len(tiles), np.float32)
    with pytest.raises(ValueError):
        _ref_stitch(p, tiles, 9, 9, 4)
    with pytest.raises(ValueError):
        stitch(p, tiles, 9, 9, 4)


def test_extract_tile_past_the_padding_fails_like_the_loop() -> None:
    before, after = _images(8, 8)
    for bad in (Tile(-3, 0, 4), Tile(0, 7, 4)):
        with pytest.raises(ValueError):
            _ref_extract(before, after, [bad], 4, 2)
        with pytest.raises(ValueError):
            extract_patches(before, after, [bad], 4, 2)


@pytest.mark.parametrize(
    ("h", "w", "patch", "stride", "channels", "dtype"),
    [
        (256, 256, 32, 8, 3, np.uint8),
        (37, 53, 16, 5, 4, np.uint16),  # not multiples of the patch or the stride
        (10, 7, 16, 4, 3, np.uint8),  # smaller than one patch
        (40, 40, 8, 1, 1, np.float32),  # stride 1
        (40, 33, 8, 8, 3, np.uint8),  # stride = patch
    ],
)
def test_extract_grid_is_extract_patches_of_the_whole_grid(
    h: int, w: int, patch: int, stride: int, channels: int, dtype: type
) -> None:
    rng = np.random.default_rng(h * w)
    before = (rng.random((h, w, channels)) * 1000).astype(dtype)
    after = (rng.random((h, w, channels)) * 1000).astype(dtype)
    tiles = tiling.grid(h, w, patch, stride)
    want = tiling.extract_patches(before, after, tiles, patch, stride)
    got = tiling.extract_grid(before, after, patch, stride)
    for g, x in zip(got, want, strict=True):
        assert g.dtype == x.dtype and g.flags.c_contiguous
        assert np.array_equal(g, x)


@pytest.mark.parametrize(("h", "w", "patch", "stride"), [(256, 256, 32, 8), (10, 37, 16, 5)])
def test_lattice_is_the_grid(h: int, w: int, patch: int, stride: int) -> None:
    tiles = tiling.grid(h, w, patch, stride)
    lat = tiling.lattice(h, w, patch, stride)
    assert lat.tiles == tiles and len(lat) == len(tiles)
    columns = lat.boxes(h, w)
    assert list(zip(*columns, strict=True)) == [t.clipped(h, w) for t in tiles]
    assert all(isinstance(v, int) for v in columns[0])
    p = np.random.default_rng(1).random(len(tiles)).astype(np.float32)
    assert np.array_equal(lat.stitch(p, h, w), tiling.stitch(p, tiles, h, w, patch))
