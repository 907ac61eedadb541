"""Training checkpoints with orbax ``CheckpointManager`` and the run's config file.

Layout of a working directory::

    <workdir>/config.json              the run's TrainConfig (JSON)
    <workdir>/checkpoints/<step>/      one orbax checkpoint per saved step (the last ``keep``)
        params/     the model's full state, nested by NNX path (``nnx.to_pure_dict`` form)
        opt_state/  the optax state
        metadata/   JSON: format, model, step, loss, config

Each step directory is also a *converted checkpoint* of :mod:`converse_jax.weights.checkpoint`
(same ``params``/``metadata`` items), so ``load_pretrained(name, <workdir>/checkpoints/<step>)``
and ``python -m experiments.evaluate --weights=<that dir>`` load it directly. orbax writes each
step under a temporary name and renames it when complete, so a killed run leaves its last
finished checkpoint intact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from converse_jax.fileio import write_json_atomic
from converse_jax.train.config import CONFIG_FILE, TrainConfig, check_compatible
from converse_jax.train.errors import IncompatibleWorkdirError
from converse_jax.train.step import host_params
from converse_jax.weights.checkpoint import FORMAT, FORMAT_VERSION, package_version, save_converted

__all__ = [
    "CheckpointStore",
    "write_json_atomic",
    "load_saved_config",
    "prepare_workdir",
    "export_params",
    "latest_checkpoint",
]

PathLike = str | os.PathLike


def load_saved_config(workdir: Path) -> dict[str, Any] | None:
    """The config saved in ``workdir`` (None when there is none)."""
    path = workdir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is unreadable ({exc}): fix or remove it, or choose another --workdir") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a training config: remove it or choose another --workdir")
    return data


def prepare_workdir(config: TrainConfig, *, write: bool = True) -> tuple[Path, list[str]]:
    """Create the workdir, refuse an incompatible one, save ``config`` there.

    Returns ``(workdir, changed)``: the names of resumable settings that differ from the saved
    config (empty for a new run).
    """
    workdir = config.resolved_workdir()
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir {workdir} exists and is not a directory")
    _check_writable(workdir)
    saved = load_saved_config(workdir) if workdir.is_dir() else None
    changed: list[str] = []
    if saved is None and (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir()):
        raise ValueError(f"{workdir} has checkpoints but no {CONFIG_FILE}: it is not a run of this program, "
                         f"choose another --workdir")
    if saved is not None:
        changed = check_compatible(saved, config, workdir)
    if write and jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(workdir / CONFIG_FILE, config.to_json())
    return workdir, changed


def _check_writable(workdir: Path) -> None:
    """ValueError unless ``workdir`` (or its nearest existing parent, where it would be created) takes a
    new file: a probe file is made and removed (permission bits miss read-only mounts and say yes to root)."""
    folder = workdir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    probe = folder / f".write-test-{os.getpid()}"
    try:
        probe.open("x").close()
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"--workdir {workdir}: cannot write in {folder} ({exc.strerror or exc}); choose another "
                         f"--workdir") from None


_ITEMS = ("params", "opt_state")


def _signature(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{dotted path: shape}`` of a tree of arrays, shape structs or orbax array metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="."): tuple(leaf.shape) for path, leaf in leaves}


def _differences(saved: Mapping[str, tuple], expected: Mapping[str, tuple]) -> list[str]:
    """How a saved tree's signature differs from the expected one (empty when they match)."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    reshaped = sorted(f"{k} {saved[k]} instead of {expected[k]}" for k in set(saved) & set(expected)
                      if saved[k] != expected[k])
    return [f"{len(keys)} {label}, e.g. {keys[0]}" for label, keys in
            (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)) if keys]


class CheckpointStore:
    """The run's orbax ``CheckpointManager`` (keeps the last ``keep`` steps)."""

    def __init__(self, directory: PathLike, keep: int = 3, *, async_save: bool = True) -> None:
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=async_save)
        handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                    "metadata": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        """The last complete checkpoint's step (None when there is none)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def path(self, step: int) -> Path:
        return self.directory / str(step)

    def save(self, step: int, params: Any, opt_state: Any, metadata: Mapping[str, Any]) -> Path:
        """Save the model's full state ``params`` (pure dict, see
        :func:`converse_jax.train.step.full_state`) and ``opt_state`` at ``step`` (asynchronously by
        default). In a multi-process run every process calls this at the same step (a collective)."""
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": int(step),
                "source_file": f"training checkpoint {self.path(step)}", **dict(metadata)}
        # the weights as host arrays (written once, by process 0): saved without the devices they lived
        # on, they load anywhere (load_converted, evaluate) and still restore onto any mesh for training
        self.manager.save(int(step), args=ocp.args.Composite(
            params=ocp.args.StandardSave(jax.tree.map(np.asarray, params)),
            opt_state=ocp.args.StandardSave(opt_state),
            metadata=ocp.args.JsonSave(meta)), force=True)
        return self.path(step)

    def check_structure(self, step: int, abstract_params: Any, abstract_opt_state: Any) -> None:
        """Raise :class:`IncompatibleWorkdirError` unless the saved trees of ``step`` have the paths
        and shapes of the abstract ones (read from the checkpoint's metadata, no arrays). The message
        names the first item that differs (the optimizer state follows the parameters)."""
        saved = self.manager.item_metadata(int(step))
        for item, abstract in zip(_ITEMS, (abstract_params, abstract_opt_state), strict=True):
            meta = saved[item] if item in saved else None
            problems = (["unreadable metadata"] if meta is None else
                        _differences(_signature(getattr(meta, "tree", meta)), _signature(abstract)))
            if problems:
                where = self.path(step)
                raise IncompatibleWorkdirError(
                    f"checkpoint {where} does not match the state of this model ({item}: {'; '.join(problems)}), "
                    f"so the run cannot resume from it: start a new --workdir with --init-from={where} to train "
                    f"on from its weights")

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any) -> tuple[Any, Any, dict[str, Any]]:
        """``(params, opt_state, metadata)`` of ``step``; the abstract trees give structure, shapes
        and shardings, and a checkpoint of another structure is refused (:meth:`check_structure`)."""
        self.check_structure(step, abstract_params, abstract_opt_state)
        out = self.manager.restore(int(step), args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            metadata=ocp.args.JsonRestore()))
        return out["params"], out["opt_state"], dict(out["metadata"])

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def latest_checkpoint(workdir: PathLike) -> Path | None:
    """The newest complete checkpoint directory of a training workdir (None if there is none)."""
    directory = Path(workdir).expanduser().absolute() / "checkpoints"
    if not directory.is_dir():
        return None
    store = CheckpointStore(directory, keep=1_000_000, async_save=False)
    try:
        step = store.latest_step()
        return None if step is None else store.path(step)
    finally:
        store.manager.close()


def export_params(params: Any, model: str, directory: PathLike, *, metadata: Mapping[str, Any] | None = None,
                  overwrite: bool = False) -> Path:
    """Write a model's weights as a standalone converted checkpoint (:func:`converse_jax.weights.save_converted`)
    that :func:`converse_jax.load_pretrained` and ``experiments.evaluate --weights`` read.

    ``params``: an NNX model (all its variables), or its full state as a pure dict (e.g.
    ``full_state(state["params"], state["extra"])`` of a training state).
    """
    if isinstance(params, nnx.Module):
        params = nnx.to_pure_dict(nnx.state(params))
    meta = {"model": model, "source_file": "converse_jax.train", "source_sha256": "",
            "converse_jax_version": package_version()}
    meta.update(dict(metadata or {}))
    return save_converted(directory, host_params(params), meta, overwrite=overwrite)
