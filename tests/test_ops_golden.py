"""Converse2D against the reference PyTorch implementation's goldens (../shared/golden/op_*.npz, NCHW)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converse_jax.assets import asset
from converse_jax.ops import converse2d, lambda_from_bias


def _cases():
    index = asset("golden", "index.json")
    if not index.exists():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"goldens not found at {index}; set CONVERSE_ASSETS"))]
    return [pytest.param(c, id=c["file"][:-4]) for c in json.loads(index.read_text())["ops"]]


CASES = _cases()


def _to_nhwc(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def _run(case, dtype, grads=True):
    """Output and (optionally) gradients w.r.t. x, kernel, bias of sum(y * cotangent), NCHW like the goldens."""
    d = np.load(asset("golden", case["file"]))
    x = jnp.asarray(_to_nhwc(d["x"]), dtype)
    kernel = jnp.asarray(d["weight"][0].transpose(1, 2, 0), dtype)
    bias = jnp.asarray(d["bias"].reshape(-1), dtype)
    cot = jnp.asarray(_to_nhwc(d["cotangent"]), dtype)

    def f(x, kernel, bias):
        lam = lambda_from_bias(bias, case["eps"])
        return converse2d(x, kernel, lam, scale=case["scale"], padding=case["padding"],
                          padding_mode=case["padding_mode"])

    @jax.jit
    def fwd_and_grads(x, kernel, bias):
        y, vjp = jax.vjp(f, x, kernel, bias)
        return (y,) + vjp(cot)

    if not grads:
        y = jax.jit(f)(x, kernel, bias)
        assert y.dtype == dtype
        return d, {"y": np.asarray(y).transpose(0, 3, 1, 2)}
    y, gx, gk, gb = fwd_and_grads(x, kernel, bias)
    assert y.dtype == dtype
    out = {
        "y": np.asarray(y).transpose(0, 3, 1, 2),
        "grad_x": np.asarray(gx).transpose(0, 3, 1, 2),
        "grad_weight": np.asarray(gk).transpose(2, 0, 1)[None],
        "grad_bias": np.asarray(gb).reshape(d["grad_bias_f64"].shape),
    }
    return d, out


def _rel(a, ref):
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("case", CASES)
def test_float64_output_and_gradients(case, x64):
    d, out = _run(case, jnp.float64)
    assert out["y"].shape == tuple(case["out_shape"])
    assert _rel(out["y"], d["y_f64"]) <= 1e-9
    for name in ("grad_x", "grad_weight", "grad_bias"):
        ref = d[name + "_f64"]
        err = np.abs(out[name] - ref).max()
        assert err <= 1e-7 * (1 + np.abs(ref).max()), (name, err)


@pytest.mark.parametrize("case", CASES)
def test_float32_output_matches_float64_reference(case):
    d, out = _run(case, jnp.float32, grads=False)
    assert _rel(out["y"], d["y_f64"]) <= 2e-5
    # The reference's own float32 path loses digits by dividing by lambda; ours must be well inside that.
    ref32_err = _rel(d["y_f32"], d["y_f64"])
    assert _rel(out["y"], d["y_f64"]) <= max(ref32_err, 2e-5)
