"""Converse2D without FFTs when the kernel fits in one scale cell (kh <= s and kw <= s).

With A = (circular convolution by the centred kernel) followed by s-fold decimation, the solver's
normal equations involve A·Aᵀ, which is convolution on the input grid by the kernel's
autocorrelation sampled every s taps. The autocorrelation is zero beyond lag k - 1 < s, so the only
sample left is the zero lag Σk²: A·Aᵀ = Σk²·I. The Woodbury identity then gives the exact solution

    x* = x0 + Aᵀ(y - A·x0) / (Σk² + λ),

a handful of elementwise passes over the planes (docs/operator.md derives it). Both A and Aᵀ split
by output phase: write an output index as n = s·p + q (p on the input grid, q in [0, s)); the kernel
taps that link input sample i to output sample n are ``W[j, q] = K[s·j - q + ⌊k/2⌋]`` with
j = i - p in {0, 1} (zero where the index leaves the kernel). Then

    (A·x0)[i] = Σ_j (Σ_q W[j, q]) · y[i - j],        x*[s·p + q] = y[p] + Σ_j W[j, q]·r[p + j] / (Σk² + λ),

with r = y - A·x0, separably in rows and columns. Either layout is handled natively (the phase axes
sit next to the spatial ones), so the channels-last entry needs no transposes here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def fits_one_cell(kh: int, kw: int, scale: int) -> bool:
    """Whether the exact FFT-free solver applies: the kernel fits in one s×s cell (and s > 1)."""
    return scale > 1 and kh <= scale and kw <= scale


def _phase_taps(k: int, scale: int) -> np.ndarray:
    """(2, s, k) one-hot: entry [j, q, a] is 1 where a = s·j - q + ⌊k/2⌋ (the tap linking phase q to j)."""
    a = scale * np.arange(2)[:, None] - np.arange(scale)[None, :] + k // 2
    return (a[..., None] == np.arange(k)).astype(np.float64)


def phase_weights(kernel: Array, scale: int) -> Array:
    """``W`` (..., 2, 2, s, s) of (..., kh, kw) kernels, separably in rows and columns:
    W[jh, jw, qh, qw] = K[s·jh - qh + ⌊kh/2⌋, s·jw - qw + ⌊kw/2⌋] (zero outside the kernel)."""
    kh, kw = kernel.shape[-2:]
    sh = jnp.asarray(_phase_taps(kh, scale), kernel.dtype)
    sw = jnp.asarray(_phase_taps(kw, scale), kernel.dtype)
    return jnp.einsum("jqa,...ab,kpb->...jkqp", sh, kernel, sw)


def solve_one_cell(y: Array, kernel: Array, lam: Array, scale: int, *, channels_last: bool) -> Array:
    """The Converse2D minimiser for kernels with kh, kw <= ``scale``, with no FFT.

    ``y``: (B, C, H, W) or, with ``channels_last``, (B, H, W, C), already padded. ``kernel``: (C, kh, kw)
    or per sample (B, C, kh, kw); ``lam``: (C,) or (B, C). Returns the (B, C, H·s, W·s) or
    (B, H·s, W·s, C) solution on the circular grid (the caller crops any padding).
    """
    kh, kw = kernel.shape[-2:]
    if not fits_one_cell(kh, kw, scale):
        raise ValueError(f"solve_one_cell needs 1 < scale and a kernel within one scale cell; got kernel "
                         f"{kh}x{kw} with scale {scale}")
    w = phase_weights(kernel, scale)  # (..., 2, 2, s, s)
    inv = 1.0 / (jnp.sum(kernel * kernel, axis=(-2, -1)) + lam)  # (C,) or (B, C)
    coef = w * inv[..., None, None, None, None]
    wsum = jnp.sum(w, axis=(-2, -1))  # (..., 2, 2): A·x0 from y directly
    # A leading batch axis of size 1 where kernel and lam are shared by the batch.
    coef = coef if coef.ndim == 6 else coef[None]  # (B, C, 2, 2, s, s)
    wsum = wsum if wsum.ndim == 4 else wsum[None]  # (B, C, 2, 2)
    if not channels_last:
        return _assemble_channels_first(y, wsum, coef, scale)
    # Channels-last: per shift j = (jh, jw), a per-channel weight for A·x0 and per-phase weights for the
    # solution, broadcast against the planes (B, H, W, C) and the output viewed as (B, H, s, W, s, C).
    coef = jnp.moveaxis(coef, 1, -1)  # (B, 2, 2, s, s, C)
    shifts = [(jh, jw) for jh in (0, 1) for jw in (0, 1)]
    r = y - sum(wsum[:, None, None, :, jh, jw] * jnp.roll(y, (jh, jw), axis=(1, 2)) for jh, jw in shifts)
    out = y[:, :, None, :, None, :] + sum(
        coef[:, jh, jw][:, None, :, None, :, :] * jnp.roll(r, (-jh, -jw), axis=(1, 2))[:, :, None, :, None, :]
        for jh, jw in shifts)
    b, height, width, c = y.shape
    return out.reshape(b, height * scale, width * scale, c)


def _assemble_channels_first(y: Array, wsum: Array, coef: Array, scale: int) -> Array:
    """The solution on (B, C, H, W) planes: each of the s×s output phases as its own plane, interleaved by
    stacking along new minor axes (XLA handles this, and its gradient, better than broadcasting into a
    (B, C, H, s, W, s) array whose minor axis is s)."""
    shifts = [(jh, jw) for jh in (0, 1) for jw in (0, 1)]
    r = y - sum(wsum[:, :, jh, jw, None, None] * jnp.roll(y, (jh, jw), axis=(2, 3)) for jh, jw in shifts)
    rolled = {j: jnp.roll(r, (-j[0], -j[1]), axis=(2, 3)) for j in shifts}
    b, c, height, width = y.shape
    rows = []
    for qh in range(scale):
        cols = [y + sum(coef[:, :, jh, jw, qh, qw, None, None] * rolled[(jh, jw)] for jh, jw in shifts)
                for qw in range(scale)]
        rows.append(jnp.stack(cols, axis=-1).reshape(b, c, height, width * scale))
    return jnp.stack(rows, axis=-2).reshape(b, c, height * scale, width * scale)

