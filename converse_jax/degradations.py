"""Image degradations, in numpy: the one implementation shared by the test protocols and the
training pipeline (both through :mod:`converse_jax.tasks`).

The protocol functions reproduce the reference's arithmetic so that the degraded test inputs
equal ``golden/protocols.npz``:

- :func:`add_noise`: additive white Gaussian noise drawn from numpy's legacy ``RandomState``
  (the reference seeds the global generator with ``np.random.seed(0)`` before each image), or
  from any generator the caller passes (training draws from its per-sample ``Generator``);
- :func:`imresize`: MATLAB-style bicubic resize with antialiasing when shrinking;
- :func:`blur`: 2-D circular convolution (``scipy.ndimage.convolve(..., mode='wrap')``); a
  uint8 image stays uint8, as in the reference's deblurring protocol;
- :func:`modcrop`: crop height and width down to a multiple of a factor.

Also here: the eight flips/rotations (:func:`dihedral`, :func:`dihedral_inverse`) used by the
training augmentation and the x8 self-ensemble, random blur kernels for training
(:func:`random_kernel`), and the parsing of noise levels such as ``"25"`` or ``"0,50"``
(:func:`parse_level_range`). All images are channels-last: (H, W) or (H, W, C); ``imresize``
also takes batches (N, H, W, C). This module imports no other part of converse_jax but
:mod:`converse_jax.assets`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from converse_jax.assets import asset

__all__ = [
    "add_noise",
    "blur",
    "dihedral",
    "dihedral_inverse",
    "imresize",
    "modcrop",
    "normalize_kernel",
    "paper_kernel",
    "parse_level_range",
    "random_gaussian_kernel",
    "random_kernel",
    "random_motion_kernel",
    "resize_matrix",
    "to_float",
    "to_uint8",
]

RandomLike = None | int | np.random.RandomState | np.random.Generator


def to_float(img: np.ndarray) -> np.ndarray:
    """uint8 image -> float32 in [0, 1] (``img / 255``, correctly rounded as the reference)."""
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"to_float expects a uint8 image, got dtype {img.dtype}")
    return img.astype(np.float32) / np.float32(255.0)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] -> uint8: clip to [0, 1], times 255, round half to even.

    The arithmetic stays in the input's precision (float32 for network outputs), as in the
    reference's ``tensor2uint``.
    """
    img = np.asarray(img)
    if not np.issubdtype(img.dtype, np.floating):
        raise ValueError(f"to_uint8 expects a float image in [0, 1], got dtype {img.dtype}")
    scaled = np.clip(img, 0, 1) * img.dtype.type(255.0)
    return np.round(scaled).astype(np.uint8)


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right of ``img`` (H, W[, C]) so that H and W are multiples of ``scale``."""
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"modcrop expects an (H, W) or (H, W, C) image, got shape {img.shape}")
    if int(scale) < 1:
        raise ValueError(f"modcrop scale must be a positive integer, got {scale}")
    scale = int(scale)
    h, w = img.shape[:2]
    hc, wc = h - h % scale, w - w % scale
    if hc == 0 or wc == 0:
        raise ValueError(f"image of size {h}x{w} is smaller than the crop multiple {scale}")
    return img[:hc, :wc]


def _generator(rng: RandomLike) -> np.random.RandomState | np.random.Generator:
    if rng is None:
        return np.random.default_rng()
    if isinstance(rng, (np.random.RandomState, np.random.Generator)):
        return rng
    if isinstance(rng, (int, np.integer)):
        return np.random.RandomState(int(rng))
    raise ValueError(f"rng must be None, an int seed, a RandomState or a Generator, got {type(rng)}")


def add_noise(img: np.ndarray, sigma: float, rng: RandomLike = 0) -> np.ndarray:
    """Add white Gaussian noise of standard deviation ``sigma / 255`` to a float image.

    ``rng`` may be an int seed (a fresh legacy ``RandomState``: seed 0 gives the stream of the
    reference's ``np.random.seed(0); np.random.normal(...)``), a ``RandomState``, a
    ``Generator`` or None (fresh entropy). The sum is formed in float64 and stored in the
    image's dtype, without clipping, as the reference's in-place ``+=``.
    """
    img = np.asarray(img)
    if not np.issubdtype(img.dtype, np.floating):
        raise ValueError(f"add_noise expects a float image in [0, 1], got dtype {img.dtype}")
    if not sigma >= 0:
        raise ValueError(f"noise level sigma must be >= 0 (0..255 scale), got {sigma}")
    noise = _generator(rng).normal(0.0, sigma / 255.0, img.shape)
    return (img + noise).astype(img.dtype)


def normalize_kernel(kernel: np.ndarray) -> np.ndarray:
    """A 2-D blur kernel as float64 that sums to 1 (raises ValueError if it cannot)."""
    k = np.asarray(kernel, dtype=np.float64)
    if k.ndim == 3 and k.shape[-1] == 1:
        k = k[..., 0]
    if k.ndim != 2 or k.size == 0:
        raise ValueError(f"a blur kernel must be a 2-D array, got shape {np.shape(kernel)}")
    if not np.all(np.isfinite(k)):
        raise ValueError("the blur kernel contains NaN or infinite values")
    total = k.sum()
    if not abs(total) > 1e-12:
        raise ValueError("the blur kernel sums to 0 and cannot be normalised to sum 1")
    return k / total


def blur(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """2-D circular convolution of each channel of ``img`` (H, W[, C]) with ``kernel``.

    ``scipy.ndimage.convolve(img, kernel[..., None], mode='wrap')`` as the reference: the
    output has the input's dtype, so a uint8 image gives a uint8 blurred image (the float
    result converted by scipy) and a float image a float one.
    """
    img = np.asarray(img)
    k = np.asarray(kernel, dtype=np.float64)
    if k.ndim != 2:
        raise ValueError(f"blur kernel must be 2-D, got shape {k.shape}")
    if img.ndim == 3:
        k = k[..., None]
    elif img.ndim != 2:
        raise ValueError(f"blur expects an (H, W) or (H, W, C) image, got shape {img.shape}")
    return ndimage.convolve(img, k, mode="wrap")


def taper_edges(img: np.ndarray, band: int | tuple[int, int], kernel: np.ndarray) -> np.ndarray:
    """``img`` (H, W[, C]) float, its outer ``band`` pixels blended towards the image circularly blurred by
    ``kernel`` (:func:`blur`): fully at the edge, not at all ``band`` pixels in (a raised-cosine ramp).
    ``band``: one width, or (rows, columns); 0 leaves that axis alone.

    An FFT deconvolution treats its input as periodic, and a photo's (or a tile's) opposite edges do not
    match: the jump rings far into the result. Blurred by the kernel itself, the edges are what a
    circular blur would give there, so the solver meets no jump. This is the idea of MATLAB's
    ``edgetaper`` (an image blended with its blurred self near the border).
    """
    img = np.asarray(img)
    by, bx = (band, band) if np.isscalar(band) else band
    if min(by, bx) < 0:
        raise ValueError(f"band must be >= 0, got {band}")
    if by == 0 and bx == 0:
        return img

    def ramp(n: int, b: int) -> np.ndarray:  # 0 at the edge, 1 from b pixels in
        if b == 0:
            return np.ones(n)
        d = np.minimum(np.arange(n), np.arange(n)[::-1]) / b
        return 0.5 - 0.5 * np.cos(np.pi * np.minimum(d, 1.0))

    w = ramp(img.shape[0], int(by))[:, None] * ramp(img.shape[1], int(bx))[None, :]
    if img.ndim == 3:
        w = w[..., None]
    return (w * img + (1.0 - w) * blur(img, kernel)).astype(img.dtype)


def pad_tapered(img: np.ndarray, margin: int, kernel: np.ndarray) -> np.ndarray:
    """``img`` (H, W[, C]) float, padded by ``margin`` pixels on each side so that it wraps around smoothly:
    its edge pixels repeated, then that border blended into its blur by ``kernel`` (:func:`taper_edges`
    over the margin), so the image's own pixels are unchanged."""
    img = np.asarray(img)
    margin = int(margin)
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if margin == 0:
        return img
    pad = ((margin, margin), (margin, margin)) + ((0, 0),) * (img.ndim - 2)
    return taper_edges(np.pad(img, pad, mode="edge"), margin, kernel)


def paper_kernel(index: int) -> np.ndarray:
    """Kernel ``index`` (1..5) of the paper's deblurring table, from the shared assets."""
    path = asset("blur_kernels", f"kernel_{int(index)}.npy")
    if not path.exists():
        raise ValueError(f"blur kernel {path} not found: set CONVERSE_ASSETS to the shared folder "
                         "holding blur_kernels/kernel_{1..5}.npy")
    return np.load(path)


def parse_level_range(value: str | float | Sequence[float], name: str = "sigma") -> tuple[float, float]:
    """A noise level or range on the 0..255 scale as ``(low, high)``.

    ``25``, ``"25"`` -> ``(25.0, 25.0)``; ``"0,50"``, ``(0, 50)`` -> ``(0.0, 50.0)``. Raises
    ValueError naming ``name`` (e.g. ``"--sigma"``) unless ``0 <= low <= high`` and both are finite.
    """
    if isinstance(value, str):
        parts: Sequence = value.split(",")
    elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        parts = [value]
    else:
        parts = value if isinstance(value, (list, tuple, np.ndarray)) else [None]
    try:
        levels = [float(p) for p in parts]
    except (TypeError, ValueError):
        levels = []
    if len(levels) == 1:
        levels = levels * 2
    if len(levels) != 2:
        raise ValueError(f"{name} must be a level or a range 'low,high' (0..255 scale), got {value!r}")
    lo, hi = levels
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
        raise ValueError(f"{name} must satisfy 0 <= low <= high (0..255 scale), got {value!r}")
    return lo, hi


def dihedral(x: np.ndarray, mode: int) -> np.ndarray:
    """One of the 8 flip/rotate transforms of the two leading spatial axes of ``x``.

    ``mode`` = 4 * flip + k (0..7): mirror left-right if ``flip``, then rotate by k * 90 degrees
    (``np.rot90``). Mode 0 is the identity. Returns a view (not necessarily contiguous).
    """
    mode = int(mode)
    if not 0 <= mode < 8:
        raise ValueError(f"dihedral mode must be in 0..7, got {mode}")
    if mode >= 4:
        x = np.flip(x, axis=1)
    return np.rot90(x, mode % 4, axes=(0, 1))


def dihedral_inverse(x: np.ndarray, mode: int) -> np.ndarray:
    """The inverse of :func:`dihedral` with the same ``mode``."""
    mode = int(mode)
    if not 0 <= mode < 8:
        raise ValueError(f"dihedral mode must be in 0..7, got {mode}")
    x = np.rot90(x, -(mode % 4), axes=(0, 1))
    return np.flip(x, axis=1) if mode >= 4 else x


# ----------------------------------------------------------------------------------------
# Random blur kernels for training the deblurring networks
#
# Both families return non-negative (size, size) float32 kernels that sum to 1, centred on the
# middle pixel: anisotropic Gaussians (rotated ellipses, the usual model of defocus / lens blur)
# and motion blurs (a random, slightly curved camera-shake trajectory drawn with sub-pixel
# accuracy and softened a little, like the paper's test kernels).


def _check_kernel_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 3 or size % 2 == 0:
        raise ValueError(f"kernel size must be an odd integer >= 3, got {size!r}")


def _nonneg_unit_sum(k: np.ndarray) -> np.ndarray:
    k = np.maximum(k, 0.0)
    return (k / k.sum()).astype(np.float32)


def random_gaussian_kernel(rng: np.random.Generator, size: int = 7,
                           sigma_range: tuple[float, float] = (0.3, 1.6)) -> np.ndarray:
    """An anisotropic Gaussian kernel with random axis lengths and orientation.

    The two standard deviations are drawn uniformly from ``sigma_range`` (pixels) and the
    ellipse is rotated by a uniform angle.
    """
    _check_kernel_size(size)
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
    return _nonneg_unit_sum(np.exp(-0.5 * q))


def _motion_path(rng: np.random.Generator, size: int, length: float, steps: int) -> np.ndarray:
    """(steps + 1, 2) points of a random smooth trajectory, centred and fitted in the window."""
    turn = np.cumsum(rng.normal(0.0, 0.3, steps)) + rng.normal(0.0, 0.1)
    angle = rng.uniform(0.0, 2.0 * np.pi) + np.cumsum(turn) * (4.0 / steps)
    step = length / steps
    pts = np.concatenate([[[0.0, 0.0]], np.cumsum(step * np.stack([np.sin(angle), np.cos(angle)], 1), 0)])
    pts -= (pts.max(0) + pts.min(0)) / 2.0  # centre the bounding box
    extent = np.abs(pts).max()
    r = (size - 1) / 2.0
    if extent > r:
        pts *= r / extent
    return pts + r


def random_motion_kernel(rng: np.random.Generator, size: int = 7,
                         length_range: tuple[float, float] | None = None, steps: int = 64) -> np.ndarray:
    """A motion-blur kernel: a random smooth trajectory rasterised with bilinear weights.

    The path has a random length (default between 2 pixels and ``size - 1``), a random initial
    direction and a randomly drifting curvature; it is centred in the kernel window, scaled
    down if it does not fit, then softened by a small Gaussian (sigma <= 0.6 px).
    """
    _check_kernel_size(size)
    lo, hi = length_range if length_range is not None else (2.0, float(size - 1))
    if not 0 < lo <= hi:
        raise ValueError(f"length_range must satisfy 0 < low <= high, got {length_range!r}")
    pts = _motion_path(rng, size, rng.uniform(lo, hi), steps)
    k = np.zeros((size, size), dtype=np.float64)  # bilinear splat of each trajectory point
    y0 = np.clip(np.floor(pts[:, 0]).astype(int), 0, size - 2)
    x0 = np.clip(np.floor(pts[:, 1]).astype(int), 0, size - 2)
    fy, fx = pts[:, 0] - y0, pts[:, 1] - x0
    for dy, dx, wgt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        np.add.at(k, (y0 + dy, x0 + dx), wgt)
    soft = rng.uniform(0.0, 0.6)
    if soft > 0.05:
        k = ndimage.gaussian_filter(k, soft, mode="constant")
    return _nonneg_unit_sum(k)


def random_kernel(rng: np.random.Generator, size: int = 7, p_motion: float = 0.5) -> np.ndarray:
    """A motion kernel with probability ``p_motion``, else an anisotropic Gaussian."""
    if rng.random() < p_motion:
        return random_motion_kernel(rng, size)
    return random_gaussian_kernel(rng, size)


# ----------------------------------------------------------------------------------------
# MATLAB-style bicubic resize


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's ``cubic``)."""
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    inner = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    outer = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return inner + outer


@functools.lru_cache(maxsize=256)
def _resize_taps(in_len: int, out_len: int, scale: float, antialias: bool) -> tuple[np.ndarray, np.ndarray]:
    """Weights (out_len, P) and 0-based input indices (out_len, P) of a 1-D bicubic resize."""
    width = 4.0
    shrink_aa = scale < 1 and antialias
    if shrink_aa:
        width = width / scale
    # Output pixel i (1-based) maps to input coordinate u (1-based), MATLAB's convention.
    u = np.arange(1, out_len + 1, dtype=np.float64) / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]
    dist = u[:, None] - idx
    if shrink_aa:
        w = scale * _cubic(dist * scale)
    else:
        w = _cubic(dist)
    w = w / w.sum(axis=1, keepdims=True)
    # Taps whose weight is zero for every output pixel contribute nothing: drop them.
    keep = np.any(w != 0, axis=0)
    w, idx = w[:, keep], idx[:, keep]
    # Symmetric boundary (edge sample repeated): fold 0-based indices into [0, in_len).
    j = idx.astype(np.int64) - 1
    period = 2 * in_len
    j = np.mod(j, period)
    j = np.where(j >= in_len, period - 1 - j, j)
    w.setflags(write=False)
    j.setflags(write=False)
    return w, j


def resize_matrix(in_len: int, out_len: int, scale: float, antialias: bool = True) -> np.ndarray:
    """The (out_len, in_len) float64 matrix of a 1-D MATLAB bicubic resize by ``scale``.

    Rows hold the normalised cubic weights, with the symmetric boundary folded in.
    """
    if in_len < 1 or out_len < 1:
        raise ValueError(f"resize lengths must be positive, got {in_len} -> {out_len}")
    w, j = _resize_taps(int(in_len), int(out_len), float(scale), bool(antialias))
    mat = np.zeros((out_len, in_len), dtype=np.float64)
    rows = np.broadcast_to(np.arange(out_len)[:, None], j.shape)
    np.add.at(mat, (rows, j), w)
    return mat


def _resize_axis(x: np.ndarray, axis: int, out_len: int, scale: float, antialias: bool) -> np.ndarray:
    w, j = _resize_taps(x.shape[axis], out_len, scale, antialias)
    shape = [1] * x.ndim
    shape[axis] = out_len
    out = None
    for t in range(w.shape[1]):
        term = np.take(x, j[:, t], axis=axis) * w[:, t].reshape(shape)
        out = term if out is None else out + term
    return out


def imresize(img: np.ndarray, scale: float, antialiasing: bool = True) -> np.ndarray:
    """MATLAB ``imresize(img, scale, 'bicubic')`` on a float image, vectorised.

    ``img``: (H, W), (H, W, C) or a batch (N, H, W, C), float in [0, 1]. The output has
    size ``ceil(H * scale) x ceil(W * scale)`` and the input's float dtype; it is not clipped
    or quantised. Height is resized first, then width (the reference's order); the sums are
    formed in float64. When shrinking with ``antialiasing`` the cubic kernel is widened by
    ``1 / scale``; the boundary is symmetric (edge pixel repeated).
    """
    img = np.asarray(img)
    if not np.issubdtype(img.dtype, np.floating):
        raise ValueError(f"imresize expects a float image, got dtype {img.dtype}; "
                         "convert uint8 images with to_float first")
    if img.ndim not in (2, 3, 4):
        raise ValueError(f"imresize expects (H, W), (H, W, C) or (N, H, W, C), got shape {img.shape}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"imresize scale must be a positive number, got {scale}")
    hax = 1 if img.ndim == 4 else 0
    in_h, in_w = img.shape[hax], img.shape[hax + 1]
    if in_h < 1 or in_w < 1:
        raise ValueError(f"imresize got an empty image of shape {img.shape}")
    out_h, out_w = math.ceil(in_h * scale), math.ceil(in_w * scale)
    x = img.astype(np.float64)
    x = _resize_axis(x, hax, out_h, float(scale), bool(antialiasing))
    x = _resize_axis(x, hax + 1, out_w, float(scale), bool(antialiasing))
    return x.astype(img.dtype)
