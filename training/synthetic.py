"""Procedural aerial-like before/after scene pairs with ground-truth change masks.

Why: tests, the demo and a tiny CNN need change-detection data on a fresh clone that has no
real imagery. One seed fixes one "place" (field parcels, roads, roofs, trees, maybe water)
that is rendered twice. Each date gets its own nuisances, which a detector must learn to
ignore because they are global or smooth: seasonal recolouring of vegetation, a smooth
cloud/haze illumination field, gain, gamma, colour balance, blur (one date), noise and a
sub-pixel shift (after date). The after date also carries a few real changes (roofs built or
removed, paved lots), which alter local structure and colour strongly so they stay learnable
from 32x32 patches.

Mask geometry: the mask stays on the before grid. Changes are painted into the scene before
the after image is translated by at most ``NuisanceConfig.shift_px`` (sub-pixel by default),
so the mask is not shifted; change borders may be misaligned by less than that.

numpy only (no torch, no scipy): serving tests that run without torch import this module.
"""

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

__all__ = [
    "NuisanceConfig",
    "SceneConfig",
    "ScenePair",
    "plant_change",
    "render_pair",
]

Box = tuple[int, int, int, int]

_REF_AREA = 512 * 512

# Field families: summer colour, alternative (other season / harvest) colour, weight.
_FIELD_BASE = np.array(
    [[72, 112, 48], [100, 138, 58], [128, 98, 70], [188, 168, 104], [88, 118, 60], [58, 92, 42]],
    np.float32,
)
_FIELD_ALT = np.array(
    [[150, 140, 72], [128, 104, 72], [96, 124, 62], [142, 112, 78], [132, 128, 78], [120, 110, 60]],
    np.float32,
)
_FIELD_P = np.array([0.22, 0.15, 0.2, 0.13, 0.2, 0.1])
_MEADOW = 4

_ROOFS = np.array(
    [
        [168, 68, 52],  # red tiles
        [146, 84, 62],  # terracotta
        [118, 56, 48],  # brown-red
        [74, 74, 82],  # dark grey
        [138, 138, 142],  # grey
        [50, 52, 58],  # anthracite
        [192, 192, 186],  # light flat roof
    ],
    np.float32,
)
_ROOF_P = np.array([0.25, 0.15, 0.1, 0.15, 0.15, 0.1, 0.1])
_SOILS = np.array(
    [[158, 128, 94], [100, 78, 58], [92, 122, 62], [180, 162, 122]], np.float32
)  # bare soils and re-sown grass, for removed buildings
_LOTS = np.array([[72, 74, 78], [172, 170, 164]], np.float32)  # asphalt, concrete
_TREE = np.array([40, 72, 38], np.float32)
_TREE_AUTUMN = np.array([98, 92, 46], np.float32)
_WATER = np.array([38, 58, 66], np.float32)


@dataclass(frozen=True)
class NuisanceConfig:
    """Magnitudes of the trivial, per-date differences a detector must ignore."""

    strength: float = 1.0  # scales every nuisance below; 0 = identical rendering
    gain: float = 0.25  # illumination: multiplicative gain in [1-g, 1+g] (times strength)
    gamma: float = 0.25  # gamma in [1-g, 1+g]
    colour: float = 0.12  # per-channel colour-balance factor in [1-c, 1+c]
    blur_sigma: float = 1.0  # gaussian blur sigma up to this (px), one date only
    noise_sigma: float = 6.0  # additive gaussian noise std in uint8 units
    shift_px: float = 0.75  # sub-pixel translation of the whole after image, up to this
    season: float = 1.0  # probability-like weight of seasonal recolouring of fields/trees/grass
    shadow: float = 0.5  # strength of a smooth low-frequency illumination field (clouds/haze)


@dataclass(frozen=True)
class SceneConfig:
    """Scene size and how many real changes to plant."""

    height: int = 512
    width: int = 512
    n_changes: int | None = None  # None: Poisson(change_rate * area/512^2); 0 = unchanged pair
    change_rate: float = 1.5
    min_change_px: int = 12  # side of changed objects, min/max
    max_change_px: int = 48
    nuisance: NuisanceConfig = field(default_factory=NuisanceConfig)


@dataclass(frozen=True)
class ScenePair:
    """Two renderings of one place plus the ground truth of what really changed."""

    before: np.ndarray  # (H, W, 3) uint8
    after: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8, 1 where a real change is, else 0
    changes: tuple[Box, ...]  # (row0, col0, row1, col1) per planted change, exclusive ends


_DEFAULT_SCENE = SceneConfig()


# --------------------------------------------------------------------------- helpers


def _rngs(seed: int, n: int) -> list[np.random.Generator]:
    """Independent streams, so e.g. changing n_changes keeps layout and nuisances."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Value noise with feature size ~cell px (smoothstep-interpolated random grid)."""
    cell = max(float(cell), 1.0)

    def axis(n: int) -> tuple[np.ndarray, np.ndarray, int]:
        pos = (np.arange(n, dtype=np.float32) + 0.5) / cell + rng.random()
        i0 = np.floor(pos).astype(np.intp)
        t = pos - i0
        return i0, (t * t * (3 - 2 * t)).astype(np.float32), int(i0.max()) + 2

    iy, ty, gh = axis(h)
    ix, tx, gw = axis(w)
    g = rng.standard_normal((gh, gw)).astype(np.float32)
    rows = g[iy] * (1 - ty)[:, None] + g[iy + 1] * ty[:, None]
    return rows[:, ix] * (1 - tx)[None, :] + rows[:, ix + 1] * tx[None, :]


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur (edge padding) as a sum of shifted slices."""
    r = max(1, math.ceil(3 * sigma))
    x = np.arange(-r, r + 1, dtype=np.float32)
    k = np.exp(-(x * x) / (2 * sigma * sigma))
    k /= k.sum()
    h, w = img.shape[:2]
    pad = np.pad(img, ((r, r), (0, 0), (0, 0)), mode="edge")
    out = k[0] * pad[0:h]
    for i in range(1, 2 * r + 1):
        out += k[i] * pad[i : i + h]
    pad = np.pad(out, ((0, 0), (r, r), (0, 0)), mode="edge")
    out = k[0] * pad[:, 0:w]
    for i in range(1, 2 * r + 1):
        out += k[i] * pad[:, i : i + w]
    return out


def _shift(img: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """Translate content by (dy, dx) px with bilinear resampling and edge clamping."""
    h, w = img.shape[:2]

    def taps(n: int, d: float) -> tuple[np.ndarray, np.ndarray, float]:
        src = np.arange(n) - d
        i0 = np.floor(src).astype(np.intp)
        f = float(src[0] - i0[0]) if n else 0.0
        return np.clip(i0, 0, n - 1), np.clip(i0 + 1, 0, n - 1), f

    y0, y1, fy = taps(h, dy)
    x0, x1, fx = taps(w, dx)
    rows = img[y0] * (1 - fy) + img[y1] * fy
    return rows[:, x0] * (1 - fx) + rows[:, x1] * fx


def _rect_mask(box: Box, shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, bool)
    out[box[0] : box[2], box[1] : box[3]] = True
    return out


def _clip_box(box: Box, h: int, w: int) -> Box:
    return (max(box[0], 0), max(box[1], 0), min(box[2], h), min(box[3], w))


def _boxes_overlap(a: Box, b: Box, margin: int = 0) -> bool:
    return not (
        a[2] + margin <= b[0]
        or b[2] + margin <= a[0]
        or a[3] + margin <= b[1]
        or b[3] + margin <= a[1]
    )


def _far_colour(
    palette: np.ndarray, ref: np.ndarray, rng: np.random.Generator, k: int
) -> np.ndarray:
    """Of k random palette entries, the one farthest from ref: real changes must stand out."""
    idx = rng.choice(len(palette), size=min(k, len(palette)), replace=False)
    d = np.abs(palette[idx] - ref).sum(axis=1)
    return palette[idx[int(np.argmax(d))]]


def _roof_pixels(
    h: int, w: int, colour: np.ndarray, sun: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """A roof of h x w px: gable halves lit/unlit by the sun, or a flat roof with fixtures."""
    colour = colour * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    roof = np.empty((h, w, 3), np.float32)
    roof[:] = colour
    flat = colour.mean() > 170 or (max(h, w) > 28 and rng.random() < 0.5)
    if flat:
        for _ in range(int(rng.integers(0, 3))):
            fh, fw = int(rng.integers(2, 5)), int(rng.integers(2, 5))
            if fh < h - 2 and fw < w - 2:
                r, c = int(rng.integers(1, h - fh)), int(rng.integers(1, w - fw))
                roof[r : r + fh, c : c + fw] *= 0.75
    elif w >= h:  # ridge runs horizontally; sun from -sun[0] lights one half
        mid = h // 2
        lit, dark = (slice(0, mid), slice(mid, h)) if sun[0] > 0 else (slice(mid, h), slice(0, mid))
        roof[lit] *= 1.15
        roof[dark] *= 0.8
        if h >= 6:
            roof[mid] = colour * 1.25
    else:
        mid = w // 2
        lit, dark = (slice(0, mid), slice(mid, w)) if sun[1] > 0 else (slice(mid, w), slice(0, mid))
        roof[:, lit] *= 1.15
        roof[:, dark] *= 0.8
        if w >= 6:
            roof[:, mid] = colour * 1.25
    roof *= 1 + 0.03 * rng.standard_normal((h, w, 1)).astype(np.float32)
    if h > 3 and w > 3:  # darker eaves outline
        roof[[0, -1]] *= 0.85
        roof[1:-1, [0, -1]] *= 0.85
    return roof


def _shadow_box(roof: Box, sun: tuple[int, int], sh: int) -> Box:
    r0, c0, r1, c1 = roof
    return (r0 + sun[0] * sh, c0 + sun[1] * sh, r1 + sun[0] * sh, c1 + sun[1] * sh)


def _union_box(a: Box, b: Box) -> Box:
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


# --------------------------------------------------------------------------- layout


@dataclass
class _House:
    roof: Box
    shadow: Box  # clipped to the image
    colour: np.ndarray


@dataclass
class _Layout:
    """Everything date-independent about one place, as per-pixel layers."""

    parcel_id: np.ndarray  # (H, W) int
    tex: np.ndarray  # (H, W) multiplicative field texture
    field_base: np.ndarray  # (P, 3)
    field_alt: np.ndarray  # (P, 3)
    ground_rgb: np.ndarray  # (H, W, 3) roads and water
    ground_a: np.ndarray  # (H, W)
    shade: np.ndarray  # (H, W) cast shadows of trees and buildings
    tree_a: np.ndarray  # (H, W)
    tree_shade: np.ndarray  # (H, W)
    built_rgb: np.ndarray  # (H, W, 3) roofs, lots, soil patches
    built_a: np.ndarray  # (H, W)
    occupied: np.ndarray  # (H, W) bool: not open field
    houses: list[_House]
    sun: tuple[int, int]  # direction (+-1, +-1) shadows are cast to


def _parcels(rng: np.random.Generator, h: int, w: int) -> list[Box]:
    """Binary space partition into field parcels of varied sizes."""
    out: list[Box] = []
    stack: list[Box] = [(0, 0, h, w)]
    min_side, max_side = 22, 170
    while stack:
        r0, c0, r1, c1 = stack.pop()
        ph, pw = r1 - r0, c1 - c0
        can_split = max(ph, pw) >= 2 * min_side
        must_split = max(ph, pw) > max_side
        if not can_split or (not must_split and rng.random() < 0.3):
            out.append((r0, c0, r1, c1))
            continue
        vertical = pw >= 2 * min_side and (pw > ph or ph < 2 * min_side or rng.random() < 0.25)
        if vertical:
            cut = int(rng.integers(c0 + min_side, c1 - min_side + 1))
            stack += [(r0, c0, r1, cut), (r0, cut, r1, c1)]
        else:
            cut = int(rng.integers(r0 + min_side, r1 - min_side + 1))
            stack += [(r0, c0, cut, c1), (cut, c0, r1, c1)]
    return out


def _fields(
    rng: np.random.Generator, h: int, w: int, parcels: list[Box]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n = len(parcels)
    fam = rng.choice(len(_FIELD_P), size=n, p=_FIELD_P)
    base = _FIELD_BASE[fam] + rng.normal(0, 8, (n, 3)).astype(np.float32)
    alt = _FIELD_ALT[fam] + rng.normal(0, 8, (n, 3)).astype(np.float32)
    pid = np.empty((h, w), np.int32)
    tex = np.empty((h, w), np.float32)
    for i, (r0, c0, r1, c1) in enumerate(parcels):
        pid[r0:r1, c0:c1] = i
        if fam[i] == _MEADOW or rng.random() < 0.15:
            tex[r0:r1, c0:c1] = 1 + 0.07 * _smooth_noise(rng, r1 - r0, c1 - c0, 3)
            continue
        theta = rng.choice([0.0, math.pi / 2]) + rng.normal(0, 0.04)
        if rng.random() < 0.15:
            theta = rng.uniform(0, math.pi)
        period = rng.uniform(3, 9)
        amp = rng.uniform(0.04, 0.12)
        rr = np.arange(r0, r1, dtype=np.float32)[:, None]
        cc = np.arange(c0, c1, dtype=np.float32)[None, :]
        phase = (rr * math.cos(theta) + cc * math.sin(theta)) * (2 * math.pi / period)
        tex[r0:r1, c0:c1] = 1 + amp * np.sin(phase + rng.uniform(0, 2 * math.pi))
    tex *= 1 + 0.08 * _smooth_noise(rng, h, w, 24)
    tex *= 1 + 0.035 * rng.standard_normal((h, w), dtype=np.float32)
    edge = np.zeros((h, w), bool)  # darker parcel boundaries (ditches, hedges)
    edge[1:] |= pid[1:] != pid[:-1]
    edge[:, 1:] |= pid[:, 1:] != pid[:, :-1]
    tex[edge] *= 0.85
    return pid, tex, base, alt


def _ground(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Water body (sometimes) and straight roads, composited over the fields."""
    rgb = np.zeros((h, w, 3), np.float32)
    a = np.zeros((h, w), np.float32)
    frac = h * w / _REF_AREA
    if rng.random() < 0.35 and min(h, w) >= 64:
        ry = rng.uniform(15, max(16.0, min(70.0, h / 4)))
        rx = rng.uniform(15, max(16.0, min(70.0, w / 4)))
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r0, r1 = max(int(cy - 1.5 * ry), 0), min(int(cy + 1.5 * ry) + 1, h)
        c0, c1 = max(int(cx - 1.5 * rx), 0), min(int(cx + 1.5 * rx) + 1, w)
        if r1 > r0 and c1 > c0:
            yy = (np.arange(r0, r1, dtype=np.float32)[:, None] - cy) / ry
            xx = (np.arange(c0, c1, dtype=np.float32)[None, :] - cx) / rx
            d = yy * yy + xx * xx + 0.35 * _smooth_noise(rng, r1 - r0, c1 - c0, 12)
            blob = np.clip((1 - d) * 8, 0, 1)
            col = _WATER * (1 + 0.06 * _smooth_noise(rng, r1 - r0, c1 - c0, 20))[..., None]
            rgb[r0:r1, c0:c1] = col
            a[r0:r1, c0:c1] = blob
    rr = np.arange(h, dtype=np.float32)[:, None]
    cc = np.arange(w, dtype=np.float32)[None, :]
    for _ in range(int(rng.poisson(0.8 + 1.7 * frac))):
        ang = rng.choice([0.0, math.pi / 2]) + rng.normal(0, 0.05)
        if rng.random() < 0.4:
            ang = rng.uniform(0, math.pi)
        py, px = rng.uniform(0, h), rng.uniform(0, w)
        width = rng.uniform(4, 10)
        d = np.abs((rr - py) * math.cos(ang) - (cc - px) * math.sin(ang))
        ra = np.clip(width / 2 + 0.5 - d, 0, 1)
        grey = rng.uniform(105, 150)
        col = np.array([grey, grey, grey * rng.uniform(0.97, 1.05)], np.float32)
        sel = ra > 0
        rgb[sel] = col * (1 + 0.04 * rng.standard_normal((int(sel.sum()), 1))).astype(np.float32)
        if width >= 8:  # faint centre line
            rgb[sel & (d < 0.6)] = col * 1.35
        a[sel] = np.maximum(a[sel], ra[sel])
    return rgb, a


def _draw_roof(lay: _Layout, roof: Box, colour: np.ndarray, rng: np.random.Generator) -> _House:
    """Paint a roof and its cast shadow into the built/shade layers."""
    h, w = lay.tex.shape
    sh = int(rng.integers(2, 4))
    shadow = _clip_box(_shadow_box(roof, lay.sun, sh), h, w)
    if shadow[2] > shadow[0] and shadow[3] > shadow[1]:
        lay.shade[shadow[0] : shadow[2], shadow[1] : shadow[3]] = np.minimum(
            lay.shade[shadow[0] : shadow[2], shadow[1] : shadow[3]], 0.55
        )
    r0, c0, r1, c1 = roof
    lay.built_rgb[r0:r1, c0:c1] = _roof_pixels(r1 - r0, c1 - c0, colour, lay.sun, rng)
    lay.built_a[r0:r1, c0:c1] = 1
    return _House(roof, shadow, colour)


def _house_fits(occ: np.ndarray, roof: Box, sun: tuple[int, int], margin: int) -> bool:
    h, w = occ.shape
    r0, c0, r1, c1 = _union_box(roof, _shadow_box(roof, sun, 3))
    if r0 < 0 or c0 < 0 or r1 > h or c1 > w:
        return False
    return not occ[max(r0 - margin, 0) : r1 + margin, max(c0 - margin, 0) : c1 + margin].any()


def _mark(occ: np.ndarray, roof: Box, sun: tuple[int, int]) -> None:
    r0, c0, r1, c1 = _union_box(roof, _shadow_box(roof, sun, 3))
    occ[max(r0, 0) : r1, max(c0, 0) : c1] = True


def _houses(lay: _Layout, rng: np.random.Generator) -> None:
    h, w = lay.tex.shape
    frac = h * w / _REF_AREA
    occ = lay.occupied
    centres = [
        (rng.uniform(0, h), rng.uniform(0, w), rng.uniform(18, 45))
        for _ in range(int(rng.poisson(2.5 * frac)) + 1)
    ]
    attempts = [(cy, cx, s) for cy, cx, s in centres for _ in range(int(rng.integers(12, 40)))]
    attempts += [(h / 2, w / 2, 1e6)] * int(rng.poisson(8 * frac))  # scattered farmsteads
    for cy, cx, spread in attempts:
        long = round(8 + 32 * float(rng.beta(1.3, 3.2)))
        short = max(8, round(long * float(rng.uniform(0.5, 1.0))))
        hh, ww = (long, short) if rng.random() < 0.5 else (short, long)
        if spread > 1e5:
            r0, c0 = rng.uniform(0, h - hh), rng.uniform(0, w - ww)
        else:
            r0, c0 = rng.normal(cy, spread), rng.normal(cx, spread)
        roof = (int(r0), int(c0), int(r0) + hh, int(c0) + ww)
        if not _house_fits(occ, roof, lay.sun, 2):
            continue
        colour = _ROOFS[rng.choice(len(_ROOFS), p=_ROOF_P)]
        lay.houses.append(_draw_roof(lay, roof, colour, rng))
        _mark(occ, roof, lay.sun)


def _tree(lay: _Layout, cy: float, cx: float, rad: float, rng: np.random.Generator) -> None:
    h, w = lay.tex.shape
    sy, sx = lay.sun[0] * rad * 0.6, lay.sun[1] * rad * 0.6
    r0 = max(int(cy - rad - 1 + min(sy, 0)), 0)
    r1 = min(int(cy + rad + 2 + max(sy, 0)), h)
    c0 = max(int(cx - rad - 1 + min(sx, 0)), 0)
    c1 = min(int(cx + rad + 2 + max(sx, 0)), w)
    if r1 <= r0 or c1 <= c0 or lay.occupied[r0:r1, c0:c1].any():
        return
    dy = np.arange(r0, r1, dtype=np.float32)[:, None] - cy
    dx = np.arange(c0, c1, dtype=np.float32)[None, :] - cx
    alpha = np.clip(rad + 0.5 - np.sqrt(dy * dy + dx * dx), 0, 1)
    dys, dxs = dy - sy, dx - sx
    shadow = np.clip(rad + 0.5 - np.sqrt(dys * dys + dxs * dxs), 0, 1)
    light = 1 - 0.3 * (dy * lay.sun[0] + dx * lay.sun[1]) / (rad * 1.414)
    light *= rng.uniform(0.85, 1.15) * (1 + 0.08 * rng.standard_normal(alpha.shape))
    sl = (slice(r0, r1), slice(c0, c1))
    lay.shade[sl] = np.minimum(lay.shade[sl], 1 - 0.45 * shadow)
    on_top = alpha >= lay.tree_a[sl]
    lay.tree_shade[sl] = np.where(on_top, light, lay.tree_shade[sl])
    lay.tree_a[sl] = np.maximum(lay.tree_a[sl], alpha)


def _trees(lay: _Layout, parcels: list[Box], rng: np.random.Generator) -> None:
    h, w = lay.tex.shape
    frac = h * w / _REF_AREA
    for _ in range(int(rng.poisson(6 * frac)) + 1):  # clusters (copses, gardens)
        cy, cx, spread = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(5, 25)
        for _ in range(int(rng.integers(3, 26))):
            rad = 3 + 7 * rng.beta(1.5, 2.5)
            _tree(lay, rng.normal(cy, spread), rng.normal(cx, spread), rad, rng)
    for _ in range(int(rng.poisson(4 * frac))):  # hedgerows along parcel edges
        r0, c0, r1, c1 = parcels[int(rng.integers(len(parcels)))]
        rad = rng.uniform(3, 5)
        horizontal = rng.random() < 0.5
        n = int((c1 - c0 if horizontal else r1 - r0) / (1.6 * rad))
        for k in range(n):
            t = (k + 0.5) * 1.6 * rad
            y, x = (r0 + 1, c0 + t) if horizontal else (r0 + t, c0 + 1)
            jy, jx = rng.normal(0, 0.7, 2)
            _tree(lay, y + jy, x + jx, rad * rng.uniform(0.8, 1.2), rng)


def _layout(rng: np.random.Generator, h: int, w: int) -> _Layout:
    parcels = _parcels(rng, h, w)
    pid, tex, base, alt = _fields(rng, h, w, parcels)
    ground_rgb, ground_a = _ground(rng, h, w)
    sun = (int(rng.choice([-1, 1])), int(rng.choice([-1, 1])))
    lay = _Layout(
        parcel_id=pid,
        tex=tex,
        field_base=base,
        field_alt=alt,
        ground_rgb=ground_rgb,
        ground_a=ground_a,
        shade=np.ones((h, w), np.float32),
        tree_a=np.zeros((h, w), np.float32),
        tree_shade=np.ones((h, w), np.float32),
        built_rgb=np.zeros((h, w, 3), np.float32),
        built_a=np.zeros((h, w), np.float32),
        occupied=ground_a > 0.05,
        houses=[],
        sun=sun,
    )
    _houses(lay, rng)
    _trees(lay, parcels, rng)
    lay.occupied |= (lay.tree_a > 0.05) | (lay.shade < 0.99)
    return lay


# --------------------------------------------------------------------------- changes


def _build(
    lay: _Layout, taken: list[Box], cfg: SceneConfig, rng: np.random.Generator
) -> tuple[Box, np.ndarray] | None:
    """New roof(s) or a paved lot on open field; returns (bbox, footprint mask)."""
    h, w = lay.tex.shape
    lo, hi = cfg.min_change_px, max(cfg.max_change_px, cfg.min_change_px)
    kind = rng.choice(3, p=[0.5, 0.25, 0.25])  # single roof, cluster, paved lot
    for _ in range(40):
        bh, bw = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        if bh + 4 > h or bw + 4 > w:
            return None
        r0, c0 = int(rng.integers(1, h - bh - 2)), int(rng.integers(1, w - bw - 2))
        box = (r0, c0, r0 + bh, c0 + bw)
        outer = _union_box(box, _shadow_box(box, lay.sun, 3))
        outer = (outer[0] - 1, outer[1] - 1, outer[2] + 1, outer[3] + 1)
        if outer[0] < 0 or outer[1] < 0 or outer[2] > h or outer[3] > w:
            continue
        if lay.occupied[outer[0] : outer[2], outer[1] : outer[3]].any():
            continue
        if any(_boxes_overlap(outer, t, 1) for t in taken):
            continue
        break
    else:
        return None
    under = lay.field_base[lay.parcel_id[(r0 + bh // 2), (c0 + bw // 2)]]
    mask = np.zeros((h, w), bool)
    if kind == 2:
        colour = _far_colour(_LOTS, under, rng, 2)
        lot = np.empty((bh, bw, 3), np.float32)
        lot[:] = colour * (1 + 0.04 * rng.standard_normal((bh, bw, 1))).astype(np.float32)
        stripe = np.array([255, 255, 245], np.float32) if colour.mean() < 120 else colour * 0.6
        step = int(rng.integers(4, 7))
        if bw >= bh:
            lot[1 : bh // 3, 1:-1:step] = stripe
            lot[bh - bh // 3 : -1, 1:-1:step] = stripe
        else:
            lot[1:-1:step, 1 : bw // 3] = stripe
            lot[1:-1:step, bw - bw // 3 : -1] = stripe
        for _ in range(int(rng.integers(0, 4))):  # parked cars
            cy, cx = int(rng.integers(1, max(bh - 3, 2))), int(rng.integers(1, max(bw - 3, 2)))
            lot[cy : cy + 2, cx : cx + 3] = rng.uniform(30, 230, 3)
        lay.built_rgb[r0 : r0 + bh, c0 : c0 + bw] = lot
        lay.built_a[r0 : r0 + bh, c0 : c0 + bw] = 1
        mask[box[0] : box[2], box[1] : box[3]] = True
        return box, mask
    roofs = [box]
    long_h = bh >= bw
    n = int(rng.integers(2, 4)) if kind == 1 else 1
    side = bh if long_h else bw
    if n > 1 and (side - 2 * (n - 1)) // n >= 6:
        gap = 2
        part = (side - gap * (n - 1)) // n
        roofs = []
        for k in range(n):
            o = k * (part + gap)
            if long_h:
                roofs.append((r0 + o, c0, r0 + o + part, c0 + bw))
            else:
                roofs.append((r0, c0 + o, r0 + bh, c0 + o + part))
    for roof in roofs:
        colour = _far_colour(_ROOFS, under, rng, 3)
        house = _draw_roof(lay, roof, colour, rng)
        mask[roof[0] : roof[2], roof[1] : roof[3]] = True
        s = house.shadow
        mask[s[0] : s[2], s[1] : s[3]] = True
    rows, cols = np.nonzero(mask)
    return (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1), mask


def _soil_patch(shape: tuple[int, int], colour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = shape
    tex = 1 + 0.06 * _smooth_noise(rng, h, w, 3) + 0.03 * rng.standard_normal((h, w))
    return (colour * tex[..., None]).astype(np.float32)


def _remove(
    lay: _Layout, taken: list[Box], cfg: SceneConfig, rng: np.random.Generator
) -> tuple[Box, np.ndarray] | None:
    """Replace an existing roof (and its shadow) by bare soil or grass."""
    h, w = lay.tex.shape
    cands = []
    for i, house in enumerate(lay.houses):
        r0, c0, r1, c1 = house.roof
        if not cfg.min_change_px <= max(r1 - r0, c1 - c0) <= cfg.max_change_px:
            continue
        bbox = _union_box(house.roof, house.shadow)
        if any(_boxes_overlap(bbox, t, 1) for t in taken):
            continue
        cands.append(i)
    if not cands:
        return None
    house = lay.houses.pop(cands[int(rng.integers(len(cands)))])
    mask = _rect_mask(house.roof, (h, w)) | _rect_mask(house.shadow, (h, w))
    bbox = _union_box(house.roof, house.shadow)
    colour = _far_colour(_SOILS, house.colour, rng, 3)
    sl = (slice(bbox[0], bbox[2]), slice(bbox[1], bbox[3]))
    local = mask[sl]
    patch = _soil_patch(local.shape, colour, rng)
    lay.built_rgb[sl][local] = patch[local]
    lay.built_a[sl][local] = 1
    lay.shade[sl][local] = 1
    return bbox, mask


# --------------------------------------------------------------------------- rendering


def _compose(
    lay: _Layout,
    built_rgb: np.ndarray,
    built_a: np.ndarray,
    shade: np.ndarray,
    season_w: np.ndarray,
    tree_w: float,
) -> np.ndarray:
    pal = lay.field_base + (lay.field_alt - lay.field_base) * season_w[:, None]
    img = pal.astype(np.float32)[lay.parcel_id]
    img *= lay.tex[..., None]
    ga = lay.ground_a[..., None]
    img += ga * (lay.ground_rgb - img)
    img *= shade[..., None]
    tree = (_TREE + (_TREE_AUTUMN - _TREE) * tree_w).astype(np.float32)
    ta = lay.tree_a[..., None]
    img += ta * (tree * lay.tree_shade[..., None] - img)
    ba = built_a[..., None]
    img += ba * (built_rgb - img)
    return img


def _nuisance(
    img: np.ndarray,
    nc: NuisanceConfig,
    rng: np.random.Generator,
    blur_sigma: float,
    shift: tuple[float, float],
    mild: float = 1.0,
) -> np.ndarray:
    """Global/smooth per-date appearance changes; identity when strength is 0.

    Photometric draws are beta(2,2)-shaped within the configured ranges (extremes are rare)
    and scaled by `mild`, which the before date uses so it is not clean but milder.
    """
    s = nc.strength
    if s == 0:
        return img
    h, w = img.shape[:2]
    if nc.shadow > 0:
        field_ = _smooth_noise(rng, h, w, 140)
        img *= (1 + 0.3 * mild * s * nc.shadow * np.clip(field_, -1.5, 1.5))[..., None]
    gain = 1 + mild * s * nc.gain * _sym(rng)
    colour = 1 + mild * s * nc.colour * _sym(rng, 3)
    img *= (gain * colour).astype(np.float32)
    gamma = 1 + mild * s * nc.gamma * _sym(rng)
    np.clip(img, 0, 255, out=img)
    img = (255 * (img / 255) ** np.float32(gamma)).astype(np.float32)
    if blur_sigma > 0.05:
        img = _blur(img, blur_sigma)
    if shift != (0.0, 0.0):
        img = _shift(img, *shift)
    if nc.noise_sigma > 0:
        img += (s * nc.noise_sigma) * rng.standard_normal(img.shape, dtype=np.float32)
    return img


def _sym(rng: np.random.Generator, size: int | None = None) -> np.ndarray:
    """Symmetric draw in [-1, 1] that favours the centre."""
    return 2 * rng.beta(2, 2, size) - 1


def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _season(lay: _Layout, nc: NuisanceConfig, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Per-parcel recolouring weights and a tree autumn weight for one date."""
    n = len(lay.field_base)
    p = float(np.clip(nc.strength * nc.season, 0, 1))
    flags = rng.random(n) < 0.5 * p
    amount = rng.uniform(0.25, 0.75, n)
    return (flags * amount).astype(np.float32), p * float(rng.uniform(0, 0.6))


def render_pair(seed: int, config: SceneConfig = _DEFAULT_SCENE) -> ScenePair:
    """Render one place twice (before/after) with nuisances and a few real changes.

    Deterministic in (seed, config). The layout, the changes and each date's nuisances come
    from separate random streams, so e.g. n_changes=0 vs 3 share layout and nuisances.
    Fewer than n_changes changes are planted when the scene has no room for them.
    """
    h, w = config.height, config.width
    if h < 1 or w < 1:
        raise ValueError(f"scene must be at least 1x1, got {h}x{w}")
    rng_layout, rng_change, rng_before, rng_after, rng_pair = _rngs(seed, 5)
    nc = config.nuisance
    lay = _layout(rng_layout, h, w)

    season_b = _season(lay, nc, rng_before)
    season_a = _season(lay, nc, rng_after)
    before_img = _compose(lay, lay.built_rgb, lay.built_a, lay.shade, *season_b)

    n = config.n_changes
    if n is None:
        n = int(rng_change.poisson(config.change_rate * h * w / _REF_AREA))
    mask = np.zeros((h, w), np.uint8)
    changes: list[Box] = []
    for _ in range(n):  # edits the layout in place; the before image is already composed
        res = _remove(lay, changes, config, rng_change) if rng_change.random() < 0.4 else None
        if res is None:
            res = _build(lay, changes, config, rng_change)
        if res is not None:
            changes.append(res[0])
            mask[res[1]] = 1
    after_img = _compose(lay, lay.built_rgb, lay.built_a, lay.shade, *season_a)

    s = nc.strength
    blur = s * nc.blur_sigma * float(rng_pair.uniform(0, 1))
    blur_after = bool(rng_pair.random() < 0.5)
    dy, dx = (s * nc.shift_px * rng_pair.uniform(-1, 1, 2)).tolist()
    before = _nuisance(before_img, nc, rng_before, 0.0 if blur_after else blur, (0.0, 0.0), 0.6)
    after = _nuisance(after_img, nc, rng_after, blur if blur_after else 0.0, (dy, dx))
    return ScenePair(_to_u8(before), _to_u8(after), mask, tuple(changes))


def plant_change(
    pair: ScenePair,
    box: Box,
    seed: int,
    kind: Literal["build", "remove"] = "build",
) -> ScenePair:
    """Return a copy with one more real change inside `box` of the after image (and mask).

    For tests that need a change at a known place. "build" paints a shaded roof (with its
    shadow) filling the box; "remove" paints bare soil over the whole box. Colours are chosen
    to contrast with what was there. Overlap with existing changes is the caller's concern.
    """
    h, w = pair.mask.shape
    r0, c0, r1, c1 = (int(v) for v in box)
    if not (0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w) or r1 - r0 < 3 or c1 - c0 < 3:
        raise ValueError(f"box {box} must lie inside the {h}x{w} image and be at least 3x3")
    if kind not in ("build", "remove"):
        raise ValueError(f"kind must be 'build' or 'remove', got {kind!r}")
    rng = np.random.default_rng(seed)
    after = pair.after.astype(np.float32)
    mask = pair.mask.copy()
    region = after[r0:r1, c0:c1]
    if kind == "remove":
        ref = pair.before[r0:r1, c0:c1].reshape(-1, 3).mean(axis=0)
        colour = _far_colour(_SOILS, ref, rng, len(_SOILS))
        region[:] = _soil_patch((r1 - r0, c1 - c0), colour, rng)
        footprint = (r0, c0, r1, c1)
    else:
        sun = (int(rng.choice([-1, 1])), int(rng.choice([-1, 1])))
        sh = 2 if min(r1 - r0, c1 - c0) >= 8 else 0
        # roof in the box corner opposite the shadow, so roof + shadow fill the box
        rr0 = r0 + (sh if sun[0] < 0 else 0)
        cc0 = c0 + (sh if sun[1] < 0 else 0)
        roof = (rr0, cc0, rr0 + (r1 - r0 - sh), cc0 + (c1 - c0 - sh))
        shadow = _shadow_box(roof, sun, sh)
        after[shadow[0] : shadow[2], shadow[1] : shadow[3]] *= 0.55
        ref = region.reshape(-1, 3).mean(axis=0)
        colour = _far_colour(_ROOFS, ref, rng, len(_ROOFS))
        after[roof[0] : roof[2], roof[1] : roof[3]] = _roof_pixels(
            roof[2] - roof[0], roof[3] - roof[1], colour, sun, rng
        )
        footprint = (r0, c0, r1, c1)
    after[r0:r1, c0:c1] += 3 * rng.standard_normal((r1 - r0, c1 - c0, 3), dtype=np.float32)
    mask[r0:r1, c0:c1] = 1
    return replace(pair, after=_to_u8(after), mask=mask, changes=(*pair.changes, footprint))
