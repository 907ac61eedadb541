"""The JAX side of the benchmark: our operator and networks, timed with ``jax.jit`` and
``block_until_ready`` on whatever device JAX picks (CPU or GPU, unchanged)."""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import alt_ops
from benchmarks import cases as C
from benchmarks.timing import RssSampler, cpu_threads, measure


def environment() -> dict[str, Any]:
    """Backend, devices and versions of this JAX process."""
    devs = jax.devices()
    return {
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
        "device_kind": devs[0].device_kind if devs else "",
        "cpu_threads": cpu_threads(),
    }


def _put(a: np.ndarray) -> jax.Array:
    return jax.device_put(jnp.asarray(a))


def _timed(fn: Callable[[], Any], policy: dict[str, Any]) -> dict[str, Any]:
    return measure(lambda: jax.block_until_ready(fn()), **policy)


# ----------------------------------------------------------------------------- operator

def op_impls() -> tuple[dict[str, Callable[..., jax.Array]], dict[str, str]]:
    """The JAX Converse2D implementations to time: ``ours`` (the library's, when importable) and
    the alternatives of :mod:`benchmarks.alt_ops`; and notes on those that are missing."""
    impls: dict[str, Callable[..., jax.Array]] = {}
    notes: dict[str, str] = {}
    try:
        ops = importlib.import_module("converse_jax.ops")
        # "ours": the operator as the networks run it, channels-first like the PyTorch baseline;
        # "ours-nhwc": the public channels-last entry point, two transposes more.
        impls["ours"] = _channels_first(ops.converse2d_channels_first)
        impls["ours-nhwc"] = ops.converse2d
    except (ImportError, AttributeError) as e:
        notes["ours"] = f"converse_jax.ops.converse2d_channels_first not available ({e})"
    impls["alt-dft"] = alt_ops.converse2d
    return impls, notes


def _channels_first(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """Wrap a channels-first operator so that it takes what :func:`run_op` passes, marked as such."""

    def call(x, kernel, lam, **kw):
        return fn(x, kernel, lam, **kw)

    call.channels_first = True
    return call


def run_op(case: dict[str, Any], policy: dict[str, Any], impl: Callable[..., jax.Array]) -> dict[str, Any]:
    """Forward and forward+backward (gradients for x, kernel and bias) of one operator case."""
    d = C.op_inputs(case)
    if getattr(impl, "channels_first", False):  # NCHW inputs, (C, k, k) kernel, as the baseline
        x, kern, ct = _put(d["x"]), _put(d["kernel"]), _put(d["cotangent"])
    else:
        x = _put(d["x"].transpose(0, 2, 3, 1))
        kern = _put(d["kernel"].transpose(1, 2, 0))
        ct = _put(d["cotangent"].transpose(0, 2, 3, 1))
    bias = _put(d["bias"])
    kw = dict(scale=case["scale"], padding=case["padding"], padding_mode=case["padding_mode"])
    eps = case["eps"]

    def forward(x, kern, bias):
        return impl(x, kern, jax.nn.sigmoid(bias - 9.0) + eps, **kw)

    fwd = jax.jit(forward)
    grad = jax.jit(jax.grad(lambda x, k, b, ct: jnp.sum(forward(x, k, b) * ct), argnums=(0, 1, 2)))
    return {"fwd": _timed(lambda: fwd(x, kern, bias), policy),
            "fwd+bwd": _timed(lambda: grad(x, kern, bias, ct), policy)}


# ----------------------------------------------------------------------------- networks

def models_available() -> str | None:
    """None when ``converse_jax.models.create`` can be imported, else why not."""
    try:
        mod = importlib.import_module("converse_jax.models")
    except ImportError as e:
        return f"converse_jax.models.create not available ({e})"
    if not hasattr(mod, "create"):
        return "converse_jax.models.create not available (no such attribute)"
    return None


def _build(name: str, arch: dict[str, Any]):
    from flax import nnx

    models = importlib.import_module("converse_jax.models")
    return models.create(name, rngs=nnx.Rngs(0), **arch)


def _net_inputs(case: dict[str, Any]) -> dict[str, jax.Array]:
    d = C.net_inputs(case)
    out = {"x": _put(d["x"].transpose(0, 2, 3, 1)), "target": _put(d["target"].transpose(0, 2, 3, 1))}
    if "kernel" in d:
        out["kernel"] = _put(d["kernel"])
    return out


NET_IMPLS = ("ours", "alt-nchw")


def _apply(model: Any, name: str, d: dict[str, jax.Array], impl: str = "ours") -> jax.Array:
    """The network's output: the library's forward pass (``ours``) or :mod:`benchmarks.alt_models`."""
    if impl == "alt-nchw":
        from benchmarks import alt_models

        return alt_models.forward(name, model, d["x"], d.get("kernel"), 1)
    if name == "usrnet":
        return model(d["x"], d["kernel"], sf=1)
    return model(d["x"])


def inference_fn(case: dict[str, Any], impl: str = "ours") -> tuple[Callable[..., jax.Array], tuple]:
    """A jitted pure inference function of the case's network and its arguments."""
    from flax import nnx

    graphdef, state = nnx.split(_build(case["net"], case.get("arch", {})))
    name = case["net"]
    d = _net_inputs(case)
    d.pop("target")

    @jax.jit
    def infer(state, d):
        return _apply(nnx.merge(graphdef, state), name, d, impl)

    return infer, (state, d)


def run_infer(case: dict[str, Any], policy: dict[str, Any], impl: str = "ours") -> dict[str, Any]:
    infer, args = inference_fn(case, impl)
    return {"infer": _timed(lambda: infer(*args), policy)}


def run_train(case: dict[str, Any], policy: dict[str, Any], impl: str = "ours") -> dict[str, Any]:
    """One Adam step on an L1 loss, parameters and optimiser state donated and carried over."""
    import optax
    from flax import nnx

    from converse_jax.train.step import mode_view

    name = case["net"]
    # As the trainer does: the training view of the model (repeated blocks unrolled).
    model = mode_view(_build(name, case.get("arch", {})), True)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(1e-4)
    opt_state = tx.init(params)
    d = _net_inputs(case)

    def loss_fn(params, rest, d):
        model = nnx.merge(graphdef, params, rest)
        return jnp.mean(jnp.abs(_apply(model, name, d, impl) - d["target"]))

    def train_step(params, opt_state, rest, d):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, d)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(train_step, donate_argnums=(0, 1))
    carry = {"params": params, "opt": opt_state}

    def one() -> Any:
        carry["params"], carry["opt"], loss = step(carry["params"], carry["opt"], rest, d)
        return carry["params"], loss

    return {"train": _timed(one, policy)}


# ----------------------------------------------------------------------------- memory

def compiled_memory(case: dict[str, Any]) -> dict[str, Any]:
    """XLA's buffer assignment for the case's inference (compile only, nothing runs):
    arguments, outputs and temporaries in bytes, and their sum as the peak estimate."""
    infer, args = inference_fn(case)
    t0 = time.perf_counter()
    compiled = infer.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    if m is None:
        return {"available": False, "compile_s": compile_s}
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {"available": True, "compile_s": compile_s, "argument_bytes": m.argument_size_in_bytes,
            "output_bytes": m.output_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
            "peak_bytes": peak, "pixels": case["out_hw"] ** 2}


def run_memory(case: dict[str, Any], policy: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one inference, measured in this (fresh) process: the device's own
    peak counter where it has one (GPU), else the growth of the sampled resident set size."""
    infer, args = inference_fn(case)
    compiled = infer.lower(*args).compile()
    jax.block_until_ready(args)
    dev = jax.devices()[0]
    before = dev.memory_stats() or {}
    with RssSampler() as rss:
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        dt = time.perf_counter() - t0
    after = dev.memory_stats() or {}
    out: dict[str, Any] = {"seconds": dt, "pixels": case["out_hw"] ** 2}
    if "peak_bytes_in_use" in after:
        out.update(method="device memory_stats", peak_bytes=after["peak_bytes_in_use"],
                   bytes_in_use_before=before.get("bytes_in_use", 0))
    else:
        out.update(method="sampled RSS", peak_rss_growth_bytes=rss.growth)
    return {"memory": out}


RUNNERS = {"infer": run_infer, "train": run_train, "memory": run_memory}


def main(argv: list[str]) -> int:
    """``python -m benchmarks.jax_bench JSON``: one measurement in a fresh process, printed as JSON."""
    if len(argv) != 1:
        print("usage: python -m benchmarks.jax_bench JSON", file=sys.stderr)
        return 2
    req = json.loads(argv[0])
    out = RUNNERS[req["section"]](req["case"], req.get("policy", {}))
    out["env"] = environment()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
