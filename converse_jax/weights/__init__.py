"""Released PyTorch weights in JAX: a torch-free, code-free checkpoint reader, the layout
converter, converted (orbax) checkpoints and :func:`load_pretrained`.

Submodules load lazily, so reading a checkpoint (:func:`load_torch_state_dict`) needs only
NumPy and does not import JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_torch_state_dict": "reader",
    "load_safetensors": "reader",
    "read_state_dict": "reader",
    "WRAPPER_KEYS": "reader",
    "CheckpointFormatError": "errors",
    "UnsafeCheckpointError": "errors",
    "WeightMismatchError": "errors",
    "WeightsUnavailableError": "errors",
    "ChecksumMismatchError": "errors",
    "path_key": "convert",
    "to_jax_layout": "convert",
    "convert_state_dict": "convert",
    "assign_weights": "convert",
    "save_converted": "checkpoint",
    "load_converted": "checkpoint",
    "read_metadata": "checkpoint",
    "make_metadata": "checkpoint",
    "sha256_file": "checkpoint",
    "cache_dir": "pretrained",
    "fetch_release": "pretrained",
    "load_weights": "pretrained",
    "load_pretrained": "pretrained",
    "find_weights": "pretrained",
    "WeightsFile": "pretrained",
    "LoadedModel": "pretrained",
    "load_with_source": "pretrained",
    "saved_model_kwargs": "pretrained",
    "convert_checkpoint": "pretrained",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
