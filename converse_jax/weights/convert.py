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

Repeated blocks are stored stacked (:class:`converse_jax.nn.BlockStack`): the variables of a stack
at ``body`` are leaves ``body.layers.pw1.kernel`` with a leading block axis. Each block's slice
also has a per-block name, ``body.3.pw1.kernel`` for block 3 (:func:`block_slots`): the models'
PyTorch key mappings give per-block names, the layout rules apply per slice, and checkpoints
converted before blocks were stacked hold per-block names too (:func:`stack_legacy_blocks`).
Problems inside a stack are reported by per-block name, folded as ``body.{0..19}.pw1.kernel``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from converse_jax.nn.blocks import BlockStack
from converse_jax.weights.errors import WeightMismatchError

__all__ = [
    "PathKey",
    "path_key",
    "to_jax_layout",
    "convert_state_dict",
    "assign_weights",
    "model_leaves",
    "block_slots",
    "stack_legacy_blocks",
]

PathKey = tuple[str, ...]


def path_key(path: Iterable[Any]) -> PathKey:
    """Canonical form of an NNX state path: every element as a string."""
    return tuple(str(getattr(p, "key", p)) for p in path)


def _dotted(key: PathKey) -> str:
    return ".".join(key)


def to_jax_layout(src: np.ndarray, target_shape: tuple[int, ...],
                  leaf: str) -> np.ndarray | None:
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


def block_slots(model: nnx.Module) -> dict[PathKey, tuple[PathKey, int]]:
    """The per-block name of every slice of ``model``'s stacked leaves: ``{("body", "3", "pw1",
    "kernel"): (("body", "layers", "pw1", "kernel"), 3), ...}`` (abstract models work too)."""
    slots: dict[PathKey, tuple[PathKey, int]] = {}
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, BlockStack):
            continue
        prefix = path_key(path)
        for rest, _ in nnx.to_flat_state(nnx.state(node.layers)):
            leaf = (*prefix, "layers", *path_key(rest))
            for i in range(node.num_blocks):
                slots[(*prefix, str(i), *path_key(rest))] = (leaf, i)
    return slots


def _params(leaves: Mapping[PathKey, Any]) -> list[PathKey]:
    """The parameters that a checkpoint must give: all but empty ones (a stack of 0 blocks)."""
    return [k for k, v in leaves.items() if isinstance(v, nnx.Param) and 0 not in _leaf_shape(v)]


def _slices_of(slots: Mapping[PathKey, tuple[PathKey, int]]) -> dict[PathKey, list[PathKey]]:
    """Stacked leaf -> its per-block names, in block order."""
    out: dict[PathKey, list[PathKey]] = {}
    for name, (leaf, _) in sorted(slots.items(), key=lambda item: item[1][1]):
        out.setdefault(leaf, []).append(name)
    return out


def _missing_names(params: Iterable[PathKey], have: Any, slices: Mapping[PathKey, list[PathKey]],
                   whole_names: bool) -> list[str]:
    """Names of the parameters (or their slices) absent from ``have``. A stacked leaf some of whose
    slices are there is reported by its absent slices; one with none there by its own path when
    ``whole_names``, else by all its per-block names."""
    missing: list[PathKey] = []
    for leaf in params:
        if leaf in have:
            continue
        names = slices.get(leaf)
        if names is None:
            missing.append(leaf)
        elif whole_names and not any(n in have for n in names):
            missing.append(leaf)
        else:
            missing.extend(n for n in names if n not in have)
    return sorted(_dotted(k) for k in missing)


def _mismatch_error(source: str, model_name: str, missing: list[str], unexpected: list[str],
                    mismatched: list[str], where: str, hint: str = "") -> WeightMismatchError:
    parts = [f"{source} does not fit {model_name}: {len(missing)} missing, "
             f"{len(unexpected)} unexpected, {len(mismatched)} shape mismatch(es)"]
    if missing:
        parts.append(f"missing{where}: " + ", ".join(_fold(missing)))
    if unexpected:
        parts.append(f"unexpected{where}: " + ", ".join(_fold(unexpected)))
    if mismatched:
        parts.append("shape mismatches: " + ", ".join(mismatched))
    if hint:
        parts.append(hint)
    return WeightMismatchError("; ".join(parts), missing, unexpected, mismatched)


def _as_torch_name(key_to_path: Callable[[str], Any], key: str) -> PathKey | None:
    try:
        path = key_to_path(key)
    except (KeyError, ValueError, IndexError):
        return None
    return None if path is None else path_key(path)


def _stack_complete(values: Mapping[PathKey, np.ndarray],
                    slices: Mapping[PathKey, list[PathKey]]) -> dict[PathKey, np.ndarray]:
    """Every stacked leaf all of whose slices are in ``values``, stacked in block order."""
    return {leaf: np.stack([values[n] for n in names]) for leaf, names in slices.items()
            if names and all(n in values for n in names)}


def convert_state_dict(torch_state: Mapping[str, np.ndarray], model: nnx.Module,
                       key_to_path: Callable[[str], Any], *, source: str = "state dict",
                       model_name: str = "model") -> dict[PathKey, np.ndarray]:
    """Rearrange a PyTorch state dict into ``{NNX path: array}`` for ``model``.

    ``key_to_path`` maps each PyTorch key to the NNX state path, per block inside a stack
    (``("body", 3, "pw1", "kernel")``: slice 3 of ``body.layers.pw1.kernel``); None or KeyError:
    the key has no place in the model. Arrays keep their dtype. Every ``nnx.Param`` (every slice
    of a stacked one) must be covered; any missing, unexpected or mis-shaped entry is reported,
    all of them in one :class:`WeightMismatchError`.
    """
    leaves = model_leaves(model)
    slots = block_slots(model)
    slices = _slices_of(slots)
    params = _params(leaves)
    found: dict[PathKey, np.ndarray] = {}  # by name: a leaf's path, or a slice's per-block name
    unexpected: list[str] = []
    mismatched: list[str] = []
    origin: dict[PathKey, str] = {}
    for key, value in torch_state.items():
        path = _as_torch_name(key_to_path, key)
        if path in slots:
            leaf, _ = slots[path]
            target = _leaf_shape(leaves[leaf])[1:]
        elif path in leaves and path not in slices:
            leaf, target = path, _leaf_shape(leaves[path])
        else:
            unexpected.append(key)
            continue
        if path in origin:
            mismatched.append(f"{key} and {origin[path]} both map to {_dotted(path)}")
            continue
        origin[path] = key
        value = np.asarray(value)
        arranged = to_jax_layout(value, target, leaf[-1])
        if arranged is None:
            mismatched.append(f"{key} {tuple(value.shape)} -> {_dotted(path)} {target}")
            continue
        found[path] = arranged
    missing = _missing_names(params, origin, slices, whole_names=False)
    if missing or unexpected or mismatched:
        raise _mismatch_error(source, model_name, missing, unexpected, mismatched, " in the checkpoint",
                              "check that the checkpoint belongs to this model")
    out = {k: v for k, v in found.items() if k not in slots}
    out.update(_stack_complete(found, slices))
    return out


def stack_legacy_blocks(weights: Mapping[Any, np.ndarray], model: nnx.Module) -> dict[PathKey, np.ndarray]:
    """``weights`` with per-block entries (``body.3.pw1.kernel``, the layout of checkpoints converted
    before blocks were stacked) stacked into ``model``'s stacked leaf (``body.layers.pw1.kernel``)
    wherever every block's entry is there with the slice's shape and the leaf itself is not given.
    Every other entry is returned unchanged (keys as :data:`PathKey`)."""
    given = {path_key(k): np.asarray(v) for k, v in weights.items()}
    leaves = model_leaves(model)
    slices = {leaf: names for leaf, names in _slices_of(block_slots(model)).items() if leaf not in given}
    complete = {leaf: names for leaf, names in slices.items()
                if all(n in given and given[n].shape == _leaf_shape(leaves[leaf])[1:] for n in names)}
    stacked = _stack_complete(given, complete)
    used = {n for names in complete.values() for n in names}
    out = {k: v for k, v in given.items() if k not in used}
    out.update(stacked)
    return out


def assign_weights(model: nnx.Module, weights: Mapping[PathKey, np.ndarray], *,
                   source: str = "weights", model_name: str = "model") -> None:
    """Write ``{path: array}`` into ``model`` in place, cast to each variable's dtype.

    Stacked leaves may be given whole (``body.layers.pw1.kernel``) or per block
    (``body.{0..19}.pw1.kernel``, see :func:`stack_legacy_blocks`). Every ``nnx.Param`` must be
    given and every given path must exist with the same shape; otherwise nothing is written and a
    :class:`WeightMismatchError` lists all problems.
    """
    leaves = model_leaves(model)
    slots = block_slots(model)
    slices = _slices_of(slots)
    params = _params(leaves)
    given = stack_legacy_blocks(weights, model)
    unexpected = sorted(_dotted(k) for k in given if k not in leaves and k not in slots)
    missing = _missing_names(params, given, slices, whole_names=True)

    def target(k: PathKey) -> tuple[int, ...]:
        return _leaf_shape(leaves[k]) if k in leaves else _leaf_shape(leaves[slots[k][0]])[1:]

    mismatched = [f"{_dotted(k)} {tuple(v.shape)} vs model {target(k)}" for k, v in given.items()
                  if (k in leaves or k in slots) and tuple(v.shape) != target(k)]
    mismatched += [f"{_dotted(k)} given both per block and within {_dotted(slots[k][0])}"
                   for k in given if k in slots and slots[k][0] in given]
    if missing or unexpected or mismatched:
        raise _mismatch_error(source, model_name, missing, unexpected, mismatched, "")
    flat = nnx.to_flat_state(nnx.state(model))
    updates = {}
    for path, variable in flat:
        key = path_key(path)
        if key in given:
            dtype = variable.get_value().dtype
            updates[tuple(path)] = variable.replace(jnp.asarray(given[key], dtype=dtype))
    nnx.update(model, nnx.from_flat_state(updates))
