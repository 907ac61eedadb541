"""The Converse2D operator ("reverse convolution") as pure JAX functions.

For one channel plane ``y`` (H, W), a kernel ``k`` and ``lam > 0``, Converse2D returns the minimiser

    x* = argmin_x ||y - (x ⊛ k)↓s||² + lam ||x - x0||²,     x0 = nearest-upsampling of y by s,

where ⊛ is 2-D circular convolution and ↓s keeps every s-th sample from index 0: the problem the
paper poses for its depthwise reverse convolution (Huang et al., ICCV 2025, arXiv 2508.09824).
docs/operator.md derives what follows.

The paper writes the closed form with a final division by ``lam`` (≈1e-4), which costs about four
significant digits. We use an algebraically equal form without it. With ``F_K`` the kernel's transfer
function at the output size (see :func:`p2o`), ``B`` the transfer function of the s×s box that turns
zero-insertion into nearest upsampling (so ``F(x0) = tile_s(F(y)) · B``), ``fold_s`` the average of the
s×s blocks of a spectrum (the spectrum of s-fold downsampling) and ``tile_s`` its adjoint (s×s tiling):

    F(x*) = tile_s(F(y)) · G,
    G     = B + conj(F_K) · tile_s[ (1 - fold_s(F_K · B)) / (fold_s(|F_K|²) + lam) ].

``G`` depends only on the kernel and ``lam``: it is computed once per channel and shared by the batch
(or once per sample when kernels are per sample). For s = 1 it reduces to the pointwise filter
``G = (conj(F_K) + lam) / (|F_K|² + lam)``. The output is real, so ``G`` is only evaluated on the
half spectrum and the inverse transform is a real FFT.

Public entry point: :func:`converse2d` (NHWC). The solver itself is written for one plane
(:func:`converse_filter`, :func:`filtered_spectrum`) and lifted over channels and batch with
``jax.vmap`` in :func:`converse2d_channels_first`, the layout the networks keep inside (the FFTs then
run over the two minor axes, with no transposes). There the inverse FFT runs once over all planes
(:func:`irfft2_planes`), which on CPU inverts two real planes per complex FFT. The channels-last entry
hands the FFT solver its padded planes through :mod:`converse_jax.ops.layout` (row by row on CPU, where a
whole-array transpose towards channels-first is slow). Kernels that fit in one
scale cell (kh, kw <= s > 1) skip all of this: :mod:`converse_jax.ops.one_cell` solves them exactly with
a few spatial passes, in either layout, so the channels-last entry transposes nothing on that path.
"""

from __future__ import annotations

import numbers
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from converse_jax.ops.layout import check_padding_mode, cropped_channels_last, pad_planes, padded_planes
from converse_jax.ops.one_cell import fits_one_cell, solve_one_cell

Array = jax.Array


def lambda_from_bias(bias: Any, eps: float) -> Array:
    """The regularisation weight of a Converse2D layer: ``sigmoid(bias - 9) + eps``."""
    bias = jnp.asarray(bias)
    return jax.nn.sigmoid(bias - 9.0) + jnp.asarray(eps, dtype=bias.dtype)


def p2o(psf: Array, shape: tuple[int, int], *, real: bool = False) -> Array:
    """Optical transfer function of a point-spread function.

    Zero-pads ``psf`` (kh, kw) to ``shape`` at the top-left, rolls it by (-⌊kh/2⌋, -⌊kw/2⌋) so that its
    centre sits at the origin, and returns its 2-D FFT (complex, ``shape``), or the half spectrum
    ``rfft2`` (``shape[0], shape[1] // 2 + 1``) when ``real`` is true. Leading axes of ``psf`` are
    batch axes.
    """
    psf = jnp.asarray(psf)
    if psf.ndim < 2:
        raise ValueError(f"p2o: psf must have at least 2 dimensions (..., kh, kw), got shape {psf.shape}")
    kh, kw = psf.shape[-2:]
    height, width = int(shape[0]), int(shape[1])
    if kh > height or kw > width:
        raise ValueError(f"p2o: psf of size {kh}x{kw} does not fit in the output size {height}x{width}; "
                         "use a smaller kernel or a larger input/padding")
    pad = [(0, 0)] * (psf.ndim - 2) + [(0, height - kh), (0, width - kw)]
    otf = jnp.roll(jnp.pad(psf, pad), (-(kh // 2), -(kw // 2)), axis=(-2, -1))
    return jnp.fft.rfft2(otf) if real else jnp.fft.fft2(otf)


def _dft_matrix(n: int, taps: int, rows: int, dtype: Any) -> np.ndarray:
    """(rows, taps): exp(-2πi·u·(t − ⌊taps/2⌋)/n), the size-n DFT (first ``rows`` bins) of a centred filter."""
    u = np.arange(rows)[:, None]
    t = np.arange(taps)[None, :] - taps // 2
    return np.exp(-2j * np.pi * ((u * t) % n) / n).astype(dtype)


def kernel_spectrum(kernel: Array, shape: tuple[int, int], *, real: bool = False) -> Array:
    """Same values as :func:`p2o` for one (kh, kw) kernel, computed as two small DFT matrix products.

    An FFT of the zero-padded kernel costs as much as an FFT of the image; the kernel has only kh·kw
    non-zero taps, so ``E_h · K · E_wᵀ`` (k columns) is much cheaper.
    """
    height, width = int(shape[0]), int(shape[1])
    kh, kw = kernel.shape
    cdtype = jnp.result_type(kernel.dtype, jnp.complex64)
    rdtype = jnp.finfo(cdtype).dtype
    eh = _dft_matrix(height, kh, height, cdtype)
    ew = _dft_matrix(width, kw, width // 2 + 1 if real else width, cdtype)
    # In real arithmetic: A = E_h·K (two real products), then [A_r A_i] @ [[E_wr, E_wi], [-E_wi, E_wr]]ᵀ.
    kernel = kernel.astype(rdtype)
    a = jnp.concatenate([jnp.asarray(eh.real, rdtype) @ kernel, jnp.asarray(eh.imag, rdtype) @ kernel], axis=-1)
    mix = np.block([[ew.real.T, ew.imag.T], [-ew.imag.T, ew.real.T]])
    f = a @ jnp.asarray(mix, rdtype)
    n = ew.shape[0]
    return jax.lax.complex(f[..., :n], f[..., n:])


def _box_response(length: int, scale: int, dtype: Any) -> Array:
    """DFT (length ``length``) of ``scale`` ones at indices 0..scale-1: nearest-upsampling's box."""
    n = jnp.arange(length, dtype=dtype)
    phase = -2.0 * jnp.pi * n[:, None] * jnp.arange(scale, dtype=dtype)[None, :] / length
    return jnp.exp(1j * phase).sum(axis=1)


def converse_filter(kernel: Array, lam: Array, out_shape: tuple[int, int], scale: int) -> Array:
    """The half-spectrum filter ``G`` of one channel: (H·s, W·s // 2 + 1), complex.

    ``kernel``: (kh, kw) real; ``lam``: scalar > 0; ``out_shape``: the output plane size (H·s, W·s).
    """
    real_dtype = jnp.result_type(kernel.dtype, lam.dtype)
    kernel = kernel.astype(real_dtype)
    lam = lam.astype(real_dtype)
    hs, ws = out_shape
    half = ws // 2 + 1
    # Complex / real is written as a product with the real reciprocal: jnp would promote the
    # denominator to complex and run a full complex division.
    if scale == 1:
        fk = kernel_spectrum(kernel, out_shape, real=True)
        inv = 1.0 / (fk.real**2 + fk.imag**2 + lam)
        return jax.lax.complex((fk.real + lam) * inv, -fk.imag * inv)
    height, width = hs // scale, ws // scale
    # fold_s(|F_K|²) is the DFT, at the input size, of the kernel's autocorrelation sampled every s
    # taps (folding a spectrum is decimating its signal), a few taps wide: small real matrix products
    # instead of passes over the (H·s, W·s) grid.
    inv = 1.0 / (_folded_power(kernel, height, width, scale) + lam)  # (H, W)
    # fold_s(F_K · B) is separable: with P_h = fold of the rows of E_h weighted by the box response,
    # it is P_h · K · P_wᵀ, a product of small matrices at the input size.
    cdtype = jnp.result_type(real_dtype, jnp.complex64)
    ph = jnp.asarray(_folded_box_dft(hs, kernel.shape[0], scale), cdtype)
    pw = jnp.asarray(_folded_box_dft(ws, kernel.shape[1], scale), cdtype)
    num = 1.0 - ph @ kernel.astype(cdtype) @ pw.T
    q = jax.lax.complex(num.real * inv, num.imag * inv)  # (H, W)
    fk = kernel_spectrum(kernel, out_shape, real=True)  # the half spectrum: (H·s, half)
    box = (_box_response(hs, scale, real_dtype)[:, None] * _box_response(ws, scale, real_dtype)[None, :half])
    return box + jnp.conj(fk) * _tile_to(q, hs, half)


def _folded_power(kernel: Array, height: int, width: int, scale: int) -> Array:
    """fold_s(|F_K|²) of a (kh, kw) kernel on the (height, width) grid (the output size divided by s), real.

    |F_K|² is the DFT of the autocorrelation r[d] = Σ_t K[t]·K[t + d] (|d| < k), and averaging the s×s
    blocks of a spectrum keeps the samples of its signal at multiples of s:
    fold_s(|F_K|²)[u, v] = Σ_{m, n} r[s·m, s·n]·exp(-2πi(u·m/height + v·n/width)), real since r is even.
    """
    kh, kw = kernel.shape
    mh, mw = (kh - 1) // scale, (kw - 1) // scale
    # shift[m, a, b] = 1 where b - a = s·m: (shift_h · K)[m, b, :] = K[b - s·m, :] (zero outside).
    sh = _shift_matrices(kh, mh, scale, kernel.dtype)
    sw = _shift_matrices(kw, mw, scale, kernel.dtype)
    r = jnp.einsum("mab,ac,ncd,bd->mn", sh, kernel, sw, kernel)  # r[s·m, s·n], m in [-mh, mh]
    ch_r, ch_i = _centred_dft_real(height, mh, kernel.dtype)
    cw_r, cw_i = _centred_dft_real(width, mw, kernel.dtype)
    return ch_r @ r @ cw_r.T - ch_i @ r @ cw_i.T


def _shift_matrices(k: int, m: int, scale: int, dtype: Any) -> Array:
    """(2m+1, k, k): entry [j, a, b] is 1 where b - a = scale·(j - m)."""
    d = scale * (np.arange(2 * m + 1) - m)
    a = np.arange(k)
    return jnp.asarray((a[None, None, :] - a[None, :, None]) == d[:, None, None], dtype)


def _centred_dft_real(n: int, m: int, dtype: Any) -> tuple[Array, Array]:
    """Real and imaginary parts of exp(-2πi·u·j/n), u in [0, n), j in [-m, m]: two (n, 2m+1) arrays."""
    u = np.arange(n)[:, None]
    j = np.arange(-m, m + 1)[None, :]
    phase = -2.0 * np.pi * ((u * j) % n) / n
    return jnp.asarray(np.cos(phase), dtype), jnp.asarray(np.sin(phase), dtype)


def _folded_box_dft(n: int, taps: int, scale: int) -> np.ndarray:
    """(n / scale, taps): (1/s)·Σ_i E[u + i·n/s, t]·box[u + i·n/s], the box-weighted fold of the rows of the
    size-n DFT matrix of a centred filter (see :func:`_dft_matrix`); computed in float64."""
    m = n // scale
    e = _dft_matrix(n, taps, n, np.complex128)
    box = np.exp(-2j * np.pi * np.arange(n)[:, None] * np.arange(scale)[None, :] / n).sum(axis=1)
    return (e * box[:, None]).reshape(scale, m, taps).mean(axis=0)


def _tile_to(a: Array, rows: int, cols: int) -> Array:
    """``a`` (h, w) repeated periodically to (rows, cols): out[i, j] = a[i mod h, j mod w] (one gather,
    which XLA fuses with its consumer)."""
    h, w = a.shape
    return a[(np.arange(rows) % h)[:, None], (np.arange(cols) % w)[None, :]]


def filtered_spectrum(y: Array, g: Array, scale: int) -> Array:
    """The half spectrum of one solved plane: ``y`` (H, W) real and its filter ``g`` (H·s, W·s // 2 + 1)
    -> ``tile_s(rfft2(y)) · g``, (H·s, W·s // 2 + 1) complex; :func:`irfft2_planes` inverts it."""
    height, width = y.shape
    hs, ws = height * scale, width * scale
    fy = jnp.fft.rfft2(y)  # (H, W // 2 + 1)
    if scale == 1:
        return fy * g
    half = ws // 2 + 1
    # tile_s(F(y)) on the half spectrum: F(y)[u mod H, v mod W]. The full spectrum comes from the real
    # FFT by Hermitian symmetry, F(y)[u, v] = conj F(y)[-u, W - v], and the tiling is a broadcast over
    # the s row blocks and a concatenation of column blocks. All are slices and concatenations, whose
    # transposes (in the gradient) are cheap, unlike a gather's scatter-add.
    mirrored = jnp.flip(fy[:, 1:width - fy.shape[1] + 1], axis=(0, 1))  # rows H-1..0, columns (W-1)//2..1
    mirrored = jnp.concatenate([mirrored[-1:], mirrored[:-1]], axis=0)  # rows 0, H-1, ..., 1
    full = jnp.concatenate([fy, jnp.conj(mirrored)], axis=1)  # (H, W)
    reps, rest = divmod(half, width)
    cols = jnp.concatenate([full] * reps + ([full[:, :rest]] if rest else []), axis=1)  # (H, half)
    return (g.reshape(scale, height, half) * cols[None]).reshape(hs, half)


def _hermitian_full(z: Array, width: int) -> Array:
    """Full spectra (..., H, width) of real planes from their half spectra ``z`` (..., H, width // 2 + 1):
    Z[u, v] = conj Z[-u, width - v] for the columns the half leaves out. One gather per element (static
    indices; it fuses with its consumer) and a sign flip of the imaginary part. Only for forward use:
    :func:`filtered_spectrum`, which is differentiated, extends its spectrum with slices instead, because
    a gather's transpose is a scatter-add."""
    height, half = z.shape[-2:]
    u = np.arange(height)[:, None]
    v = np.arange(width)[None, :]
    direct = v < half
    index = np.where(direct, u * half + v, (-u % height) * half + (width - v) % width)
    picked = z.reshape(z.shape[:-2] + (height * half,))[..., index]
    sign = np.where(direct, 1.0, -1.0).astype(jnp.finfo(z.dtype).dtype)
    return jax.lax.complex(picked.real, picked.imag * sign)


def _irfft2_paired(z: Array, shape: tuple[int, int]) -> Array:
    """:func:`jnp.fft.irfft2` of a stack of half spectra, two planes per complex inverse FFT.

    With ``a``, ``b`` real, ifft2(F(a) + i·F(b)) = a + i·b. XLA's CPU FFT runs a complex inverse
    transform of one (H, W) plane in about the time its real inverse takes for one: pairing the planes
    halves the work. The half spectra must be those of real planes (Hermitian on their first and, for
    even W, last column), as :func:`filtered_spectrum` makes them.
    """
    lead, (height, half) = z.shape[:-2], z.shape[-2:]
    planes = z.reshape((-1, height, half))
    n = planes.shape[0] // 2
    if n == 0:
        return jnp.fft.irfft2(z, s=shape)
    first = _hermitian_full(planes[:n], shape[1])
    second = _hermitian_full(planes[n:2 * n], shape[1])
    both = jnp.fft.ifft2(first + 1j * second)
    parts = [both.real, both.imag]
    if planes.shape[0] % 2:
        parts.append(jnp.fft.irfft2(planes[2 * n:], s=shape))
    return jnp.concatenate(parts, axis=0).reshape(lead + tuple(shape))


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def irfft2_planes(z: Array, shape: tuple[int, int]) -> Array:
    """The real inverse FFT of a stack of half spectra of real planes, (..., H, W // 2 + 1) -> (..., H, W).

    On CPU, planes are inverted in pairs (:func:`_irfft2_paired`, half the FFT work); elsewhere this is
    ``jnp.fft.irfft2``. Differentiated (either mode) as ``jnp.fft.irfft2``, which it equals.
    """
    shape = tuple(shape)
    return jax.lax.platform_dependent(z, cpu=lambda a: _irfft2_paired(a, shape),
                                      default=lambda a: jnp.fft.irfft2(a, s=shape))


@irfft2_planes.defjvp
def _irfft2_planes_jvp(shape: tuple[int, int], primals: tuple[Array], tangents: tuple[Array]):
    (z,), (dz,) = primals, tangents
    return irfft2_planes(z, shape), jnp.fft.irfft2(dz, s=tuple(shape))


def _check_scale(scale: Any) -> int:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Integral):
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    if scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale}")
    return int(scale)


def _check_padding(padding: Any, padding_mode: str, height: int, width: int) -> int:
    if isinstance(padding, bool) or not isinstance(padding, numbers.Integral):
        raise ValueError(f"padding must be a non-negative integer, got {padding!r}")
    if padding < 0:
        raise ValueError(f"padding must be a non-negative integer, got {padding}")
    check_padding_mode(padding_mode)
    if padding_mode == "reflect" and padding >= min(height, width):
        raise ValueError(f"reflect padding must be smaller than the input size: padding {padding} with input "
                         f"{height}x{width}; use a smaller padding or another padding_mode")
    return int(padding)


def _check_kernel(kernel: Array, batch: int, channels: int) -> bool:
    """Whether a channels-first ``kernel`` is per sample (B, C, kh, kw) rather than shared (C, kh, kw)."""
    if kernel.ndim == 3:
        if kernel.shape[0] != channels:
            raise ValueError(f"kernel channels must equal the input channels: kernel {kernel.shape} "
                             f"(C, kh, kw) for input with C={channels}")
        return False
    if kernel.ndim == 4:
        if kernel.shape[0] != batch or kernel.shape[1] != channels:
            raise ValueError(f"per-sample kernel must have shape (B, C, kh, kw) = ({batch}, {channels}, kh, kw); "
                             f"got {kernel.shape}")
        return True
    raise ValueError(f"kernel must be (C, kh, kw) or (B, C, kh, kw); got shape {kernel.shape}")


def _check_lam(lam: Array, batch: int, channels: int) -> tuple[Array, bool]:
    """``lam`` as (C,) (shared by the batch) or (B, C) (per sample), and which one it is."""
    if lam.ndim == 0:
        return jnp.broadcast_to(lam, (channels,)), False
    if lam.shape == (channels,):
        return lam, False
    if lam.shape == (batch, channels):
        return lam, True
    raise ValueError(f"lam must be a scalar, ({channels},) or ({batch}, {channels}) for input with batch {batch} "
                     f"and {channels} channels; got shape {lam.shape}")


def _coerce(x: Any, kernel: Any, lam: Any) -> tuple[Array, Array, Array]:
    x = jnp.asarray(x)
    kernel = jnp.asarray(kernel)
    lam = jnp.asarray(lam)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a real floating array, got dtype {x.dtype}; "
                         "convert it, e.g. x.astype(jnp.float32)")
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise ValueError(f"kernel must be a real floating array, got dtype {kernel.dtype}")
    if not jnp.issubdtype(lam.dtype, jnp.floating):
        lam = lam.astype(x.dtype)
    return x, kernel, lam


def _solve(x: Array, kernel: Array, lam: Array, scale: Any, padding: Any, padding_mode: str,
           channels_last: bool) -> Array:
    """Validate, pad, solve and crop. ``x`` (B, C, H, W), or (B, H, W, C) when ``channels_last``;
    ``kernel`` channels-first, (C, kh, kw) or (B, C, kh, kw). Kernels within one scale cell take the
    FFT-free solver in either layout; the FFT solver works on channels-first planes, to which a
    channels-last ``x`` is padded and from which the result is cropped by :mod:`converse_jax.ops.layout`."""
    if channels_last:
        batch, height, width, channels = x.shape
    else:
        batch, channels, height, width = x.shape
    scale = _check_scale(scale)
    padding = _check_padding(padding, padding_mode, height, width)
    per_sample = _check_kernel(kernel, batch, channels)
    lam, per_sample_lam = _check_lam(lam, batch, channels)
    dtype = jnp.result_type(x.dtype, kernel.dtype, lam.dtype)
    x, kernel, lam = x.astype(dtype), kernel.astype(dtype), lam.astype(dtype)
    out_shape = ((height + 2 * padding) * scale, (width + 2 * padding) * scale)
    kh, kw = kernel.shape[-2], kernel.shape[-1]
    if kh > out_shape[0] or kw > out_shape[1]:
        raise ValueError(f"kernel of size {kh}x{kw} is larger than the (padded) output plane {out_shape[0]}x"
                         f"{out_shape[1]}; use a larger input or padding, or a smaller kernel")
    c = padding * scale
    if fits_one_cell(kh, kw, scale):
        out = solve_one_cell(pad_planes(x, padding, padding_mode, channels_last=channels_last), kernel, lam, scale,
                             channels_last=channels_last)
        if channels_last:
            return out[:, c:out.shape[1] - c, c:out.shape[2] - c, :] if c else out
        return out[..., c:out.shape[-2] - c, c:out.shape[-1] - c] if c else out
    if channels_last:  # to padded channels-first planes (row by row on CPU) and back (ops.layout)
        out = _solve_fft(padded_planes(x, padding, padding_mode), kernel, lam, scale, out_shape, per_sample,
                         per_sample_lam)
        return cropped_channels_last(out, c)
    out = _solve_fft(pad_planes(x, padding, padding_mode), kernel, lam, scale, out_shape, per_sample, per_sample_lam)
    return out[..., c:out.shape[-2] - c, c:out.shape[-1] - c] if c else out


def _solve_fft(x: Array, kernel: Array, lam: Array, scale: int, out_shape: tuple[int, int], per_sample: bool,
               per_sample_lam: bool) -> Array:
    """The FFT solver on padded channels-first planes: (B, C, H, W) -> (B, C, H·s, W·s)."""
    # One filter per channel (or per sample and channel), shared across the batch when possible.
    filt = jax.vmap(lambda k, lam_c: converse_filter(k, lam_c, out_shape, scale))  # over channels
    spectrum = jax.vmap(lambda y, gg: filtered_spectrum(y, gg, scale))  # over channels
    if per_sample or per_sample_lam:
        g = jax.vmap(filt, in_axes=(0 if per_sample else None, 0 if per_sample_lam else None))(kernel, lam)
        z = jax.vmap(spectrum)(x, g)  # g: (B, C, Hs, Ws//2+1)
    else:
        g = filt(kernel, lam)  # (C, Hs, Ws//2+1)
        z = jax.vmap(spectrum, in_axes=(0, None))(x, g)
    return irfft2_planes(z, out_shape)  # all planes at once: on CPU, two per complex FFT


def converse2d_channels_first(x: Any, kernel: Any, lam: Any, *, scale: int = 1, padding: int = 0,
                              padding_mode: str = "circular") -> Array:
    """:func:`converse2d` on channels-first planes, the layout the networks use internally.

    ``x`` (B, C, H, W); ``kernel`` (C, kh, kw) or (B, C, kh, kw); ``lam`` a scalar, (C,) or (B, C).
    Returns (B, C, H·s, W·s). The FFTs run over the two minor axes, so no transposes are needed; the
    public, channels-last entry point is :func:`converse2d`. Kernels that fit in one scale cell
    (kh, kw <= s) are solved exactly without FFTs (:mod:`converse_jax.ops.one_cell`).
    """
    x, kernel, lam = _coerce(x, kernel, lam)
    if x.ndim != 4:
        raise ValueError(f"x must be a 4-D array (B, C, H, W) in channels-first layout, got shape {x.shape}")
    return _solve(x, kernel, lam, scale, padding, padding_mode, channels_last=False)


def converse2d(x: Any, kernel: Any, lam: Any, *, scale: int = 1, padding: int = 0,
               padding_mode: str = "circular") -> Array:
    """Depthwise reverse convolution (Converse2D), channels-last.

    Args:
      x: (B, H, W, C) real floating input.
      kernel: (kh, kw, C) shared by the batch, or (B, kh, kw, C) per sample.
      lam: regularisation weight ``λ > 0``: a scalar, (C,) or (B, C). For a layer, see
        :func:`lambda_from_bias`.
      scale: integer upsampling factor s >= 1.
      padding: pixels added on each side before solving; the output is cropped by ``padding·s``.
      padding_mode: ``circular``, ``reflect``, ``replicate`` or ``constant`` (zeros).

    Returns:
      (B, H·s, W·s, C): per channel, the minimiser of ``||y - (x ⊛ k)↓s||² + λ||x - x0||²``.
      Kernels within one scale cell (kh, kw <= s) are solved without FFTs, in this layout.
    """
    x, kernel, lam = _coerce(x, kernel, lam)
    if x.ndim != 4:
        raise ValueError(f"x must be a 4-D array (B, H, W, C) in channels-last layout, got shape {x.shape}")
    channels = x.shape[-1]
    if kernel.ndim == 3:
        if kernel.shape[-1] != channels:
            raise ValueError(f"kernel channels must equal the input channels: kernel {kernel.shape} "
                             f"(kh, kw, C) for input with C={channels}")
        kernel_cf = jnp.moveaxis(kernel, -1, 0)
    elif kernel.ndim == 4:
        if kernel.shape[0] != x.shape[0] or kernel.shape[-1] != channels:
            raise ValueError(f"per-sample kernel must have shape (B, kh, kw, C) = ({x.shape[0]}, kh, kw, "
                             f"{channels}); got {kernel.shape}")
        kernel_cf = jnp.moveaxis(kernel, -1, 1)
    else:
        raise ValueError(f"kernel must be (kh, kw, C) or (B, kh, kw, C); got shape {kernel.shape}")
    return _solve(x, kernel_cf, lam, scale, padding, padding_mode, channels_last=True)
