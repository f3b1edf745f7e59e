"""Augmented MNIST pairs, the benchmark of Hamaguchi et al. (CVPR 2019), Table 3.

A pair is two images of the real MNIST: negative (unchanged, label 0) when both show the same
digit class (two different images of it), positive (changed, label 1) when the classes differ.
Each image gets its own random augmentation, the "trivial difference" the model must ignore:

- ``MNIST-R``: rotation by an angle uniform in [-90, 90] degrees about the centre (bilinear);
- ``MNIST-B``: the digit over a random crop of natural texture, ``max(digit, texture)``, the
  texture stretched to [0, 255 * contrast] with contrast uniform in [0.4, 0.8] (as in
  mnist-back-image of Larochelle et al. 2007);
- ``MNIST-R-B``: both, the digit rotated first, the texture not.

Training pairs come from the training split, test pairs from the test split, so the two never
share an image. The paper trains on 100,000 negatives and 50, 500 or 32,000 positives and tests
on 50,000 of each.

Data: ``root`` is the data folder (the one holding ``mnist/`` and ``sztaki/``), by default
``serving.config.shared_data_dir()`` ($RARECHANGE_DATA, else ``../shared/data``). Textures are
crops of the SZTAKI AirChange aerial photos (``<data>/sztaki/*/*/im{1,2}.png``); without them,
clutter made of MNIST digit fragments (see :func:`texture_source`).
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from training.data import PatchSet

Variant = Literal["MNIST-R", "MNIST-B", "MNIST-R-B"]
Split = Literal["train", "test"]
VARIANTS: tuple[str, ...] = get_args(Variant)
SPLITS: tuple[str, ...] = get_args(Split)

SIDE = 28
MAX_ANGLE = 90.0  # degrees, either way
CONTRAST = (0.4, 0.8)  # texture brightness range, as a fraction of 255
CROP_SIDE = (28, 84)  # texture crops, in source pixels, before resizing to 28
BATCH = 8192  # images per rotation / compositing batch

FILES: dict[str, tuple[str, str]] = {  # split -> (images, labels)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MD5: dict[str, str] = {  # of the decompressed files
    "train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637",
}

SOURCE_SZTAKI = "sztaki"
SOURCE_FRAGMENTS = "mnist-fragments"

_verified: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) whose md5 matched


class MnistNotFound(FileNotFoundError):
    """The MNIST idx files are not where we looked."""


# --------------------------------------------------------------------------------------- loading


def _data_root(root: Path | None) -> Path | None:
    if root is not None:
        return Path(root)
    from serving.config import shared_data_dir

    return shared_data_dir()


def _mnist_dir(root: Path | None) -> Path:
    """The folder holding the four idx files: ``<root>/mnist`` or ``root`` itself."""
    data = _data_root(root)
    if data is None:
        raise MnistNotFound(
            "MNIST not found: no data folder ($RARECHANGE_DATA is unset or not a folder, and "
            "../shared/data beside the checkout does not exist). Set RARECHANGE_DATA to a folder "
            "holding mnist/ with the four original idx .gz files, or pass root=."
        )
    names = [n for pair in FILES.values() for n in pair]
    candidates = [data / "mnist", data]
    for folder in candidates:
        if all((folder / n).is_file() for n in names):
            return folder
    looked = ", ".join(str(c) for c in candidates)
    raise MnistNotFound(
        f"MNIST not found: looked in {looked} for {', '.join(names)}. Set RARECHANGE_DATA to a "
        "folder holding mnist/ with these files (or pass root=)."
    )


def _read_idx(path: Path, verify: bool) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    if verify:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _verified:
            digest = hashlib.md5(raw).hexdigest()
            if digest != MD5[path.name]:
                raise ValueError(
                    f"{path}: md5 of the decompressed file is {digest}, expected {MD5[path.name]} "
                    "(corrupt or not the original MNIST)"
                )
            _verified.add(key)
    magic = int.from_bytes(raw[:4], "big")
    if magic >> 8 != 0x08:  # unsigned bytes
        raise ValueError(f"{path}: not an idx file of unsigned bytes (magic {magic:#010x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {data.size} bytes of data for dimensions {dims}")
    return data.reshape(dims)


def load_mnist(
    split: Split, root: Path | None = None, verify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 images and (N,) int64 labels of one split of the real MNIST.

    ``verify`` checks the md5 of the decompressed files (once per file per process)."""
    if split not in FILES:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    folder = _mnist_dir(root)
    image_file, label_file = FILES[split]
    images = _read_idx(folder / image_file, verify)
    labels = _read_idx(folder / label_file, verify).astype(np.int64)
    if images.ndim != 3 or images.shape[1:] != (SIDE, SIDE) or len(images) != len(labels):
        raise ValueError(f"{folder}: images {images.shape} and labels {labels.shape} do not match")
    return images.copy(), labels


# ------------------------------------------------------------------------------------------ pairs


def build_pair_indices(
    labels: np.ndarray, n_negative: int, n_positive: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(idx_a, idx_b, label): ``n_negative`` pairs of two different images of one class (label 0),
    spread evenly over the classes, and ``n_positive`` pairs of images of different classes
    (label 1; the first image uniform over all, the second uniform over the other classes), in
    shuffled order."""
    labels = np.asarray(labels)
    if n_negative < 0 or n_positive < 0:
        raise ValueError("pair counts must be >= 0")
    classes, counts = np.unique(labels, return_counts=True)
    k = len(classes)
    order = np.argsort(labels, kind="stable")  # image indices grouped by class
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])

    # negatives: n // k per class, the remainder to randomly chosen classes
    per_class = np.full(k, n_negative // k if k else 0, dtype=np.int64)
    if k:
        per_class[rng.choice(k, n_negative % k, replace=False)] += 1
    if n_negative and (counts[per_class > 0] < 2).any():
        raise ValueError("every class needs at least two images for negative pairs")
    neg_class = np.repeat(np.arange(k), per_class)
    size = counts[neg_class]
    pos_a = rng.integers(0, size) if n_negative else np.zeros(0, np.int64)
    pos_b = (pos_a + rng.integers(1, np.maximum(size, 2))) % size  # never pos_a
    neg_a = order[start[neg_class] + pos_a]
    neg_b = order[start[neg_class] + pos_b]

    # positives: a uniform; b uniform among the images of the other classes
    if n_positive:
        if k < 2:
            raise ValueError("positive pairs need at least two classes")
        n = len(labels)
        pos_a = rng.integers(0, n, size=n_positive)
        cls_a = np.searchsorted(classes, labels[pos_a])
        slot = rng.integers(0, n - counts[cls_a])  # a position in `order`, class a skipped
        slot = np.where(slot >= start[cls_a], slot + counts[cls_a], slot)
        pos_b = order[slot]
    else:
        pos_a = pos_b = np.zeros(0, np.int64)

    idx_a = np.concatenate([neg_a, pos_a]).astype(np.int64)
    idx_b = np.concatenate([neg_b, pos_b]).astype(np.int64)
    label = np.concatenate([np.zeros(n_negative, np.int64), np.ones(n_positive, np.int64)])
    perm = rng.permutation(len(label))
    return idx_a[perm], idx_b[perm], label[perm]


# ---------------------------------------------------------------------------------- augmentation


def _rotate(images: np.ndarray, angles_deg: np.ndarray) -> np.ndarray:
    """Rotate each (28, 28) image about its centre by its angle (bilinear, zeros outside)."""
    import torch
    import torch.nn.functional as F

    out = np.empty_like(images)
    theta_rad = np.deg2rad(angles_deg).astype(np.float32)
    cos, sin = np.cos(theta_rad), np.sin(theta_rad)
    zero = np.zeros_like(cos)
    # affine_grid maps output coordinates to input ones: [x_in, y_in] = R [x_out, y_out]
    theta = np.stack([np.stack([cos, -sin, zero], 1), np.stack([sin, cos, zero], 1)], 1)
    with torch.no_grad():
        for i in range(0, len(images), BATCH):
            x = torch.from_numpy(images[i : i + BATCH]).unsqueeze(1).float()
            t = torch.from_numpy(theta[i : i + BATCH])
            grid = F.affine_grid(t, list(x.shape), align_corners=False)
            y = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            out[i : i + BATCH] = y.squeeze(1).round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


def _composite(
    images: np.ndarray, backgrounds: np.ndarray, pick: np.ndarray, contrast: np.ndarray
) -> np.ndarray:
    """max(digit, texture) with each texture stretched to [0, 255 * contrast]."""
    bank = backgrounds.astype(np.float32)
    lo = bank.min(axis=(1, 2), keepdims=True)
    span = bank.max(axis=(1, 2), keepdims=True) - lo
    bank = np.divide(bank - lo, span, out=np.zeros_like(bank), where=span > 0)  # [0, 1]
    out = np.empty_like(images)
    for i in range(0, len(images), BATCH):
        s = slice(i, i + BATCH)
        tex = bank[pick[s]] * (255.0 * contrast[s, None, None]).astype(np.float32)
        tex = np.rint(tex, out=tex).astype(np.uint8)
        np.maximum(images[s], tex, out=out[s])
    return out


def augment(
    images: np.ndarray,
    variant: Variant,
    rng: np.random.Generator,
    backgrounds: np.ndarray | None = None,
) -> np.ndarray:
    """(N, 28, 28) uint8 -> (N, 28, 28) uint8, each image with its own random augmentation.

    ``backgrounds`` is a (M, 28, 28) texture bank for the -B variants; when None, one of
    ``min(N, 20000)`` crops is built with :func:`texture_bank` (default data folder, seed drawn
    from ``rng``)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (SIDE, SIDE):
        raise ValueError(f"expected (N, 28, 28) uint8 images, got {images.shape} {images.dtype}")
    out = images
    if variant in ("MNIST-R", "MNIST-R-B"):
        out = _rotate(out, rng.uniform(-MAX_ANGLE, MAX_ANGLE, size=len(images)))
    if variant in ("MNIST-B", "MNIST-R-B"):
        if backgrounds is None:
            seed = int(rng.integers(2**31))
            backgrounds = texture_bank(n=max(1, min(len(images), 20000)), seed=seed)
        pick = rng.integers(0, len(backgrounds), size=len(images))
        contrast = rng.uniform(*CONTRAST, size=len(images))
        out = _composite(out, backgrounds, pick, contrast)
    return out if out is not images else images.copy()


# -------------------------------------------------------------------------------------- textures


def _sztaki_files(data: Path | None) -> list[Path]:
    if data is None:
        return []
    folder = data / "sztaki"
    return sorted(p for name in ("im1.png", "im2.png") for p in folder.glob(f"*/*/{name}"))


def texture_source(root: Path | None = None) -> str:
    """Which texture :func:`texture_bank` uses for this data folder: ``"sztaki"`` (aerial photos)
    or ``"mnist-fragments"`` (clutter of MNIST training-digit pieces)."""
    return SOURCE_SZTAKI if _sztaki_files(_data_root(root)) else SOURCE_FRAGMENTS


@lru_cache(maxsize=2)
def _grey_photos(files: tuple[Path, ...]) -> tuple[np.ndarray, ...]:
    from PIL import Image

    photos = []
    for f in files:
        with Image.open(f) as im:
            photos.append(np.asarray(im.convert("L")))
    return tuple(photos)


def _sztaki_crops(files: list[Path], n: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    photos = _grey_photos(tuple(files))
    which = rng.integers(0, len(photos), size=n)
    sides = rng.integers(CROP_SIDE[0], CROP_SIDE[1] + 1, size=n)
    u = rng.random((n, 2))
    flips = rng.random((n, 2)) < 0.5
    out = np.empty((n, SIDE, SIDE), np.uint8)
    for i in range(n):
        photo, s = photos[which[i]], int(sides[i])
        r = int(u[i, 0] * (photo.shape[0] - s + 1))
        c = int(u[i, 1] * (photo.shape[1] - s + 1))
        crop = photo[r : r + s, c : c + s]
        if s != SIDE:
            crop = np.asarray(Image.fromarray(crop).resize((SIDE, SIDE), Image.Resampling.BILINEAR))
        if flips[i, 0]:
            crop = crop[::-1]
        if flips[i, 1]:
            crop = crop[:, ::-1]
        out[i] = crop
    return out


def _fragment_crops(digits: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Clutter: 4..8 random square pieces (10..16 px) of random digits pasted at random places."""
    out = np.zeros((n, SIDE, SIDE), np.uint8)
    pieces = rng.integers(4, 9, size=n)
    for round_ in range(8):
        sizes = rng.integers(10, 17, size=n)
        src = rng.integers(0, len(digits), size=n)
        flip = rng.random(n) < 0.5
        u = rng.random((n, 4))
        for s in range(10, 17):
            i = np.flatnonzero((sizes == s) & (pieces > round_))
            if not len(i):
                continue
            span = np.arange(s)
            r0, c0 = (4 + (u[i, :2] * (SIDE - 8 - s + 1)).astype(int)).T  # where digits have ink
            r1, c1 = (u[i, 2:] * (SIDE - s + 1)).astype(int).T
            cols = c0[:, None] + np.where(flip[i, None], span[::-1], span)
            piece = digits[src[i, None, None], r0[:, None, None] + span[:, None], cols[:, None, :]]
            at = (i[:, None, None], r1[:, None, None] + span[:, None], c1[:, None, None] + span)
            out[at] = np.maximum(out[at], piece)
    return out


def texture_bank(root: Path | None = None, n: int = 20000, seed: int = 0) -> np.ndarray:
    """(n, 28, 28) uint8 grey texture crops for the -B variants.

    From the SZTAKI AirChange photos when the data folder has them: crops of 28..84 px at random
    places, resized to 28 px, randomly flipped. Otherwise from MNIST training digits (see
    :func:`texture_source`). Use different seeds for the training and test textures."""
    return _texture_bank(_data_root(root), n, seed).copy()


@lru_cache(maxsize=4)
def _texture_bank(data: Path | None, n: int, seed: int) -> np.ndarray:
    """:func:`texture_bank`, cached and read-only."""
    rng = np.random.default_rng(seed)
    files = _sztaki_files(data)
    if files:
        bank = _sztaki_crops(files, n, rng)
    else:
        bank = _fragment_crops(load_mnist("train", data)[0], n, rng)
    bank.flags.writeable = False
    return bank


# ----------------------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class PairSet:
    before: np.ndarray  # (N, 1, 28, 28) uint8
    after: np.ndarray  # (N, 1, 28, 28) uint8
    label: np.ndarray  # (N,) int64: 1 changed (different digits), 0 unchanged
    digits_a: np.ndarray  # (N,) int64: the digit class of `before`
    digits_b: np.ndarray  # (N,) int64: the digit class of `after`

    def __len__(self) -> int:
        return len(self.label)

    def to_patchset(self) -> PatchSet:
        return PatchSet(self.before, self.after, self.label.astype(np.float32))


def make_pairs(
    variant: Variant,
    split: Split,
    n_negative: int,
    n_positive: int,
    seed: int,
    root: Path | None = None,
) -> PairSet:
    """``n_negative`` unchanged and ``n_positive`` changed pairs of augmented digits of one split.

    Deterministic in its arguments. The negatives (images and augmentations) do not depend on
    ``n_positive``, and the image indices not on ``variant``, so that settings compare fairly."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    images, labels = load_mnist(split, root)
    v, s = VARIANTS.index(variant), SPLITS.index(split)

    def stream(*key: int) -> np.random.Generator:
        return np.random.default_rng([seed, s, *key])

    backgrounds = None
    if variant != "MNIST-R":
        tex_seed = int(np.random.SeedSequence([seed, s, 99]).generate_state(1)[0])
        backgrounds = _texture_bank(_data_root(root), 20000, tex_seed)

    parts = []
    for kind, n in ((0, n_negative), (1, n_positive)):
        na, nb = (n, 0) if kind == 0 else (0, n)
        a, b, lab = build_pair_indices(labels, na, nb, stream(kind, n))
        aug = stream(kind, n, 1 + v)
        before = augment(images[a], variant, aug, backgrounds)
        after = augment(images[b], variant, aug, backgrounds)
        parts.append((before, after, lab, labels[a], labels[b]))
    before, after, lab, da, db = (np.concatenate(x) for x in zip(*parts, strict=True))
    perm = stream(2, n_negative, n_positive).permutation(len(lab))
    return PairSet(
        before[perm, None],
        after[perm, None],
        lab[perm],
        da[perm].astype(np.int64),
        db[perm].astype(np.int64),
    )
