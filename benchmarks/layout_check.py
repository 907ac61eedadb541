"""The public channels-last Converse2D against the channels-first entry the networks use.

For every operator case of the benchmark (:data:`benchmarks.cases.OP_CASES_FULL`, or the quick ones),
times ``converse2d`` on (B, H, W, C) input and ``converse2d_channels_first`` on the same values in
(B, C, H, W), forward and forward+backward (gradients for input, kernel and bias, as
:func:`benchmarks.jax_bench.run_op`), float32, under ``jax.jit``. All variants of a case run
interleaved, one call each per round, and the median over the rounds is reported, so that load from
other processes hits them alike. Prints one line per case as it finishes: the times and the
channels-last / channels-first ratios.

    python -m benchmarks.layout_check [--quick] [--rounds N] [--cases dncnn-256,dncnn-128]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import cases as C
from benchmarks.timing import cpu_summary
from converse_jax.ops import converse2d, converse2d_channels_first


def _variants(case: dict[str, Any]) -> dict[str, tuple[Callable[..., Any], tuple]]:
    """name -> (jitted function, arguments): forward and forward+backward of both entry points."""
    d = C.op_inputs(case)
    kw = dict(scale=case["scale"], padding=case["padding"], padding_mode=case["padding_mode"])
    eps = case["eps"]
    bias = jnp.asarray(d["bias"])
    layouts = {
        "channels-first": (converse2d_channels_first, d["x"], d["kernel"], d["cotangent"]),
        "channels-last": (converse2d, d["x"].transpose(0, 2, 3, 1), d["kernel"].transpose(1, 2, 0),
                          d["cotangent"].transpose(0, 2, 3, 1)),
    }
    out = {}
    for name, (op, x, kernel, ct) in layouts.items():
        def forward(x, k, b, op=op):
            return op(x, k, jax.nn.sigmoid(b - 9.0) + eps, **kw)

        grad = jax.grad(lambda x, k, b, ct, f=forward: jnp.sum(f(x, k, b) * ct), argnums=(0, 1, 2))
        args = (jnp.asarray(x), jnp.asarray(kernel), bias)
        out[f"{name} fwd"] = (jax.jit(forward), args)
        out[f"{name} fwd+bwd"] = (jax.jit(grad), args + (jnp.asarray(ct),))
    return out


def time_case(case: dict[str, Any], rounds: int) -> dict[str, float]:
    """Median seconds per variant of one case (after one warm-up call each), interleaved."""
    variants = _variants(case)
    for fn, args in variants.values():
        jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (fn, args) in variants.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def _machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu_summary()}, load average {load:.2f}, jax {jax.__version__} on {jax.default_backend()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the small shapes of the quick benchmark")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per case (median reported; >= 1)")
    p.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error(f"--rounds must be >= 1, got {a.rounds}")
    cases = C.op_cases(a.quick)
    wanted = [n for n in a.cases.split(",") if n]
    unknown = sorted(set(wanted) - {c["name"] for c in cases})
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(c['name'] for c in cases)}")
    print(_machine(), flush=True)
    for case in cases:
        if wanted and case["name"] not in wanted:
            continue
        print(f"{case['name']}: B{case['B']} C{case['C']} {case['H']}x{case['W']} k{case['k']} s{case['scale']} "
              f"... ", end="", flush=True)
        m = time_case(case, a.rounds)
        ratio = {s: m[f"channels-last {s}"] / m[f"channels-first {s}"] for s in ("fwd", "fwd+bwd")}
        print("  ".join(f"{n} {1e3 * t:.1f} ms" for n, t in m.items())
              + f"  | last/first fwd {ratio['fwd']:.2f}, fwd+bwd {ratio['fwd+bwd']:.2f}", flush=True)
    print(f"after: load average {os.getloadavg()[0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
