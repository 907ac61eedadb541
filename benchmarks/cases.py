"""What the benchmark measures: the operator shapes, network sizes and memory sizes, full and
quick, plus the deterministic inputs both frameworks use. No framework imports here."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

NETWORKS = ("dncnn", "srresnet", "conversenet", "usrnet")
SECTIONS = ("op", "infer", "train", "memory")
# not run by default: component timings behind the proposals; large-image restoration (minutes)
EXTRA_SECTIONS = ("micro", "large")

# Targets of the issue: our time must be at least this many times shorter than the baseline's.
TARGETS = {("op", "fwd"): 5.0, ("op", "fwd+bwd"): 3.0, ("infer", None): 5.0, ("train", None): 3.0}

# The operator at the shapes the networks use (NCHW sizes of the layer input; eps of the layer).
OP_CASES_FULL = [
    {"name": "dncnn-256", "B": 1, "C": 128, "H": 256, "W": 256, "k": 7, "scale": 1,
     "padding": 6, "padding_mode": "circular", "eps": 1e-5},
    {"name": "srresnet-up", "B": 1, "C": 64, "H": 128, "W": 128, "k": 2, "scale": 2,
     "padding": 2, "padding_mode": "replicate", "eps": 1e-3},
    {"name": "dncnn-train", "B": 8, "C": 128, "H": 64, "W": 64, "k": 7, "scale": 1,
     "padding": 6, "padding_mode": "circular", "eps": 1e-5},
    {"name": "dncnn-128", "B": 1, "C": 128, "H": 128, "W": 128, "k": 7, "scale": 1,
     "padding": 6, "padding_mode": "circular", "eps": 1e-5},
    {"name": "srresnet-up64", "B": 1, "C": 64, "H": 64, "W": 64, "k": 2, "scale": 2,
     "padding": 2, "padding_mode": "replicate", "eps": 1e-3},
]
OP_CASES_QUICK = [
    {"name": "dncnn-256", "B": 1, "C": 8, "H": 24, "W": 24, "k": 7, "scale": 1,
     "padding": 6, "padding_mode": "circular", "eps": 1e-5},
    {"name": "srresnet-up", "B": 1, "C": 8, "H": 12, "W": 12, "k": 2, "scale": 2,
     "padding": 2, "padding_mode": "replicate", "eps": 1e-3},
    {"name": "dncnn-train", "B": 2, "C": 8, "H": 16, "W": 16, "k": 7, "scale": 1,
     "padding": 6, "padding_mode": "circular", "eps": 1e-5},
]

# Network channels: (input channels, output channels, scale).
NET_IO = {"dncnn": (1, 1, 1), "srresnet": (3, 3, 4), "conversenet": (3, 3, 1), "usrnet": (3, 3, 1)}

# --quick also shrinks the networks (fewer blocks and iterations) so that compiling them stays
# short: it checks that everything runs, it does not measure the real networks.
QUICK_ARCH = {"dncnn": {"num_blocks": 2}, "srresnet": {"num_blocks": 1},
              "conversenet": {"num_blocks": 2, "num_iterations": 2},
              "usrnet": {"num_blocks": 2, "num_iterations": 2}}

INFER_SIZE = {"full": 256, "quick": 16}  # output side; SR input is a quarter of it
TRAIN = {"full": {"batch": 8, "patch": 64}, "quick": {"batch": 2, "patch": 16}}  # patch = target side
MEMORY_SIZES = {"full": (512, 1024), "quick": (32, 64)}
MEMORY_COMPILE_SIZES = {"full": (256, 512, 1024, 2048), "quick": (32, 64, 128)}


def op_cases(quick: bool) -> list[dict[str, Any]]:
    return [dict(c) for c in (OP_CASES_QUICK if quick else OP_CASES_FULL)]


def infer_cases(quick: bool) -> list[dict[str, Any]]:
    out = INFER_SIZE["quick" if quick else "full"]
    cases = []
    for net in NETWORKS:
        cin, cout, s = NET_IO[net]
        cases.append({"net": net, "batch": 1, "in_hw": out // s, "out_hw": out, "cin": cin, "cout": cout,
                      "scale": s, "arch": dict(QUICK_ARCH[net]) if quick else {}})
    return cases


def train_cases(quick: bool) -> list[dict[str, Any]]:
    t = TRAIN["quick" if quick else "full"]
    cases = []
    for net in NETWORKS:
        cin, cout, s = NET_IO[net]
        cases.append({"net": net, "batch": t["batch"], "in_hw": t["patch"] // s, "out_hw": t["patch"],
                      "cin": cin, "cout": cout, "scale": s, "arch": dict(QUICK_ARCH[net]) if quick else {}})
    return cases


def memory_cases(quick: bool) -> list[dict[str, Any]]:
    return [memory_case(n, quick) for n in MEMORY_SIZES["quick" if quick else "full"]]


def memory_case(size: int, quick: bool) -> dict[str, Any]:
    """Converse-DnCNN inference on one size×size gray image."""
    return {"net": "dncnn", "batch": 1, "in_hw": size, "out_hw": size, "cin": 1, "cout": 1, "scale": 1,
            "arch": dict(QUICK_ARCH["dncnn"]) if quick else {}}


# ----------------------------------------------------------------------------- inputs

def _rng(tag: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(tag.encode()))


def op_inputs(case: dict[str, Any]) -> dict[str, np.ndarray]:
    """Float32 NCHW inputs of an operator case: x, kernel (C, k, k), bias (C,), cotangent."""
    rng = _rng("op" + case["name"])
    b, c, h, w, k, s = case["B"], case["C"], case["H"], case["W"], case["k"], case["scale"]
    draw = rng.standard_normal((c, k * k))
    kern = np.exp(draw - draw.max(1, keepdims=True))
    kern /= kern.sum(1, keepdims=True)
    return {
        "x": rng.random((b, c, h, w), dtype=np.float32),
        "kernel": kern.reshape(c, k, k).astype(np.float32),
        "bias": (0.5 * rng.standard_normal(c)).astype(np.float32),
        "cotangent": rng.standard_normal((b, c, h * s, w * s)).astype(np.float32),
    }


def blur_kernels(batch: int, seed: int = 0) -> np.ndarray:
    """(batch, 7, 7) normalised Gaussian blur kernels with random widths."""
    rng = np.random.default_rng(seed)
    ax = np.arange(7) - 3.0
    out = []
    for _ in range(batch):
        sy, sx = rng.uniform(0.8, 2.0, size=2)
        g = np.exp(-(ax[:, None] ** 2) / (2 * sy**2) - (ax[None, :] ** 2) / (2 * sx**2))
        out.append(g / g.sum())
    return np.stack(out).astype(np.float32)


def net_inputs(case: dict[str, Any]) -> dict[str, np.ndarray]:
    """Float32 NCHW inputs of a network case: image in [0, 1], target, and blur kernels for USRNet."""
    rng = _rng("net" + case["net"] + str(case["in_hw"]))
    b = case["batch"]
    d = {
        "x": rng.random((b, case["cin"], case["in_hw"], case["in_hw"]), dtype=np.float32),
        "target": rng.random((b, case["cout"], case["out_hw"], case["out_hw"]), dtype=np.float32),
    }
    if case["net"] == "usrnet":
        d["kernel"] = blur_kernels(b)
    return d
