"""Synthetic isotropic FIB-SEM volumes of tissue, with exact 3D labels (tests and the volume benchmark).

Contract
--------
``make_em_volume((Z, Y, X), seed=0, voxel_size_nm=5.0) -> SyntheticVolume``

* ``image``: ``uint8`` ``(Z, Y, X)``: bright cytoplasm, dark membranes and organelles, as FIB-SEM
  stacks of stained tissue are shown; blurred, with per-slice brightness flicker, curtaining
  stripes and noise.
* ``mask``: ``uint8`` of the same shape; 0 background, 1 membrane, 2 mitochondrion
  (:data:`CLASS_NAMES`, the classes of :mod:`emseg.synthetic`).
* ``mitochondria``: ``uint16`` instance labels of the mitochondria (0 elsewhere), numbered 1..n.
  Labels come from the geometry, before blur and noise, so they are exact in 3D.
* Geometry is set in nanometres and converted with ``voxel_size_nm``; voxels are isotropic.
* Deterministic for a seed on one machine (``numpy.random.default_rng``); the geometry is rendered
  slab by slab; memory is about 16 bytes per voxel (the outputs, the noise-free image and its blur).

How it is built: cells are a Voronoi tessellation of random seeds in noise-warped coordinates;
membranes are the voxels closer to a bisecting plane between the two nearest seeds than a
half-width (sheets, 3 voxels thick at 5 nm). Mitochondria are tubes along bent centrelines and
spindle-shaped "ellipsoids", at random 3D orientations, each inside one cell and clear of membranes
and of each other, with a dark outer rim and cristae across their axis. Unlabelled distractors:
endosomes (dark spheres without cristae) and vesicles. Then a 3D Gaussian blur, curtaining
(streaks along y that drift slowly through z), per-slice brightness and shot + Gaussian noise.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from emseg.synthetic import BACKGROUND, CLASS_NAMES, MEMBRANE, MITOCHONDRION

log = logging.getLogger(__name__)

__all__ = ["CLASS_NAMES", "SyntheticVolume", "make_em_volume"]

CELL_SPACING_NM = 420.0
WARP_NM, WARP_SCALE_NM = 25.0, 160.0
MEMBRANE_HALF_WIDTH_NM = 7.0
TUBE_RADIUS_NM = (26.0, 50.0)
TUBE_LENGTH_NM = (250.0, 1100.0)
SPINDLE_AXES_NM = ((90.0, 220.0), (45.0, 85.0))  # semi-major, semi-minor
MITO_VOLUME_FRACTION = 0.07
GAP_NM = 20.0
FIT = 0.97  # share of a mitochondrion that must lie in its cell, off membranes
ENDOSOMES_PER_UM3 = 6.0
ENDOSOME_RADIUS_NM = (35.0, 80.0)
VESICLES_PER_UM3 = 120.0
VESICLE_RADIUS_NM = (14.0, 24.0)
RIM_NM, CRISTAE_PERIOD_NM = 9.0, 42.0
PSF_SIGMA_NM = 4.5
NOISE_SIGMA = 0.075
SLAB = 24  # pages rendered at once


@dataclass(frozen=True)
class SyntheticVolume:
    """A synthetic volume and its exact labels (see the module docstring)."""

    image: np.ndarray
    mask: np.ndarray
    mitochondria: np.ndarray
    voxel_size_nm: tuple[float, float, float]


@dataclass(frozen=True)
class _Organelle:
    """Centreline samples (n, 3) in voxels with a radius each; ``kind`` 0 tube/spindle, 1 endosome."""

    points: np.ndarray
    radius: np.ndarray
    kind: int
    label: int



class _Tissue:
    """Cells and membranes at any voxel, from seeds and a smooth warp (no volume held)."""

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int, int], px: float):
        spacing = CELL_SPACING_NM * px
        margin = spacing
        extent = np.array(shape, float) + 2 * margin
        n = max(4, round(float(np.prod(extent)) / spacing**3))
        self.seeds = rng.uniform(-margin, np.array(shape) + margin, (n, 3))
        self.tree = cKDTree(self.seeds)
        self.step = max(2.0, WARP_SCALE_NM * px / 2)
        coarse = tuple(int(math.ceil(s / self.step)) + 3 for s in shape)
        fields = ndi.gaussian_filter(rng.standard_normal((3, *coarse)), (0, 1.5, 1.5, 1.5), mode="wrap")
        self.warp = fields / max(float(fields.std()), 1e-6) * (WARP_NM * px)
        self.half_width = MEMBRANE_HALF_WIDTH_NM * px

    def at(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cell index and distance (voxels) to the nearest cell boundary of points (n, 3)."""
        coarse = points.T / self.step + 1.0
        q = points + np.stack([ndi.map_coordinates(f, coarse, order=1, mode="nearest") for f in self.warp], 1)
        d, idx = self.tree.query(q, k=2)
        s1, s2 = self.seeds[idx[:, 0]], self.seeds[idx[:, 1]]
        gap = np.linalg.norm(s2 - s1, axis=1)
        return idx[:, 0], (d[:, 1] ** 2 - d[:, 0] ** 2) / (2 * np.maximum(gap, 1e-9))


def _grid(box: tuple[slice, ...]) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij"), -1).reshape(-1, 3)


def _centreline(rng: np.random.Generator, px: float, shape) -> tuple[np.ndarray, np.ndarray]:
    """Samples (n, 3) and radii of a random tube (bent) or spindle, anywhere in the volume."""
    centre = rng.uniform(0, np.array(shape, float))
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    if rng.random() < 0.7:
        length = rng.uniform(*TUBE_LENGTH_NM) * px
        bend = rng.normal(size=3) * 0.25 * length
        bend -= axis * (bend @ axis)
        t = np.linspace(-0.5, 0.5, max(8, int(length * 1.5)))[:, None]
        points = centre + t * length * axis + (1 - 4 * t**2) * bend
        radius = np.full(len(points), rng.uniform(*TUBE_RADIUS_NM) * px)
    else:
        a, b = rng.uniform(*SPINDLE_AXES_NM[0]) * px, rng.uniform(*SPINDLE_AXES_NM[1]) * px
        t = np.linspace(-1, 1, max(8, int(2 * a * 1.5)))[:, None]
        points = centre + t * (a - b) * axis  # rounded ends: the radius reaches b/3 at the tips
        radius = b * np.sqrt(np.clip(1 - 0.9 * t[:, 0] ** 2, 0.1, 1))
    return points, radius


def _inside(org: _Organelle, shape, z0: int = 0, z1: int | None = None):
    """The voxels (n, 3) of an organelle within pages [z0, z1), their depth below its surface and
    their position along its centreline (voxels); candidates are balls around centreline samples."""
    z1 = shape[0] if z1 is None else z1
    seg = float(np.linalg.norm(np.diff(org.points, axis=0), axis=1).mean()) if len(org.points) > 1 else 1.0
    k = max(1, int(0.5 * org.radius.min() / max(seg, 1e-6)))
    centres = np.round(np.vstack([org.points[::k], org.points[-1:]])).astype(np.int64)
    half = int(np.ceil(org.radius.max() + k * seg + 1))
    off = np.arange(-half, half + 1)
    ball = np.stack(np.meshgrid(off, off, off, indexing="ij"), -1).reshape(-1, 3)
    ball = ball[(ball**2).sum(1) <= half**2]
    cand = (centres[:, None, :] + ball[None]).reshape(-1, 3)
    lo, hi = np.array([z0, 0, 0]), np.array([z1, shape[1], shape[2]])
    cand = cand[np.all((cand >= lo) & (cand < hi), axis=1)]
    flat = np.unique(np.ravel_multi_index(cand.T, shape))
    voxels = np.stack(np.unravel_index(flat, shape), 1)
    d, i = cKDTree(org.points).query(voxels, distance_upper_bound=float(org.radius.max()) + 1)
    ok = np.isfinite(d)
    i = np.where(ok, i, 0)
    depth = np.where(ok, org.radius[i] - d, -1.0)
    keep = depth > 0
    steps = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(org.points, axis=0), axis=1))]
    return voxels[keep], depth[keep], steps[i[keep]]


def _place(rng, tissue: _Tissue, shape, px: float) -> list[_Organelle]:
    """Mitochondria up to the target volume fraction, then endosomes; each fits its cell and keeps clear."""
    placed: list[_Organelle] = []
    target = MITO_VOLUME_FRACTION * float(np.prod(shape))
    filled, tries = 0.0, 0
    volume_um3 = float(np.prod(shape)) / px**3 * 1e-9
    n_endo = rng.poisson(ENDOSOMES_PER_UM3 * volume_um3)
    while tries < 4000 and (filled < target or n_endo > 0):
        tries += 1
        mito = filled < target
        if mito:
            points, radius = _centreline(rng, px, shape)
        else:
            points = rng.uniform(0, np.array(shape, float), (1, 3))
            radius = np.array([rng.uniform(*ENDOSOME_RADIUS_NM) * px])
        org = _Organelle(points, radius, 0 if mito else 1, len([p for p in placed if p.kind == 0]) + 1)
        if not _clear(org, placed, GAP_NM * px):
            continue
        cells, dist = tissue.at(org.points)  # quick: the centreline must lie deep inside one cell
        if np.any(cells != cells[0]) or np.mean(dist > org.radius + tissue.half_width) < FIT:
            continue
        voxels = _inside(org, shape)[0]
        if len(voxels) < 20:
            continue
        cells, dist = tissue.at(voxels.astype(float))
        host = np.bincount(cells).argmax()
        if np.mean((cells == host) & (dist > tissue.half_width + 1)) < FIT:
            continue
        placed.append(org)
        if mito:
            filled += len(voxels)
        else:
            n_endo -= 1
    return placed


def _extent(org: _Organelle) -> float:
    """Radius of a sphere around the centreline's mean that holds the organelle."""
    return float(np.linalg.norm(org.points - org.points.mean(0), axis=1).max() + org.radius.max())


def _clear(org: _Organelle, placed: list[_Organelle], gap: float) -> bool:
    """True when ``org`` keeps ``gap`` voxels from every placed organelle."""
    for other in placed:
        if np.linalg.norm(org.points.mean(0) - other.points.mean(0)) > _extent(org) + _extent(other) + gap:
            continue
        reach = org.radius.max() + other.radius.max() + gap
        d, i = cKDTree(other.points).query(org.points, distance_upper_bound=reach)
        near = np.isfinite(d)
        if np.any(d[near] < org.radius[near] + other.radius[i[near]] + gap):
            return False
    return True


def _render_slab(z0: int, z1: int, shape, tissue: _Tissue, organelles, vesicles, levels, rng_tex, px: float):
    """Noise-free image (float32, ~0-1), class mask and instance labels of pages [z0, z1)."""
    _, h, w = shape
    box = (slice(z0, z1), slice(0, h), slice(0, w))
    voxels = _grid(box)
    cells, dist = tissue.at(voxels)
    sub = (z1 - z0, h, w)
    cells, dist = cells.reshape(sub), dist.reshape(sub)
    membrane = dist < tissue.half_width
    image = levels[cells] + 0.03 * ndi.gaussian_filter(rng_tex.standard_normal(sub).astype(np.float32), 1.2)
    labels = np.zeros(sub, np.uint16)
    for org in organelles:
        zs = org.points[:, 0]
        reach = org.radius.max() + 1
        if zs.max() + reach < z0 or zs.min() - reach >= z1:
            continue
        voxels, depth, arc = _inside(org, shape, z0, z1)
        where = (voxels[:, 0] - z0, voxels[:, 1], voxels[:, 2])
        free = ~membrane[where]
        where = tuple(w[free] for w in where)
        depth, arc = depth[free], arc[free]
        if org.kind == 0:
            cristae = np.cos(2 * np.pi * arc / (CRISTAE_PERIOD_NM * px)) > 0.55
            tone = np.where(depth < RIM_NM * px, 0.24, np.where(cristae & (depth > 1.5 * RIM_NM * px), 0.3, 0.43))
            labels[where] = org.label
        else:
            tone = np.where(depth < 0.6 * RIM_NM * px, 0.3, 0.44)
        image[where] = tone
    image = np.where(membrane, 0.2, image)
    for c, r in zip(*vesicles):
        lo = np.maximum(np.floor(c - r - 3).astype(int), (z0, 0, 0))
        hi = np.minimum(np.ceil(c + r + 4).astype(int), (z1, h, w))
        if np.any(lo >= hi):
            continue
        vbox = tuple(slice(a, b) for a, b in zip(lo, hi))
        local = (slice(lo[0] - z0, hi[0] - z0), vbox[1], vbox[2])
        d = np.linalg.norm(_grid(vbox) - c, axis=1).reshape(tuple(hi - lo))
        ring = np.exp(-(((d - r) / 0.9) ** 2)) * (labels[local] == 0) * ~membrane[local]
        image[local] *= 1 - 0.5 * ring.astype(np.float32)
    mask = np.where(membrane, MEMBRANE, np.where(labels > 0, MITOCHONDRION, BACKGROUND)).astype(np.uint8)
    labels[membrane] = 0
    return image.astype(np.float32), mask, labels


def make_em_volume(shape: tuple[int, int, int] = (128, 128, 128), *, seed: int = 0,
                   voxel_size_nm: float = 5.0) -> SyntheticVolume:
    """Make a synthetic isotropic FIB-SEM volume with exact labels (see the module docstring).

    Args:
        shape: ``(Z, Y, X)`` in voxels, each at least 16.
        seed: seed of the random generator.
        voxel_size_nm: isotropic voxel size; physical sizes scale with it.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"need a (Z, Y, X) shape with every side >= 16, got {shape}")
    if not voxel_size_nm > 0:
        raise ValueError(f"voxel_size_nm must be positive, got {voxel_size_nm}")
    px = 1.0 / voxel_size_nm
    rng = np.random.default_rng(seed)
    tissue = _Tissue(rng, shape, px)
    levels = np.clip(rng.normal(0.62, 0.04, len(tissue.seeds)), 0.5, 0.75).astype(np.float32)
    organelles = _place(rng, tissue, shape, px)
    n_ves = rng.poisson(VESICLES_PER_UM3 * float(np.prod(shape)) / px**3 * 1e-9)
    vesicles = (rng.uniform(0, np.array(shape, float), (n_ves, 3)), rng.uniform(*VESICLE_RADIUS_NM, n_ves) * px)
    flicker = 1.0 + rng.normal(0, 0.03, shape[0])
    curtain = ndi.gaussian_filter(rng.normal(0, 1, (shape[0] // 8 + 2, shape[2])), (1.0, 0.7))
    curtain = 0.04 * curtain / max(float(curtain.std()), 1e-6)
    tex_seed, noise_seed = rng.integers(2**31, size=2)
    clean = np.empty(shape, np.float32)
    mask = np.empty(shape, np.uint8)
    mito = np.empty(shape, np.uint16)
    for z0 in range(0, shape[0], SLAB):
        z1 = min(z0 + SLAB, shape[0])
        clean[z0:z1], mask[z0:z1], mito[z0:z1] = _render_slab(
            z0, z1, shape, tissue, organelles, vesicles, levels, np.random.default_rng([tex_seed, z0]), px)
    image = _acquire(clean, flicker, curtain, np.random.default_rng(noise_seed), px)
    log.debug("synthetic volume %s seed %d: %d mitochondria, class fractions %s", shape, seed, int(mito.max()),
              np.bincount(mask.ravel(), minlength=3) / mask.size)
    return SyntheticVolume(image, mask, _renumber(mito), (voxel_size_nm,) * 3)


def _acquire(clean: np.ndarray, flicker, curtain, rng, px: float) -> np.ndarray:
    """3D blur, curtaining along y, per-slice brightness, shot and Gaussian noise; uint8."""
    sigma = PSF_SIGMA_NM * px
    out = np.empty(clean.shape, np.uint8)
    blurred = ndi.gaussian_filter(clean, sigma, mode="reflect", truncate=3.0)
    for z in range(clean.shape[0]):
        page = blurred[z] * flicker[z] + curtain[z // 8][None, :]
        noise = rng.standard_normal(page.shape, dtype=np.float32)
        page = page + np.sqrt(0.002 * np.clip(page, 0, None) + NOISE_SIGMA**2) * noise
        out[z] = np.clip(np.rint(page * 255.0), 0, 255).astype(np.uint8)
    return out


def _renumber(labels: np.ndarray) -> np.ndarray:
    """Labels 1..n without gaps (objects that were clipped away entirely leave none)."""
    present = np.unique(labels)
    present = present[present > 0]
    lut = np.zeros(int(labels.max()) + 1, labels.dtype)
    lut[present] = np.arange(1, len(present) + 1, dtype=labels.dtype)
    return lut[labels]
