"""Runs one baseline (PyTorch) measurement in its own process and prints it as JSON.

``python -m benchmarks.torch_worker '{"section": "op", "case": {...}, "policy": {...}}'``

The suite starts this with an interpreter that has torch (``--torch-python``), so the main
environment stays torch-free and each measurement gets a fresh process (clean peak memory,
no thread pools competing with JAX's).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import cases as C
from benchmarks import official as O
from benchmarks import torch_ref as T
from benchmarks.timing import RssSampler, cpu_threads, measure

DEVICE = torch.device("cpu")
REFERENCE: Path | None = None  # the official checkout when this worker times the official code
INFO: dict[str, Any] = {}  # what the runners report about themselves (the official weights used)


def _setup(device: str) -> dict[str, Any]:
    global DEVICE
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the JAX side runs on a GPU but this torch has no CUDA device")
    DEVICE = torch.device(device)
    torch.set_num_threads(cpu_threads())
    torch.manual_seed(0)
    info = {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads(), "device": device}
    if device == "cuda":
        info["device_name"] = torch.cuda.get_device_name(0)
    return info


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _measure(fn: Any, policy: dict[str, Any]) -> dict[str, Any]:
    def run() -> None:
        fn()
        _sync()

    return measure(run, **policy)


def _tensor(a: Any) -> torch.Tensor:
    return torch.from_numpy(a).to(DEVICE)


def _op_functions(case: dict[str, Any], d: dict[str, Any]) -> tuple[Any, Any, list[torch.Tensor]]:
    """(forward, forward with gradients, the parameters that get gradients) of the operator case,
    both x -> y. With a reference checkout,
    the official Converse2D module, else our baseline's function of the paper's closed form."""
    weight = _tensor(d["kernel"])[None]
    bias = _tensor(d["bias"]).view(1, -1, 1, 1)
    if REFERENCE is not None:
        m = O.converse2d_module(REFERENCE, case, weight, bias).to(DEVICE, weight.dtype)
        return m, m, list(m.parameters())
    kw = dict(scale=case["scale"], padding=case["padding"], padding_mode=case["padding_mode"])
    eps = case["eps"]
    wg, bg = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)

    def fwd(x: torch.Tensor) -> torch.Tensor:
        return T.converse2d(x, weight, torch.sigmoid(bias - 9.0) + eps, **kw)

    def fwd_grad(x: torch.Tensor) -> torch.Tensor:
        return T.converse2d(x, wg, torch.sigmoid(bg - 9.0) + eps, **kw)

    return fwd, fwd_grad, [wg, bg]


def run_op(case: dict[str, Any], policy: dict[str, Any]) -> dict[str, Any]:
    d = C.op_inputs(case)
    x = _tensor(d["x"])
    ct = _tensor(d["cotangent"])
    op, op_grad, params = _op_functions(case, d)

    def fwd() -> None:
        with torch.inference_mode():
            op(x)

    xg = x.clone().requires_grad_(True)

    def fwd_bwd() -> None:
        xg.grad = None
        for t in params:
            t.grad = None
        (op_grad(xg) * ct).sum().backward()

    return {"fwd": _measure(fwd, policy), "fwd+bwd": _measure(fwd_bwd, policy)}


def run_op_output(case: dict[str, Any], policy: dict[str, Any]) -> dict[str, Any]:
    """The operator's forward output for the case's inputs in float32 and float64, saved to the .npz
    file ``case["out"]``: to check that the official code and our baselines compute the same thing."""
    import numpy as np

    out = {}
    for dtype in ("float32", "float64"):
        d = {k: v.astype(dtype) for k, v in C.op_inputs(case).items()}
        op, _, _ = _op_functions(case, d)
        with torch.inference_mode():
            out[dtype] = op(_tensor(d["x"])).cpu().numpy()
    np.savez(case["out"], **out)
    return {"op_output": {"file": case["out"], "shape": list(out["float32"].shape)}}


def _net_call(net: torch.nn.Module, name: str, d: dict[str, torch.Tensor]) -> torch.Tensor:
    if REFERENCE is not None:
        return O.call_network(net, name, d)
    if name == "usrnet":
        return net(d["x"], d["kernel"], 1)
    return net(d["x"])


def _build(case: dict[str, Any]) -> torch.nn.Module:
    """The network of the case: the official one from the checkout (released weights when present), or
    our baseline's."""
    if REFERENCE is not None:
        net, INFO["weights"] = O.build_network(REFERENCE, case["net"], case.get("arch") or None)
        return net
    return T.build(case["net"], **case.get("arch", {}))


def run_infer(case: dict[str, Any], policy: dict[str, Any]) -> dict[str, Any]:
    net = _build(case).eval().to(DEVICE)
    d = {k: _tensor(v) for k, v in C.net_inputs(case).items()}

    def fwd() -> None:
        with torch.inference_mode():
            _net_call(net, case["net"], d)

    return {"infer": _measure(fwd, policy)}


def run_train(case: dict[str, Any], policy: dict[str, Any]) -> dict[str, Any]:
    net = _build(case).train().to(DEVICE)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    d = {k: _tensor(v) for k, v in C.net_inputs(case).items()}

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = (_net_call(net, case["net"], d) - d["target"]).abs().mean()
        loss.backward()
        opt.step()

    return {"train": _measure(step, policy)}


def run_memory(case: dict[str, Any], policy: dict[str, Any]) -> dict[str, Any]:
    net = _build(case).eval().to(DEVICE)
    d = {k: _tensor(v) for k, v in C.net_inputs(case).items()}
    if DEVICE.type == "cuda":
        _sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with RssSampler() as rss:
        t0 = time.perf_counter()
        with torch.inference_mode():
            _net_call(net, case["net"], d)
        _sync()
        dt = time.perf_counter() - t0
    if DEVICE.type == "cuda":
        return {"memory": {"peak_bytes": torch.cuda.max_memory_allocated() - before, "seconds": dt,
                           "method": "torch.cuda.max_memory_allocated"}}
    return {"memory": {"peak_rss_growth_bytes": rss.growth, "seconds": dt, "method": "sampled RSS"}}


RUNNERS = {"op": run_op, "infer": run_infer, "train": run_train, "memory": run_memory, "op_output": run_op_output}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m benchmarks.torch_worker JSON", file=sys.stderr)
        return 2
    global REFERENCE
    req = json.loads(argv[0])
    info = _setup(req.get("device", "cpu"))
    if req.get("reference"):
        try:
            REFERENCE = O.check_reference(req["reference"])
            out = RUNNERS[req["section"]](req["case"], req.get("policy", {}))
        except O.CheckoutError as e:
            out = {"error": str(e)}
        info["reference"] = str(REFERENCE)
    else:
        out = RUNNERS[req["section"]](req["case"], req.get("policy", {}))
    out["env"] = dict(info, **INFO)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
