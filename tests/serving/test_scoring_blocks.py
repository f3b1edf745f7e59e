"""serving.scoring.blocks without a model: a scene scored block by block equals the whole scene
tiled, scored and stitched at once, bit for bit.

Covered: ``plan`` covers the scene once, row-major; ``tiles_for`` reads inside the scene and its
padded window is the whole scene's padded image (also for blocks at a border narrower than the
mirrored padding, which must mirror the scene, not the block); blocks scored over a plan ==
``tiling.grid`` + ``extract_patches`` + ``stitch`` of the whole image (np.array_equal) for sizes
that are not multiples of the block, patch or stride, scenes smaller than one patch, block ==
patch, block smaller than the patch, stride == patch, strides that do not divide the patch, and
any chunk size; tiles touching no valid pixel are never scored, and skipping them leaves every
valid pixel's value unchanged (invalid pixels are NaN); a block with no valid pixel scores
nothing.

The scorer is a deterministic fake with the batcher's ``submit`` signature: each patch pair's
probability is a function of its mean absolute difference and of its mean brightness, so every
tile of a random scene gets its own value and a misplaced tile shows up in the map.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest

from serving import tiling
from serving.scoring.blocks import (
    Block,
    BlockJob,
    TileBook,
    pad,
    plan,
    score_blocks,
    tiles_for,
)


class FakeScorer:
    """``submit(before (N, C, P, P), after)`` -> waiter of (N,) float32; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []

    @staticmethod
    def probabilities(before: np.ndarray, after: np.ndarray) -> np.ndarray:
        b, a = before.astype(np.float64), after.astype(np.float64)
        diff = np.abs(a - b).mean(axis=(1, 2, 3)) / 255.0
        light = b.mean(axis=(1, 2, 3)) / 255.0
        return (0.7 * diff + 0.3 * light).astype(np.float32)

    def submit(self, before: np.ndarray, after: np.ndarray) -> Callable[[], np.ndarray]:
        assert before.shape == after.shape and before.ndim == 4
        self.calls.append((before.copy(), after.copy()))
        result = self.probabilities(before, after)
        return lambda: result

    @property
    def patches(self) -> int:
        return sum(len(b) for b, _ in self.calls)


def score_block(
    block: Block,
    before: np.ndarray,
    after: np.ndarray,
    valid: np.ndarray,
    patch: int,
    stride: int,
    submit: Callable[[np.ndarray, np.ndarray], Callable[[], np.ndarray]],
    chunk: int = 4096,
) -> tuple[np.ndarray, int]:
    """One block of a whole scene (``before``, ``after``, ``valid``) through ``BlockJob`` and
    ``score_blocks``, reading only the window its tiles need: (probability, patches scored)."""
    h, w = valid.shape
    t = tiles_for(block, h, w, patch, stride)
    rows, cols = t.read.toslices()
    job = BlockJob(
        block, before[rows, cols], after[rows, cols], valid[rows, cols], t, patch, stride
    )
    ((_, prob),) = score_blocks([job], submit, chunk)
    return prob, job.patches


def scene(height: int, width: int, seed: int = 0, channels: int = 3) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    before = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    after = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return before, after


def whole_scene(before: np.ndarray, after: np.ndarray, patch: int, stride: int) -> np.ndarray:
    """The in-memory path: every tile of the grid, extracted, scored, stitched."""
    h, w = before.shape[:2]
    tiles = tiling.grid(h, w, patch, stride)
    b, a = tiling.extract_patches(before, after, tiles, patch, stride)
    probs = FakeScorer.probabilities(b, a)
    return tiling.stitch(probs, tiles, h, w, patch)


def streamed(
    before: np.ndarray,
    after: np.ndarray,
    valid: np.ndarray | None,
    patch: int,
    stride: int,
    block: int,
    chunk: int = 4096,
    scorer: FakeScorer | None = None,
) -> np.ndarray:
    """The batch path: block by block, each reading only the window its tiles need."""
    h, w = before.shape[:2]
    valid = np.ones((h, w), bool) if valid is None else valid
    scorer = scorer or FakeScorer()
    out = np.full((h, w), -7.0, np.float32)  # a value no block writes: gaps would show
    for b in plan(h, w, block):
        prob, _ = score_block(b, before, after, valid, patch, stride, scorer.submit, chunk=chunk)
        assert prob.shape == (b.height, b.width) and prob.dtype == np.float32
        out[b.row : b.row + b.height, b.col : b.col + b.width] = prob
    return out


# (height, width, patch, stride, block)
CASES = [
    (97, 83, 32, 8, 40),  # nothing is a multiple of anything
    (130, 95, 32, 8, 32),  # block == patch
    (20, 13, 32, 8, 64),  # scene smaller than one patch, one block
    (20, 13, 32, 8, 7),  # scene smaller than one patch, many blocks
    (77, 61, 16, 16, 25),  # stride == patch
    (45, 52, 8, 3, 11),  # the stride does not divide the patch
    (64, 64, 16, 4, 64),  # exact multiples, one block
    (50, 70, 16, 4, 5),  # blocks far smaller than the patch
    (1, 1, 4, 1, 1),
    (1, 37, 8, 4, 9),
]


def test_plan_covers_the_scene_once_row_major() -> None:
    for h, w, size in [(97, 83, 40), (20, 13, 64), (64, 64, 32), (1, 1, 1), (5, 300, 7)]:
        blocks = plan(h, w, size)
        seen = np.zeros((h, w), np.int32)
        for i, b in enumerate(blocks):
            assert b.index == i
            assert 1 <= b.height <= size and 1 <= b.width <= size
            seen[b.row : b.row + b.height, b.col : b.col + b.width] += 1
        assert (seen == 1).all()
        assert [(b.row, b.col) for b in blocks] == sorted((b.row, b.col) for b in blocks)
    with pytest.raises(ValueError):
        plan(10, 10, 0)


@pytest.mark.parametrize("h,w,patch,stride,block", CASES)
def test_tiles_for_reads_inside_the_scene_and_pads_like_the_whole_scene(
    h: int, w: int, patch: int, stride: int, block: int
) -> None:
    image = np.arange(h * w, dtype=np.int64).reshape(h, w, 1)  # every pixel its own value
    whole = tiling.pad_image(image, patch, stride)
    top, bottom, left, right = tiling.padding(h, w, patch, stride)
    for b in plan(h, w, block):
        t = tiles_for(b, h, w, patch, stride)
        r = t.read
        assert r.row_off >= 0 and r.row_off + r.height <= h
        assert r.col_off >= 0 and r.col_off + r.width <= w
        # every tile that touches the block, and only those
        for origins, lo, n, full in ((t.rows, b.row, b.height, h), (t.cols, b.col, b.width, w)):
            every = tiling.axis_origins(full, patch, stride)
            assert list(origins) == [o for o in every if o < lo + n and o + patch > lo]
        # padding only at the scene's borders, never more than the whole scene's
        pt, pb, pl, pr = t.pad
        assert pt <= top and pb <= bottom and pl <= left and pr <= right
        assert (pt == 0 or r.row_off == 0) and (pl == 0 or r.col_off == 0)
        assert (pb == 0 or r.row_off + r.height == h) and (pr == 0 or r.col_off + r.width == w)
        # the padded window, over the tiles' span, is the whole scene's padded image there
        rows, cols = r.toslices()
        padded = pad(image[rows, cols], t)
        r0, c0 = int(t.rows[0]), int(t.cols[0])
        span_r, span_c = int(t.rows[-1]) + patch - r0, int(t.cols[-1]) + patch - c0
        dr, dc = r0 - (r.row_off - pt), c0 - (r.col_off - pl)
        got = padded[dr : dr + span_r, dc : dc + span_c]
        want = whole[r0 + top : r0 + top + span_r, c0 + left : c0 + left + span_c]
        assert got.shape == (span_r, span_c, 1)
        assert np.array_equal(got, want), b


@pytest.mark.parametrize("h,w,patch,stride,block", CASES)
def test_streamed_blocks_equal_the_whole_scene_bit_for_bit(
    h: int, w: int, patch: int, stride: int, block: int
) -> None:
    before, after = scene(h, w, seed=h * 1000 + w)
    expected = whole_scene(before, after, patch, stride)
    got = streamed(before, after, None, patch, stride, block)
    assert np.array_equal(got, expected), np.abs(got - expected).max()


def test_chunking_does_not_change_the_map() -> None:
    h, w, patch, stride = 70, 90, 16, 4
    before, after = scene(h, w, seed=3)
    expected = whole_scene(before, after, patch, stride)
    for chunk in (1, 7, 100, 4096):
        scorer = FakeScorer()
        got = streamed(before, after, None, patch, stride, 33, chunk=chunk, scorer=scorer)
        assert np.array_equal(got, expected)
        assert max(len(b) for b, _ in scorer.calls) <= chunk


def test_one_channel_and_four_channel_scenes() -> None:
    for channels in (1, 4):
        rng = np.random.default_rng(channels)
        before = rng.integers(0, 256, (41, 57, channels), dtype=np.uint8)
        after = rng.integers(0, 256, (41, 57, channels), dtype=np.uint8)
        expected = whole_scene(before, after, 16, 8)
        assert np.array_equal(streamed(before, after, None, 16, 8, 20), expected)


def test_patches_handed_to_submit_are_the_whole_scene_patches() -> None:
    """One block covering the scene submits exactly the grid's patches, in tile order."""
    h, w, patch, stride = 37, 29, 16, 8
    before, after = scene(h, w, seed=11)
    tiles = tiling.grid(h, w, patch, stride)
    b_ref, a_ref = tiling.extract_patches(before, after, tiles, patch, stride)
    scorer = FakeScorer()
    streamed(before, after, None, patch, stride, block=max(h, w), scorer=scorer)
    b_got = np.concatenate([b for b, _ in scorer.calls])
    a_got = np.concatenate([a for _, a in scorer.calls])
    assert np.array_equal(b_got, b_ref) and np.array_equal(a_got, a_ref)


def shared(
    before: np.ndarray, after: np.ndarray, valid: np.ndarray, patch: int, stride: int, block: int
) -> tuple[np.ndarray, FakeScorer]:
    """The scene as `rarechange score` streams it: every block a job of one pipelined run,
    tiles on block edges kept in a ``TileBook``."""
    h, w = valid.shape
    blocks = plan(h, w, block)
    book = TileBook(keep=-(-w // block) + 1)

    def jobs() -> Iterator[BlockJob]:
        for b in blocks:
            t = tiles_for(b, h, w, patch, stride)
            rows, cols = t.read.toslices()
            yield BlockJob(
                b, before[rows, cols], after[rows, cols], valid[rows, cols], t, patch, stride, book
            )

    scorer, out = FakeScorer(), np.full((h, w), -7.0, np.float32)
    for job, prob in score_blocks(jobs(), scorer.submit, chunk=64):
        b = job.block
        out[b.row : b.row + b.height, b.col : b.col + b.width] = prob
    return out, scorer


@pytest.mark.parametrize("h,w,patch,stride,block", CASES)
def test_tiles_on_block_edges_are_scored_once_and_the_map_is_unchanged(
    h: int, w: int, patch: int, stride: int, block: int
) -> None:
    before, after = scene(h, w, seed=h * 1000 + w)
    valid = np.ones((h, w), bool)
    got, scorer = shared(before, after, valid, patch, stride, block)
    assert np.array_equal(got, whole_scene(before, after, patch, stride))
    assert scorer.patches == len(tiling.grid(h, w, patch, stride))  # each tile once


def test_tiles_on_block_edges_with_nodata() -> None:
    """Skipped tiles stay skipped, borrowed ones keep their value: equal to blocks scored alone."""
    h, w, patch, stride = 150, 130, 16, 4
    before, after = scene(h, w, seed=21)
    valid = np.ones((h, w), bool)
    valid[40:110, 30:100] = False
    valid[70, 60] = True
    alone = streamed(before, after, valid, patch, stride, 32)
    got, scorer = shared(before, after, valid, patch, stride, 32)
    assert np.array_equal(got, alone, equal_nan=True)
    tiles = tiling.grid(h, w, patch, stride)
    touching = [
        t
        for t in tiles
        if valid[max(t.row, 0) : t.row + patch, max(t.col, 0) : t.col + patch].any()
    ]
    assert scorer.patches == len(touching)


def invalid_corner_scene(h: int, w: int, patch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random scene whose lower-right part (well over a patch wide) is invalid."""
    before, after = scene(h, w, seed=5)
    valid = np.ones((h, w), bool)
    valid[h // 3 :, w // 3 :] = False
    valid[h - 10, w - 20] = True  # one lone valid pixel inside the invalid part
    assert h - h // 3 > 3 * patch and w - w // 3 > 3 * patch
    return before, after, valid


@pytest.mark.parametrize("block", [24, 50, 1000])
def test_skipping_invalid_tiles_leaves_valid_pixels_unchanged(block: int) -> None:
    h, w, patch, stride = 150, 170, 16, 4
    before, after, valid = invalid_corner_scene(h, w, patch)
    expected = whole_scene(before, after, patch, stride)
    scorer = FakeScorer()
    got = streamed(before, after, valid, patch, stride, block, scorer=scorer)
    assert np.isnan(got[~valid]).all()
    assert not np.isnan(got[valid]).any()
    assert np.array_equal(got[valid], expected[valid])
    # fewer patches than with every pixel valid
    all_valid = FakeScorer()
    streamed(before, after, None, patch, stride, block, scorer=all_valid)
    assert scorer.patches < all_valid.patches


def test_tiles_touching_no_valid_pixel_are_not_scored() -> None:
    """One block over the whole scene: the scored patches are exactly the tiles that touch a
    valid pixel (compared by content against the whole-scene patches)."""
    h, w, patch, stride = 100, 120, 16, 8
    before, after, valid = invalid_corner_scene(h, w, patch)
    tiles = tiling.grid(h, w, patch, stride)
    needed = [
        t
        for t in tiles
        if valid[max(t.row, 0) : t.row + patch, max(t.col, 0) : t.col + patch].any()
    ]
    b_ref, a_ref = tiling.extract_patches(before, after, needed, patch, stride)
    scorer = FakeScorer()
    block = Block(0, 0, 0, h, w)
    _, n = score_block(block, before, after, valid, patch, stride, scorer.submit)
    assert n == len(needed) < len(tiles)
    assert np.array_equal(np.concatenate([b for b, _ in scorer.calls]), b_ref)
    assert np.array_equal(np.concatenate([a for _, a in scorer.calls]), a_ref)


def test_block_without_valid_pixels_scores_nothing() -> None:
    h, w, patch, stride = 120, 120, 16, 8
    before, after = scene(h, w, seed=9)
    valid = np.zeros((h, w), bool)
    valid[:10, :10] = True
    scorer = FakeScorer()
    block = Block(0, 80, 80, 40, 40)  # far (> a patch) from every valid pixel
    prob, n = score_block(block, before, after, valid, patch, stride, scorer.submit)
    assert n == 0 and not scorer.calls
    assert prob.shape == (40, 40) and np.isnan(prob).all()


class LazyScorer(FakeScorer):
    """Waiters that score only when waited on; records how many chunks were out at each submit."""

    def __init__(self) -> None:
        super().__init__()
        self.out, self.most_out, self.log = 0, 0, []

    def submit(self, before: np.ndarray, after: np.ndarray) -> Callable[[], np.ndarray]:
        self.calls.append((before.copy(), after.copy()))
        self.out += 1
        self.most_out = max(self.most_out, self.out)
        self.log.append("submit")
        b, a = before.copy(), after.copy()

        def wait() -> np.ndarray:
            self.out -= 1
            self.log.append("wait")
            return self.probabilities(b, a)

        return wait


@pytest.mark.parametrize("in_flight", [1, 2, 3])
def test_score_blocks_pipelines_across_blocks_with_the_same_maps(in_flight: int) -> None:
    h, w, patch, stride, size = 97, 83, 16, 4, 40
    before, after = scene(h, w, seed=5)
    valid = np.ones((h, w), bool)
    valid[:62, :62] = False  # the first block scores nothing: it must still come out, in order
    blocks = plan(h, w, size)
    pulled: list[int] = []

    def jobs() -> Iterator[BlockJob]:
        for b in blocks:
            pulled.append(b.index)
            t = tiles_for(b, h, w, patch, stride)
            rows, cols = t.read.toslices()
            yield BlockJob(
                b, before[rows, cols], after[rows, cols], valid[rows, cols], t, patch, stride
            )

    scorer = LazyScorer()
    done, empty = [], []
    for job, prob in score_blocks(jobs(), scorer.submit, chunk=50, in_flight=in_flight):
        done.append(job.block.index)
        if job.patches == 0:
            empty.append(job.block.index)
        if in_flight > 1 and job.patches and job.block.index < len(blocks) - 1:
            # the next block was read and its first chunk submitted before this one came out
            # (a block with nothing to score comes out at once)
            assert pulled[-1] > job.block.index
        alone, n = score_block(
            job.block, before, after, valid, patch, stride, FakeScorer().submit, chunk=50
        )
        assert n == job.patches
        np.testing.assert_array_equal(prob, alone)
    assert done == [b.index for b in blocks]
    assert empty == [0]
    assert scorer.most_out == in_flight and scorer.out == 0
    with pytest.raises(ValueError, match="in_flight"):
        list(score_blocks(jobs(), scorer.submit, in_flight=0))


class ReadsLateScorer(FakeScorer):
    """Like the batcher: keeps the arrays it was handed (no copy) and reads them only when
    waited on, so an array reused before its chunk was scored would change the map."""

    def __init__(self) -> None:
        super().__init__()
        self.bases: list[int] = []

    def submit(self, before: np.ndarray, after: np.ndarray) -> Callable[[], np.ndarray]:
        self.bases.append(id(before.base if before.base is not None else before))
        self.calls.append((before, after))
        return lambda: self.probabilities(before, after)


@pytest.mark.parametrize("in_flight", [1, 2, 3])
def test_patch_arrays_are_reused_only_once_scored(in_flight: int) -> None:
    h, w, patch, stride, size = 97, 83, 16, 4, 40
    before, after = scene(h, w, seed=6)
    valid = np.ones((h, w), bool)

    def jobs() -> Iterator[BlockJob]:
        for b in plan(h, w, size):
            t = tiles_for(b, h, w, patch, stride)
            rows, cols = t.read.toslices()
            yield BlockJob(
                b, before[rows, cols], after[rows, cols], valid[rows, cols], t, patch, stride
            )

    scorer = ReadsLateScorer()
    out = np.full((h, w), -7.0, np.float32)
    for job, prob in score_blocks(jobs(), scorer.submit, chunk=50, in_flight=in_flight):
        b = job.block
        out[b.row : b.row + b.height, b.col : b.col + b.width] = prob
    np.testing.assert_array_equal(out, streamed(before, after, None, patch, stride, size, 50))
    # reused: far fewer arrays than chunks (at most the in-flight ones and those waiting)
    assert len(scorer.bases) > 20 and len(set(scorer.bases)) <= 2 * (in_flight + 1)
