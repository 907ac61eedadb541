"""Converse-DnCNN: grayscale denoising."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from converse_jax.nn import BlockStack, ConverseBlock, block_key_to_path, linear_key_to_path, pointwise
from converse_jax.nn.precision import check_precision, compute_dtype, full_dtype


class ConverseDnCNN(nnx.Module):
    """1x1 conv -> ``num_blocks`` reverse-convolution blocks -> 1x1 conv (no global residual).

    Released: 20 blocks, 64 features, 7x7 Converse2D kernels with circular padding 6 (796,353 parameters);
    the paper's table uses 5x5 kernels (734,913).
    ``body`` is a :class:`~converse_jax.nn.BlockStack`; ``scan_blocks`` chooses its scan or unrolled loop.
    ``precision``: ``"float32"`` or ``"bf16"`` (None: the default, :mod:`converse_jax.nn.precision`).
    """

    def __init__(self, in_channels: int = 1, features: int = 64, num_blocks: int = 20, kernel_size: int = 7,
                 padding: int = 6, padding_mode: str = "circular", eps: float = 1e-5, *, mixer=None,
                 scan_blocks: bool = True, precision: str | None = None, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        self.precision = check_precision(precision)
        dtype = compute_dtype(self.precision)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.head = pointwise(in_channels, features, **kw)
        self.body = BlockStack(num_blocks, lambda r: ConverseBlock(
            features, kernel_size, padding=padding, padding_mode=padding_mode, eps=eps, mixer=mixer,
            dtype=dtype, param_dtype=param_dtype, rngs=r), scan_blocks=scan_blocks, rngs=rngs)
        self.tail = pointwise(features, in_channels, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C). Channels-first inside."""
        h = self.head.channels_first(jnp.moveaxis(x, -1, 1))
        h = self.body.channels_first(h)
        return jnp.moveaxis(self.tail.channels_first(h), 1, -1).astype(full_dtype(x))


def torch_key_to_path(key: str) -> tuple:
    """Official ``ConverseDnCNN`` state-dict key -> NNX path (per block: ``body.{i}...``, see
    :mod:`converse_jax.weights.convert`)."""
    parts = key.split(".")
    if parts[0] in ("m_head", "m_tail") and len(parts) == 3 and parts[1] == "0":
        return linear_key_to_path(("head" if parts[0] == "m_head" else "tail",), parts[2], key)
    if parts[0] == "m_body" and len(parts) >= 3 and parts[1].isdigit():
        return ("body", int(parts[1])) + block_key_to_path(parts[2:], key)
    raise KeyError(f"unexpected PyTorch key {key!r}")
