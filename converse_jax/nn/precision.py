"""Compute precision of the networks: the one place that maps a precision name to dtypes.

``"float32"`` (the default) computes everything in the dtype of the parameters and inputs, as the
networks always did. ``"bf16"`` is mixed precision: the 1x1 convolutions, linear layers, LayerNorms
(their output; the statistics stay float32, as flax computes them), GELUs and the baselines' dense
and depthwise convolutions take bfloat16 inputs, while

- parameters stay float32 (``param_dtype``; they are cast to bfloat16 where they are used, so
  gradients, optimizer state and checkpoints are float32 either way, and released weights load
  unchanged);
- matrix products accumulate in float32 (the backends do: XLA:CPU converts bfloat16 operands to
  float32, GPUs and TPUs accumulate in float32) and round the result to bfloat16;
- the Converse2D solver (and USRNet's data step) runs in float32: its input is cast up and its output
  cast back, because XLA's FFTs take no bfloat16 and the division by ``|K|² + λ`` needs the range;
- the residual sums stay in the stream's dtype (float32 when the network's input is), and every
  network returns float32 for float32 input;
- Converse-USRNet also keeps in float32 the layers that make its data step's kernels and its last
  1x1 convolution, whose output is the restored image (rounded to bfloat16 it cost most of bf16's
  accuracy loss on that network).

See docs/precision.md for the accuracy and speed this gives.

The default precision is process-wide, like ``jax_default_matmul_precision``: networks built
without a ``precision`` argument (for instance by :func:`converse_jax.load_pretrained`) take
:func:`get_default_precision`, which starts as ``$CONVERSE_JAX_PRECISION`` (float32 when unset);
:func:`set_default_precision` changes it (the command lines' ``--precision`` flag does) and
:func:`default_precision` changes it inside a ``with`` block.
The choice is made when a network is built: it is part of the network's static structure
(its ``nnx.GraphDef``), so compiled functions of float32 and bf16 networks never mix.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["ENV_VAR", "PRECISIONS", "check_precision", "compute_dtype", "default_precision", "full_dtype",
           "get_default_precision", "model_precision", "set_default_precision"]

# name -> compute dtype (None: no cast, the dtype of the parameters and inputs).
_COMPUTE_DTYPES: dict[str, Any] = {"float32": None, "bf16": jnp.bfloat16}
PRECISIONS: tuple[str, ...] = tuple(_COMPUTE_DTYPES)

ENV_VAR = "CONVERSE_JAX_PRECISION"  # the initial default precision (subprocesses inherit it)

_default: list[str | None] = [None]  # None: not read from ENV_VAR yet


def check_precision(precision: str | None) -> str:
    """``precision`` if it is a known name, the default precision if None; else a one-line ValueError."""
    if precision is None:
        return get_default_precision()
    if not isinstance(precision, str) or precision not in _COMPUTE_DTYPES:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return precision


def compute_dtype(precision: str | None = None) -> Any:
    """The dtype the layers compute in for ``precision`` (None: the default precision): bfloat16 for
    ``"bf16"``, None (no cast) for ``"float32"``. Passed to the layers as their ``dtype``."""
    return _COMPUTE_DTYPES[check_precision(precision)]


def get_default_precision() -> str:
    """The precision of networks built without a ``precision`` argument: ``"float32"`` unless changed
    by :func:`set_default_precision` or, before the first call, by ``$CONVERSE_JAX_PRECISION``."""
    if _default[0] is None:
        value = os.environ.get(ENV_VAR) or "float32"
        if value not in _COMPUTE_DTYPES:
            raise ValueError(f"${ENV_VAR}={value!r} is not a precision: set it to one of {', '.join(PRECISIONS)} "
                             "or unset it")
        _default[0] = value
    return _default[0]


def set_default_precision(precision: str) -> None:
    """Make ``precision`` the process-wide default for networks built from now on."""
    if precision is None:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got None")
    _default[0] = check_precision(precision)


@contextlib.contextmanager
def default_precision(precision: str) -> Iterator[str]:
    """``with default_precision("bf16"):`` networks built inside the block default to ``precision``."""
    old = get_default_precision()
    set_default_precision(precision)
    try:
        yield precision
    finally:
        _default[0] = old


def full_dtype(x: jax.Array) -> Any:
    """``x``'s dtype widened to at least float32 (bfloat16 -> float32; float64 stays float64): the dtype
    the Converse2D solver and LayerNorm statistics run in, and the dtype a network returns."""
    return jnp.promote_types(x.dtype, jnp.float32)


def model_precision(model: Any, default: str | None = None) -> str | None:
    """The compute precision a network was built with (its ``precision`` attribute), which reports and
    exported artifacts record beside their figures; ``default`` for a model that does not say."""
    precision = getattr(model, "precision", None)
    return precision if isinstance(precision, str) else default
