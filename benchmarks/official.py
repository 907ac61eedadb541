"""The official PyTorch code (cszn/ConverseNet) as a second baseline, run from a user's checkout.

The official repository has no licence, so nothing of it is part of this project: the benchmark
imports its model modules from a checkout the user names with ``--reference=PATH`` (for example
``git clone https://github.com/cszn/ConverseNet third_party/ConverseNet``; ``/third_party/`` is
ignored by git). Only the four model files under ``models/`` are imported, never its scripts or
``utils/``, which need more packages than torch.

The networks are built with the constructor arguments its test scripts use for the released
weights, and those weights are loaded from the checkout's ``model_zoo/`` when present (strict key
match), so the computation timed is the released one. Converse2D is the checkout's module with
the case's kernel and bias written into its parameters.

:func:`check_reference` needs no torch (the suite calls it before anything runs); the rest is
called in the torch worker's process.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

CLONE_HINT = "git clone https://github.com/cszn/ConverseNet third_party/ConverseNet"

# The files that identify a checkout, each with a line it must contain.
SIGNATURE = {
    "models/util_converse.py": "class Converse2D",
    "models/converse_dncnn.py": "class ConverseDnCNN",
    "models/converse_srresnet.py": "class ConverseMSRResNet",
    "models/converse_usrnet.py": "class ConverseUSRNet",
}

# name -> (module, class, constructor arguments of the released weights, checkpoint in model_zoo/)
NETWORKS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "dncnn": ("models.converse_dncnn", "ConverseDnCNN",
              {"in_channels": 1, "kernel_size": 7, "num_features": 64, "padding": 6, "padding_mode": "circular"},
              "converse_dncnn.pth"),
    "srresnet": ("models.converse_srresnet", "ConverseMSRResNet",
                 {"in_channels": 3, "out_channels": 3, "num_features": 64, "num_blocks": 16, "upscale": 4},
                 "converse_srresnet.pth"),
    "conversenet": ("models.converse_usrnet", "ConverseNet",
                    {"num_iterations": 5, "in_channels": 64, "num_blocks": 7}, "conversenet.pth"),
    "usrnet": ("models.converse_usrnet", "ConverseUSRNet",
               {"num_iterations": 5, "in_channels": 64, "num_blocks": 7}, "converse_usrnet.pth"),
}


class CheckoutError(ValueError):
    """The checkout is missing, incomplete, or its modules cannot be imported (one line)."""


def check_reference(path: str | Path) -> Path:
    """The resolved checkout folder; :class:`CheckoutError` naming what is wrong otherwise."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise CheckoutError(f"--reference: {root} is not a folder; get the official code with `{CLONE_HINT}`")
    for rel, needle in SIGNATURE.items():
        f = root / rel
        try:
            text = f.read_text(errors="replace")
        except OSError:
            raise CheckoutError(f"--reference: {root} does not look like a cszn/ConverseNet checkout "
                                  f"({rel} is missing); get it with `{CLONE_HINT}`") from None
        if needle not in text:
            raise CheckoutError(f"--reference: {f} has no `{needle}`; is {root} a cszn/ConverseNet checkout? "
                                  f"(`{CLONE_HINT}`)")
    return root.resolve()


def _import(root: Path, module: str) -> Any:
    """Import ``module`` (``models.*``) from the checkout at ``root``, and only from there."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise CheckoutError(f"--reference: importing {module} from {root} failed ({e}); "
                              f"install what it needs (pip install {e.name or '...'})") from None
    where = Path(getattr(mod, "__file__", "") or "").resolve()
    if root not in where.parents:
        raise CheckoutError(f"--reference: {module} was imported from {where}, not from {root}; "
                              "another package named `models` is in the way")
    return mod


def converse2d_module(root: Path, case: dict[str, Any], kernel: Any, bias: Any) -> Any:
    """The checkout's Converse2D for an operator case, its weight and bias set to ``kernel`` (C, k, k)
    and ``bias`` (C,) (torch tensors)."""
    mod = _import(root, "models.util_converse")
    c, k = case["C"], case["k"]
    m = mod.Converse2D(c, c, k, scale=case["scale"], padding=case["padding"], padding_mode=case["padding_mode"],
                       eps=case["eps"])
    m.weight.data.copy_(kernel.reshape(1, c, k, k))
    m.bias.data.copy_(bias.reshape(1, c, 1, 1))
    return m


def build_network(root: Path, name: str, arch: dict[str, int] | None = None) -> tuple[Any, str]:
    """(network, what its weights are): the released weights from ``model_zoo/`` when present and the
    network has its released size; else its own random initialisation (``arch`` shrinks it, as --quick)."""
    import torch

    module, cls, kwargs, ckpt = NETWORKS[name]
    net = getattr(_import(root, module), cls)(**dict(kwargs, **(arch or {})))
    path = root / "model_zoo" / ckpt
    if arch or not path.is_file():
        return net, "random init" + (" (shrunk)" if arch else f" ({path} not found)")
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return net, f"model_zoo/{ckpt}"


def call_network(net: Any, name: str, d: dict[str, Any]) -> Any:
    """The network's forward as its test script calls it (USRNet: kernel (B, 1, k, k), sf 1)."""
    if name == "usrnet":
        return net(d["x"], d["kernel"][:, None], 1)
    return net(d["x"])
