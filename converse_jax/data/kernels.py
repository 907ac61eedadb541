"""Random blur kernels for training the deblurring networks.

Both families return non-negative ``(size, size)`` float32 kernels that sum to 1, centred on the
middle pixel: anisotropic Gaussians (rotated ellipses, the usual model of defocus / lens blur)
and motion blurs (a random, slightly curved camera-shake trajectory drawn with sub-pixel
accuracy and softened a little, like the paper's test kernels).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["random_gaussian_kernel", "random_motion_kernel", "random_kernel"]


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or size < 3 or size % 2 == 0:
        raise ValueError(f"kernel size must be an odd integer >= 3, got {size!r}")


def _normalize(k: np.ndarray) -> np.ndarray:
    k = np.maximum(k, 0.0)
    return (k / k.sum()).astype(np.float32)


def random_gaussian_kernel(
    rng: np.random.Generator,
    size: int = 7,
    sigma_range: tuple[float, float] = (0.3, 1.6),
) -> np.ndarray:
    """An anisotropic Gaussian kernel with random axis lengths and orientation.

    The two standard deviations are drawn uniformly from ``sigma_range`` (pixels) and the
    ellipse is rotated by a uniform angle.
    """
    _check_size(size)
    lo, hi = sigma_range
    if not 0 < lo <= hi:
        raise ValueError(f"sigma_range must satisfy 0 < low <= high, got {sigma_range!r}")
    s1, s2 = rng.uniform(lo, hi, 2)
    theta = rng.uniform(0.0, np.pi)
    c, s = np.cos(theta), np.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    cov = rot @ np.diag([s1 * s1, s2 * s2]) @ rot.T
    prec = np.linalg.inv(cov)
    r = (size - 1) / 2.0
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    q = prec[0, 0] * y * y + 2.0 * prec[0, 1] * y * x + prec[1, 1] * x * x
    return _normalize(np.exp(-0.5 * q))


def random_motion_kernel(
    rng: np.random.Generator,
    size: int = 7,
    length_range: tuple[float, float] | None = None,
    steps: int = 64,
) -> np.ndarray:
    """A motion-blur kernel: a random smooth trajectory rasterised with bilinear weights.

    The path has a random length (default between 2 pixels and ``size - 1``), a random initial
    direction and a randomly drifting curvature; it is centred in the kernel window, scaled
    down if it does not fit, then softened by a small Gaussian (σ ≤ 0.6 px).
    """
    _check_size(size)
    lo, hi = length_range if length_range is not None else (2.0, float(size - 1))
    if not 0 < lo <= hi:
        raise ValueError(f"length_range must satisfy 0 < low <= high, got {length_range!r}")
    length = rng.uniform(lo, hi)
    turn = np.cumsum(rng.normal(0.0, 0.3, steps)) + rng.normal(0.0, 0.1)
    angle = rng.uniform(0.0, 2.0 * np.pi) + np.cumsum(turn) * (4.0 / steps)
    step = length / steps
    pts = np.concatenate([[[0.0, 0.0]], np.cumsum(step * np.stack([np.sin(angle), np.cos(angle)], 1), 0)])
    pts -= (pts.max(0) + pts.min(0)) / 2.0  # centre the bounding box
    extent = np.abs(pts).max()
    r = (size - 1) / 2.0
    if extent > r:
        pts *= r / extent
    pts += r

    # Bilinear splat of each trajectory point.
    k = np.zeros((size, size), dtype=np.float64)
    y0 = np.clip(np.floor(pts[:, 0]).astype(int), 0, size - 2)
    x0 = np.clip(np.floor(pts[:, 1]).astype(int), 0, size - 2)
    fy, fx = pts[:, 0] - y0, pts[:, 1] - x0
    for dy, dx, wgt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        np.add.at(k, (y0 + dy, x0 + dx), wgt)
    soft = rng.uniform(0.0, 0.6)
    if soft > 0.05:
        k = ndimage.gaussian_filter(k, soft, mode="constant")
    return _normalize(k)


def random_kernel(rng: np.random.Generator, size: int = 7, p_motion: float = 0.5) -> np.ndarray:
    """A motion kernel with probability ``p_motion``, else an anisotropic Gaussian."""
    if rng.random() < p_motion:
        return random_motion_kernel(rng, size)
    return random_gaussian_kernel(rng, size)
