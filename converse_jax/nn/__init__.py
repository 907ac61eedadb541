"""Flax NNX layers and blocks (channels-last)."""

from converse_jax.nn.blocks import ConverseBlock
from converse_jax.nn.layers import (DEFAULT_KERNEL_INIT, Converse2D, gelu, layer_norm, pointwise,
                                    softmax_kernel_init)
from converse_jax.nn.torch_names import block_key_to_path

__all__ = ["DEFAULT_KERNEL_INIT", "Converse2D", "ConverseBlock", "block_key_to_path", "gelu", "layer_norm",
           "pointwise", "softmax_kernel_init"]
