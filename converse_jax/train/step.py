"""The functional training step: the NNX model's state as pure dicts, an optax optimizer, and one
``jax.jit``-compiled update over a data-parallel mesh.

A model state is held in the pure-dict form of ``nnx.to_pure_dict``: nested dicts of arrays keyed
by NNX path (``{"head": {"kernel": ...}, ...}``, list items under int keys). The train state keeps
two of them, the ``nnx.Param`` variables (what the optimizer updates) and the rest (e.g. BatchNorm
statistics, updated by the forward pass in training mode; empty for the paper's four networks).
:func:`full_state` joins them into the model's full state, which is what training checkpoints and
converted weight checkpoints (:mod:`converse_jax.weights.checkpoint`) hold, so
:func:`converse_jax.load_pretrained` loads a training checkpoint as it is.

Mixed precision (a network built with ``precision="bf16"``) changes only the forward pass: the
parameters are float32 (``param_dtype``) and cast where they are used, so their gradients, the Adam
moments (``tx.init`` of the float32 parameters) and the checkpoints are float32, and
:func:`loss_value` computes the loss in float32. No loss scaling is needed: bfloat16 has float32's
exponent range.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, traverse_util
from jax.sharding import Mesh

from converse_jax.nn import INFERENCE_HIDDEN_GROUPS
from converse_jax.tasks import Task, get_task, jit_forward
from converse_jax.train.parallel import batch_sharding, replicated
from converse_jax.weights.convert import PathKey, path_key

__all__ = [
    "Optimizer",
    "mode_view",
    "split_state",
    "full_state",
    "lr_schedule",
    "make_optimizer",
    "loss_value",
    "init_train_state",
    "make_train_step",
    "make_predict",
    "host_params",
]

State = dict[Any, Any]  # a model state (or part of one) in nnx.to_pure_dict form
TrainState = dict[str, Any]  # {"params", "extra", "opt_state", "step"}


class Optimizer(NamedTuple):
    """The optax transformation and the learning-rate schedule it applies (the loop logs it)."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule


def mode_view(model: nnx.Module, train: bool) -> nnx.Module:
    """The model with BatchNorm-style layers in training (batch statistics) or evaluation mode, and the
    Converse networks' repeated blocks unrolled for training (faster to differentiate) or scanned for
    evaluation (bounded memory): see :class:`converse_jax.nn.BlockStack`; in evaluation the blocks' hidden
    channels run in groups, as the restorers run them (:func:`converse_jax.nn.inference_view`).

    A model without one of the two options (no BatchNorm, or no repeated blocks) ignores it. Needs
    flax >= 0.12.5, whose ``nnx.view`` gives each module's ``set_view`` only the options it takes
    (0.12.4 passed every option to every module, so a module without one raised TypeError).
    """
    return nnx.view(model, use_running_average=not train, scan_blocks=not train,
                    hidden_groups=1 if train else INFERENCE_HIDDEN_GROUPS, raise_if_not_found=False)


def split_state(model: nnx.Module) -> tuple[State, State]:
    """``(params, extra)`` of ``model`` as pure dicts: its ``nnx.Param`` variables and all its other
    variables (works on tracers inside ``jax.jit``)."""
    _, params, extra = nnx.split(model, nnx.Param, ...)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(extra)


def full_state(params: State, extra: State) -> State:
    """The model's full state as one pure dict: ``params`` and ``extra`` side by side (what
    checkpoints hold; ``split_state(nnx.merge(graphdef, full))`` separates them again)."""
    flat = traverse_util.flatten_dict(params)
    flat.update(traverse_util.flatten_dict(extra))
    return traverse_util.unflatten_dict(flat)


def lr_schedule(lr: float, milestones: tuple[int, ...] = (), decay: float = 0.5) -> optax.Schedule:
    """``lr``, multiplied by ``decay`` at each milestone step."""
    if not milestones:
        return optax.constant_schedule(lr)
    return optax.piecewise_constant_schedule(lr, {int(m): decay for m in milestones})


def make_optimizer(config: Any) -> Optimizer:
    """Adam with the step-decay schedule of ``config``, and that schedule."""
    schedule = lr_schedule(config.lr, tuple(config.lr_milestones), config.lr_decay)
    return Optimizer(optax.adam(schedule), schedule)


def loss_value(output: jax.Array, target: jax.Array, kind: str) -> jax.Array:
    """Mean absolute (``l1``) or squared (``l2``) error, in float32."""
    diff = output.astype(jnp.float32) - target.astype(jnp.float32)
    if kind == "l1":
        return jnp.mean(jnp.abs(diff))
    if kind == "l2":
        return jnp.mean(jnp.square(diff))
    raise ValueError(f"unknown loss {kind!r}: expected l1 or l2")


def init_train_state(params: State, tx: optax.GradientTransformation, step: int = 0,
                     extra: State | None = None) -> TrainState:
    """``{"params", "extra", "opt_state", "step"}`` for fresh (or imported) parameters
    (``params, extra = split_state(model)``)."""
    return {"params": params, "extra": {} if extra is None else extra, "opt_state": tx.init(params),
            "step": jnp.asarray(step, jnp.int32)}


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def make_train_step(model: nnx.Module, tx: optax.GradientTransformation, task: Task | str, loss: str,
                    mesh: Mesh) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
    """``step(state, batch) -> (new_state, metrics)`` for ``model``'s architecture (its training
    view, :func:`mode_view`), compiled with ``jax.jit``.

    The batch is split along the mesh and the state replicated; the gradient of the global-batch
    mean loss is therefore the same on any number of devices. ``metrics``: ``loss`` (of the
    parameters before the update), ``grad_norm`` and ``finite`` (loss, gradients and new
    parameters all finite). The input state is not donated, so it stays valid when ``finite``
    is false.
    """
    graphdef = nnx.graphdef(mode_view(model, True))
    task = get_task(task)

    def loss_fn(params: State, extra: State, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, State]:
        trained = nnx.merge(graphdef, params, extra)
        value = loss_value(task.forward(trained, batch), batch["target"], loss)
        return value, split_state(trained)[1]

    def step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
        (value, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], state["extra"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(value) & _all_finite(grads) & _all_finite(params) & _all_finite(extra)
        new = {"params": params, "extra": extra, "opt_state": opt_state, "step": state["step"] + 1}
        return new, {"loss": value, "grad_norm": optax.tree.norm(grads), "finite": finite}

    rep, data = replicated(mesh), batch_sharding(mesh)
    return jax.jit(step, in_shardings=(rep, data), out_shardings=(rep, rep))


def make_predict(model: nnx.Module, task: Task | str) -> Callable[..., jax.Array]:
    """``predict((params, extra), batch) -> output`` of ``model``'s architecture in evaluation mode
    (:func:`mode_view`): the task's compiled forward, :func:`converse_jax.tasks.jit_forward`."""
    return jit_forward(get_task(task), nnx.graphdef(mode_view(model, False)))


def host_params(state: State) -> dict[PathKey, np.ndarray]:
    """A (replicated) model state as ``{path of strings: numpy array}``, the form
    :func:`converse_jax.weights.save_converted` writes."""
    return {path_key(path): np.asarray(leaf) for path, leaf in traverse_util.flatten_dict(state).items()}
