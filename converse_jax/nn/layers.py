"""Flax NNX layers of the Converse networks.

Every layer takes channels-last input (B, H, W, C) when called. The layers the networks are built from
also have a ``channels_first`` method for (B, C, H, W): the networks keep their activations
channels-first inside, so that the FFTs of Converse2D run over the two minor axes with no transposes,
and convert once at their input and output.

Each layer takes a flax-style ``dtype``, the dtype it computes in (None: that of its inputs and
parameters), beside ``param_dtype``; the networks set it from their ``precision``
(:mod:`converse_jax.nn.precision`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from converse_jax.nn.precision import full_dtype
from converse_jax.ops import check_padding_mode, converse2d, converse2d_channels_first, lambda_from_bias

# Initialisation of 1x1 convolutions and linear layers when training from scratch: truncated normal
# (std 0.02) weights and zero biases, as in the official code's baselines (docs/architectures.md).
DEFAULT_KERNEL_INIT = nnx.initializers.truncated_normal(stddev=0.02)


_SQRT_HALF = 0.7071067811865476


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as PyTorch's ``nn.GELU()``: ``x/2 · (1 + erf(x/√2))``.

    ``jax.nn.gelu`` defaults to the tanh approximation, and its exact form is written with ``erfc``,
    which XLA's CPU backend expands into several passes; ``erf`` is one polynomial that fuses with
    its neighbours.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * _SQRT_HALF))


def apply_channels_first(module: Any, x: jax.Array) -> jax.Array:
    """``module`` applied to channels-first ``x`` (B, C, H, W): its ``channels_first`` method when it has
    one, else its channels-last ``__call__`` between two transposes."""
    if hasattr(module, "channels_first"):
        return module.channels_first(x)
    return jnp.moveaxis(module(jnp.moveaxis(x, 1, -1)), -1, 1)


def softmax_kernel_init(key: jax.Array, shape: tuple[int, int, int], dtype: Any = jnp.float32) -> jax.Array:
    """Converse2D kernel initialisation: per channel, a softmax over the k² entries of a normal draw."""
    kh, kw, channels = shape
    logits = jax.random.normal(key, (kh * kw, channels), dtype)
    return jax.nn.softmax(logits, axis=0).reshape(kh, kw, channels)


class Converse2D(nnx.Module):
    """Depthwise reverse convolution layer (the operator of docs/operator.md).

    Parameters: ``weight`` (k, k, C), initialised by :func:`softmax_kernel_init`, and ``bias`` (C,) zeros,
    giving ``λ = sigmoid(bias - 9) + eps``. Input (B, H, W, C) -> output (B, H·scale, W·scale, C).

    The solver runs in at least float32 whatever ``dtype`` is (XLA's FFTs take no bfloat16): a
    bfloat16 input is cast up, and the output is cast to ``dtype`` (None: left as the solver's).
    """

    def __init__(self, channels: int, kernel_size: int, *, scale: int = 1, padding: int = 2,
                 padding_mode: str = "circular", eps: float = 1e-5, dtype: Any = None,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        check_padding_mode(padding_mode)
        self.channels = channels
        self.kernel_size = kernel_size
        self.scale = scale
        self.padding = padding
        self.padding_mode = padding_mode
        self.eps = eps
        self.dtype = dtype
        self.weight = nnx.Param(softmax_kernel_init(rngs.params(), (kernel_size, kernel_size, channels),
                                                    param_dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        lam = lambda_from_bias(self.bias[...], self.eps)
        y = converse2d(x.astype(full_dtype(x)), self.weight[...], lam, scale=self.scale, padding=self.padding,
                       padding_mode=self.padding_mode)
        return y if self.dtype is None else y.astype(self.dtype)

    def channels_first(self, x: jax.Array) -> jax.Array:
        """(B, C, H, W) -> (B, C, H·scale, W·scale)."""
        lam = lambda_from_bias(self.bias[...], self.eps)
        y = converse2d_channels_first(x.astype(full_dtype(x)), jnp.moveaxis(self.weight[...], -1, 0), lam,
                                      scale=self.scale, padding=self.padding, padding_mode=self.padding_mode)
        return y if self.dtype is None else y.astype(self.dtype)


class Pointwise(nnx.Linear):
    """A 1x1 convolution: ``nnx.Linear`` over the channel axis (last when called, parameters
    ``kernel`` (C_in, C_out) and ``bias``), with a channels-first method.

    With a ``dtype`` (bfloat16 in mixed precision) the input and kernel are cast to it and the product
    is a ``dtype`` product; the float32 bias is added to it and the sum rounded to ``dtype``. The
    backends accumulate bfloat16 products in float32 (XLA:CPU converts the operands to float32, GPUs
    and TPUs accumulate in float32). The product is not asked for a float32 result
    (``preferred_element_type``): XLA:CPU cannot run some such bfloat16 products ("Unsupported
    element type for DotThunk"), see docs/precision.md.
    """

    def _operands(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(input, kernel), cast to ``dtype`` when it is set."""
        if self.dtype is None:
            return x, self.kernel[...]
        return x.astype(self.dtype), self.kernel[...].astype(self.dtype)

    def _finish(self, y: jax.Array, bias_axis: int) -> jax.Array:
        """``y`` plus the bias (along ``bias_axis``), in ``dtype``."""
        if self.bias is not None:
            bias = self.bias[...]
            y = y + (bias if bias_axis == -1 else bias[:, None, None])
        return y if self.dtype is None else y.astype(self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., C_in) -> (..., C_out)."""
        if self.dtype is None:
            return super().__call__(x)
        return self._finish(jnp.einsum("...c,cd->...d", *self._operands(x)), -1)

    def channels_first(self, x: jax.Array) -> jax.Array:
        """(B, C_in, H, W) -> (B, C_out, H, W).

        With a batch, written as a batched matrix product with the kernel broadcast over the batch: its
        gradient is then a batched product summed over the batch, which XLA's CPU backend runs faster
        than the one contraction over (batch, height, width) it gets from the plain einsum.
        """
        b, c, h, w = x.shape
        x, kernel = self._operands(x)
        if b == 1:
            y = jnp.einsum("bchw,cd->bdhw", x, kernel)
        else:
            kernel = jnp.broadcast_to(kernel, (b,) + kernel.shape)
            y = jnp.einsum("bcn,bcd->bdn", x.reshape(b, c, h * w), kernel).reshape(b, -1, h, w)
        return self._finish(y, 1)


def pointwise(in_features: int, out_features: int, *, use_bias: bool = True, dtype: Any = None,
              param_dtype: Any = jnp.float32, rngs: nnx.Rngs) -> Pointwise:
    """A 1x1 convolution (or a linear layer), truncated-normal initialised (:data:`DEFAULT_KERNEL_INIT`),
    computing in ``dtype`` (None: its input's)."""
    return Pointwise(in_features, out_features, use_bias=use_bias, kernel_init=DEFAULT_KERNEL_INIT,
                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class ChannelLayerNorm(nnx.LayerNorm):
    """``nnx.LayerNorm`` over channels (the last axis when called), with a channels-first method.

    As flax's LayerNorm, the statistics and the normalisation run in at least float32 and the output
    is cast to ``dtype`` (None: left in that dtype).
    """

    def channels_first(self, x: jax.Array) -> jax.Array:
        """LayerNorm over axis 1 of (B, C, H, W). The channel means are vector-matrix products, which XLA's
        CPU backend runs faster than a reduction over a major axis. (The vector comes first: as
        ``x · avg``, XLA transposes ``x`` to make the contracted axis minor.)"""
        x = x.astype(full_dtype(x))
        avg = jnp.full((x.shape[1],), 1.0 / x.shape[1], x.dtype)
        mean = jnp.einsum("c,bchw->bhw", avg, x)[:, None]
        d = x - mean
        var = jnp.einsum("c,bchw->bhw", avg, d * d)[:, None]
        y = d * jax.lax.rsqrt(var + self.epsilon)
        if self.scale is not None:
            y = y * self.scale[...][:, None, None]
        if self.bias is not None:
            y = y + self.bias[...][:, None, None]
        return y if self.dtype is None else y.astype(self.dtype)


def layer_norm(channels: int, *, dtype: Any = None, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs) -> ChannelLayerNorm:
    """LayerNorm over channels with PyTorch's numerics: biased variance, eps 1e-5, computed as E[(x-μ)²];
    output in ``dtype`` (None: at least float32)."""
    return ChannelLayerNorm(channels, epsilon=1e-5, use_fast_variance=False, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)
