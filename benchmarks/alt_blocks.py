"""Alternative evaluation of the library's reverse-convolution block, for comparison only.

:func:`block_apply` runs a :class:`converse_jax.nn.blocks.ConverseBlock`'s own parameters
through a different computation, so that the two can be timed against each other and checked
to agree numerically:

* ``layout="nhwc"``: the library's layout, with the Converse2D of :mod:`benchmarks.alt_ops`
  (kernel spectrum by separable DFT) in place of the library's;
* ``layout="nchw"``: activations kept channels-first inside the block, so the FFTs run over
  the two minor axes with no transposes (1×1 convolutions become channel contractions and
  LayerNorm's channel means matrix-vector products). A network converts NHWC→NCHW once at
  its input and back once at its output.

Both use GELU's erf form (see :func:`_gelu`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import alt_ops

_SQRT_HALF = np.float32(0.7071067811865476)


def _gelu(x: jax.Array) -> jax.Array:
    """Exact GELU in the erf form PyTorch's CPU kernel uses, ``x/2 · (1 + erf(x/√2))``.

    ``jax.nn.gelu(approximate=False)`` computes ``x/2 · erfc(−x/√2)`` instead: XLA expands erfc into
    several loops, where erf is one cheap polynomial that fuses with its neighbours.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * _SQRT_HALF))


def _norm(ln: Any, x: jax.Array, axis: int) -> jax.Array:
    """LayerNorm over channels (biased variance, E[(x−μ)²]). Channels-first, the channel means are
    matrix-vector products: XLA's CPU reduction over a major axis is several times slower."""
    if axis == -1:
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + ln.epsilon)
        return y * ln.scale[...] + ln.bias[...]
    c = x.shape[1]
    avg = jnp.full((c,), 1.0 / c, x.dtype)
    mean = jnp.einsum("bchw,c->bhw", x, avg)[:, None]
    d = x - mean
    var = jnp.einsum("bchw,c->bhw", d * d, avg)[:, None]
    return d * jax.lax.rsqrt(var + ln.epsilon) * ln.scale[...][:, None, None] + ln.bias[...][:, None, None]


def _pw(lin: Any, x: jax.Array, layout: str) -> jax.Array:
    w = lin.kernel[...]
    if layout == "nhwc":
        y = x @ w
        return y if lin.bias is None else y + lin.bias[...]
    y = jnp.einsum("bchw,cd->bdhw", x, w)
    return y if lin.bias is None else y + lin.bias[...][:, None, None]


def _mixer(conv: Any, x: jax.Array, layout: str) -> jax.Array:
    lam = jax.nn.sigmoid(conv.bias[...] - 9.0) + conv.eps
    return alt_ops.converse2d(x, conv.weight[...], lam, scale=conv.scale, padding=conv.padding,
                              padding_mode=conv.padding_mode, layout=layout)


def block_apply(block: Any, x: jax.Array, layout: str = "nchw") -> jax.Array:
    """The block's output for ``x`` ((B, H, W, C) with ``layout="nhwc"``, (B, C, H, W) with
    ``layout="nchw"``), computed with the alternatives above."""
    if layout not in ("nhwc", "nchw"):
        raise ValueError(f"layout must be 'nhwc' or 'nchw', got {layout!r}")
    axis = -1 if layout == "nhwc" else 1

    def scaled(alpha: Any, h: jax.Array) -> jax.Array:
        if alpha is None:
            return h
        a = alpha[...]
        return h * (a if layout == "nhwc" else a[:, None, None])

    h = _pw(block.pw2, _gelu(_mixer(block.mixer, _gelu(_pw(block.pw1, _norm(block.norm1, x, axis), layout)),
                                    layout)), layout)
    x = x + scaled(block.alpha1, h)
    h = _pw(block.pw4, _gelu(_pw(block.pw3, _norm(block.norm2, x, axis), layout)), layout)
    return x + scaled(block.alpha2, h)
