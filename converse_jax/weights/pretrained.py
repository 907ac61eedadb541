"""The released networks, ready to run: :func:`load_pretrained`, and the one lookup of weight
files that it and every command line share, :func:`find_weights`.

Where the weights of a model come from, first match wins:

1. an explicit path (``path=``, ``--weights``): a PyTorch ``.pth``, a ``.safetensors`` file, a
   converted orbax checkpoint directory, a training checkpoint or a training workdir (its latest
   checkpoint);
2. the assets folder, ``$CONVERSE_ASSETS/weights/<release file>`` (by default ``../shared``
   beside the repository checkout, see :mod:`converse_jax.assets`);
3. the cache directory, ``$CONVERSE_JAX_CACHE/<release file>`` (default ``~/.cache/converse_jax``);
4. a download of the release URL into the cache.

Release files from 2-4 must have the SHA-256 of the model registry (and of a ``SHA256SUMS`` file
beside them, where there is one); a file that does not is refused, never used silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converse_jax import models
from converse_jax.assets import assets_dir
from converse_jax.console import progress_bar
from converse_jax.weights.checkpoint import (
    is_converted_checkpoint,
    load_converted,
    make_metadata,
    read_metadata,
    save_converted,
    sha256_file,
)
from converse_jax.weights.convert import PathKey, assign_weights, convert_state_dict
from converse_jax.weights.errors import ChecksumMismatchError, WeightMismatchError, WeightsUnavailableError
from converse_jax.weights.reader import load_torch_state_dict

__all__ = [
    "LoadedModel",
    "WeightsFile",
    "cache_dir",
    "find_weights",
    "fetch_release",
    "load_weights",
    "load_pretrained",
    "load_with_source",
    "convert_checkpoint",
]

PathLike = str | os.PathLike
_CHUNK = 1 << 16


def cache_dir() -> Path:
    """``$CONVERSE_JAX_CACHE`` or ``~/.cache/converse_jax``."""
    env = os.environ.get("CONVERSE_JAX_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/converse_jax").expanduser()


def _open_url(url: str, timeout: float = 60.0) -> BinaryIO:
    """Open ``url`` for reading (tests replace this to serve bytes without a network)."""
    request = urllib.request.Request(url, headers={"User-Agent": "converse_jax"})
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (https URLs only)


def _spec(name: str) -> Any:
    names = list(models.list_models())
    if name not in names:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(names)}")
    return models.get_spec(name)


def _where_to_put(release: Any, target: Path) -> str:
    return (f"download {release.url} yourself and put it at {target} (sha256 {release.sha256}), "
            f"or pass path= to a .pth, .safetensors or converted checkpoint")


def fetch_release(name: str, *, cache: PathLike | None = None, download: bool = True,
                  progress: bool = True) -> Path:
    """The released checkpoint of model ``name`` in the cache, downloading it if absent.

    A download goes to a temporary file in the cache directory, is hashed on the way and is
    renamed into place only when its SHA-256 equals the registry's; otherwise it is deleted
    and :class:`ChecksumMismatchError` is raised. A cached file with the wrong hash is left
    alone and reported.
    """
    spec = _spec(name)
    release = spec.release
    if release is None:
        raise WeightsUnavailableError(f"model {name!r} has no released weights: pass path=")
    folder = Path(cache).expanduser() if cache is not None else cache_dir()
    target = folder / release.filename
    if target.is_file():
        digest = sha256_file(target)
        if digest != release.sha256:
            raise ChecksumMismatchError(
                f"cached {target} has sha256 {digest}, expected {release.sha256}: delete it to "
                f"download it again, or pass path= to use it anyway")
        return target
    if not download:
        raise WeightsUnavailableError(f"{release.filename} is not in the cache {folder}: "
                                      + _where_to_put(release, target))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsUnavailableError(f"cannot create the cache directory {folder} ({exc}): set "
                                      f"CONVERSE_JAX_CACHE to a writable folder") from None
    print(f"downloading {release.url} -> {target}", file=sys.stderr, flush=True)
    _download(release.url, target, release.sha256, progress=progress)
    return target


def _download(url: str, target: Path, sha256: str, *, progress: bool) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                    suffix=".part")
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = _open_url(url)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                raise WeightsUnavailableError(
                    f"could not download {url} ({reason}); "
                    + _where_to_put(_Release(url, sha256), target)) from None
            with response:
                length = _content_length(response)
                with progress_bar(length, unit="B", unit_scale=True, unit_divisor=1024,
                                  desc=target.name, disable=not progress, leave=False) as bar:
                    while True:
                        try:
                            block = response.read(_CHUNK)
                        except OSError as exc:
                            raise WeightsUnavailableError(
                                f"download of {url} broke off ({exc}); "
                                + _where_to_put(_Release(url, sha256), target)) from None
                        if not block:
                            break
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if got != sha256:
            raise ChecksumMismatchError(f"download of {url} has sha256 {got}, expected {sha256}: "
                                        f"nothing was saved; try again or "
                                        + _where_to_put(_Release(url, sha256), target))
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


class _Release:
    def __init__(self, url: str, sha256: str) -> None:
        self.url = url
        self.sha256 = sha256


def _content_length(response: Any) -> int | None:
    headers = getattr(response, "headers", None)
    value = headers.get("Content-Length") if headers is not None else None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


@dataclasses.dataclass(frozen=True)
class WeightsFile:
    """Where :func:`find_weights` found a model's weights: ``path`` and ``source``, one of
    ``"given path"``, ``"assets folder"``, ``"cache"`` and ``"downloaded"``."""

    path: Path
    source: str

    def __str__(self) -> str:
        return f"weights: {self.path} ({self.source})"


def find_weights(name: str, path: PathLike | None = None, *, cache: PathLike | None = None,
                 download: bool = True, progress: bool = True) -> WeightsFile:
    """The weights file (or checkpoint directory) of model ``name``: ``path`` if given, else the
    release file from the assets folder, the cache, or a download into the cache, in this order
    (see the module's docstring). Release files are checked against their SHA-256.

    Raises FileNotFoundError for a ``path`` that does not exist, :class:`ChecksumMismatchError`
    for a release file with the wrong hash, :class:`WeightsUnavailableError` when none is found.
    """
    release = _spec(name).release
    if path is not None:
        given = Path(path).expanduser()
        if not given.exists():
            raise FileNotFoundError(f"weights {given} not found: check the path (--weights)")
        return WeightsFile(_latest_in_workdir(given), "given path")
    if release is None:
        raise WeightsUnavailableError(f"model {name!r} has no released weights: pass a checkpoint "
                                      f"(path=, --weights)")
    shared = assets_dir() / "weights" / release.filename
    if shared.is_file():
        _check_release_file(shared, release.sha256)
        return WeightsFile(shared, "assets folder")
    folder = Path(cache).expanduser() if cache is not None else cache_dir()
    if (folder / release.filename).is_file():
        return WeightsFile(fetch_release(name, cache=folder, download=False), "cache")
    return WeightsFile(fetch_release(name, cache=folder, download=download, progress=progress), "downloaded")


def _check_release_file(path: Path, expected: str) -> None:
    """ChecksumMismatchError unless ``path`` hashes to ``expected`` and to what a ``SHA256SUMS``
    file beside it lists for it."""
    wanted = {expected}
    sums = path.parent / "SHA256SUMS"
    if sums.is_file():
        for line in sums.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("*") == path.name:
                wanted.add(parts[0].lower())
    digest = sha256_file(path)
    if wanted != {digest}:
        raise ChecksumMismatchError(
            f"{path} has sha256 {digest}, expected {' and '.join(sorted(wanted))}: replace the file, or "
            f"pass it explicitly (path=, --weights) to use it anyway")


def _latest_in_workdir(path: Path) -> Path:
    """A training workdir's latest complete checkpoint (``<workdir>/checkpoints/<step>``); any other
    path as it is."""
    folder = path / "checkpoints"
    if not path.is_dir() or is_converted_checkpoint(path) or not folder.is_dir():
        return path
    steps = [int(d.name) for d in folder.iterdir() if d.name.isdigit() and is_converted_checkpoint(d)]
    if not steps:
        raise FileNotFoundError(f"training workdir {path} has no complete checkpoint yet: train first, "
                                f"or pass a checkpoint file")
    return folder / str(max(steps))


def saved_model_kwargs(path: PathLike) -> dict[str, Any]:
    """The constructor arguments (``--arch``) that a training checkpoint was written with; ``{}``
    for release files and converted checkpoints, which have the registry's architecture."""
    path = Path(path)
    if not is_converted_checkpoint(path):
        return {}
    return dict(read_metadata(path).get("model_kwargs") or {})


def load_weights(name: str, path: PathLike, model: Any) -> tuple[dict[PathKey, np.ndarray],
                                                                  dict[str, Any]]:
    """Weights for ``model`` (a model ``name`` instance, possibly abstract) from ``path``:
    ``({NNX path: array}, metadata)``. ``path`` is a ``.pth``, a ``.safetensors`` file or a
    converted checkpoint directory."""
    spec = _spec(name)
    path = Path(path).expanduser()
    if path.is_dir():
        if not is_converted_checkpoint(path):
            raise ValueError(f"{path} is a directory but not a converted checkpoint: pass a .pth, "
                             f".safetensors file or a directory written by experiments.convert")
        weights, meta = load_converted(path)
        if meta.get("model") != name:
            raise WeightMismatchError(
                f"{path} holds converted weights of {meta.get('model')!r}, not {name!r}: load it "
                f"with load_pretrained({meta.get('model')!r}, ...)", [], [], [])
        return weights, meta
    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path}")
    if spec.torch_key_to_path is None:
        raise ValueError(f"model {name!r} has no PyTorch key mapping: it cannot import {path.name}")
    state = load_torch_state_dict(path)
    weights = convert_state_dict(state, model, spec.torch_key_to_path, source=path.name,
                                 model_name=name)
    return weights, make_metadata(name, path)


def load_pretrained(name: str, path: PathLike | None = None, *, dtype: Any = None,
                    cache: PathLike | None = None, download: bool = True, progress: bool = True,
                    arch: dict[str, Any] | None = None, report: bool = True) -> Any:
    """The NNX model ``name`` (``dncnn``, ``srresnet``, ``conversenet``, ``usrnet``) with its
    released (or given) weights; :func:`load_with_source` (same arguments) also says which file it
    came from and which architecture it was built with.

    ``path``: a ``.pth``, ``.safetensors``, converted or training checkpoint directory, or a training
    workdir; without it the release file, looked up as :func:`find_weights` says. ``arch``: constructor
    arguments for a network trained with ``--arch`` (a training checkpoint carries them, so it needs
    none). ``dtype``: float32 (default) or float64 (needs ``jax_enable_x64``). ``report``: print which
    file was used (one ``weights: <file> (<source>)`` line on stderr).
    """
    return load_with_source(name, path, dtype=dtype, cache=cache, download=download, progress=progress,
                            arch=arch, report=report).model


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """What :func:`load_with_source` loaded: the model, the file its weights came from, and the
    constructor arguments it was built with (``--arch``; ``{}`` for the registry's architecture)."""

    model: Any
    weights: WeightsFile
    arch: dict[str, Any]


def load_with_source(name: str, path: PathLike | None = None, *, dtype: Any = None,
                     cache: PathLike | None = None, download: bool = True, progress: bool = True,
                     arch: dict[str, Any] | None = None, report: bool = True) -> LoadedModel:
    """:func:`load_pretrained`, returning the model with where it came from (:class:`LoadedModel`)."""
    dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("dtype float64 needs 64-bit JAX: call "
                         "jax.config.update('jax_enable_x64', True) first")
    found = find_weights(name, path, cache=cache, download=download, progress=progress)
    if report:
        print(found, file=sys.stderr, flush=True)
    kwargs = _model_kwargs(found.path, arch)

    def build() -> Any:
        return models.create(name, rngs=nnx.Rngs(0), param_dtype=dtype, **kwargs)

    try:  # shapes only: a random initialisation would cost more than the loading, and be overwritten
        model = nnx.eval_shape(build)
    except TypeError as exc:
        raise ValueError(f"architecture {kwargs} does not fit {name}: {exc}; check --arch") from None
    weights, meta = load_weights(name, found.path, model)
    source = str(meta.get("source_file", found.path))
    assign_weights(model, weights, source=source, model_name=name)
    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(model))):
        model = build()  # state that no checkpoint holds: keep its initial value
        assign_weights(model, weights, source=source, model_name=name)
    return LoadedModel(model, found, kwargs)


def _model_kwargs(path: Path, arch: dict[str, Any] | None) -> dict[str, Any]:
    """``arch``, or the checkpoint's own; ValueError when both are given and differ."""
    saved = saved_model_kwargs(path)
    if not arch:
        return saved
    if saved and dict(arch) != saved:
        raise ValueError(f"--arch {_arch_text(arch)} differs from the architecture {path} was trained with "
                         f"({_arch_text(saved)}): drop --arch, the checkpoint's own is used")
    return dict(arch)


def _arch_text(kwargs: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in kwargs.items())


def convert_checkpoint(name: str, weights: PathLike, out: PathLike, *,
                       overwrite: bool = False) -> Path:
    """Convert a PyTorch ``.pth``/``.safetensors`` checkpoint of model ``name`` into an orbax
    checkpoint directory ``out`` (metadata: model, source file name and SHA-256, version)."""
    _spec(name)
    weights = Path(weights).expanduser()
    if weights.is_dir():
        raise ValueError(f"{weights} is a directory: pass the .pth or .safetensors file to "
                         f"convert")
    model = nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0)))  # only its shapes are needed
    converted, meta = load_weights(name, weights, model)
    return save_converted(out, converted, meta, overwrite=overwrite)
