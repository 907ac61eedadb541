"""Converted weights on disk: an orbax checkpoint directory with ``params`` (the arrays, in
NNX layout, keyed by state path) and ``metadata`` (JSON: model name, source file and its
SHA-256, converse_jax version).

Writes are atomic: the checkpoint is written beside the destination under a temporary name and
renamed into place; an existing destination is only replaced when asked to, only if it is itself
a converted checkpoint, and only once the new one is complete.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from converse_jax.weights.convert import PathKey, path_key
from converse_jax.weights.errors import CheckpointFormatError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "package_version",
    "sha256_file",
    "make_metadata",
    "is_converted_checkpoint",
    "read_metadata",
    "save_converted",
    "load_converted",
]

FORMAT = "converse_jax.weights"
FORMAT_VERSION = 1
PathLike = str | os.PathLike


def package_version() -> str:
    """The installed converse_jax version ("unknown" when not installed)."""
    try:
        return importlib.metadata.version("converse_jax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def make_metadata(model: str, source: PathLike, sha256: str | None = None) -> dict[str, Any]:
    """Metadata of a checkpoint converted from ``source`` for ``model``."""
    source = Path(source)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model,
        "source_file": source.name,
        "source_sha256": sha256 if sha256 is not None else sha256_file(source),
        "converse_jax_version": package_version(),
        "layout": "flax.nnx (kernels HWIO, Converse2D weights (k, k, C))",
    }


def _nest(weights: Mapping[PathKey, np.ndarray]) -> dict[str, Any]:
    """``{path: array}`` -> nested dicts with string keys (a path that is also another's prefix is an error)."""
    flat = {path_key(path): np.asarray(value) for path, value in weights.items()}
    prefixes = {key[:i] for key in flat for i in range(1, len(key))}
    clash = sorted(prefixes & set(flat))
    if clash:
        raise ValueError(f"path {'.'.join(clash[0])} is both a weight and a group of weights")
    return traverse_util.unflatten_dict(flat)


def _flatten(tree: Mapping[str, Any]) -> dict[PathKey, np.ndarray]:
    return {path_key(path): np.asarray(value) for path, value in traverse_util.flatten_dict(tree).items()}


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def is_converted_checkpoint(directory: PathLike) -> bool:
    """Whether ``directory`` looks like a checkpoint written by :func:`save_converted`."""
    directory = Path(directory)
    return directory.is_dir() and (directory / "metadata").is_dir() and (
        directory / "params").is_dir()


def read_metadata(directory: PathLike) -> dict[str, Any]:
    """The metadata of a converted checkpoint (no arrays are read)."""
    directory = Path(directory).absolute()
    if not is_converted_checkpoint(directory):
        raise CheckpointFormatError(f"{directory} is not a converted converse_jax checkpoint "
                                    f"(expected sub-directories params/ and metadata/)")
    ckptr = _checkpointer()
    try:
        out = ckptr.restore(directory, ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    except Exception as exc:  # orbax raises many types for damaged directories
        raise CheckpointFormatError(f"{directory}: unreadable checkpoint metadata "
                                    f"({type(exc).__name__}: {exc})") from None
    meta = out["metadata"]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointFormatError(f"{directory} was not written by converse_jax.weights")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointFormatError(f"{directory} has format version {meta['format_version']}; "
                                    f"this converse_jax reads up to {FORMAT_VERSION}: upgrade it")
    return meta


def save_converted(directory: PathLike, weights: Mapping[PathKey, np.ndarray],
                   metadata: Mapping[str, Any], *, overwrite: bool = False) -> Path:
    """Save ``{NNX path: array}`` and ``metadata`` as an orbax checkpoint at ``directory``.

    An existing ``directory`` is an error unless ``overwrite`` is set, and even then only a
    converted checkpoint is replaced (never an unrelated folder).
    """
    directory = Path(directory).expanduser().absolute()
    if directory.exists() or directory.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{directory} already exists: choose another output directory "
                                  f"or allow overwriting it")
        if not is_converted_checkpoint(directory):
            raise FileExistsError(f"{directory} exists and is not a converted converse_jax "
                                  f"checkpoint: refusing to replace it")
    meta = dict(metadata)
    meta.setdefault("format", FORMAT)
    meta.setdefault("format_version", FORMAT_VERSION)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = directory.parent / f".{directory.name}.tmp-{tag}"
    ckptr = _checkpointer()
    try:
        ckptr.save(tmp, ocp.args.Composite(params=ocp.args.PyTreeSave(_nest(weights)),
                                           metadata=ocp.args.JsonSave(meta)))
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{tag}"
            os.rename(directory, old)
            try:
                os.rename(tmp, directory)
            except BaseException:
                os.rename(old, directory)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load_converted(directory: PathLike) -> tuple[dict[PathKey, np.ndarray], dict[str, Any]]:
    """Read a converted checkpoint: ``({NNX path: numpy array}, metadata)``."""
    directory = Path(directory).expanduser().absolute()
    meta = read_metadata(directory)
    ckptr = _checkpointer()
    try:
        # Every leaf as a host array, whatever devices wrote it (a run on 4 devices loads on 1).
        tree = ocp.PyTreeCheckpointHandler().metadata(directory / "params").tree
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        out = ckptr.restore(directory, ocp.args.Composite(params=ocp.args.PyTreeRestore(restore_args=as_numpy)))
    except Exception as exc:
        raise CheckpointFormatError(f"{directory}: unreadable converted weights "
                                    f"({type(exc).__name__}: {exc})") from None
    return _flatten(out["params"]), meta
