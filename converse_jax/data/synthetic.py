"""Procedurally generated training images: the embedded default data set.

A *dead-leaves* image is a stack of opaque disks dropped one over the other, with radii drawn
from a power law (density ∝ r⁻³, which makes the picture statistically scale-invariant, like
natural images: occlusions, edges at every scale, flat-ish regions). To keep it from being
piecewise-flat each disk also gets a gentle linear shading and a fine grain, and the whole image
a mild optical blur; values are quantised to 8 bits like a real photograph.

This is only a stand-in for a real training set (BSD400 / DIV2K ...) that needs no download:
models trained on it learn the right kind of operator, but will not reach the paper's numbers.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = ["dead_leaves"]


def _power_law_radii(rng: np.random.Generator, n: int, r_min: float, r_max: float) -> np.ndarray:
    """``n`` radii with density ∝ r⁻³ on [r_min, r_max] (inverse-CDF sampling)."""
    a, b = r_min ** -2.0, r_max ** -2.0
    u = rng.random(n)
    return (a - u * (a - b)) ** -0.5


def dead_leaves(
    size: int | tuple[int, int],
    seed: int,
    channels: int = 3,
    *,
    r_min: float = 1.0,
    r_max: float | None = None,
    blur: tuple[float, float] = (0.3, 1.0),
) -> np.ndarray:
    """A natural-looking synthetic image, fully determined by ``(size, seed, channels)``.

    Args:
        size: side ``S`` or ``(H, W)`` in pixels.
        seed: non-negative integer; the same seed gives the same image.
        channels: 1 (grey) or 3 (colour).
        r_min, r_max: disk radius range in pixels (``r_max`` defaults to half the longer side).
        blur: range of the standard deviation (pixels) of the final Gaussian blur.

    Returns:
        float32 array ``(H, W, channels)`` with values in [0, 1], multiples of 1/255.
    """
    h, w = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if h < 1 or w < 1:
        raise ValueError(f"dead_leaves: size must be positive, got {size!r}")
    if channels not in (1, 3):
        raise ValueError(f"dead_leaves: channels must be 1 or 3, got {channels!r}")
    if r_max is None:
        r_max = max(h, w) / 2.0
    r_max = max(float(r_max), r_min)
    rng = np.random.default_rng(seed)
    radius, cy, cx = _drop_disks(rng, h, w, r_min, r_max)
    label = _rasterise(radius, cy, cx, h, w)
    img = _paint(rng, label, radius, cy, cx, channels)
    sigma = rng.uniform(*blur)
    img = ndimage.gaussian_filter(img, (sigma, sigma, 0.0), mode="reflect")
    img = np.round(np.clip(img, 0.0, 1.0) * 255.0) / 255.0
    return img.astype(np.float32)


def _drop_disks(rng: np.random.Generator, h: int, w: int, r_min: float,
                r_max: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Radii and centres of enough disks that the expected uncovered fraction is about e^-6."""
    margin = r_max / 8.0
    area = (h + 2 * margin) * (w + 2 * margin)
    if r_max > r_min:
        mean_r2 = math.log(r_max / r_min) / (0.5 * (r_min ** -2 - r_max ** -2))
    else:
        mean_r2 = r_min ** 2
    n = int(math.ceil(6.0 * area / (math.pi * mean_r2)))
    radius = _power_law_radii(rng, n, r_min, r_max)
    cy = rng.uniform(-margin, h + margin, n)
    cx = rng.uniform(-margin, w + margin, n)
    return radius, cy, cx


def _rasterise(radius: np.ndarray, cy: np.ndarray, cx: np.ndarray, h: int, w: int) -> np.ndarray:
    """(H, W) index of the last disk covering each pixel (``n``, one past the disks, for the background).

    Disks are grouped by bounding-box size so that each group is one vectorised pass."""
    n = len(radius)
    half = np.ceil(radius).astype(np.int64)
    iy = np.floor(cy).astype(np.int64)
    ix = np.floor(cx).astype(np.int64)
    label = np.full(h * w, -1, dtype=np.int64)
    for r_int in np.unique(half):
        sel = np.nonzero(half == r_int)[0]
        oy, ox = np.mgrid[-r_int : r_int + 1, -r_int : r_int + 1]
        inner = oy**2 + ox**2 <= (r_int + 1) ** 2  # superset of every disk of this group
        oy, ox = oy[inner], ox[inner]
        ys = iy[sel, None] + oy[None, :]
        xs = ix[sel, None] + ox[None, :]
        keep = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        keep &= (ys + 0.5 - cy[sel, None]) ** 2 + (xs + 0.5 - cx[sel, None]) ** 2 <= radius[sel, None] ** 2
        ids = np.broadcast_to(sel[:, None], keep.shape)
        np.maximum.at(label, ys[keep] * w + xs[keep], ids[keep])
    label[label < 0] = n
    return label.reshape(h, w)


def _paint(rng: np.random.Generator, label: np.ndarray, radius: np.ndarray, cy: np.ndarray, cx: np.ndarray,
           channels: int) -> np.ndarray:
    """Each disk's colour with a gentle linear shading and a fine grain (index ``n`` is the background)."""
    h, w = label.shape
    m = len(radius) + 1
    base = rng.random(m)
    if channels == 3:
        chroma = rng.normal(0.0, 0.12, (m, 3)) * rng.random((m, 1))
        color = np.clip(base[:, None] + chroma, 0.0, 1.0)
    else:
        color = base[:, None]
    grad = rng.normal(0.0, 0.08, (m, 2))
    grain = rng.uniform(0.0, 0.04, m)
    cy = np.append(cy, h / 2.0)
    cx = np.append(cx, w / 2.0)
    radius = np.append(radius, max(h, w))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = radius[label]
    shade = (grad[label, 0] * (yy - cy[label]) + grad[label, 1] * (xx - cx[label])) / r
    texture = ndimage.gaussian_filter(rng.standard_normal((h, w)), 0.7)
    texture /= texture.std() + 1e-12
    return color[label] + (shade + grain[label] * texture)[..., None]
