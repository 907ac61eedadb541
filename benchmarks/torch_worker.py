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
from typing import Any

import torch

from benchmarks import cases as C
from benchmarks import torch_ref as T
from benchmarks.timing import RssSampler, cpu_threads, measure

DEVICE = torch.device("cpu")


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


def run_op(case: dict[str, Any], policy: dict[str, Any]) -> dict[str, Any]:
    d = C.op_inputs(case)
    x = _tensor(d["x"])
    weight = _tensor(d["kernel"])[None]
    bias = _tensor(d["bias"]).view(1, -1, 1, 1)
    ct = _tensor(d["cotangent"])
    kw = dict(scale=case["scale"], padding=case["padding"], padding_mode=case["padding_mode"])
    eps = case["eps"]

    def fwd() -> None:
        with torch.inference_mode():
            lam = torch.sigmoid(bias - 9.0) + eps
            T.converse2d(x, weight, lam, **kw)

    xg, wg, bg = (t.clone().requires_grad_(True) for t in (x, weight, bias))

    def fwd_bwd() -> None:
        for t in (xg, wg, bg):
            t.grad = None
        lam = torch.sigmoid(bg - 9.0) + eps
        (T.converse2d(xg, wg, lam, **kw) * ct).sum().backward()

    return {"fwd": _measure(fwd, policy), "fwd+bwd": _measure(fwd_bwd, policy)}


def _net_call(net: torch.nn.Module, name: str, d: dict[str, torch.Tensor]) -> torch.Tensor:
    if name == "usrnet":
        return net(d["x"], d["kernel"], 1)
    return net(d["x"])


def run_infer(case: dict[str, Any], policy: dict[str, Any]) -> dict[str, Any]:
    net = T.build(case["net"], **case.get("arch", {})).eval().to(DEVICE)
    d = {k: _tensor(v) for k, v in C.net_inputs(case).items()}

    def fwd() -> None:
        with torch.inference_mode():
            _net_call(net, case["net"], d)

    return {"infer": _measure(fwd, policy)}


def run_train(case: dict[str, Any], policy: dict[str, Any]) -> dict[str, Any]:
    net = T.build(case["net"], **case.get("arch", {})).train().to(DEVICE)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    d = {k: _tensor(v) for k, v in C.net_inputs(case).items()}

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = (_net_call(net, case["net"], d) - d["target"]).abs().mean()
        loss.backward()
        opt.step()

    return {"train": _measure(step, policy)}


def run_memory(case: dict[str, Any], policy: dict[str, Any]) -> dict[str, Any]:
    net = T.build(case["net"], **case.get("arch", {})).eval().to(DEVICE)
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


RUNNERS = {"op": run_op, "infer": run_infer, "train": run_train, "memory": run_memory}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m benchmarks.torch_worker JSON", file=sys.stderr)
        return 2
    req = json.loads(argv[0])
    info = _setup(req.get("device", "cpu"))
    out = RUNNERS[req["section"]](req["case"], req.get("policy", {}))
    out["env"] = info
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
