"""Alternative JAX implementations of Converse2D, kept here to compare against the library's.

They compute the same minimiser as docs/operator.md in its stable form, NHWC in and out, and are
written to do as little work as possible:

* the kernel spectrum comes from a small separable DFT (two matrix products with k columns)
  instead of an FFT of the zero-padded kernel: for a k×k kernel that is O(C·H·W·k) work
  instead of an FFT as large as the image;
* padding is a gather with precomputed indices, which XLA fuses with whatever produced the
  input (``jnp.pad``'s circular mode is a concatenation that costs an extra pass);
* s = 1 is one real-FFT filter: ``irfft2(rfft2(Y) · (conj(F_K) + λ) / (|F_K|² + λ))``;
* s > 1 uses that X0 (nearest-neighbour upsampling of Y) has spectrum
  ``tile(F(Y)) · F(box)``, so the bracket of the stable form is ``F(Y) · (1 − (F_K·F_box)⇓s)
  / (|F_K|²⇓s + λ)``: one FFT at the input size and one inverse real FFT at the output size.

``layout="nchw"`` takes and returns NCHW instead, to measure what the NHWC transposes cost.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from converse_jax.ops import pad_planes

_PAD_MODES = {"circular": "wrap", "reflect": "reflect", "replicate": "edge", "constant": "constant"}


def _dft_matrix(n: int, taps: int, shift: int, rows: int) -> np.ndarray:
    """(rows, taps) matrix with entries exp(-2πi·u·(t − shift)/n): the DFT at size n of a
    length-``taps`` filter whose tap t sits at index (t − shift) mod n; first ``rows`` bins."""
    u = np.arange(rows)[:, None]
    t = np.arange(taps)[None, :] - shift
    return np.exp(-2j * np.pi * ((u * t) % n) / n).astype(np.complex64)


def kernel_spectrum(kernel: jax.Array, h: int, w: int, half: bool) -> tuple[jax.Array, jax.Array]:
    """p2o spectrum of per-channel kernels at size (h, w) by separable DFT, as (real, imag).

    ``kernel`` (kh, kw, C) or (B, kh, kw, C); returns two (C, h, w') or (B, C, h, w') float
    arrays with w' = w // 2 + 1 when ``half`` (the rfft bins) else w. Real arithmetic: a small
    product along the kernel rows, then one matrix product with 2·kw columns.
    """
    kh, kw = kernel.shape[-3], kernel.shape[-2]
    eh = _dft_matrix(h, kh, kh // 2, h)
    ew = _dft_matrix(w, kw, kw // 2, w // 2 + 1 if half else w)
    ehr, ehi = jnp.asarray(eh.real), jnp.asarray(eh.imag)
    # [Ar Ai] @ [[Ewr^T, Ewi^T], [-Ewi^T, Ewr^T]] = [Fr Fi]
    mix = jnp.asarray(np.block([[ew.real.T, ew.imag.T], [-ew.imag.T, ew.real.T]]).astype(np.float32))
    k = jnp.moveaxis(kernel, -1, -3)  # (.., C, kh, kw)
    ar = jnp.einsum("ui,...ij->...uj", ehr, k)
    ai = jnp.einsum("ui,...ij->...uj", ehi, k)
    f = jnp.concatenate([ar, ai], axis=-1) @ mix  # (.., C, h, 2w')
    n = mix.shape[1] // 2
    return f[..., :n], f[..., n:]


def _pad_spatial(x: jax.Array, pad: int, mode: str) -> jax.Array:
    """Pad the last two axes of an NCHW array: the library's fused-gather padding (it came from here)."""
    return pad_planes(x, pad, mode)


def _lam(lam: jax.Array | float, batched: bool) -> jax.Array:
    lam = jnp.asarray(lam, jnp.float32)
    if lam.ndim == 0:
        return lam
    if lam.ndim == 1:
        return lam[:, None, None]
    if lam.ndim == 2:
        return lam[:, :, None, None]
    raise ValueError(f"lam must be a scalar, (C,) or (B, C); got shape {lam.shape}")


def converse2d(x: jax.Array, kernel: jax.Array, lam: jax.Array | float, *, scale: int = 1,
               padding: int = 0, padding_mode: str = "circular", layout: str = "nhwc") -> jax.Array:
    """Converse2D, stable form, fewest transforms. ``x`` NHWC (or NCHW with ``layout="nchw"``)."""
    if padding_mode not in _PAD_MODES:
        raise ValueError(f"padding_mode must be one of {sorted(_PAD_MODES)}, got {padding_mode!r}")
    if layout == "nhwc":
        x = jnp.transpose(x, (0, 3, 1, 2))
    elif layout != "nchw":
        raise ValueError(f"layout must be 'nhwc' or 'nchw', got {layout!r}")
    s = int(scale)
    p = int(padding)
    if p > 0:
        if padding_mode == "reflect" and p >= min(x.shape[-2:]):
            raise ValueError(f"reflect padding {p} needs an input larger than {p} on both sides, got "
                             f"{x.shape[-2]}x{x.shape[-1]}")
        x = _pad_spatial(x, p, padding_mode)
    h, w = x.shape[-2:]
    lam_b = _lam(lam, kernel.ndim == 4)
    if s == 1:
        fr, fi = kernel_spectrum(kernel, h, w, half=True)
        filt = jax.lax.complex(fr + lam_b, -fi) / (fr * fr + fi * fi + lam_b)
        out = jnp.fft.irfft2(jnp.fft.rfft2(x) * filt, s=(h, w))
    else:
        hs, ws = h * s, w * s
        fk = jax.lax.complex(*kernel_spectrum(kernel, hs, ws, half=False))  # (.., C, hs, ws)
        box = jnp.asarray(_dft_matrix(hs, s, 0, hs)).sum(1)[:, None] * \
            jnp.asarray(_dft_matrix(ws, s, 0, ws)).sum(1)[None, :]
        lead = fk.shape[:-2]

        def down(a: jax.Array) -> jax.Array:  # ⇓s: mean of the s×s blocks of size h×w
            return a.reshape(lead + (s, h, s, w)).mean(axis=(-4, -2))

        num = 1.0 - down(fk * box)
        den = down(jnp.real(fk) ** 2 + jnp.imag(fk) ** 2) + lam_b
        q = jnp.fft.fft2(x) * (num / den)  # (B, C, h, w)
        q = jnp.tile(q, (1, 1, s, s))[..., : ws // 2 + 1]
        x0 = jnp.repeat(jnp.repeat(x, s, axis=-2), s, axis=-1)
        out = x0 + jnp.fft.irfft2(jnp.conj(fk[..., : ws // 2 + 1]) * q, s=(hs, ws))
    if p > 0:
        c = p * s
        out = out[..., c:-c, c:-c]
    if layout == "nhwc":
        out = jnp.transpose(out, (0, 2, 3, 1))
    return out


def lam_from_bias(bias: jax.Array, eps: float) -> jax.Array:
    """λ = sigmoid(bias − 9) + eps."""
    return jax.nn.sigmoid(bias - 9.0) + eps

