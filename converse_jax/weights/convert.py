"""Map a PyTorch state dict onto an NNX model: names through the model's key mapping, layouts
by rule.

Layout rules (chosen from the target leaf's name, the source's rank and the target's shape):

- leaf ``kernel`` (convolution or linear): PyTorch ``(out, in, *spatial)`` becomes
  ``(*spatial, in, out)``, or ``(in, out)`` for a 1x1 convolution held as a dense layer; a
  linear ``(out, in)`` becomes ``(in, out)``;
- any other leaf with the same shape on both sides is copied (LayerNorm ``(C,)``, biases);
- a Converse2D weight ``(1, C, kh, kw)`` becomes ``(kh, kw, C)``;
- a vector stored with singleton axes, e.g. a Converse2D bias or an alpha ``(1, C, 1, 1)``,
  is reshaped to the target (``(C,)``) when both hold the same non-singleton axis.

Anything else is a shape mismatch. All problems of one state dict are reported together in a
single :class:`WeightMismatchError`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from converse_jax.weights.errors import WeightMismatchError

__all__ = [
    "PathKey",
    "path_key",
    "to_jax_layout",
    "convert_state_dict",
    "assign_weights",
    "model_leaves",
]

PathKey = tuple[str, ...]


def path_key(path: Iterable[Any]) -> PathKey:
    """Canonical form of an NNX state path: every element as a string."""
    return tuple(str(getattr(p, "key", p)) for p in path)


def _dotted(key: PathKey) -> str:
    return ".".join(key)


def to_jax_layout(src: np.ndarray, target_shape: tuple[int, ...],
                  leaf: str) -> Optional[np.ndarray]:
    """``src`` (PyTorch layout) rearranged to ``target_shape``, or None when no rule fits."""
    target_shape = tuple(int(d) for d in target_shape)
    if leaf == "kernel":
        if src.ndim >= 3 and len(target_shape) == 2 and all(d == 1 for d in src.shape[2:]):
            moved = src.reshape(src.shape[:2]).T  # 1x1 conv held as a dense layer
        elif src.ndim >= 3:
            moved = np.transpose(src, (*range(2, src.ndim), 1, 0))
        elif src.ndim == 2:
            moved = src.T
        else:
            moved = src
        return np.ascontiguousarray(moved) if moved.shape == target_shape else None
    if src.shape == target_shape:
        return src
    if src.ndim == 4 and src.shape[0] == 1 and len(target_shape) == 3:
        moved = np.transpose(src[0], (1, 2, 0))
        if moved.shape == target_shape:
            return np.ascontiguousarray(moved)
    big_src = [d for d in src.shape if d != 1]
    big_tgt = [d for d in target_shape if d != 1]
    if len(big_src) <= 1 and big_src == big_tgt:
        return src.reshape(target_shape)
    return None


def model_leaves(model: nnx.Module) -> dict[PathKey, Any]:
    """Every variable of ``model`` by canonical path (abstract models work too)."""
    return {path_key(p): v for p, v in nnx.to_flat_state(nnx.state(model))}


def _leaf_shape(variable: Any) -> tuple[int, ...]:
    value = variable.get_value() if hasattr(variable, "get_value") else variable
    return tuple(value.shape)


def _fold(names: list[str]) -> list[str]:
    """Fold runs of names that differ in one integer component: ``a.{0..19}.b``."""
    groups: dict[tuple, list[int]] = {}
    singles: list[str] = []
    order: list[tuple] = []
    for name in names:
        parts = name.split(".")
        nums = [i for i, p in enumerate(parts) if p.isdigit()]
        if not nums:
            singles.append(name)
            order.append(("s", name))
            continue
        # fold on the first numeric component; others stay literal
        i = nums[0]
        key = (tuple(parts[:i]), tuple(parts[i + 1:]))
        if key not in groups:
            groups[key] = []
            order.append(("g", key))
        groups[key].append(int(parts[i]))
    out = []
    for kind, item in order:
        if kind == "s":
            out.append(item)
            continue
        head, tail = item
        idx = sorted(set(groups[item]))
        if len(idx) == 1:
            label = str(idx[0])
        elif idx == list(range(idx[0], idx[-1] + 1)):
            label = f"{{{idx[0]}..{idx[-1]}}}"
        else:
            label = "{" + ",".join(map(str, idx)) + "}"
        out.append(".".join((*head, label, *tail)))
    return out


def _as_torch_name(key_to_path: Callable[[str], Any], key: str) -> Optional[PathKey]:
    try:
        path = key_to_path(key)
    except (KeyError, ValueError, IndexError):
        return None
    return None if path is None else path_key(path)


def convert_state_dict(torch_state: Mapping[str, np.ndarray], model: nnx.Module,
                       key_to_path: Callable[[str], Any], *, source: str = "state dict",
                       model_name: str = "model") -> dict[PathKey, np.ndarray]:
    """Rearrange a PyTorch state dict into ``{NNX path: array}`` for ``model``.

    ``key_to_path`` maps each PyTorch key to the NNX state path (None or KeyError: the key
    has no place in the model). Arrays keep their dtype. Every ``nnx.Param`` of the model must
    be covered; any missing, unexpected or mis-shaped entry is reported, all of them in one
    :class:`WeightMismatchError`.
    """
    leaves = model_leaves(model)
    params = {k for k, v in leaves.items() if isinstance(v, nnx.Param)}
    out: dict[PathKey, np.ndarray] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    origin: dict[PathKey, str] = {}
    for key, value in torch_state.items():
        path = _as_torch_name(key_to_path, key)
        if path is None or path not in leaves:
            unexpected.append(key)
            continue
        if path in origin:
            mismatched.append(f"{key} and {origin[path]} both map to {_dotted(path)}")
            continue
        origin[path] = key
        value = np.asarray(value)
        target = _leaf_shape(leaves[path])
        arranged = to_jax_layout(value, target, path[-1])
        if arranged is None:
            mismatched.append(f"{key} {tuple(value.shape)} -> {_dotted(path)} {target}")
            continue
        out[path] = arranged
    missing = sorted(_dotted(p) for p in params if p not in origin)
    if missing or unexpected or mismatched:
        parts = [f"{source} does not fit {model_name}: {len(missing)} missing, "
                 f"{len(unexpected)} unexpected, {len(mismatched)} shape mismatch(es)"]
        if missing:
            parts.append("missing in the checkpoint: " + ", ".join(_fold(missing)))
        if unexpected:
            parts.append("unexpected in the checkpoint: " + ", ".join(_fold(unexpected)))
        if mismatched:
            parts.append("shape mismatches: " + ", ".join(mismatched))
        parts.append("check that the checkpoint belongs to this model")
        raise WeightMismatchError("; ".join(parts), missing, unexpected, mismatched)
    return out


def assign_weights(model: nnx.Module, weights: Mapping[PathKey, np.ndarray], *,
                   source: str = "weights", model_name: str = "model") -> None:
    """Write ``{path: array}`` into ``model`` in place, cast to each variable's dtype.

    Every ``nnx.Param`` must be given and every given path must exist with the same shape;
    otherwise nothing is written and a :class:`WeightMismatchError` lists all problems.
    """
    leaves = model_leaves(model)
    params = {k for k, v in leaves.items() if isinstance(v, nnx.Param)}
    given = {path_key(k): np.asarray(v) for k, v in weights.items()}
    unexpected = sorted(_dotted(k) for k in given if k not in leaves)
    missing = sorted(_dotted(k) for k in params if k not in given)
    mismatched = [f"{_dotted(k)} {tuple(v.shape)} vs model {_leaf_shape(leaves[k])}"
                  for k, v in given.items()
                  if k in leaves and tuple(v.shape) != _leaf_shape(leaves[k])]
    if missing or unexpected or mismatched:
        parts = [f"{source} does not fit {model_name}: {len(missing)} missing, "
                 f"{len(unexpected)} unexpected, {len(mismatched)} shape mismatch(es)"]
        if missing:
            parts.append("missing: " + ", ".join(_fold(missing)))
        if unexpected:
            parts.append("unexpected: " + ", ".join(_fold(unexpected)))
        if mismatched:
            parts.append("shape mismatches: " + ", ".join(mismatched))
        raise WeightMismatchError("; ".join(parts), missing, unexpected, mismatched)
    flat = nnx.to_flat_state(nnx.state(model))
    updates = {}
    for path, variable in flat:
        key = path_key(path)
        if key in given:
            dtype = variable.get_value().dtype
            updates[tuple(path)] = variable.replace(jnp.asarray(given[key], dtype=dtype))
    nnx.update(model, nnx.from_flat_state(updates))

