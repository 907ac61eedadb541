"""A jaxpr interpreter that rewrites a function into real arithmetic, for exporters without complex
numbers or 2-D FFTs (ONNX).

:func:`realify` evaluates the function's jaxpr equation by equation:

- equations whose inputs are all known at export time (weights, constants) and whose outputs are small
  (:data:`FOLD_LIMIT`) or integral (index arrays) are computed once and become constants; larger
  floating-point ones, such as the Converse2D filters ``G`` (one value per pixel and channel), stay in the
  graph, computed from the weights;
- a gather whose constant indices are the outer product of 1-D index vectors (Converse2D's padding)
  becomes one 1-D take per axis, and large constants enter the graph once per distinct value
  (:data:`SHARE_MIN`);
- complex values of the data path are carried as (real, imaginary) pairs (:class:`Cplx`), and the
  primitives that touch them are applied to the parts;
- each FFT (2-D real, inverse real and complex) becomes, with ``fft="matmul"``, products with DFT
  matrices over its axes (``x @ E``), constants of size n×n (n×(n//2+1) on the real axis), one
  array per size shared by every FFT of that size; with ``fft="dft"``, one 1-D DFT per axis
  (:data:`dft_p`, on tensors with the real and imaginary parts packed in a last axis of 2), which the
  ONNX exporter writes as ``DFT`` nodes;
- ``jax.lax.platform_dependent`` branches take their default (non-CPU) branch, ``jit`` and custom
  derivative calls are inlined, and ``scan`` is unrolled.

The rewritten function computes the same values in float32 up to rounding; the library's code is
left as it is.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core
from jax.interpreters import mlir

STRUCTURAL = {"reshape", "slice", "rev", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "copy",
              "copy_p", "reduce_sum", "dynamic_slice"}


# Constant equations with outputs up to this many elements are folded at export time; larger ones (the
# Converse2D filters, a few per pixel and channel) stay in the graph, computed there from the weights, so
# the model's size does not grow with the image size.
FOLD_LIMIT = 1 << 15

# Constants of at least this many elements that reach the rewritten graph (the DFT matrices, the static
# index arrays of gathers such as Converse2D's padding) enter it as one array per distinct value, so that
# the layers that use the same one share a single stored copy.
SHARE_MIN = 1024

FFT_MODES = ("matmul", "dft")


@dataclasses.dataclass
class _Run:
    """The settings and shared constants of one rewriting (one trace of :func:`realify`'s function)."""

    fft: str = "matmul"
    shared: dict[tuple[Any, ...], Any] = dataclasses.field(default_factory=dict)


_RUN: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("realify_run", default=None)


def _run() -> _Run:
    """The current rewriting's settings (defaults, without sharing, outside :func:`realify`)."""
    return _RUN.get() or _Run()


@dataclasses.dataclass
class Cplx:
    """A complex array of the traced data path as its real and imaginary parts."""

    re: Any
    im: Any


def _traced(v: Any) -> bool:
    return isinstance(v, Cplx) or isinstance(v, jax.core.Tracer)


def _is_complex(v: Any) -> bool:
    return isinstance(v, Cplx) or jnp.iscomplexobj(v)


def _as_c(v: Any) -> Cplx:
    if isinstance(v, Cplx):
        return v
    if jnp.iscomplexobj(v):  # a constant: split here, at export time
        return Cplx(np.real(np.asarray(v)), np.imag(np.asarray(v)))
    return Cplx(v, jnp.zeros_like(v))


@functools.cache
def _dft(n: int, rows: int, sign: float, scale: float = 1.0,
         weighted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin parts of scale·exp(sign·2πi·t·u/n), (n, rows): x (…, n) @ it gives (…, rows) bins.

    ``weighted``: the inverse real FFT's matrices, (rows, n), each half-spectrum bin weighted by the
    number of bins it stands for (1 for DC and Nyquist, else 2). Cached, so all FFTs of one size use
    the same arrays, which the exporters then store once.
    """
    t = np.arange(n)[:, None]
    u = np.arange(rows)[None, :]
    phase = sign * 2.0 * np.pi * ((t * u) % n) / n
    c, s = np.cos(phase) * scale, np.sin(phase) * scale
    if weighted:
        w = np.full(rows, 2.0)
        w[0] = 1.0
        if n % 2 == 0:
            w[-1] = 1.0
        c, s = (c * w[None, :]).T, (s * w[None, :]).T
    c, s = c.astype(np.float32), s.astype(np.float32)
    c.flags.writeable = s.flags.writeable = False
    return c, s


def _shared(v: Any) -> Any:
    """``v``, or for a constant array of :data:`SHARE_MIN` elements or more, the one JAX array of this run
    with its value: the exporters store a constant once per array object."""
    if _traced(v) or isinstance(v, core.Literal) or np.size(v) < SHARE_MIN or not hasattr(v, "dtype"):
        return v
    a = np.asarray(v)
    key = (a.shape, a.dtype.str, hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest())
    shared = _run().shared
    if key not in shared:
        with jax.ensure_compile_time_eval():
            shared[key] = jnp.asarray(a)
    return shared[key]


def _along(x: Any, axis: int, mat: np.ndarray) -> Any:
    """``x`` with its axis ``axis`` multiplied by the matrix ``mat`` (n, m) (a shared constant)."""
    moved = jnp.moveaxis(x, axis, -1)
    return jnp.moveaxis(moved @ _shared(mat), -1, axis)


def _cfft_axis(z: Cplx, axis: int, inverse: bool) -> Cplx:
    n = z.re.shape[axis]
    c, s = _dft(n, n, 1.0 if inverse else -1.0, 1.0 / n if inverse else 1.0)
    re = _along(z.re, axis, c) - _along(z.im, axis, s)
    im = _along(z.re, axis, s) + _along(z.im, axis, c)
    return Cplx(re, im)


def _dft_impl(p: Any, *, length: int, axis: int, inverse: bool, onesided: bool) -> Any:
    z = p[..., 0] if p.shape[-1] == 1 else lax.complex(p[..., 0], p[..., 1])
    z = jnp.moveaxis(z, axis, -1)
    if onesided:
        z = jnp.fft.rfft(z, n=length)
    else:
        z = jnp.fft.ifft(z, n=length) if inverse else jnp.fft.fft(z, n=length)
    z = jnp.moveaxis(z, -1, axis)
    return jnp.stack([jnp.real(z), jnp.imag(z)], axis=-1).astype(p.dtype)


def _dft_abstract(p: Any, *, length: int, axis: int, inverse: bool, onesided: bool) -> Any:
    shape = list(p.shape)
    shape[axis], shape[-1] = (length // 2 + 1 if onesided else length), 2
    return jax.core.ShapedArray(tuple(shape), p.dtype)


# ONNX's DFT operator on "packed" complex tensors, (..., 2) real and imaginary parts last ((..., 1) for a
# real signal): a 1-D DFT along ``axis`` (not the last). Its own primitive, so that the ONNX exporter can
# write it as one ``DFT`` node (onnx_export registers the conversion); in JAX it runs as jnp.fft.
dft_p = core.Primitive("converse_onnx_dft")
dft_p.def_impl(_dft_impl)
dft_p.def_abstract_eval(_dft_abstract)
mlir.register_lowering(dft_p, mlir.lower_fun(_dft_impl, multiple_results=False))


def _dft_nodes(x: Any, kind: str, lengths: tuple[int, ...]) -> Any:
    """The FFT ``kind`` over the last ``len(lengths)`` axes as 1-D :data:`dft_p` calls on packed tensors."""
    if "RFFT" in kind and "IRFFT" not in kind:
        p, rank = x[..., None], x.ndim
        p = dft_p.bind(p, length=lengths[-1], axis=rank - 1, inverse=False, onesided=True)
        for i, n in enumerate(lengths[:-1]):
            p = dft_p.bind(p, length=n, axis=rank - len(lengths) + i, inverse=False, onesided=False)
        return Cplx(p[..., 0], p[..., 1])
    z = _as_c(x)
    p, rank = jnp.stack([z.re, z.im], axis=-1), z.re.ndim
    inverse = kind in ("IFFT", "IRFFT")
    inner = lengths[:-1] if "IRFFT" in kind else lengths
    for i, n in enumerate(inner):
        p = dft_p.bind(p, length=n, axis=rank - len(lengths) + i, inverse=inverse, onesided=False)
    if "IRFFT" not in kind:
        return Cplx(p[..., 0], p[..., 1])
    # Inverse real FFT: the half spectrum completed by Hermitian symmetry, X[n - j] = conj X[j], then a
    # complex inverse DFT whose real part is the signal (ONNX's DFT has no complex-to-real mode).
    n = lengths[-1]
    half = p.shape[-2]
    mirror = p[..., 1:n - half + 1, :][..., ::-1, :] * np.array([1.0, -1.0], np.float32)
    p = jnp.concatenate([p, mirror], axis=-2)
    p = dft_p.bind(p, length=n, axis=rank - 1, inverse=True, onesided=False)
    return p[..., 0]


def _fft(x: Any, fft_type: Any, lengths: tuple[int, ...]) -> Any:
    kind = getattr(fft_type, "name", str(fft_type)).upper()
    if _run().fft == "dft":
        return _dft_nodes(x, kind, lengths)
    axes = list(range(-len(lengths), 0))
    if "IRFFT" in kind:
        z = _as_c(x)
        for ax in axes[:-1]:
            z = _cfft_axis(z, ax, inverse=True)
        n = lengths[-1]
        c, s = _dft(n, z.re.shape[-1], 1.0, 1.0 / n, weighted=True)
        return _along(z.re, -1, c) - _along(z.im, -1, s)
    if "RFFT" in kind:
        n = lengths[-1]
        c, s = _dft(n, n // 2 + 1, -1.0)
        z = Cplx(_along(x, -1, c), _along(x, -1, s))
        for ax in axes[:-1]:
            z = _cfft_axis(z, ax, inverse=False)
        return z
    z = _as_c(x)
    for ax in axes:
        z = _cfft_axis(z, ax, inverse="IFFT" in kind)
    return z


def _bind(prim: Any, args: list[Any], params: dict[str, Any]) -> Any:
    return prim.bind(*args, **params)


def _complex_arith(name: str, prim: Any, ins: list[Any], params: dict[str, Any]) -> Any:
    """The arithmetic primitives on complex pairs (None for the others)."""
    if name == "real":
        return _as_c(ins[0]).re
    if name == "imag":
        return _as_c(ins[0]).im
    if name == "complex":
        return Cplx(ins[0], ins[1])
    if name == "conj":
        z = _as_c(ins[0])
        return Cplx(z.re, -z.im)
    if name == "exp":
        z = _as_c(ins[0])
        mag = jnp.exp(z.re)
        return Cplx(mag * jnp.cos(z.im), mag * jnp.sin(z.im))
    if name == "abs":
        z = _as_c(ins[0])
        return jnp.sqrt(z.re * z.re + z.im * z.im)
    if name == "neg":
        z = _as_c(ins[0])
        return Cplx(-z.re, -z.im)
    if name in ("add", "sub"):
        op = lax.add if name == "add" else lax.sub
        a, b = _as_c(ins[0]), _as_c(ins[1])
        return Cplx(op(a.re, b.re), op(a.im, b.im))
    if name in ("mul", "div"):
        a, b = ins
        if not _is_complex(b):
            a = _as_c(a)
            return Cplx(_bind(prim, [a.re, b], params), _bind(prim, [a.im, b], params))
        if name == "mul" and not _is_complex(a):
            b = _as_c(b)
            return Cplx(a * b.re, a * b.im)
        a, b = _as_c(a), _as_c(b)
        if name == "mul":
            return Cplx(a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re)
        den = b.re * b.re + b.im * b.im
        return Cplx((a.re * b.re + a.im * b.im) / den, (a.im * b.re - a.re * b.im) / den)
    return None


def _complex_rule(name: str, prim: Any, ins: list[Any], params: dict[str, Any]) -> Any:
    """One primitive applied to operands of which at least one is a traced complex pair."""
    out = _complex_arith(name, prim, ins, params)
    if out is not None:
        return out
    if name in STRUCTURAL or name == "gather":
        z = _as_c(ins[0])
        return Cplx(_bind(prim, [z.re, *ins[1:]], params), _bind(prim, [z.im, *ins[1:]], params))
    if name == "pad":
        z, pv = _as_c(ins[0]), _as_c(ins[1])
        return Cplx(_bind(prim, [z.re, pv.re], params), _bind(prim, [z.im, pv.im], params))
    if name == "concatenate":
        parts = [_as_c(v) for v in ins]
        return Cplx(_bind(prim, [p.re for p in parts], params), _bind(prim, [p.im for p in parts], params))
    if name == "select_n":
        parts = [_as_c(v) for v in ins[1:]]
        return Cplx(_bind(prim, [ins[0], *[p.re for p in parts]], params),
                    _bind(prim, [ins[0], *[p.im for p in parts]], params))
    if name == "convert_element_type":
        real_dtype = jnp.finfo(params["new_dtype"]).dtype
        if jnp.issubdtype(params["new_dtype"], jnp.complexfloating):
            z = _as_c(ins[0])
            return Cplx(z.re.astype(real_dtype), z.im.astype(real_dtype))
        return _as_c(ins[0]).re.astype(params["new_dtype"])
    if name == "dot_general":
        a, b = _as_c(ins[0]), _as_c(ins[1])
        p = dict(params, preferred_element_type=None)
        return Cplx(_bind(prim, [a.re, b.re], p) - _bind(prim, [a.im, b.im], p),
                    _bind(prim, [a.re, b.im], p) + _bind(prim, [a.im, b.re], p))
    if name == "fft":
        return _fft(ins[0], params["fft_type"], tuple(params["fft_lengths"]))
    raise NotImplementedError(f"realify: no rule for the primitive {name!r} on complex values")


def _separable_gather(ins: list[Any], params: dict[str, Any]) -> Any:
    """A gather with constant indices that pick an outer product of 1-D index vectors (Converse2D's
    padding, ``x[..., ih[:, None], iw[None, :]]``) as one 1-D take per axis, or None for other gathers.

    jax2onnx writes a gather as ``GatherND`` with its own copy of the full index array (two int64 per
    output pixel) for each use; 1-D takes need only the vectors.
    """
    x, idx = ins
    dn = params["dimension_numbers"]
    if _traced(idx) or getattr(dn, "operand_batching_dims", ()):
        return None
    idx = np.asarray(idx)
    dims = tuple(dn.start_index_map)
    k = len(dims)
    if (tuple(sorted(dn.collapsed_slice_dims)) != tuple(sorted(dims)) or idx.ndim != k + 1 or idx.shape[-1] != k
            or any(params["slice_sizes"][d] != (1 if d in dims else x.shape[d]) for d in range(x.ndim))):
        return None
    vecs = {}
    for j, d in enumerate(dims):  # component j must vary along batch axis j only
        line = idx[(0,) * j + (slice(None),) + (0,) * (k - j - 1) + (j,)]
        if not np.array_equal(idx[..., j], np.broadcast_to(line.reshape([-1 if a == j else 1 for a in range(k)]),
                                                           idx.shape[:-1])):
            return None
        if line.min() < 0 or line.max() >= x.shape[d]:
            return None
        vecs[d] = line
    out = x
    for d in dims:
        out = jnp.take(out, vecs[d], axis=d)
    # Output layout: operand's other axes at offset_dims, the index (batch) axes at the remaining positions.
    rest = [d for d in range(x.ndim) if d not in dims]
    batch_pos = [p for p in range(x.ndim) if p not in dn.offset_dims]
    src = [0] * x.ndim
    for p, d in zip(sorted(dn.offset_dims), rest, strict=True):
        src[p] = d
    for p, d in zip(batch_pos, dims, strict=True):
        src[p] = d
    return out if src == list(range(x.ndim)) else jnp.transpose(out, src)


def _read(env: dict[Any, Any], v: Any) -> Any:
    return v.val if isinstance(v, core.Literal) else env[v]


def _scan(ins: list[Any], params: dict[str, Any]) -> list[Any]:
    """``lax.scan`` unrolled (the exporters see one copy of the body per step)."""
    nc, ncarry, length = params["num_consts"], params["num_carry"], params["length"]
    body = params["jaxpr"]
    consts, carry, xs = ins[:nc], list(ins[nc:nc + ncarry]), ins[nc + ncarry:]
    ys = []
    steps = range(length - 1, -1, -1) if params["reverse"] else range(length)
    for i in steps:
        with jax.ensure_compile_time_eval():
            x_i = [x[i] for x in xs]
        out = eval_jaxpr(body.jaxpr, body.consts, [*consts, *carry, *x_i])
        carry, y = out[:ncarry], out[ncarry:]
        ys.append(y)
    if params["reverse"]:
        ys = ys[::-1]
    stacked = [jnp.stack([y[j] for y in ys]) for j in range(len(ys[0]) if ys else 0)]
    return [*carry, *stacked]


def _apply(eqn: Any, ins: list[Any]) -> list[Any]:
    name, prim, params = eqn.primitive.name, eqn.primitive, eqn.params
    if name in ("jit", "pjit", "closed_call", "core_call", "remat", "checkpoint"):
        closed = params.get("jaxpr") or params.get("call_jaxpr")
        return eval_jaxpr(closed.jaxpr, closed.consts, ins)
    if name in ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"):
        closed = params.get("call_jaxpr") or params.get("fun_jaxpr")
        return eval_jaxpr(closed.jaxpr, closed.consts, ins)
    if name == "platform_index":
        return [np.int32(len(params["platforms"]))]  # the default branch of platform_dependent
    if name == "cond":
        if _traced(ins[0]):
            raise NotImplementedError("realify: a cond on a traced predicate cannot be exported")
        branch = params["branches"][int(np.clip(int(ins[0]), 0, len(params["branches"]) - 1))]
        return eval_jaxpr(branch.jaxpr, branch.consts, ins[1:])
    if name == "scan":
        return _scan(ins, params)
    shapes = [getattr(v.aval, "shape", ()) for v in eqn.outvars]
    static = all(isinstance(d, int) for shape in shapes for d in shape)
    small = sum(int(np.prod(shape)) for shape in shapes) <= FOLD_LIMIT
    integral = all(jnp.issubdtype(v.aval.dtype, jnp.integer) or v.aval.dtype == bool for v in eqn.outvars)
    if static and (small or integral) and not any(_traced(v) for v in ins):
        with jax.ensure_compile_time_eval():
            out = prim.bind(*ins, **params)
        return list(out) if prim.multiple_results else [out]
    ins = [_shared(v) for v in ins]
    if name == "gather" and not _is_complex(ins[0]):
        out = _separable_gather(ins, params)
        if out is not None:
            return [out]
    complex_out = any(jnp.issubdtype(v.aval.dtype, jnp.complexfloating) for v in eqn.outvars)
    if complex_out or any(_is_complex(v) for v in ins):
        return [_complex_rule(name, prim, ins, params)]
    out = prim.bind(*ins, **params)
    return list(out) if prim.multiple_results else [out]


def eval_jaxpr(jaxpr: Any, consts: list[Any], args: list[Any]) -> list[Any]:
    """Evaluate ``jaxpr`` with the rewriting rules above (module docstring)."""
    env: dict[Any, Any] = {}
    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = c
    for v, a in zip(jaxpr.invars, args, strict=True):
        env[v] = a
    for eqn in jaxpr.eqns:
        outs = _apply(eqn, [_read(env, v) for v in eqn.invars])
        for v, o in zip(eqn.outvars, outs, strict=True):
            env[v] = o
    return [_read(env, v) for v in jaxpr.outvars]


def realify(fn: Any, *example_args: Any, fft: str = "matmul") -> Any:
    """``fn`` rewritten to real arithmetic, its FFTs as ``fft`` says (one of :data:`FFT_MODES`) and
    constants folded (module docstring).

    ``example_args`` (arrays or ``jax.ShapeDtypeStruct``) fix the input shapes. The jaxpr is traced
    here, before any exporter runs: exporters such as jax2onnx replace ``jax.numpy`` functions with
    their own primitives while they trace.
    """
    if fft not in FFT_MODES:
        raise ValueError(f"fft must be one of {', '.join(FFT_MODES)}, got {fft!r}")
    closed = jax.make_jaxpr(fn)(*example_args)

    def real_fn(*args: Any) -> Any:
        token = _RUN.set(_Run(fft=fft))
        try:
            outs = eval_jaxpr(closed.jaxpr, closed.consts, list(args))
        finally:
            _RUN.reset(token)
        outs = [o.re if isinstance(o, Cplx) else o for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    return real_fn
