"""Pure, stateless operators."""

from converse_jax.ops.converse2d import (PADDING_MODES, apply_filter, converse2d, converse2d_channels_first,
                                         converse_filter, filtered_spectrum, irfft2_planes, lambda_from_bias, p2o,
                                         pad_planes, solve_plane)

__all__ = ["PADDING_MODES", "apply_filter", "converse2d", "converse2d_channels_first", "converse_filter",
           "filtered_spectrum", "irfft2_planes", "lambda_from_bias", "p2o", "pad_planes", "solve_plane"]
