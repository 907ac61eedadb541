"""Pure, stateless operators."""

from converse_jax.ops.converse2d import (
    converse2d,
    converse2d_channels_first,
    converse_filter,
    filtered_spectrum,
    irfft2_planes,
    lambda_from_bias,
    p2o,
)
from converse_jax.ops.layout import JNP_PAD_MODES, PADDING_MODES, check_padding_mode, pad_planes

__all__ = ["JNP_PAD_MODES", "PADDING_MODES", "check_padding_mode", "converse2d", "converse2d_channels_first",
           "converse_filter", "filtered_spectrum", "irfft2_planes", "lambda_from_bias", "p2o", "pad_planes"]
