"""PSNR and SSIM as the reference computes them (KAIR's ``utils_image``), on uint8 images.

Both metrics work on uint8 values, crop ``border`` pixels from each side first, and compute
in float64. SSIM uses an 11x11 Gaussian window (sigma 1.5), the valid region only, and the
mean over channels. The Y channel is ``round(16 + (65.481 R + 128.553 G + 24.966 B) / 255)``.

The arithmetic is dm-pix's (``dm_pix.psnr`` and ``dm_pix.ssim`` on ``uint8 / 255``) run in
float64 under ``jax.enable_x64``: that reproduces the reference's numbers to ~1e-12. In JAX's
default float32 the same calls are off by up to 4e-6 dB (PSNR) and 1e-5 (SSIM), outside the
tolerance we hold ourselves to, so these wrappers always switch to float64 locally (the global
JAX setting is left untouched).
"""

from __future__ import annotations

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

from converse_jax.degradations import to_uint8

__all__ = ["psnr", "ssim", "rgb_to_y", "image_metrics", "as_uint8"]

_Y_WEIGHTS = [65.481, 128.553, 24.966]
_SSIM_WINDOW = 11


def as_uint8(img: np.ndarray) -> np.ndarray:
    """A uint8 image; float images in [0, 1] are quantised like network outputs."""
    img = np.asarray(img)
    if img.dtype == np.uint8:
        return img
    if np.issubdtype(img.dtype, np.floating):
        return to_uint8(img)
    raise ValueError(f"metrics expect uint8 images (or float in [0, 1]), got dtype {img.dtype}")


def _prepare(a: np.ndarray, b: np.ndarray, border: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_uint8(a), as_uint8(b)
    if a.shape != b.shape:
        raise ValueError(f"images to compare have different shapes {a.shape} and {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if a.ndim != 3:
        raise ValueError(f"metrics expect (H, W) or (H, W, C) images, got shape {a.shape}")
    border = int(border)
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    h, w = a.shape[:2]
    if h <= 2 * border or w <= 2 * border:
        raise ValueError(f"image of size {h}x{w} is too small for a border of {border}")
    if border:
        a = a[border:h - border, border:w - border]
        b = b[border:h - border, border:w - border]
    return a, b


@jax.jit
def _psnr_f64(a: jax.Array, b: jax.Array) -> jax.Array:
    return pix.psnr(a.astype(jnp.float64) / 255.0, b.astype(jnp.float64) / 255.0)


@jax.jit
def _ssim_f64(a: jax.Array, b: jax.Array) -> jax.Array:
    return pix.ssim(a.astype(jnp.float64) / 255.0, b.astype(jnp.float64) / 255.0)


def psnr(a: np.ndarray, b: np.ndarray, border: int = 0) -> float:
    """PSNR in dB between two uint8 images (H, W[, C]) after cropping ``border`` pixels per side.

    Identical images give ``inf``.
    """
    a, b = _prepare(a, b, border)
    if np.array_equal(a, b):
        return float("inf")  # XLA's log(0) on CPU is not -inf, so decide here
    with jax.enable_x64(True):
        return float(_psnr_f64(jnp.asarray(a), jnp.asarray(b)))


def ssim(a: np.ndarray, b: np.ndarray, border: int = 0) -> float:
    """Mean SSIM (11x11 Gaussian window, sigma 1.5, valid region) over pixels and channels."""
    a, b = _prepare(a, b, border)
    if min(a.shape[:2]) < _SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {_SSIM_WINDOW}x{_SSIM_WINDOW} pixels after "
                         f"the border crop, got {a.shape[0]}x{a.shape[1]}")
    with jax.enable_x64(True):
        return float(_ssim_f64(jnp.asarray(a), jnp.asarray(b)))


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """Luma of a uint8 RGB image (H, W, 3) as uint8 (H, W): ITU-R BT.601 studio range, rounded."""
    img = as_uint8(img)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"rgb_to_y expects an (H, W, 3) RGB image, got shape {img.shape}")
    y = np.dot(img, _Y_WEIGHTS) / 255.0 + 16.0
    return np.round(y).astype(np.uint8)


def image_metrics(restored: np.ndarray, reference: np.ndarray, border: int = 0,
                  y_channel: bool | None = None) -> dict[str, float]:
    """``{"psnr", "ssim"}`` and, for RGB images, ``{"psnr_y", "ssim_y"}`` too.

    ``y_channel`` defaults to True for 3-channel images and must be False for gray ones.
    """
    restored, reference = as_uint8(restored), as_uint8(reference)
    out = {"psnr": psnr(restored, reference, border), "ssim": ssim(restored, reference, border)}
    is_rgb = restored.ndim == 3 and restored.shape[-1] == 3
    if y_channel is None:
        y_channel = is_rgb
    if y_channel:
        if not is_rgb:
            raise ValueError(f"Y-channel metrics need RGB images, got shape {restored.shape}")
        ry, gy = rgb_to_y(restored), rgb_to_y(reference)
        out["psnr_y"] = psnr(ry, gy, border)
        out["ssim_y"] = ssim(ry, gy, border)
    return out
