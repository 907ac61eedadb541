"""A jaxpr interpreter that rewrites a function into real arithmetic, for exporters without complex
numbers or 2-D FFTs (ONNX).

:func:`realify` evaluates the function's jaxpr equation by equation:

- equations whose inputs are all known at export time (weights, constants) and whose outputs are small
  (:data:`FOLD_LIMIT`) are computed once and become constants; larger ones, such as the Converse2D
  filters ``G`` (one value per pixel and channel), stay in the graph, computed from the weights;
- complex values of the data path are carried as (real, imaginary) pairs (:class:`Cplx`), and the
  primitives that touch them are applied to the parts;
- each FFT (2-D real, inverse real and complex) becomes products with DFT matrices over its axes
  (``x @ E``), constants of size n×n (n×(n//2+1) on the real axis);
- ``jax.lax.platform_dependent`` branches take their default (non-CPU) branch, ``jit`` and custom
  derivative calls are inlined, and ``scan`` is unrolled.

The rewritten function computes the same values in float32 up to rounding; the library's code is
left as it is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core

STRUCTURAL = {"reshape", "slice", "rev", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "copy",
              "copy_p", "reduce_sum", "dynamic_slice"}


# Constant equations with outputs up to this many elements are folded at export time; larger ones (the
# Converse2D filters, a few per pixel and channel) stay in the graph, computed there from the weights, so
# the model's size does not grow with the image size.
FOLD_LIMIT = 1 << 15


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


def _dft(n: int, rows: int, sign: float, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin parts of exp(sign·2πi·t·u/n), (n, rows): x (…, n) @ it gives (…, rows) bins."""
    t = np.arange(n)[:, None]
    u = np.arange(rows)[None, :]
    phase = sign * 2.0 * np.pi * ((t * u) % n) / n
    return np.cos(phase).astype(dtype), np.sin(phase).astype(dtype)


def _along(x: Any, axis: int, mat: np.ndarray) -> Any:
    """``x`` with its axis ``axis`` multiplied by the matrix ``mat`` (n, m)."""
    moved = jnp.moveaxis(x, axis, -1)
    return jnp.moveaxis(moved @ jnp.asarray(mat), -1, axis)


def _cfft_axis(z: Cplx, axis: int, inverse: bool) -> Cplx:
    n = z.re.shape[axis]
    c, s = _dft(n, n, 1.0 if inverse else -1.0, np.float32)
    if inverse:
        c, s = c / n, s / n
    re = _along(z.re, axis, c) - _along(z.im, axis, s)
    im = _along(z.re, axis, s) + _along(z.im, axis, c)
    return Cplx(re, im)


def _fft(x: Any, fft_type: Any, lengths: tuple[int, ...]) -> Any:
    kind = getattr(fft_type, "name", str(fft_type)).upper()
    axes = list(range(-len(lengths), 0))
    if "IRFFT" in kind:
        z = _as_c(x)
        for ax in axes[:-1]:
            z = _cfft_axis(z, ax, inverse=True)
        n = lengths[-1]
        half = z.re.shape[-1]
        c, s = _dft(n, half, 1.0, np.float32)
        w = np.full(half, 2.0, np.float32)
        w[0] = 1.0
        if n % 2 == 0:
            w[-1] = 1.0
        return _along(z.re, -1, (c * w[None, :] / n).T) - _along(z.im, -1, (s * w[None, :] / n).T)
    if "RFFT" in kind:
        n = lengths[-1]
        c, s = _dft(n, n // 2 + 1, -1.0, np.float32)
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
    if static and sum(int(np.prod(shape)) for shape in shapes) <= FOLD_LIMIT and not any(_traced(v) for v in ins):
        with jax.ensure_compile_time_eval():
            out = prim.bind(*ins, **params)
        return list(out) if prim.multiple_results else [out]
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


def realify(fn: Any, *example_args: Any) -> Any:
    """``fn`` rewritten to real arithmetic with DFT-matrix FFTs and constants folded (module docstring).

    ``example_args`` (arrays or ``jax.ShapeDtypeStruct``) fix the input shapes. The jaxpr is traced
    here, before any exporter runs: exporters such as jax2onnx replace ``jax.numpy`` functions with
    their own primitives while they trace.
    """
    closed = jax.make_jaxpr(fn)(*example_args)

    def real_fn(*args: Any) -> Any:
        outs = eval_jaxpr(closed.jaxpr, closed.consts, list(args))
        outs = [o.re if isinstance(o, Cplx) else o for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    return real_fn
