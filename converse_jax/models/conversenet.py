"""ConverseNet: blind deblurring."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from converse_jax.nn import BlockStack, ConverseBlock, block_key_to_path, linear_key_to_path, pointwise
from converse_jax.nn.precision import check_precision, compute_dtype, full_dtype


class ConverseNet(nnx.Module):
    """1x1 conv 3->64 -> the same ``num_blocks`` blocks applied ``num_iterations`` times -> 1x1 conv 64->3.

    Takes only the blurred image. Released: 7 blocks (3x3 kernels, circular padding 2), 5 iterations,
    243,267 parameters.
    ``prior`` is a :class:`~converse_jax.nn.BlockStack`; ``scan_blocks`` chooses its scan or unrolled loop.
    ``precision``: ``"float32"`` or ``"bf16"`` (None: the default, :mod:`converse_jax.nn.precision`).
    """

    def __init__(self, in_channels: int = 3, features: int = 64, num_blocks: int = 7, num_iterations: int = 5,
                 kernel_size: int = 3, padding: int = 2, padding_mode: str = "circular", *, mixer=None,
                 scan_blocks: bool = True, precision: str | None = None, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        self.precision = check_precision(precision)
        dtype = compute_dtype(self.precision)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_iterations = num_iterations
        self.conv1 = pointwise(in_channels, features, **kw)
        self.prior = BlockStack(num_blocks, lambda r: ConverseBlock(
            features, kernel_size, padding=padding, padding_mode=padding_mode, mixer=mixer,
            dtype=dtype, param_dtype=param_dtype, rngs=r), scan_blocks=scan_blocks, rngs=rngs)
        self.conv2 = pointwise(features, in_channels, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C). Channels-first inside."""
        h = self.conv1.channels_first(jnp.moveaxis(x, -1, 1))
        for _ in range(self.num_iterations):
            h = self.prior.channels_first(h)
        return jnp.moveaxis(self.conv2.channels_first(h), 1, -1).astype(full_dtype(x))


def torch_key_to_path(key: str) -> tuple:
    """Official ``ConverseNet`` state-dict key -> NNX path (per block: ``prior.{i}...``, see
    :mod:`converse_jax.weights.convert`)."""
    parts = key.split(".")
    if parts[0] in ("conv1", "conv2") and len(parts) == 2:
        return linear_key_to_path((parts[0],), parts[1], key)
    if parts[:2] == ["p", "m_body"] and len(parts) >= 4 and parts[2].isdigit():
        return ("prior", int(parts[2])) + block_key_to_path(parts[3:], key)
    raise KeyError(f"unexpected PyTorch key {key!r}")
