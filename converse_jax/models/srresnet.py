"""Converse-SRResNet: x4 super-resolution with Converse2D upsampling."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from converse_jax.nn import (
    BlockStack,
    Converse2D,
    ConverseBlock,
    apply_channels_first,
    block_key_to_path,
    gelu,
    linear_key_to_path,
    pointwise,
)
from converse_jax.nn.precision import check_precision, compute_dtype, full_dtype


def bilinear_upsample(x: jax.Array, scale: int) -> jax.Array:
    """Bilinear upsampling with half-pixel centres and edge clamping (PyTorch ``align_corners=False``)."""
    b, h, w, c = x.shape
    return jax.image.resize(x, (b, h * scale, w * scale, c), method="linear", antialias=False)


class ConverseSRResNet(nnx.Module):
    """conv_first+GELU -> blocks -> [block -> Converse2D x2 -> GELU] x2 -> block -> GELU -> conv_last,
    plus the input upsampled x4 bilinearly. Released: 699,072 parameters.
    ``body`` is a :class:`~converse_jax.nn.BlockStack`; ``scan_blocks`` chooses its scan or unrolled loop.
    The up-sampling blocks stay a list: each runs at its own resolution, between two upsamplers.
    ``precision``: ``"float32"`` or ``"bf16"`` (None: the default, :mod:`converse_jax.nn.precision`).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, features: int = 64, num_blocks: int = 16,
                 kernel_size: int = 5, padding: int = 4, padding_mode: str = "replicate", upscale: int = 4,
                 *, mixer=None, upsampler=None, scan_blocks: bool = True, precision: str | None = None,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if upscale not in (2, 4):
            raise ValueError(f"upscale must be 2 or 4, got {upscale}")
        self.precision = check_precision(precision)
        dtype = compute_dtype(self.precision)
        kw = dict(param_dtype=param_dtype, rngs=rngs) | ({} if dtype is None else {"dtype": dtype})

        def block(r: nnx.Rngs) -> ConverseBlock:
            return ConverseBlock(features, kernel_size, padding=padding, padding_mode=padding_mode, mixer=mixer,
                                 dtype=dtype, param_dtype=param_dtype, rngs=r)

        self.upscale = upscale
        self.conv_first = pointwise(in_channels, features, **kw)
        self.body = BlockStack(num_blocks, block, scan_blocks=scan_blocks, rngs=rngs)
        n_up = 2 if upscale == 4 else 1
        self.up_blocks = nnx.List([block(rngs) for _ in range(n_up)])
        if upsampler is None:
            self.upsamplers = nnx.List([
                Converse2D(features, 2, scale=2, padding=2, padding_mode="replicate", eps=1e-3, **kw)
                for _ in range(n_up)])
        else:
            self.upsamplers = nnx.List([upsampler(features, **kw) for _ in range(n_up)])
        self.hr_block = block(rngs)
        self.conv_last = pointwise(features, out_channels, use_bias=False, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H·upscale, W·upscale, C_out). Channels-first inside."""
        h = gelu(self.conv_first.channels_first(jnp.moveaxis(x, -1, 1)))
        h = self.body.channels_first(h)
        for blk, up in zip(self.up_blocks, self.upsamplers, strict=False):
            h = gelu(apply_channels_first(up, blk.channels_first(h)))
        h = self.conv_last.channels_first(gelu(self.hr_block.channels_first(h)))
        return (jnp.moveaxis(h, 1, -1) + bilinear_upsample(x, self.upscale)).astype(full_dtype(x))


def torch_key_to_path(key: str) -> tuple:
    """Official ``ConverseMSRResNet`` state-dict key -> NNX path (per block: ``body.{i}...``, see
    :mod:`converse_jax.weights.convert`)."""
    parts = key.split(".")
    if parts[0] in ("conv_first", "conv_last") and len(parts) == 2:
        return linear_key_to_path((parts[0],), parts[1], key)
    if parts[0] == "conv_body" and len(parts) >= 3 and parts[1].isdigit():
        return ("body", int(parts[1])) + block_key_to_path(parts[2:], key)
    if parts[0] in ("upconv1", "upconv2"):
        return ("up_blocks", int(parts[0][-1]) - 1) + block_key_to_path(parts[1:], key)
    if parts[0] in ("up1", "up2") and len(parts) == 2 and parts[1] in ("weight", "bias"):
        return ("upsamplers", int(parts[0][-1]) - 1, parts[1])
    if parts[0] == "conv_hres":
        return ("hr_block",) + block_key_to_path(parts[1:], key)
    raise KeyError(f"unexpected PyTorch key {key!r}")
