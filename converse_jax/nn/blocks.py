"""The reverse-convolution block, and :class:`BlockStack`, repeated blocks stored stacked."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from converse_jax.nn.layers import Converse2D, apply_channels_first, gelu, layer_norm, pointwise
from converse_jax.nn.precision import full_dtype


class ConverseBlock(nnx.Module):
    """``x + B1(x)`` then ``x + B2(x)`` (or ``x + α·B(x)`` with ``alpha=True``).

    B1: LayerNorm -> 1x1 conv C->2C -> GELU -> spatial mixer on 2C channels -> GELU -> 1x1 conv 2C->C.
    B2: LayerNorm -> 1x1 conv C->2C -> GELU -> 1x1 conv 2C->C.

    Called on channels-last input (B, H, W, C); :meth:`channels_first` takes (B, C, H, W), which is what
    the networks use inside. The spatial mixer is a :class:`Converse2D` by default; ``mixer`` builds
    another one (a depthwise convolution in the baselines) as ``mixer(channels, rngs=..., param_dtype=...)``,
    with ``dtype=...`` too when ``dtype`` is set.

    ``dtype`` is the compute dtype of its layers (None: the input's; bfloat16 in mixed precision, see
    :mod:`converse_jax.nn.precision`). The residual stream (the block's input and output) is kept in at least
    float32: a bfloat16 input is cast up before the first sum.

    ``hidden_groups`` (an option of ``nnx.view``, see :func:`inference_view`): with ``g > 1`` and the
    Converse2D mixer, each branch runs over ``g`` groups of its 2C hidden channels in a loop, adding each
    group's share of the last 1x1 convolution to the output: the same function (the sums in another
    order), with one group's hidden planes alive at a time instead of all 2C. For inference on large
    images: about half the memory at the same speed with 4 groups (docs/restore.md); differentiated, the
    loop is slower, so training keeps ``1``.
    """

    def __init__(self, channels: int, kernel_size: int = 3, *, padding: int = 2, padding_mode: str = "circular",
                 eps: float = 1e-5, alpha: bool = False,
                 mixer: Callable[..., nnx.Module] | None = None, dtype: Any = None,
                 param_dtype: Any = jnp.float32, hidden_groups: int = 1, rngs: nnx.Rngs):
        hidden = 2 * channels
        self.hidden_groups = 1
        self.set_view(hidden_groups)  # validated as a view's option is
        kw = dict(param_dtype=param_dtype, rngs=rngs) | ({} if dtype is None else {"dtype": dtype})
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

    def set_view(self, hidden_groups: int | None = None) -> None:
        """Hook of ``nnx.view``: ``hidden_groups`` sets how many groups of hidden channels a call runs over."""
        if hidden_groups is not None:
            if isinstance(hidden_groups, bool) or not isinstance(hidden_groups, int) or hidden_groups < 1:
                raise ValueError(f"hidden_groups must be an integer >= 1, got {hidden_groups!r}")
            self.hidden_groups = hidden_groups

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C)."""
        return jnp.moveaxis(self.channels_first(jnp.moveaxis(x, -1, 1)), 1, -1)

    def channels_first(self, x: jax.Array) -> jax.Array:
        """(B, C, H, W) -> (B, C, H, W)."""
        x = x.astype(full_dtype(x))
        groups = math.gcd(self.hidden_groups, self.pw1.kernel.shape[1])
        if groups > 1 and isinstance(self.mixer, Converse2D):
            x = _grouped_branch(x, self.norm1, self.pw1, self.mixer, self.pw2, self.alpha1, groups)
            return _grouped_branch(x, self.norm2, self.pw3, None, self.pw4, self.alpha2, groups)
        h = self.pw1.channels_first(self.norm1.channels_first(x))
        h = self.pw2.channels_first(gelu(apply_channels_first(self.mixer, gelu(h))))
        x = x + (h if self.alpha1 is None else self.alpha1[...][:, None, None] * h)
        h = self.pw4.channels_first(gelu(self.pw3.channels_first(self.norm2.channels_first(x))))
        return x + (h if self.alpha2 is None else self.alpha2[...][:, None, None] * h)


def _grouped_branch(x: jax.Array, norm: nnx.Module, first: nnx.Module, mixer: nnx.Module | None, last: nnx.Module,
                    alpha: nnx.Param | None, groups: int) -> jax.Array:
    """``x + α·last(GELU(mixer(GELU(first(norm(x))))))`` (no mixer: ``x + α·last(GELU(first(norm(x))))``),
    with the hidden channels in ``groups`` groups, one at a time in a ``fori_loop``: the output starts as
    ``x + α·bias`` (``last``'s bias) and each group adds its share of ``α·last``."""
    n = norm.channels_first(x)
    size = first.kernel.shape[1] // groups
    scale = 1.0 if alpha is None else alpha[...][:, None, None]
    bias = 0.0 if last.bias is None else last.bias[...][:, None, None]
    first_def, first_p = _pure_split(first)
    last_def, last_p = _pure_split(last)
    if "bias" in last_p:
        last_p["bias"] = jnp.zeros_like(last_p["bias"])  # added once, to the start of the sum
    mixer_def, mixer_p = _pure_split(mixer) if mixer is not None else (None, None)

    def group(graphdef: Any, pure: dict, axes: dict[str, int], start: jax.Array) -> nnx.Module:
        """The layer with its parameters cut to this group's ``size`` channels along ``axes``."""
        cut = {k: jax.lax.dynamic_slice_in_dim(pure[k], start, size, axis) for k, axis in axes.items() if k in pure}
        return nnx.merge(graphdef, pure | cut)

    def add_group(i: jax.Array, out: jax.Array) -> jax.Array:
        start = i * size
        h = gelu(group(first_def, first_p, {"kernel": 1, "bias": 0}, start).channels_first(n))
        if mixer is not None:
            h = gelu(group(mixer_def, mixer_p, {"weight": -1, "bias": 0}, start).channels_first(h))
        return out + scale * group(last_def, last_p, {"kernel": 0}, start).channels_first(h)

    return jax.lax.fori_loop(0, groups, add_group, x + scale * bias)


def _pure_split(module: nnx.Module) -> tuple[Any, dict]:
    """``module``'s graph definition and its state as a pure dict."""
    graphdef, state = nnx.split(module)
    return graphdef, nnx.to_pure_dict(state)


# Groups of hidden channels for inference (:func:`inference_view`): on a 2-core CPU, ConverseNet's
# temporaries fall from ~1,860 to ~920 bytes per pixel at the same speed; 8 groups save ~10% more
# memory at 1.3-1.7x the time (docs/restore.md).
INFERENCE_HIDDEN_GROUPS = 4


def inference_view(model: nnx.Module, hidden_groups: int = INFERENCE_HIDDEN_GROUPS) -> nnx.Module:
    """``model`` (a view sharing its variables) with every :class:`ConverseBlock` computing its branches over
    ``hidden_groups`` groups of hidden channels: the inference path of the restorers, about half the
    memory of a whole image at the same speed. Modules without the option ignore it."""
    return nnx.view(model, hidden_groups=hidden_groups, raise_if_not_found=False)


class BlockStack(nnx.Module):
    """``num_blocks`` blocks of one structure, stored stacked: one module ``layers`` whose variables all
    have a leading block axis (flax's scan-over-layers layout), built with ``nnx.split_rngs`` and
    ``nnx.vmap`` so that every block gets its own initialisation.

    Called like one of its blocks: ``stack(x)`` applies the blocks' ``__call__`` in order,
    ``stack.channels_first(h)`` their ``channels_first``. ``scan_blocks`` chooses how:

    - ``True``: one ``jax.lax.scan`` over the stacked variables. XLA compiles the block once and keeps one
      block's temporaries alive at a time, so peak memory does not grow with depth (unrolled, XLA's CPU
      scheduler computes every layer's Converse2D filter up front).
    - ``False``: an unrolled loop over static slices of the stacked variables. Differentiated it is
      faster (a scan copies every block's residuals into stacked buffers), which is why the trainer
      unrolls; for inference both run at the same speed.

    ``nnx.view(model, scan_blocks=...)`` switches every stack of a model on a copy (:meth:`set_view`).
    Variables other than parameters (statistics, counters) that a block updates are written back to
    their slices in both modes.
    """

    def __init__(self, num_blocks: int, make_block: Callable[[nnx.Rngs], nnx.Module], *,
                 scan_blocks: bool = True, rngs: nnx.Rngs):
        """``make_block(rngs)`` builds one block; it is traced once under ``nnx.vmap``, so it must build
        blocks of one structure and use only ``rngs`` for randomness."""
        if isinstance(num_blocks, bool) or not hasattr(num_blocks, "__index__") or num_blocks < 0:
            raise ValueError(f"num_blocks must be an integer >= 0, got {num_blocks!r}")
        num_blocks = int(num_blocks)
        self.num_blocks = num_blocks
        self.scan_blocks = scan_blocks

        @nnx.split_rngs(splits=num_blocks)
        @nnx.vmap(in_axes=0, out_axes=0)
        def build(block_rngs: nnx.Rngs) -> nnx.Module:
            return make_block(block_rngs)

        self.layers = build(rngs)

    def set_view(self, scan_blocks: bool | None = None) -> None:
        """Hook of ``nnx.view``: ``scan_blocks`` selects the scan or the unrolled loop."""
        if scan_blocks is not None:
            self.scan_blocks = scan_blocks

    def __call__(self, x: jax.Array) -> jax.Array:
        """The blocks' ``__call__`` applied in order."""
        return self._run(x, "__call__")

    def channels_first(self, h: jax.Array) -> jax.Array:
        """The blocks' ``channels_first`` applied in order."""
        return self._run(h, "channels_first")

    def block(self, index: int) -> nnx.Module:
        """A copy of block ``index`` (an unstacked module: writes to it do not reach the stack)."""
        if not -self.num_blocks <= index < self.num_blocks:
            raise IndexError(f"block index {index} out of range for {self.num_blocks} blocks")
        graphdef, state = nnx.split(self.layers)
        return nnx.merge(graphdef, _slice(state, index))

    def _run(self, h: jax.Array, method: str) -> jax.Array:
        """The blocks' ``method`` on ``h`` in order; non-parameter state they update is written back."""
        graphdef, params, rest = nnx.split(self.layers, nnx.Param, ...)
        run = self._scan if self.scan_blocks else self._unrolled
        h, rest = run(graphdef, params, rest, h, method)
        if jax.tree.leaves(rest):
            nnx.update(self.layers, rest)
        return h

    @staticmethod
    def _apply(graphdef: Any, params: Any, rest: Any, h: jax.Array, method: str) -> tuple[jax.Array, Any]:
        """One block (its unstacked variables) on ``h``: the output and the block's non-parameter state."""
        block = nnx.merge(graphdef, params, rest)
        return getattr(block, method)(h), nnx.state(block, nnx.Not(nnx.Param))

    def _scan(self, graphdef: Any, params: Any, rest: Any, h: jax.Array, method: str) -> tuple[jax.Array, Any]:
        """One ``lax.scan`` over the stacked variables: ``h`` carried, updated state stacked as outputs."""

        def step(carry: jax.Array, xs: tuple[Any, Any]) -> tuple[jax.Array, Any]:
            return self._apply(graphdef, *xs, carry, method)

        if self.num_blocks:  # the carry takes the blocks' output dtype (mixed precision: bfloat16 in, float32 out)
            h = h.astype(jax.eval_shape(step, h, _slice((params, rest), 0))[0].dtype)
        return jax.lax.scan(step, h, (params, rest))

    def _unrolled(self, graphdef: Any, params: Any, rest: Any, h: jax.Array,
                  method: str) -> tuple[jax.Array, Any]:
        """A Python loop over static slices (``a[i]``) of the stacked variables."""
        updated = []
        for i in range(self.num_blocks):
            h, new = self._apply(graphdef, *_slice((params, rest), i), h, method)
            updated.append(new)
        if not jax.tree.leaves(rest):
            return h, rest
        return h, jax.tree.map(lambda *slices: jnp.stack(slices), *updated)  # only non-parameter state


def _slice(tree: Any, index: int) -> Any:
    """Slice ``index`` of every leaf's leading (block) axis."""
    return jax.tree.map(lambda a: a[index], tree)
