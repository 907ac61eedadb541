"""The reverse-convolution block (PAPER.md §2), channels-last."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from converse_jax.nn.layers import Converse2D, gelu, layer_norm, pointwise


class ConverseBlock(nnx.Module):
    """``x + B1(x)`` then ``x + B2(x)`` (or ``x + α·B(x)`` with ``alpha=True``).

    B1: LayerNorm -> 1x1 conv C->2C -> GELU -> spatial mixer on 2C channels -> GELU -> 1x1 conv 2C->C.
    B2: LayerNorm -> 1x1 conv C->2C -> GELU -> 1x1 conv 2C->C.

    The spatial mixer is a :class:`Converse2D` by default; ``mixer`` builds another one (a depthwise
    convolution in the baselines) as ``mixer(channels, rngs=..., param_dtype=...)``.
    """

    def __init__(self, channels: int, kernel_size: int = 3, *, padding: int = 2, padding_mode: str = "circular",
                 eps: float = 1e-5, alpha: bool = False,
                 mixer: Optional[Callable[..., nnx.Module]] = None, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        hidden = 2 * channels
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layer_norm(channels, **kw)
        self.pw1 = pointwise(channels, hidden, **kw)
        if mixer is None:
            self.mixer = Converse2D(hidden, kernel_size, padding=padding, padding_mode=padding_mode, eps=eps, **kw)
        else:
            self.mixer = mixer(hidden, **kw)
        self.pw2 = pointwise(hidden, channels, **kw)
        self.norm2 = layer_norm(channels, **kw)
        self.pw3 = pointwise(channels, hidden, **kw)
        self.pw4 = pointwise(hidden, channels, **kw)
        if alpha:
            self.alpha1 = nnx.Param(jnp.zeros((channels,), param_dtype))
            self.alpha2 = nnx.Param(jnp.zeros((channels,), param_dtype))
        else:
            self.alpha1 = self.alpha2 = None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.pw2(gelu(self.mixer(gelu(self.pw1(self.norm1(x))))))
        x = x + (h if self.alpha1 is None else self.alpha1[...] * h)
        h = self.pw4(gelu(self.pw3(self.norm2(x))))
        return x + (h if self.alpha2 is None else self.alpha2[...] * h)
