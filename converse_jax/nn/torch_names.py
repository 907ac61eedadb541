"""PyTorch state-dict names of the official code's layers, mapped onto our NNX attribute paths.

Used by each model's ``torch_key_to_path``; layouts (transposes, reshapes) are the converter's job
(:mod:`converse_jax.weights`), chosen from the shapes.
"""

from __future__ import annotations

# Official block: conv1 = Sequential(LayerNorm, Conv1x1, GELU, Converse2D, GELU, Conv1x1),
#                 conv2 = Sequential(LayerNorm, Conv1x1, GELU, Conv1x1).
_BLOCK_LAYERS = {
    ("conv1", "0"): ("norm1", "layernorm"),
    ("conv1", "1"): ("pw1", "linear"),
    ("conv1", "3"): ("mixer", "converse"),
    ("conv1", "5"): ("pw2", "linear"),
    ("conv2", "0"): ("norm2", "layernorm"),
    ("conv2", "1"): ("pw3", "linear"),
    ("conv2", "3"): ("pw4", "linear"),
}

_LEAF = {
    "layernorm": {"weight": "scale", "bias": "bias"},
    "linear": {"weight": "kernel", "bias": "bias"},
    "converse": {"weight": "weight", "bias": "bias"},
}


def leaf_path(kind: str, name: str, key: str) -> tuple[str, ...]:
    """Our leaf name for a PyTorch parameter ``name`` of a layer of ``kind``."""
    try:
        return (_LEAF[kind][name],)
    except KeyError:
        raise KeyError(f"unexpected PyTorch key {key!r}") from None


def linear_key_to_path(prefix: tuple, name: str, key: str) -> tuple:
    """Path of a PyTorch ``Conv2d(1x1)``/``Linear`` parameter ``name`` (weight, bias) of the layer at ``prefix``."""
    return tuple(prefix) + leaf_path("linear", name, key)


def block_key_to_path(parts: list[str], key: str) -> tuple:
    """Path inside a :class:`~converse_jax.nn.ConverseBlock` of a block-relative PyTorch key (split on '.')."""
    if len(parts) == 1 and parts[0] in ("alpha1", "alpha2"):
        return (parts[0],)
    if len(parts) == 3 and (parts[0], parts[1]) in _BLOCK_LAYERS:
        attr, kind = _BLOCK_LAYERS[(parts[0], parts[1])]
        return (attr,) + leaf_path(kind, parts[2], key)
    raise KeyError(f"unexpected PyTorch key {key!r}")
