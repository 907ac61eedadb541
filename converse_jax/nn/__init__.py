"""Flax NNX layers and blocks (channels-last when called; ``channels_first`` methods for network internals)."""

from converse_jax.nn.blocks import INFERENCE_HIDDEN_GROUPS, BlockStack, ConverseBlock, inference_view
from converse_jax.nn.layers import (
                                    DEFAULT_KERNEL_INIT,
                                    ChannelLayerNorm,
                                    Converse2D,
                                    Pointwise,
                                    apply_channels_first,
                                    gelu,
                                    layer_norm,
                                    pointwise,
                                    softmax_kernel_init,
)
from converse_jax.nn.precision import (
    PRECISIONS,
    check_precision,
    compute_dtype,
    default_precision,
    get_default_precision,
    set_default_precision,
)
from converse_jax.nn.torch_names import block_key_to_path, linear_key_to_path

__all__ = ["DEFAULT_KERNEL_INIT", "INFERENCE_HIDDEN_GROUPS", "PRECISIONS", "BlockStack", "ChannelLayerNorm",
           "Converse2D", "ConverseBlock", "Pointwise", "apply_channels_first", "block_key_to_path", "check_precision",
           "compute_dtype", "default_precision", "gelu", "get_default_precision", "inference_view", "layer_norm",
           "linear_key_to_path", "pointwise", "set_default_precision", "softmax_kernel_init"]
