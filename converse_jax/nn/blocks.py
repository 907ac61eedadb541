"""The reverse-convolution block (PAPER.md §2), and running a stack of blocks."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from converse_jax.nn.layers import Converse2D, apply_channels_first, gelu, layer_norm, pointwise


class ConverseBlock(nnx.Module):
    """``x + B1(x)`` then ``x + B2(x)`` (or ``x + α·B(x)`` with ``alpha=True``).

    B1: LayerNorm -> 1x1 conv C->2C -> GELU -> spatial mixer on 2C channels -> GELU -> 1x1 conv 2C->C.
    B2: LayerNorm -> 1x1 conv C->2C -> GELU -> 1x1 conv 2C->C.

    Called on channels-last input (B, H, W, C); :meth:`channels_first` takes (B, C, H, W), which is what
    the networks use inside. The spatial mixer is a :class:`Converse2D` by default; ``mixer`` builds
    another one (a depthwise convolution in the baselines) as ``mixer(channels, rngs=..., param_dtype=...)``.
    """

    def __init__(self, channels: int, kernel_size: int = 3, *, padding: int = 2, padding_mode: str = "circular",
                 eps: float = 1e-5, alpha: bool = False,
                 mixer: Optional[Callable[..., nnx.Module]] = None, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        hidden = 2 * channels
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layer_norm(channels, **kw)
        self.pw1 = pointwise(channels, hidden, **kw)
        if mixer is None:
            self.mixer = Converse2D(hidden, kernel_size, padding=padding, padding_mode=padding_mode, eps=eps, **kw)
        else:
            self.mixer = mixer(hidden, **kw)
        self.pw2 = pointwise(hidden, channels, **kw)
        self.norm2 = layer_norm(channels, **kw)
        self.pw3 = pointwise(channels, hidden, **kw)
        self.pw4 = pointwise(hidden, channels, **kw)
        if alpha:
            self.alpha1 = nnx.Param(jnp.zeros((channels,), param_dtype))
            self.alpha2 = nnx.Param(jnp.zeros((channels,), param_dtype))
        else:
            self.alpha1 = self.alpha2 = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C)."""
        return jnp.moveaxis(self.channels_first(jnp.moveaxis(x, -1, 1)), 1, -1)

    def channels_first(self, x: jax.Array) -> jax.Array:
        """(B, C, H, W) -> (B, C, H, W)."""
        h = self.pw1.channels_first(self.norm1.channels_first(x))
        h = self.pw2.channels_first(gelu(apply_channels_first(self.mixer, gelu(h))))
        x = x + (h if self.alpha1 is None else self.alpha1[...][:, None, None] * h)
        h = self.pw4.channels_first(gelu(self.pw3.channels_first(self.norm2.channels_first(x))))
        return x + (h if self.alpha2 is None else self.alpha2[...][:, None, None] * h)


class ScanBlocksView:
    """Mixin of the networks with repeated blocks: their ``scan_blocks`` attribute, settable with
    ``nnx.view(model, scan_blocks=...)`` (the trainer's training view unrolls)."""

    scan_blocks: bool = True

    def set_view(self, scan_blocks: bool | None = None) -> None:
        """Hook of ``nnx.view``: ``scan_blocks`` selects :func:`run_blocks`' scan or unrolled loop."""
        if scan_blocks is not None:
            self.scan_blocks = scan_blocks


def run_blocks(blocks: Sequence[nnx.Module], h: jax.Array, *, scan: bool = True) -> jax.Array:
    """Apply ``blocks`` in order to channels-first ``h`` (each block's ``channels_first``).

    With ``scan``, blocks of one structure whose state is only parameters run as one ``jax.lax.scan``
    over their stacked parameters: XLA compiles the block once and keeps one block's temporaries alive
    at a time. Unrolled, XLA's CPU scheduler computes every layer's filter up front and peak memory
    grows with depth (DnCNN at 256²: 778 instead of 125 MiB). Differentiated, the unrolled form is
    about 10% faster (the scan copies every block's residuals into stacked buffers), so the trainer
    unrolls; for inference the two run at the same speed.
    """
    blocks = list(blocks)
    if not scan or len(blocks) < 2 or not _scannable(blocks):
        for block in blocks:
            h = block.channels_first(h)
        return h
    graphdef = nnx.graphdef(blocks[0])
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[nnx.state(b) for b in blocks])

    def step(carry: jax.Array, state: Any) -> tuple[jax.Array, None]:
        return nnx.merge(graphdef, state).channels_first(carry), None

    h, _ = jax.lax.scan(step, h, stacked)
    return h


def _scannable(blocks: list[nnx.Module]) -> bool:
    graphdef = nnx.graphdef(blocks[0])
    for block in blocks:
        if nnx.graphdef(block) != graphdef:
            return False
        if jax.tree.leaves(nnx.state(block, nnx.Not(nnx.Param))):
            return False  # state a block would update (statistics, RNG counters) cannot be scanned read-only
    return True
