"""Synthetic serial-section TEM stacks of neural tissue, with exact labels.

Used for tests, demos and tutorials where real data (and its licence) is not wanted.

Contract
--------
``make_em_stack(pages, height, width, seed=0, pixel_size_nm=6.0) -> (image, mask)``

* ``image``: ``uint8`` array ``(pages, height, width)``; TEM contrast (bright cytoplasm,
  dark membranes and organelles), with optical blur, uneven illumination and noise.
* ``mask``: ``uint8`` array of the same shape; ``0`` background/cytoplasm, ``1`` membrane,
  ``2`` mitochondrion (see :data:`CLASS_NAMES`). Labels come from the geometry, before
  blur and noise, so they are exact. Vesicles are drawn but not labelled (distractors).
* Physical sizes are set in nanometres and converted with ``pixel_size_nm`` (so cells keep
  their size in nm at another pixel size); pages are sections about 50 nm apart.
* Deterministic: only ``numpy.random.default_rng(seed)`` is used, with a fixed number of
  draws in a fixed order (no draw count depends on computed values), and geometry uses
  only correctly rounded float operations, so a seed gives the same bytes on any machine
  (at worst a rare grey level may round differently where a platform's transcendental
  functions differ in the last bit; the masks do not depend on those).
* Memory: about 60 bytes per voxel while generating (whole-stack smooth random fields).

How it is built: cells are an additively weighted Voronoi tessellation of drifting seeds,
computed in noise-warped coordinates (irregular boundaries); membranes are the pixels
closer to a cell boundary than a smoothly varying half-width (2-5 px at 6 nm/px);
mitochondria are elongated ellipses (tube cross-sections) attached to a host cell and
clipped to it, with a dark double outline and cristae stripes; vesicles are small dark
rings or dots. Then Gaussian PSF blur, a low-frequency illumination gradient, and
signal-dependent (shot) plus Gaussian noise.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage.segmentation import find_boundaries

logger = logging.getLogger(__name__)

CLASS_NAMES = ("background", "membrane", "mitochondrion")
BACKGROUND, MEMBRANE, MITOCHONDRION = 0, 1, 2

SECTION_NM = 50.0  # nominal distance between pages

# Geometry, in nanometres unless stated otherwise.
SMALL_CELL_SPACING_NM = 290.0  # mean distance between seeds of small cells (axons)
LARGE_CELL_SPACING_NM = 1100.0  # mean distance between seeds of large cells (dendrites)
LARGE_CELL_WEIGHT_NM = (120.0, 330.0)  # additive Voronoi weight: how far a large cell reaches
SMALL_CELL_WEIGHT_NM = 25.0  # weight jitter of small cells (size variety)
SEED_DRIFT_NM = 4.0  # std of seed drift per page
WARP_NM, WARP_SCALE_NM = 50.0, 200.0  # coarse boundary warp: amplitude, correlation length
FINE_WARP_NM, FINE_WARP_SCALE_NM = 7.0, 25.0  # fine boundary roughness
MEMBRANE_HALF_WIDTH_NM = (6.5, 15.0)  # half-width: membranes 13-30 nm wide (2-5 px at 6 nm)
MITO_SEMI_MAJOR_NM = (140.0, 380.0)
MITO_SEMI_MINOR_NM = (65.0, 120.0)
MITO_DENSITY_PER_UM2 = 1.6  # mitochondria per square micrometre of section
MITO_OUTLINE_NM = (12.0, 19.0, 27.0)  # outer membrane | gap | inner membrane (cumulative)
CRISTAE_PERIOD_NM = 45.0
VESICLE_CLUSTERS_PER_UM2 = 0.35
VESICLES_PER_CLUSTER = 45
LOOSE_VESICLES_PER_UM2 = 30.0
VESICLE_RADIUS_NM = (15.0, 28.0)
PSF_SIGMA_NM = 6.5
BLOCK = 8  # block size (px) of the coarse candidate search in the tessellation


@dataclass(frozen=True)
class _Tracks:
    """Cell seeds through the stack: positions (pages, n, 2) in px, weights (pages, n) in px."""

    pos: np.ndarray
    weight: np.ndarray
    n_small: int


@dataclass(frozen=True)
class _Mitos:
    """Mitochondria of the stack, one entry each; lengths in px, angles in rad, z in pages."""

    host: np.ndarray
    offset: np.ndarray
    semi_axes: np.ndarray
    angle: np.ndarray
    spin: np.ndarray
    z_center: np.ndarray
    z_half: np.ndarray
    phase: np.ndarray


@dataclass(frozen=True)
class _Vesicles:
    """Vesicles of the stack: centres (n, 3) as (z pages, y px, x px), radii px, filled flags."""

    center: np.ndarray
    radius: np.ndarray
    filled: np.ndarray


def make_em_stack(
    pages: int = 8,
    height: int = 512,
    width: int = 512,
    *,
    seed: int = 0,
    pixel_size_nm: float = 6.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Make a synthetic serial-section TEM stack of neural tissue and its exact labels.

    Args:
        pages: number of sections (z).
        height, width: page size in pixels (at least 16 each).
        seed: seed of ``numpy.random.default_rng``; same seed, same bytes.
        pixel_size_nm: pixel size; physical sizes (cells, membranes...) scale with it.

    Returns:
        ``(image, mask)``, both ``uint8`` of shape ``(pages, height, width)``; mask values
        0 background/cytoplasm, 1 membrane, 2 mitochondrion.
    """
    _check_args(pages, height, width, pixel_size_nm)
    rng = np.random.default_rng(seed)
    px = 1.0 / pixel_size_nm
    shape = (pages, height, width)
    tracks = _draw_tracks(rng, shape, px)
    brightness = _draw_brightness(rng, tracks)
    fields = _draw_fields(rng, shape, px)
    cells = np.stack([_cells_page(p, tracks, fields) for p in range(pages)])
    mid = (pages - 1) // 2
    mitos = _draw_mitos(rng, shape, px, tracks, cells[mid],
                        (fields["warp_y"][mid] + fields["fine_y"][mid],
                         fields["warp_x"][mid] + fields["fine_x"][mid]))
    vesicles = _draw_vesicles(rng, shape, px)
    image = np.empty(shape, np.float32)
    mask = np.zeros(shape, np.uint8)
    for p in range(pages):
        image[p], mask[p] = _render_page(p, cells[p], tracks, brightness, mitos, vesicles,
                                         fields, px)
    out = _acquire(rng, image, px)
    logger.debug("synthetic stack %s seed=%d class fractions %s", shape, seed,
                 np.bincount(mask.ravel(), minlength=3) / mask.size)
    return out, mask


def _check_args(pages: int, height: int, width: int, pixel_size_nm: float) -> None:
    """Raise ValueError for sizes the generator cannot make."""
    if pages < 1 or height < 16 or width < 16:
        raise ValueError(f"need pages >= 1 and height, width >= 16; got {(pages, height, width)}")
    if not pixel_size_nm > 0:
        raise ValueError(f"pixel_size_nm must be positive, got {pixel_size_nm}")


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], sigma_px: float,
                  sigma_z: float = 1.5) -> np.ndarray:
    """Unit-std Gaussian random field (pages, H, W), correlated over sigma_px and sigma_z pages.

    Filtered on a grid coarser by about sigma_px / 2 and upsampled linearly (fast).
    """
    pages, h, w = shape
    step = max(1, int(sigma_px / 2 + 0.5))
    coarse = (pages, (h - 1) // step + 2, (w - 1) // step + 2)
    noise = rng.standard_normal(coarse, dtype=np.float32)
    field = ndi.gaussian_filter(noise, (sigma_z, sigma_px / step, sigma_px / step), mode="reflect")
    if step > 1:
        field = _upsample(_upsample(field, step, h, axis=1), step, w, axis=2)
    field = field[:, :h, :w]
    return field / np.float32(max(float(field[:, ::3, ::3].std()), 1e-6))


def _upsample(a: np.ndarray, step: int, n: int, axis: int) -> np.ndarray:
    """Linear interpolation of a (samples every step px along axis) onto n pixels."""
    def along(s: slice) -> tuple[slice, ...]:
        return (slice(None),) * axis + (s,)

    m = -(-n // step)  # coarse intervals needed
    low, rise = a[along(slice(0, m))], np.diff(a[along(slice(0, m + 1))], axis=axis)
    out = np.empty(a.shape[:axis] + (m * step,) + a.shape[axis + 1:], np.float32)
    for r in range(step):
        out[along(slice(r, None, step))] = low + np.float32(r / step) * rise
    return out[along(slice(0, n))]


def _seed_track(rng: np.random.Generator, shape: tuple[int, int, int], spacing: float,
                weight: tuple[float, float], drift: float, margin: float):
    """Seeds drifting linearly through z; returns positions (pages, n, 2) and weights (pages, n)."""
    pages, h, w = shape
    n = max(1, round((h + 2 * margin) * (w + 2 * margin) / spacing**2))
    start = rng.uniform((-margin, -margin), (h + margin, w + margin), (n, 2))
    velocity = rng.normal(0.0, drift, (n, 2))
    w0 = rng.uniform(weight[0], weight[1], n)
    w_rate = rng.normal(0.0, 0.1 * (weight[1] - weight[0]) + 0.1, n)
    z = np.arange(pages, dtype=np.float64)[:, None] - (pages - 1) / 2
    pos = start[None] + z[..., None] * velocity[None]
    return pos, w0[None] + z * w_rate[None]


def _draw_tracks(rng: np.random.Generator, shape: tuple[int, int, int], px: float) -> _Tracks:
    """Small (axon-like) and large (dendrite-like) cell seeds for the whole stack."""
    margin = (LARGE_CELL_WEIGHT_NM[1] + SMALL_CELL_SPACING_NM + 3 * WARP_NM) * px
    drift = SEED_DRIFT_NM * px
    small = _seed_track(rng, shape, SMALL_CELL_SPACING_NM * px,
                        (-SMALL_CELL_WEIGHT_NM * px, SMALL_CELL_WEIGHT_NM * px), drift, margin)
    large = _seed_track(rng, shape, LARGE_CELL_SPACING_NM * px,
                        (LARGE_CELL_WEIGHT_NM[0] * px, LARGE_CELL_WEIGHT_NM[1] * px),
                        0.5 * drift, margin)
    pos = np.concatenate([small[0], large[0]], axis=1).astype(np.float32)
    weight = np.concatenate([small[1], large[1]], axis=1).astype(np.float32)
    return _Tracks(pos, weight, small[0].shape[1])


def _draw_brightness(rng: np.random.Generator, tracks: _Tracks) -> np.ndarray:
    """Cytoplasm grey level (0-1) of each cell; large cells are a little lighter."""
    n = tracks.pos.shape[1]
    level = rng.normal(0.57, 0.05, n)
    level[tracks.n_small:] += 0.06
    return np.clip(level, 0.42, 0.75).astype(np.float32)


def _draw_mitos(rng: np.random.Generator, shape: tuple[int, int, int], px: float,
                tracks: _Tracks, cells: np.ndarray, warp: tuple[np.ndarray, np.ndarray]) -> _Mitos:
    """Mitochondria, each attached to a host cell big enough mid-stack (half in large cells).

    A mitochondrion sits near its host's mid-stack centroid and moves with the host seed.
    The number of draws is fixed by the shape; the cells only decide which seeds may host.

    Args:
        cells: mid-stack cell labels (H, W); warp: mid-stack (y, x) warp of the pixels.
    """
    pages, h, w = shape
    n_seeds = tracks.pos.shape[1]
    n = max(2, round(h * w / px**2 * 1e-6 * MITO_DENSITY_PER_UM2))
    area = np.bincount(cells.ravel(), minlength=n_seeds)
    small, large = _mito_hosts(area, tracks.n_small, px)
    key = rng.random(n_seeds)  # random order of the candidate hosts
    n_large = min(n // 2, large.size)
    host = np.resize(np.concatenate([large[np.argsort(key[large], kind="stable")][:n_large],
                                     small[np.argsort(key[small], kind="stable")]]), n)
    anchor = _centroids(cells, warp, n_seeds)[host] - tracks.pos[(pages - 1) // 2, host]
    reach = 0.3 * np.sqrt(area[host] / np.pi)
    direction = rng.normal(0.0, 1.0, (n, 2))
    direction /= np.maximum(np.sqrt((direction**2).sum(1, keepdims=True)), 1e-9)
    offset = anchor + (rng.random(n) * reach)[:, None] * direction
    semi = np.stack([rng.uniform(*MITO_SEMI_MAJOR_NM, n), rng.uniform(*MITO_SEMI_MINOR_NM, n)], 1)
    z_half = rng.uniform(150.0, 1200.0, n) / SECTION_NM
    return _Mitos(
        host=host,
        offset=offset,
        semi_axes=semi * px,
        angle=rng.uniform(0, np.pi, n),
        spin=rng.normal(0.0, 0.04, n),
        z_center=rng.uniform(-0.3 * z_half, pages - 1 + 0.3 * z_half),
        z_half=z_half,
        phase=rng.uniform(0, 2 * np.pi, n),
    )


def _mito_hosts(area: np.ndarray, n_small: int, px: float) -> tuple[np.ndarray, np.ndarray]:
    """Seed indices (small cells, large cells) whose cells can hold a mitochondrion."""
    big_enough = area >= np.pi * MITO_SEMI_MAJOR_NM[0] * MITO_SEMI_MINOR_NM[0] * px**2
    if not big_enough.any():
        big_enough = area == area.max()
    small = np.flatnonzero(big_enough[:n_small])
    large = n_small + np.flatnonzero(big_enough[n_small:])
    return (small if small.size else large), (large if large.size else small)


def _centroids(cells: np.ndarray, warp: tuple[np.ndarray, np.ndarray], n: int) -> np.ndarray:
    """Centroid (n, 2) of each cell in warped (seed) coordinates; 0 for absent cells."""
    yy, xx = np.mgrid[: cells.shape[0], : cells.shape[1]]
    labels = cells.ravel()
    count = np.maximum(np.bincount(labels, minlength=n), 1)
    cy = np.bincount(labels, (yy + warp[0]).ravel(), minlength=n) / count
    cx = np.bincount(labels, (xx + warp[1]).ravel(), minlength=n) / count
    return np.stack([cy, cx], 1)


def _draw_vesicles(rng: np.random.Generator, shape: tuple[int, int, int], px: float) -> _Vesicles:
    """Vesicles: clusters (synapse-like) plus loose ones; each spans about one section."""
    pages, h, w = shape
    area_um2 = h * w / px**2 * 1e-6
    n_clusters = max(1, round(area_um2 * VESICLE_CLUSTERS_PER_UM2 * pages / 4))
    cluster = np.column_stack([rng.uniform(-1, pages, n_clusters),
                               rng.uniform(0, h, n_clusters), rng.uniform(0, w, n_clusters)])
    spread = rng.uniform(50.0, 110.0, n_clusters) * px
    n_in = n_clusters * VESICLES_PER_CLUSTER
    which = rng.integers(n_clusters, size=n_in)
    clustered = cluster[which] + rng.normal(0, 1, (n_in, 3)) * np.column_stack(
        [np.full(n_in, 1.5), spread[which], spread[which]])
    n_loose = round(area_um2 * LOOSE_VESICLES_PER_UM2 * pages)
    loose = rng.uniform((-0.5, 0, 0), (pages - 0.5, h, w), (n_loose, 3))
    radius = rng.uniform(*VESICLE_RADIUS_NM, n_in + n_loose) * px
    filled = rng.random(n_in + n_loose) < 0.2
    return _Vesicles(np.concatenate([clustered, loose]), radius, filled)


def _draw_fields(rng: np.random.Generator, shape: tuple[int, int, int],
                 px: float) -> dict[str, np.ndarray]:
    """All per-voxel random fields (smooth warps, widths, textures), drawn in a fixed order."""
    f = {
        "warp_y": _smooth_field(rng, shape, WARP_SCALE_NM * px, 6.0) * (WARP_NM * px),
        "warp_x": _smooth_field(rng, shape, WARP_SCALE_NM * px, 6.0) * (WARP_NM * px),
        "fine_y": _smooth_field(rng, shape, FINE_WARP_SCALE_NM * px, 2.5) * (FINE_WARP_NM * px),
        "fine_x": _smooth_field(rng, shape, FINE_WARP_SCALE_NM * px, 2.5) * (FINE_WARP_NM * px),
        "half_width": _smooth_field(rng, shape, 120.0 * px, 3.0),
        "membrane_tone": _smooth_field(rng, shape, 60.0 * px, 2.0),
        "grain": _smooth_field(rng, shape, 5.0 * px, 0.0),
    }
    lo, hi = MEMBRANE_HALF_WIDTH_NM
    t = np.clip(0.5 + 0.3 * f["half_width"], 0.0, 1.0)
    f["half_width"] = (lo + (hi - lo) * t) * px
    return f


def _tessellate(qy: np.ndarray, qx: np.ndarray, pos: np.ndarray, weight: np.ndarray,
                n_small: int, k: int = 6) -> np.ndarray:
    """Additively weighted Voronoi labels (H, W) int32 of warped pixel coordinates (qy, qx).

    Candidates are the k best seeds at the centre of each BLOCK x BLOCK block; each pixel
    picks the best of its block's candidates. Seeds [0, n_small) are small cells, the rest
    large ones.
    """
    h, w = qy.shape
    nby, nbx = -(-h // BLOCK), -(-w // BLOCK)
    pad = ((0, nby * BLOCK - h), (0, nbx * BLOCK - w))
    by = np.pad(qy, pad, mode="edge").reshape(nby, BLOCK, nbx, BLOCK)
    bx = np.pad(qx, pad, mode="edge").reshape(nby, BLOCK, nbx, BLOCK)
    centres = np.stack([by[:, BLOCK // 2, :, BLOCK // 2], bx[:, BLOCK // 2, :, BLOCK // 2]], -1)
    cands = _block_candidates(centres, pos, weight, n_small, k)
    best = np.full(by.shape, np.inf, np.float32)
    labels = np.zeros(by.shape, np.int32)
    for j in range(cands.shape[-1]):
        c = cands[:, None, :, None, j]
        d = _norm(by - pos[c, 0], bx - pos[c, 1]) - weight[c]
        closer = d < best
        best = np.where(closer, d, best)
        labels = np.where(closer, c, labels)
    return labels.reshape(nby * BLOCK, nbx * BLOCK)[:h, :w]


def _block_candidates(centres: np.ndarray, pos: np.ndarray, weight: np.ndarray, n_small: int,
                      k: int) -> np.ndarray:
    """Indices (..., k) of the k seeds with the least weighted distance to each block centre.

    Shortlists the nearest small and large seeds with k-d trees (weights are bounded), then
    ranks the shortlist by weighted distance.
    """
    flat = centres.reshape(-1, 2)
    short = []
    for lo, hi, n_near in ((0, n_small, 2 * k), (n_small, pos.shape[0], 4)):
        n_near = min(n_near, hi - lo)
        if n_near:
            _, idx = cKDTree(pos[lo:hi]).query(flat, k=n_near)
            short.append(lo + idx.reshape(len(flat), n_near))
    short = np.concatenate(short, axis=1)
    d = _norm(flat[:, None, 0] - pos[short, 0], flat[:, None, 1] - pos[short, 1]) - weight[short]
    k = min(k, short.shape[1])
    best = np.take_along_axis(short, np.argsort(d, axis=1, kind="stable")[:, :k], 1)
    return best.reshape(*centres.shape[:-1], k)


def _norm(dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Euclidean length sqrt(dy^2 + dx^2) (IEEE-exact operations only, unlike libm hypot)."""
    return np.sqrt(dy * dy + dx * dx)


def _boundary_distance(labels: np.ndarray) -> np.ndarray:
    """Distance (px, float32) of each pixel from the nearest cell boundary (0.5 on the boundary)."""
    band = find_boundaries(labels, mode="thick")
    return (ndi.distance_transform_edt(~band) + 0.5).astype(np.float32)


def _cells_page(p: int, tracks: _Tracks, fields: dict[str, np.ndarray]) -> np.ndarray:
    """Cell labels (H, W) int32 (seed indices) of page p."""
    h, w = fields["warp_y"].shape[1:]
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    qy = yy + fields["warp_y"][p] + fields["fine_y"][p]
    qx = xx + fields["warp_x"][p] + fields["fine_x"][p]
    return _tessellate(qy, qx, tracks.pos[p], tracks.weight[p], tracks.n_small)


def _render_page(p: int, labels: np.ndarray, tracks: _Tracks, brightness: np.ndarray,
                 mitos: _Mitos, vesicles: _Vesicles, fields: dict[str, np.ndarray],
                 px: float) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free image (float, ~0-1) and exact mask of page p with cell labels `labels`."""
    h, w = labels.shape
    dist = _boundary_distance(labels)
    half = fields["half_width"][p]
    membrane = dist < half
    image = brightness[labels] + 0.08 * fields["grain"][p] + 0.04 * fields["membrane_tone"][p]
    mito, mito_tone = _mitos_page(p, mitos, tracks, labels, membrane, fields, px)
    image = np.where(mito, mito_tone + 0.04 * fields["grain"][p], image)
    cytoplasm = ~(mito | membrane)
    image *= 1.0 - 0.5 * _vesicles_page(p, vesicles, (h, w)) * cytoplasm
    soft = np.clip(half - dist + 0.5, 0.0, 1.0)  # anti-aliased membrane; > 0.5 where masked
    tone = 0.16 + 0.05 * fields["membrane_tone"][p] + 0.03 * fields["grain"][p]
    image = image * (1 - soft) + tone * soft
    mask = np.where(membrane, MEMBRANE, np.where(mito, MITOCHONDRION, BACKGROUND))
    return image.astype(np.float32), mask.astype(np.uint8)


def _mitos_page(p: int, mitos: _Mitos, tracks: _Tracks, labels: np.ndarray,
                membrane: np.ndarray, fields: dict[str, np.ndarray],
                px: float) -> tuple[np.ndarray, np.ndarray]:
    """Mitochondrion mask and grey levels on page p (tube cross-sections clipped to the host).

    Each ellipse moves rigidly with the tissue around its centre (coarse warp taken at the
    centre) and gets only the fine boundary roughness, so it keeps an elliptic outline.
    """
    h, w = labels.shape
    mask = np.zeros((h, w), bool)
    tone = np.zeros((h, w), np.float32)
    for i in np.flatnonzero(np.abs(p - mitos.z_center) < mitos.z_half):
        scale = np.sqrt(1.0 - ((p - mitos.z_center[i]) / mitos.z_half[i]) ** 2)
        a, b = mitos.semi_axes[i] * scale
        if b < 3.0:
            continue
        cy, cx = tracks.pos[p, mitos.host[i]] + mitos.offset[i]
        iy, ix = int(np.clip(cy, 0, h - 1)), int(np.clip(cx, 0, w - 1))
        cy, cx = cy - fields["warp_y"][p, iy, ix], cx - fields["warp_x"][p, iy, ix]
        box = _box(cy, cx, a + 6, (h, w))
        if box is None:
            continue
        u, v = _ellipse_frame(box, fields, p, cy, cx, mitos.angle[i] + mitos.spin[i] * p)
        host = labels[box] == mitos.host[i]
        for _ in range(4):  # shrink until it (mostly) fits in its host cell
            ellipse = (u / a) ** 2 + (v / b) ** 2 < 1
            if (ellipse & host).sum() >= 0.85 * ellipse.sum():
                break
            a, b = 0.8 * a, 0.8 * b
        inside = ellipse & host & ~membrane[box]
        if b < 3.0 or not inside.any() or (inside & mask[box]).any():
            continue
        mask[box] |= inside
        tone[box] = np.where(inside, _mito_tone(inside, u, v, b, mitos.phase[i], px), tone[box])
    return mask, tone


def _ellipse_frame(box: tuple[slice, slice], fields: dict[str, np.ndarray], p: int, cy: float,
                   cx: float, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u along the long axis, v across) of the pixels of box, with fine roughness."""
    yy, xx = np.mgrid[box]
    dy = yy + fields["fine_y"][p][box] - cy
    dx = xx + fields["fine_x"][p][box] - cx
    cos, sin = math.cos(theta), math.sin(theta)
    return dy * cos + dx * sin, dx * cos - dy * sin


def _box(cy: float, cx: float, r: float, shape: tuple[int, int]):
    """Slices of the square of half-side r around (cy, cx), clipped to shape; None if empty."""
    y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 1, shape[0])
    x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 1, shape[1])
    if y0 >= y1 or x0 >= x1:
        return None
    return slice(y0, y1), slice(x0, x1)


def _mito_tone(inside: np.ndarray, u: np.ndarray, v: np.ndarray, b: float, phase: float,
               px: float) -> np.ndarray:
    """Grey levels of one mitochondrion: dark double outline, matrix, cristae across the axis."""
    rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    tight = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    depth = np.zeros(inside.shape)
    depth[tight] = ndi.distance_transform_edt(np.pad(inside[tight], 1))[1:-1, 1:-1]
    outer, gap, inner = (t * px for t in MITO_OUTLINE_NM)
    period = CRISTAE_PERIOD_NM * px
    wobble = 0.35 * period * np.sin(np.pi * v / b + phase)
    cristae = np.cos(2 * np.pi * (u + wobble) / period + phase) > 0.45
    tone = np.where(cristae, 0.3, 0.5)
    tone = np.where(depth <= inner, 0.24, tone)
    tone = np.where(depth <= gap, 0.42, tone)
    tone = np.where(depth <= outer, 0.2, tone)
    return tone.astype(np.float32)


def _vesicles_page(p: int, vesicles: _Vesicles, shape: tuple[int, int]) -> np.ndarray:
    """Darkening (0-1) by the vesicles cut by page p: thin dark rings, or filled dark dots."""
    dark = np.zeros(shape, np.float32)
    cut = np.flatnonzero(np.abs(vesicles.center[:, 0] - p) < 0.6)
    if cut.size == 0:
        return dark
    half = int(np.ceil(vesicles.radius.max() + 2.5))
    off = np.arange(-half, half + 1)
    cy, cx = (vesicles.center[cut, i, None, None] for i in (1, 2))
    r = vesicles.radius[cut, None, None]
    iy = np.floor(cy).astype(np.int64) + off[None, :, None]
    ix = np.floor(cx).astype(np.int64) + off[None, None, :]
    d = _norm(iy - cy, ix - cx)
    ring = np.exp(-(((d - r) / 0.9) ** 2))
    body = np.clip(r - d + 0.5, 0.0, 1.0) * np.where(vesicles.filled[cut], 0.9, 0.25)[:, None, None]
    iy, ix = np.broadcast_arrays(iy, ix)
    ok = (iy >= 0) & (iy < shape[0]) & (ix >= 0) & (ix < shape[1])
    np.maximum.at(dark, (iy[ok], ix[ok]), np.maximum(ring, body)[ok].astype(np.float32))
    return dark


def _acquire(rng: np.random.Generator, image: np.ndarray, px: float) -> np.ndarray:
    """Blur (Gaussian PSF), uneven illumination, shot + Gaussian noise; quantise to uint8."""
    pages, h, w = image.shape
    sigma = PSF_SIGMA_NM * px
    image = ndi.gaussian_filter(image, (0, sigma, sigma))
    angle = float(rng.uniform(0, 2 * np.pi))
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    ramp = math.sin(angle) * (yy / h - 0.5) + math.cos(angle) * (xx / w - 0.5)
    shading = _smooth_field(rng, image.shape, max(h, w) / 4, 3.0)
    image *= 1.0 + 0.25 * ramp[None] + 0.06 * shading
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    image += np.sqrt(0.0035 * np.clip(image, 0, None) + 0.02**2) * noise
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
