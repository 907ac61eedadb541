"""Convolution layers of the baselines (docs/architectures.md), channels-last.

Every layer here initialises its weights with a truncated normal (std 0.02) and its biases with zeros,
as the official baselines do, and computes in its ``dtype`` (None: its input's; bfloat16 in mixed
precision, :mod:`converse_jax.nn.precision`) with ``param_dtype`` parameters. Kernels are
cross-correlations (PyTorch's and flax's convention) except :func:`circular_conv_per_sample`, which
is a true circular convolution aligned with :func:`converse_jax.ops.p2o`, i.e. the forward model that
Converse2D inverts.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from converse_jax.nn.layers import DEFAULT_KERNEL_INIT
from converse_jax.ops import JNP_PAD_MODES, check_padding_mode

_ZEROS = nnx.initializers.zeros_init()


def _check_positive(name: str, value: int, minimum: int = 1) -> int:
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def pad2d(x: jax.Array, before: int, after: int, padding_mode: str) -> jax.Array:
    """Pad the two spatial axes of an NHWC array by ``before``/``after`` pixels."""
    if before == 0 and after == 0:
        return x
    pads = ((0, 0), (before, after), (before, after), (0, 0))
    return jnp.pad(x, pads, mode=JNP_PAD_MODES[check_padding_mode(padding_mode)])


def conv2d(in_features: int, out_features: int, kernel_size: int = 3, *, use_bias: bool = True,
           dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
    """A dense ``kernel_size`` convolution with zero "same" padding (PyTorch ``Conv2d(.., k, 1, k // 2)``)."""
    _check_positive("kernel_size", kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(f"conv2d needs an odd kernel_size for symmetric 'same' padding, got {kernel_size}")
    return nnx.Conv(in_features, out_features, (kernel_size, kernel_size), padding=kernel_size // 2,
                    use_bias=use_bias, kernel_init=DEFAULT_KERNEL_INIT, bias_init=_ZEROS,
                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class DepthwiseConv(nnx.Module):
    """Depthwise ``kernel_size`` convolution (one k×k filter per channel, plus a per-channel bias).

    The input is padded by ``padding`` pixels per side with ``padding_mode`` (``circular``, ``reflect``,
    ``replicate`` or ``constant``), then convolved without padding: with ``padding = kernel_size // 2``
    (the default) the output has the input's size. Parameters: ``conv.kernel`` (k, k, 1, C), ``conv.bias``
    (C,) — k²·C + C, the same count as a Converse2D layer with the same kernel size.
    """

    def __init__(self, channels: int, kernel_size: int = 3, *, padding: int | None = None,
                 padding_mode: str = "circular", use_bias: bool = True, dtype: Any = None,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        _check_positive("channels", channels)
        _check_positive("kernel_size", kernel_size)
        self.padding = kernel_size // 2 if padding is None else _check_positive("padding", padding, 0)
        self.padding_mode = check_padding_mode(padding_mode)
        self.conv = nnx.Conv(channels, channels, (kernel_size, kernel_size), padding="VALID",
                             feature_group_count=channels, use_bias=use_bias, kernel_init=DEFAULT_KERNEL_INIT,
                             bias_init=_ZEROS, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(pad2d(x, self.padding, self.padding, self.padding_mode))


class DepthwiseConvTranspose(nnx.Module):
    """Depthwise transposed convolution with PyTorch ``ConvTranspose2d(C, C, k, stride, padding, groups=C)``
    semantics (zero padding): output size ``(H - 1)·stride - 2·padding + k``.

    It is the adjoint of the zero-padded depthwise cross-correlation with the same kernel, stride and
    padding. Stride 1 with ``padding = (k - 1) / 2`` keeps the size (the denoising baseline); kernel 2,
    stride 2, padding 0 doubles it (the ×2 upsampler). Parameters: ``kernel`` (k, k, C), ``bias`` (C,).
    """

    def __init__(self, channels: int, kernel_size: int = 5, *, stride: int = 1, padding: int = 2,
                 use_bias: bool = True, dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        _check_positive("channels", channels)
        _check_positive("kernel_size", kernel_size)
        self.dtype = dtype
        self.stride = _check_positive("stride", stride)
        self.padding = _check_positive("padding", padding, 0)
        if padding > kernel_size - 1:
            raise ValueError(f"padding must be at most kernel_size - 1 = {kernel_size - 1}, got {padding}")
        self.channels = channels
        self.kernel = nnx.Param(DEFAULT_KERNEL_INIT(rngs.params(), (kernel_size, kernel_size, channels),
                                                    param_dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel[...]
        if self.dtype is not None:
            x = x.astype(self.dtype)
        size = k.shape[0]
        # Insert stride-1 zeros between samples, pad by k-1-p, cross-correlate with the flipped kernel.
        rhs = k[::-1, ::-1, None, :].astype(x.dtype)  # (k, k, 1, C): HWIO with one input per group
        edge = size - 1 - self.padding
        y = jax.lax.conv_general_dilated(
            x, rhs, window_strides=(1, 1), padding=((edge, edge), (edge, edge)),
            lhs_dilation=(self.stride, self.stride), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.channels)
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)


def nearest_upsample(x: jax.Array, scale: int) -> jax.Array:
    """Nearest-neighbour upsampling of an NHWC array by an integer factor."""
    if scale == 1:
        return x
    return jnp.repeat(jnp.repeat(x, scale, axis=1), scale, axis=2)


def pixel_shuffle(x: jax.Array, scale: int) -> jax.Array:
    """NHWC pixel shuffle: (B, H, W, C·r²) -> (B, H·r, W·r, C), channel ``c·r² + i·r + j`` going to
    sub-pixel (i, j) of channel c, as PyTorch's ``PixelShuffle`` orders NCHW channels."""
    b, h, w, cr = x.shape
    if cr % (scale * scale):
        raise ValueError(f"pixel_shuffle: channels ({cr}) must be a multiple of scale² = {scale * scale}")
    c = cr // (scale * scale)
    x = x.reshape(b, h, w, c, scale, scale).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * scale, w * scale, c)


class ResizeConv(nnx.Module):
    """×``scale`` upsampler: nearest-neighbour upsampling followed by a :class:`DepthwiseConv`."""

    def __init__(self, channels: int, kernel_size: int = 3, *, scale: int = 2, padding_mode: str = "replicate",
                 dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.scale = _check_positive("scale", scale)
        self.conv = DepthwiseConv(channels, kernel_size, padding_mode=padding_mode, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(nearest_upsample(x, self.scale))


def circular_conv_per_sample(x: jax.Array, kernels: jax.Array) -> jax.Array:
    """Per-sample depthwise circular convolution: x (B, H, W, C), kernels (B, k, k, C) -> (B, H, W, C).

    A true convolution centred as :func:`converse_jax.ops.p2o` centres the kernel, so that it equals
    ``ifft2(fft2(x) · p2o(kernel))`` per plane: the forward model ``X ⊛ K`` that Converse2D inverts.
    """
    if x.ndim != 4 or kernels.ndim != 4 or kernels.shape[0] != x.shape[0] or kernels.shape[-1] != x.shape[-1]:
        raise ValueError(f"circular_conv_per_sample: x must be (B, H, W, C) and kernels (B, k, k, C) with the same "
                         f"B and C; got {x.shape} and {kernels.shape}")
    b, h, w, c = x.shape
    kh, kw = kernels.shape[1:3]
    if kh > h or kw > w:
        raise ValueError(f"circular_conv_per_sample: kernel {kh}x{kw} is larger than the image {h}x{w}")
    # Output n = sum_m K[m] x[n - m + k//2]: cross-correlation of x padded by (k-1-k//2, k//2) with flip(K).
    xp = jnp.pad(x, ((0, 0), (kh - 1 - kh // 2, kh // 2), (kw - 1 - kw // 2, kw // 2), (0, 0)), mode="wrap")
    # Fold the batch into the channel groups: one convolution with B·C groups.
    lhs = xp.transpose(1, 2, 0, 3).reshape(1, xp.shape[1], xp.shape[2], b * c)
    rhs = kernels[:, ::-1, ::-1, :].transpose(1, 2, 0, 3).reshape(kh, kw, 1, b * c).astype(x.dtype)
    y = jax.lax.conv_general_dilated(lhs, rhs, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=b * c)
    return y.reshape(h, w, b, c).transpose(2, 0, 1, 3)
