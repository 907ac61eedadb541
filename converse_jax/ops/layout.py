"""Padding of planes, and channels-last arrays to the channels-first planes of the FFT solver and back.

XLA's FFT transforms the two minor axes, so the channels-last entry point of Converse2D hands the
solver padded (B, C, H, W) planes and takes (B, C, H·s, W·s) planes back. XLA's CPU backend emits a
transpose as one loop over the output in its memory order. Towards channels-last (writing (B, H, W, C))
that order reads every plane a short row at a time, which caches serve well. Towards channels-first it
writes one whole plane after another, each reading one channel of every pixel of the input: once the
input outgrows the cache, each of its cache lines is fetched again for every channel it holds.

:func:`padded_planes` therefore builds the padded channels-first planes one padded row at a time (a
loop whose step reads one row of pixels, all channels, and writes that row of every plane) when the
input is larger than :data:`ROW_LOOP_MIN_BYTES`; below that, and on other
platforms (whose compilers tile transposes) it is a plain transpose and ``jnp.pad``. Values are only
copied: the result equals ``jnp.moveaxis`` followed by :func:`pad_planes` exactly, in every dtype.
:func:`cropped_channels_last`, the way back, is a plain crop and transpose; its reverse-mode derivative
goes towards channels-first, so for large planes on CPU it is differentiated through a tangent map whose
transpose (what reverse mode runs) again works one row at a time.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# The four padding modes (PyTorch's names) and the ``jnp.pad`` mode of each: the one table of the
# project (the convolution layers of converse_jax.nn pad with it too).
JNP_PAD_MODES = {"circular": "wrap", "reflect": "reflect", "replicate": "edge", "constant": "constant"}
PADDING_MODES = tuple(JNP_PAD_MODES)


def check_padding_mode(padding_mode: Any) -> str:
    """``padding_mode`` if it is one of :data:`PADDING_MODES`, else a ValueError naming them."""
    if padding_mode not in JNP_PAD_MODES:
        raise ValueError(f"padding_mode must be one of {', '.join(PADDING_MODES)}; got {padding_mode!r}")
    return padding_mode


def pad_index(n: int, pad: int, mode: str) -> np.ndarray:
    """Source index of each of the ``n + 2·pad`` samples of an axis padded by ``pad`` on both sides
    (``circular``, ``reflect`` without repeating the edge, ``replicate``)."""
    i = np.arange(-pad, n + pad)
    if mode == "circular":
        return i % n
    if mode == "replicate":
        return np.clip(i, 0, n - 1)
    if mode == "reflect":
        if n == 1:
            return np.zeros_like(i)
        period = 2 * (n - 1)
        j = np.abs(i) % period
        return np.where(j >= n, period - j, j)
    raise ValueError(f"pad_index: no index form for padding mode {mode!r}")


def _pad_reference(x: Array, pad: int, mode: str, channels_last: bool = False) -> Array:
    widths = [(0, 0)] * x.ndim
    axes = (1, 2) if channels_last else (x.ndim - 2, x.ndim - 1)
    for a in axes:
        widths[a] = (pad, pad)
    return jnp.pad(x, widths, mode=JNP_PAD_MODES[mode])


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _pad_gather(x: Array, pad: int, mode: str, channels_last: bool = False) -> Array:
    # One gather with static indices: XLA fuses it with the producer of ``x``, where jnp.pad's
    # circular mode is a concatenation that costs an extra pass over the tensor.
    if channels_last:
        ih = pad_index(x.shape[1], pad, mode)
        iw = pad_index(x.shape[2], pad, mode)
        return x[:, ih[:, None], iw[None, :], :]
    ih = pad_index(x.shape[-2], pad, mode)
    iw = pad_index(x.shape[-1], pad, mode)
    return x[..., ih[:, None], iw[None, :]]


def _pad_gather_fwd(x: Array, pad: int, mode: str, channels_last: bool) -> tuple[Array, tuple[int, ...]]:
    return _pad_gather(x, pad, mode, channels_last), x.shape


def _pad_gather_bwd(pad: int, mode: str, channels_last: bool, shape: tuple[int, ...], g: Array) -> tuple[Array]:
    # The gather's own transpose is a scatter-add, slow on XLA's CPU backend; jnp.pad's is slices and adds.
    _, vjp = jax.vjp(lambda a: _pad_reference(a, pad, mode, channels_last), jnp.zeros(shape, g.dtype))
    return vjp(g)


_pad_gather.defvjp(_pad_gather_fwd, _pad_gather_bwd)


def pad_planes(x: Array, padding: int, padding_mode: str, *, channels_last: bool = False) -> Array:
    """Pad the spatial axes of ``x`` by ``padding`` on each side (``PADDING_MODES``): the last two axes,
    or axes 1 and 2 of a (B, H, W, C) array when ``channels_last``."""
    if padding == 0:
        return x
    if padding_mode == "constant":
        return _pad_reference(x, padding, padding_mode, channels_last)
    return _pad_gather(x, padding, padding_mode, channels_last)


# Inputs smaller than this stay in the caches through a plain transpose, where the loop's per-row steps
# would only add overhead: the size of a CPU core's second-level cache, in bytes.
ROW_LOOP_MIN_BYTES = 1 << 20


def _source_index(n: int, pad: int, mode: str) -> np.ndarray:
    """Source index of each sample of an axis of length ``n`` padded by ``pad`` on both sides; ``n``
    (out of range: a zero) for the padded samples of ``constant`` mode."""
    if mode == "constant":
        i = np.arange(-pad, n + pad)
        return np.where((i < 0) | (i >= n), n, i).astype(np.int32)
    return pad_index(n, pad, mode).astype(np.int32)


def _planes_by_rows(x: Array, pad: int, mode: str) -> Array:
    """(B, H, W, C) -> (B, C, H + 2·pad, W + 2·pad): one padded row of every plane per loop step."""
    batch, height, width, channels = x.shape
    rows = jnp.asarray(_source_index(height, pad, mode))
    cols = jnp.asarray(_source_index(width, pad, mode))
    take = partial(jnp.take, mode="fill", fill_value=0) if mode == "constant" else partial(jnp.take, mode="clip")

    def step(i: Array, planes: Array) -> Array:
        row = take(take(x, jax.lax.dynamic_slice_in_dim(rows, i, 1), axis=1), cols, axis=2)  # (B, 1, W', C)
        return jax.lax.dynamic_update_slice_in_dim(planes, jnp.transpose(row, (0, 3, 1, 2)), i, axis=2)

    # The initial value only fixes shape and dtype (every row is overwritten). It is derived from x so
    # that XLA does not share one buffer of zeros between two such loops and copy it for each.
    init = jnp.broadcast_to(x[0, 0, 0, 0] * 0, (batch, channels, rows.shape[0], cols.shape[0]))
    return jax.lax.fori_loop(0, rows.shape[0], step, init)


def _planes_reference(x: Array, pad: int, mode: str) -> Array:
    # Padded channels-last, then transposed: transposed for reverse mode, the cotangent is transposed
    # (the cheap way) and then summed over the padding in the channels-last layout of the result.
    return jnp.moveaxis(_pad_reference(x, pad, mode, channels_last=True) if pad else x, -1, 1)


@partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def padded_planes(x: Array, pad: int, mode: str) -> Array:
    """Channels-last ``x`` (B, H, W, C) as channels-first planes padded by ``pad`` on each side in
    ``mode`` (one of ``PADDING_MODES``): (B, C, H + 2·pad, W + 2·pad).

    Differentiated (either mode) as the plain transpose and ``jnp.pad``, which it equals: their
    reverse-mode derivative runs towards channels-last, the cheap direction.
    """
    if x.size * x.dtype.itemsize < ROW_LOOP_MIN_BYTES:
        return _planes_reference(x, pad, mode)
    return jax.lax.platform_dependent(x, cpu=lambda a: _planes_by_rows(a, pad, mode),
                                      default=lambda a: _planes_reference(a, pad, mode))


@padded_planes.defjvp
def _padded_planes_jvp(pad: int, mode: str, primals: tuple[Array], tangents: tuple[Array]):
    (x,), (dx,) = primals, tangents
    return padded_planes(x, pad, mode), _planes_reference(dx, pad, mode)


# Reverse mode transposes the output of :func:`cropped_channels_last` back towards channels-first. One
# whole-array transpose does that in a single pass while the cache lines that one plane's sweep touches (one
# per pixel of a sample: a sixteenth of the sample's bytes with 64-byte lines, float32 and C >= 16) stay
# in a core's caches; from this many bytes of planes per sample (about a megabyte of such lines at C = 128)
# a loop over rows is faster.
ROW_SCAN_MIN_BYTES = 16 << 20


def _crop_transpose(planes: Array, crop: int) -> Array:
    if crop:
        planes = planes[..., crop:planes.shape[-2] - crop, crop:planes.shape[-1] - crop]
    return jnp.moveaxis(planes, 1, -1)


def _crop_transpose_by_rows(planes: Array, crop: int) -> Array:
    """:func:`_crop_transpose` as a scan over the output rows of every sample, each step reading one row of
    all the planes of a sample (B·H steps). Only a tangent map: what reverse mode runs is its transpose,
    a loop that adds one channels-last row, transposed, into one row of the zero-initialised planes
    (which XLA performs in place), so every step stays within the caches."""
    batch, channels, height_p, width_p = planes.shape
    height, width = height_p - 2 * crop, width_p - 2 * crop

    def step(carry: Array, k: Array) -> tuple[Array, Array]:
        row = jax.lax.dynamic_slice(carry, (k // height, 0, k % height + crop, 0), (1, channels, 1, width_p))
        return carry, jnp.transpose(row[0, :, 0, crop:crop + width])  # (W, C)

    _, rows = jax.lax.scan(step, planes, jnp.arange(batch * height))
    return rows.reshape(batch, height, width, channels)


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def _crop_transpose_rows_derivative(planes: Array, crop: int) -> Array:
    return _crop_transpose(planes, crop)


@_crop_transpose_rows_derivative.defjvp
def _crop_transpose_rows_jvp(crop: int, primals: tuple[Array], tangents: tuple[Array]):
    (planes,), (dplanes,) = primals, tangents
    tangent = jax.lax.platform_dependent(dplanes, cpu=lambda a: _crop_transpose_by_rows(a, crop),
                                         default=lambda a: _crop_transpose(a, crop))
    return _crop_transpose(planes, crop), tangent


def cropped_channels_last(planes: Array, crop: int) -> Array:
    """Channels-first ``planes`` (B, C, H, W) cropped by ``crop`` on each side, channels-last:
    (B, H - 2·crop, W - 2·crop, C): a plain crop and transpose, towards channels-last (the cheap direction).

    Its reverse-mode derivative runs the costly way. For more than :data:`ROW_SCAN_MIN_BYTES` of planes
    per sample, on CPU, it is differentiated (either mode) through :func:`_crop_transpose_by_rows`, equal
    values computed by a scan whose transpose, derived by JAX, builds the zero-padded channels-first
    cotangent one row at a time. A custom VJP (or ``linear_call``, which vmap does not support) would
    take forward mode or batching away from the public operator; a custom JVP keeps jvp, grad and vmap.
    """
    if int(np.prod(planes.shape[1:])) * planes.dtype.itemsize < ROW_SCAN_MIN_BYTES:
        return _crop_transpose(planes, crop)
    return _crop_transpose_rows_derivative(planes, crop)
