"""Component timings behind the optimisation notes (``--only=micro``).

Each group is timed interleaved (every variant once per round, median over rounds), so that
load from other processes hits all variants of a group alike.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import alt_ops

Group = list[tuple[str, Callable[..., Any], tuple]]


def _interleaved(group: Group, rounds: int) -> list[dict[str, Any]]:
    fns = []
    for name, fn, args in group:
        f = jax.jit(fn)
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        fns.append((name, f, args, time.perf_counter() - t0))
    times: dict[str, list[float]] = {name: [] for name, *_ in fns}
    for _ in range(rounds):
        for name, f, args, _ in fns:
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - t0)
    return [{"name": name, "median_s": float(np.median(times[name])), "min_s": min(times[name]),
             "runs": rounds, "first_s": first} for name, _, _, first in fns]


def _rand(*shape: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(len(shape) + sum(shape)).random(shape, dtype=np.float32))


def groups(quick: bool) -> list[Group]:
    """The component groups at Converse-DnCNN's 256×256 shapes (tiny ones when ``quick``)."""
    n, c = (24, 8) if quick else (256, 64)
    pad = 6
    npad = n + 2 * pad
    x64 = _rand(1, n, n, c)
    x128 = _rand(1, n, n, 2 * c)
    w = _rand(c, 2 * c)
    kern = _rand(7, 7, 2 * c) / 49.0
    lam = jnp.full((2 * c,), 1.3e-4, jnp.float32)
    planes = _rand(1, 2 * c, npad, npad)
    planes_nhwc = jnp.transpose(planes, (0, 2, 3, 1))
    gs: list[Group] = []
    gs.append([
        (f"GELU exact (erf) 1x{n}x{n}x{2 * c}", lambda a: jax.nn.gelu(a, approximate=False), (x128,)),
        (f"GELU tanh approximation 1x{n}x{n}x{2 * c}", lambda a: jax.nn.gelu(a, approximate=True), (x128,)),
        (f"x*2 (one memory pass) 1x{n}x{n}x{2 * c}", lambda a: a * 2.0, (x128,)),
    ])
    gs.append([
        (f"1x1 conv {c}->{2 * c} NHWC matmul", lambda a, b: a @ b, (x64, w)),
        (f"1x1 conv {c}->{2 * c} NHWC matmul + exact GELU", lambda a, b: jax.nn.gelu(a @ b, approximate=False),
         (x64, w)),
        (f"1x1 conv {c}->{2 * c} NCHW einsum", lambda a, b: jnp.einsum("bchw,cd->bdhw", a, b),
         (jnp.transpose(x64, (0, 3, 1, 2)), w)),
    ])
    gs.append([
        (f"rfft2+irfft2 {2 * c} planes {npad}^2, NCHW", lambda a: jnp.fft.irfft2(jnp.fft.rfft2(a), s=(npad, npad)),
         (planes,)),
        (f"rfft2+irfft2 {2 * c} planes {npad}^2, NHWC axes (1,2)",
         lambda a: jnp.fft.irfft2(jnp.fft.rfft2(a, axes=(1, 2)), s=(npad, npad), axes=(1, 2)), (planes_nhwc,)),
        (f"rfft2+irfft2 {2 * c} planes {n}^2, NCHW (unpadded size, for contrast)",
         lambda a: jnp.fft.irfft2(jnp.fft.rfft2(a), s=(n, n)), (planes[..., :n, :n],)),
        (f"transpose NHWC->NCHW 1x{npad}x{npad}x{2 * c}", lambda a: jnp.transpose(a, (0, 3, 1, 2)) + 0.0,
         (planes_nhwc,)),
    ])
    spec: Group = [
        (f"kernel spectrum {2 * c}x7x7 at {npad}^2: separable DFT (alt)",
         lambda k: alt_ops.kernel_spectrum(k, npad, npad, half=True), (kern,)),
    ]
    kw = dict(scale=1, padding=pad, padding_mode="circular")
    op: Group = [
        ("Converse2D alt, NHWC", lambda a, k: alt_ops.converse2d(a, k, lam, **kw), (x128, kern)),
        ("Converse2D alt, NCHW in/out", lambda a, k: alt_ops.converse2d(a, k, lam, layout="nchw", **kw),
         (jnp.transpose(x128, (0, 3, 1, 2)), kern)),
    ]
    try:
        ops = importlib.import_module("converse_jax.ops")
        spec.insert(0, (f"kernel filter {2 * c}x7x7 at {npad}^2: library (p2o FFT)",
                        lambda k: jax.vmap(lambda kk, ll: ops.converse_filter(kk, ll, (npad, npad), 1),
                                           in_axes=(-1, 0))(k, lam), (kern,)))
        op.insert(0, ("Converse2D library, NHWC", lambda a, k: ops.converse2d(a, k, lam, **kw), (x128, kern)))
    except (ImportError, AttributeError):
        pass
    gs += [spec, op]
    try:
        gs += block_groups(n, c, pad)
    except (ImportError, AttributeError):
        pass
    return gs


def block_groups(n: int, c: int, pad: int) -> list[Group]:
    """One Converse-DnCNN block: the library's against :mod:`benchmarks.alt_blocks`, forward and
    forward+backward (gradient of a squared sum with respect to parameters and input)."""
    from flax import nnx

    from benchmarks import alt_blocks
    from converse_jax.nn.blocks import ConverseBlock

    graphdef, state = nnx.split(ConverseBlock(c, 7, padding=pad, padding_mode="circular", rngs=nnx.Rngs(0)))
    x = _rand(1, n, n, c)
    xn = jnp.transpose(x, (0, 3, 1, 2))

    def lib(st, a):
        return nnx.merge(graphdef, st)(a)

    def alt(layout):
        return lambda st, a: alt_blocks.block_apply(nnx.merge(graphdef, st), a, layout)

    def grad(f):
        return jax.grad(lambda st, a: jnp.sum(jnp.square(f(st, a))), argnums=(0, 1))

    fwd = [(f"block 1x{n}x{n}x{c} library", lib, (state, x)),
           (f"block 1x{n}x{n}x{c} alt NHWC", alt("nhwc"), (state, x)),
           (f"block 1x{n}x{n}x{c} alt NCHW", alt("nchw"), (state, xn))]
    bwd = [(name.replace("block", "block fwd+bwd"), grad(f), a) for name, f, a in fwd]
    return [fwd, bwd]


def run(*, quick: bool, policy: dict[str, Any], log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Time every group; returns one record per variant."""
    rounds = max(int(policy.get("min_repeats", 3)), 3)
    out: list[dict[str, Any]] = []
    for g in groups(quick):
        log(f"micro: {g[0][0]} ...")
        out += _interleaved(g, rounds)
    return out
