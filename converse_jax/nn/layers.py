"""Flax NNX layers of the Converse networks (channels-last)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from converse_jax.ops import PADDING_MODES, converse2d, lambda_from_bias

# Initialisation of 1x1 convolutions and linear layers when training from scratch: truncated normal
# (std 0.02) weights and zero biases, as in the official code's baselines (PAPER.md §3).
DEFAULT_KERNEL_INIT = nnx.initializers.truncated_normal(stddev=0.02)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as PyTorch's ``nn.GELU()``; ``jax.nn.gelu`` defaults to the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


def softmax_kernel_init(key: jax.Array, shape: tuple[int, int, int], dtype: Any = jnp.float32) -> jax.Array:
    """Converse2D kernel initialisation: per channel, a softmax over the k² entries of a normal draw."""
    kh, kw, channels = shape
    logits = jax.random.normal(key, (kh * kw, channels), dtype)
    return jax.nn.softmax(logits, axis=0).reshape(kh, kw, channels)


class Converse2D(nnx.Module):
    """Depthwise reverse convolution layer (PAPER.md §1).

    Parameters: ``weight`` (k, k, C), initialised by :func:`softmax_kernel_init`, and ``bias`` (C,) zeros,
    giving ``λ = sigmoid(bias - 9) + eps``. Input (B, H, W, C) -> output (B, H·scale, W·scale, C).
    """

    def __init__(self, channels: int, kernel_size: int, *, scale: int = 1, padding: int = 2,
                 padding_mode: str = "circular", eps: float = 1e-5, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {', '.join(PADDING_MODES)}; got {padding_mode!r}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.scale = scale
        self.padding = padding
        self.padding_mode = padding_mode
        self.eps = eps
        self.weight = nnx.Param(softmax_kernel_init(rngs.params(), (kernel_size, kernel_size, channels),
                                                    param_dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        lam = lambda_from_bias(self.bias[...], self.eps)
        return converse2d(x, self.weight[...], lam, scale=self.scale, padding=self.padding,
                          padding_mode=self.padding_mode)


def pointwise(in_features: int, out_features: int, *, use_bias: bool = True, param_dtype: Any = jnp.float32,
              rngs: nnx.Rngs) -> nnx.Linear:
    """A 1x1 convolution: a matmul over the channel (last) axis."""
    return nnx.Linear(in_features, out_features, use_bias=use_bias, kernel_init=DEFAULT_KERNEL_INIT,
                      param_dtype=param_dtype, rngs=rngs)


def layer_norm(channels: int, *, param_dtype: Any = jnp.float32, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm over channels with PyTorch's numerics: biased variance, eps 1e-5, computed as E[(x-μ)²]."""
    return nnx.LayerNorm(channels, epsilon=1e-5, use_fast_variance=False, param_dtype=param_dtype, rngs=rngs)
