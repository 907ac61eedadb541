"""The four networks evaluated with :mod:`benchmarks.alt_blocks` (channels-first inside, the
separable-DFT Converse2D), using the library models' own parameters. For comparison only:
the benchmark times these next to the library's forward passes (``--alt``) and the tests
check that both give the same outputs."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import alt_ops
from benchmarks.alt_blocks import _gelu, _pw, block_apply

_LAYOUT = "nchw"


def _blocks(stack: Any, h: jax.Array) -> jax.Array:
    """The blocks of a :class:`converse_jax.nn.BlockStack`, one after the other."""
    for i in range(stack.num_blocks):
        h = block_apply(stack.block(i), h, _LAYOUT)
    return h


def _converse(layer: Any, h: jax.Array) -> jax.Array:
    lam = jax.nn.sigmoid(layer.bias[...] - 9.0) + layer.eps
    return alt_ops.converse2d(h, layer.weight[...], lam, scale=layer.scale, padding=layer.padding,
                              padding_mode=layer.padding_mode, layout=_LAYOUT)


def forward(name: str, model: Any, x: jax.Array, kernel: jax.Array | None = None, sf: int = 1) -> jax.Array:
    """``model``'s output for NHWC ``x`` (and USRNet's (B, 7, 7) ``kernel``), NHWC."""
    h = jnp.transpose(x, (0, 3, 1, 2))
    if name == "dncnn":
        out = _pw(model.tail, _blocks(model.body, _pw(model.head, h, _LAYOUT)), _LAYOUT)
    elif name == "conversenet":
        h = _pw(model.conv1, h, _LAYOUT)
        for _ in range(model.num_iterations):
            h = _blocks(model.prior, h)
        out = _pw(model.conv2, h, _LAYOUT)
    elif name == "srresnet":
        from converse_jax.models.srresnet import bilinear_upsample

        f = _blocks(model.body, _gelu(_pw(model.conv_first, h, _LAYOUT)))
        for blk, up in zip(model.up_blocks, model.upsamplers, strict=False):
            f = _gelu(_converse(up, block_apply(blk, f, _LAYOUT)))
        f = _pw(model.conv_last, _gelu(block_apply(model.hr_block, f, _LAYOUT)), _LAYOUT)
        return jnp.transpose(f, (0, 2, 3, 1)) + bilinear_upsample(x, model.upscale)
    elif name == "usrnet":
        if kernel is None:
            raise ValueError("usrnet needs the blur kernel")
        feats = model.kernelnet(jnp.asarray(kernel, x.dtype))  # (B, k, k, 16)
        lam = model.data_weight()
        h = _pw(model.conv1, h, _LAYOUT)
        for i, conv in enumerate(model.kernel_convs):
            h = alt_ops.converse2d(h, conv(feats), lam, scale=sf if i == 0 else 1, padding=0, layout=_LAYOUT)
            h = _blocks(model.prior, h)
        out = _pw(model.conv2, h, _LAYOUT)
    else:
        raise ValueError(f"unknown network {name!r}")
    return jnp.transpose(out, (0, 2, 3, 1))
