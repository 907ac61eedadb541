"""The functional training step: the NNX model split into a static graph and a pytree of
parameters, an optax optimizer, and one ``jax.jit``-compiled update over a data-parallel mesh.

Parameters are kept as a nested dict with string keys (``{"body": {"0": {"pw1": {"kernel":
...}}}}``), the layout of converted weight checkpoints (:mod:`converse_jax.weights.checkpoint`),
so a training checkpoint can be loaded by :func:`converse_jax.load_pretrained` as it is.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from converse_jax.train.parallel import batch_sharding, replicated

__all__ = [
    "ParamCodec",
    "lr_schedule",
    "make_optimizer",
    "loss_value",
    "apply_model",
    "init_train_state",
    "make_train_step",
    "make_predict",
]

Params = dict[str, Any]
TrainState = dict[str, Any]  # {"params", "extra", "opt_state", "step"}


def _key(path: Any) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def mode_view(model: nnx.Module, train: bool) -> nnx.Module:
    """The model with BatchNorm-style layers in training (batch statistics) or evaluation mode, and the
    Converse networks' repeated blocks unrolled for training (faster to differentiate) or scanned for
    evaluation (bounded memory): see :func:`converse_jax.nn.run_blocks`."""
    try:
        return nnx.view(model, use_running_average=not train, scan_blocks=not train, raise_if_not_found=False)
    except (TypeError, ValueError):
        return model


def _nest(flat: Mapping[tuple[str, ...], Any]) -> Params:
    out: Params = {}
    for key, value in flat.items():
        node = out
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    return out


def _lookup(tree: Params, key: tuple[str, ...]) -> Any:
    node = tree
    for part in key:
        node = node[part]
    return node


class ParamCodec:
    """Converts between an NNX model and pytrees of nested string-keyed dicts.

    ``params`` are the ``nnx.Param`` variables (what the optimizer updates); ``extra`` holds any
    other state (e.g. BatchNorm running statistics, updated by the forward pass in training
    mode; empty for the paper's four networks). :meth:`combine` gives the model's full state in
    the layout of converted weight checkpoints.
    """

    def __init__(self, model: nnx.Module) -> None:
        self.train_graphdef, params, extra = nnx.split(mode_view(model, True), nnx.Param, ...)
        self.eval_graphdef, _, _ = nnx.split(mode_view(model, False), nnx.Param, ...)
        p_leaves, self._p_treedef = jax.tree_util.tree_flatten_with_path(params)
        e_leaves, self._e_treedef = jax.tree_util.tree_flatten_with_path(extra)
        self.param_keys = [_key(path) for path, _ in p_leaves]
        self.extra_keys = [_key(path) for path, _ in e_leaves]
        if len(set(self.param_keys + self.extra_keys)) != len(self.param_keys) + len(self.extra_keys):
            raise ValueError("the model's state paths are not unique")
        self._initial = (_nest({k: v for k, (_, v) in zip(self.param_keys, p_leaves)}),
                         _nest({k: v for k, (_, v) in zip(self.extra_keys, e_leaves)}))

    def initial(self) -> Params:
        """The parameters the model was built with."""
        return self._initial[0]

    def initial_extra(self) -> Params:
        """The non-parameter state the model was built with."""
        return self._initial[1]

    @staticmethod
    def nest(flat: Mapping[tuple[str, ...], Any]) -> Params:
        """``{("a", "0", "b"): x}`` -> ``{"a": {"0": {"b": x}}}``."""
        return _nest(flat)

    def flatten(self, params: Params) -> dict[tuple[str, ...], Any]:
        """Parameters -> ``{path: leaf}`` in the model's order (a missing path raises KeyError)."""
        return {key: _lookup(params, key) for key in self.param_keys}

    def combine(self, params: Params, extra: Optional[Params] = None) -> Params:
        """Parameters and extra state as one nested dict (the model's full state)."""
        flat = {key: _lookup(params, key) for key in self.param_keys}
        if self.extra_keys:
            flat.update({key: _lookup(extra, key) for key in self.extra_keys})
        return _nest(flat)

    def separate(self, state: Params) -> tuple[Params, Params]:
        """Inverse of :meth:`combine`."""
        return (_nest({key: _lookup(state, key) for key in self.param_keys}),
                _nest({key: _lookup(state, key) for key in self.extra_keys}))

    def merge(self, params: Params, extra: Optional[Params] = None, *, train: bool = False) -> nnx.Module:
        """A model with ``params`` (and ``extra``) in training or evaluation mode (works on
        tracers inside ``jax.jit``)."""
        p = jax.tree_util.tree_unflatten(self._p_treedef, [_lookup(params, k) for k in self.param_keys])
        e = jax.tree_util.tree_unflatten(self._e_treedef, [_lookup(extra, k) for k in self.extra_keys])
        return nnx.merge(self.train_graphdef if train else self.eval_graphdef, p, e)

    def extra_of(self, model: nnx.Module) -> Params:
        """The non-parameter state of a model (e.g. after a training-mode forward pass)."""
        _, _, extra = nnx.split(model, nnx.Param, ...)
        return _nest({_key(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(extra)[0]})

    def from_model(self, model: nnx.Module) -> tuple[Params, Params]:
        """``(params, extra)`` of another instance of the same architecture."""
        _, params, extra = nnx.split(model, nnx.Param, ...)
        p_leaves, p_def = jax.tree_util.tree_flatten_with_path(params)
        e_leaves, e_def = jax.tree_util.tree_flatten_with_path(extra)
        if p_def != self._p_treedef or e_def != self._e_treedef:
            raise ValueError("the model's state does not have this architecture's structure")
        return (_nest({_key(path): leaf for path, leaf in p_leaves}),
                _nest({_key(path): leaf for path, leaf in e_leaves}))


def lr_schedule(lr: float, milestones: tuple[int, ...] = (), decay: float = 0.5) -> optax.Schedule:
    """``lr``, multiplied by ``decay`` at each milestone step."""
    if not milestones:
        return optax.constant_schedule(lr)
    return optax.piecewise_constant_schedule(lr, {int(m): decay for m in milestones})


def make_optimizer(config: Any) -> optax.GradientTransformation:
    """Adam (the practice of PAPER.md §6) with the step-decay schedule of ``config``."""
    return optax.adam(lr_schedule(config.lr, tuple(config.lr_milestones), config.lr_decay))


def loss_value(output: jax.Array, target: jax.Array, kind: str) -> jax.Array:
    """Mean absolute (``l1``) or squared (``l2``) error, in float32."""
    diff = output.astype(jnp.float32) - target.astype(jnp.float32)
    if kind == "l1":
        return jnp.mean(jnp.abs(diff))
    if kind == "l2":
        return jnp.mean(jnp.square(diff))
    raise ValueError(f"unknown loss {kind!r}: expected l1 or l2")


def apply_model(model: nnx.Module, batch: Mapping[str, jax.Array], task: str) -> jax.Array:
    """Run ``model`` on a batch of ``task`` (Converse-USRNet also takes the blur kernels)."""
    if task == "deblur_nonblind":
        return model(batch["input"], batch["kernel"], sf=1)
    return model(batch["input"])


def init_train_state(params: Params, tx: optax.GradientTransformation, step: int = 0,
                     extra: Optional[Params] = None) -> TrainState:
    """``{"params", "extra", "opt_state", "step"}`` for fresh (or imported) parameters."""
    return {"params": params, "extra": {} if extra is None else extra, "opt_state": tx.init(params),
            "step": jnp.asarray(step, jnp.int32)}


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def make_train_step(codec: ParamCodec, tx: optax.GradientTransformation, task: str, loss: str,
                    mesh: Mesh) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
    """``step(state, batch) -> (new_state, metrics)`` compiled with ``jax.jit``.

    The batch is split along the mesh and the state replicated; the gradient of the global-batch
    mean loss is therefore the same on any number of devices. ``metrics``: ``loss`` (of the
    parameters before the update), ``grad_norm`` and ``finite`` (loss, gradients and new
    parameters all finite). The input state is not donated, so it stays valid when ``finite``
    is false.
    """

    def loss_fn(params: Params, extra: Params, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Params]:
        model = codec.merge(params, extra, train=True)
        value = loss_value(apply_model(model, batch, task), batch["target"], loss)
        return value, codec.extra_of(model)

    def step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
        (value, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], state["extra"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(value) & _all_finite(grads) & _all_finite(params) & _all_finite(extra)
        new = {"params": params, "extra": extra, "opt_state": opt_state, "step": state["step"] + 1}
        return new, {"loss": value, "grad_norm": optax.tree.norm(grads), "finite": finite}

    rep, data = replicated(mesh), batch_sharding(mesh)
    return jax.jit(step, in_shardings=(rep, data), out_shardings=(rep, rep))


def make_predict(codec: ParamCodec, task: str) -> Callable[..., jax.Array]:
    """``predict(params, extra, batch) -> output`` in evaluation mode, compiled with ``jax.jit``."""

    def predict(params: Params, extra: Params, batch: Mapping[str, jax.Array]) -> jax.Array:
        return apply_model(codec.merge(params, extra), batch, task)

    return jax.jit(predict)


def host_params(params: Params) -> dict[tuple[str, ...], np.ndarray]:
    """Replicated parameters as ``{path tuple: numpy array}``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {_key(path): np.asarray(leaf) for path, leaf in flat}
