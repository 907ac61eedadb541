"""Pure, stateless operators."""

from converse_jax.ops.converse2d import (PADDING_MODES, apply_filter, converse2d, converse_filter,
                                         lambda_from_bias, p2o, solve_plane)

__all__ = ["PADDING_MODES", "apply_filter", "converse2d", "converse_filter", "lambda_from_bias", "p2o",
           "solve_plane"]
