"""The released networks, ready to run: :func:`load_pretrained`.

Weights come from ``path`` (a PyTorch ``.pth``, a ``.safetensors`` file or a converted orbax
checkpoint directory) or, without it, from the cache directory (``$CONVERSE_JAX_CACHE``,
default ``~/.cache/converse_jax``), where the official release file is downloaded on first
use and kept only once its SHA-256 matches the registry's.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from converse_jax import models
from converse_jax.weights.checkpoint import (
    is_converted_checkpoint,
    load_converted,
    make_metadata,
    save_converted,
    sha256_file,
)
from converse_jax.weights.convert import PathKey, assign_weights, convert_state_dict
from converse_jax.weights.errors import ChecksumMismatchError, WeightMismatchError, WeightsUnavailableError
from converse_jax.weights.reader import load_torch_state_dict

__all__ = [
    "cache_dir",
    "fetch_release",
    "load_weights",
    "load_pretrained",
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
                with tqdm(total=length, unit="B", unit_scale=True, unit_divisor=1024,
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
                    cache: PathLike | None = None, download: bool = True,
                    progress: bool = True) -> Any:
    """The NNX model ``name`` (``dncnn``, ``srresnet``, ``conversenet``, ``usrnet``) with its
    released (or given) weights.

    ``path``: a ``.pth``, ``.safetensors`` or converted checkpoint directory; without it the
    release file from the cache (downloaded into it if missing, see :func:`fetch_release`).
    ``dtype``: float32 (default) or float64 (needs ``jax_enable_x64``).
    """
    dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("dtype float64 needs 64-bit JAX: call "
                         "jax.config.update('jax_enable_x64', True) first")
    _spec(name)
    if path is None:
        path = fetch_release(name, cache=cache, download=download, progress=progress)
    model = models.create(name, rngs=nnx.Rngs(0), param_dtype=dtype)
    weights, meta = load_weights(name, path, model)
    assign_weights(model, weights, source=str(meta.get("source_file", path)), model_name=name)
    return model


def convert_checkpoint(name: str, weights: PathLike, out: PathLike, *,
                       overwrite: bool = False) -> Path:
    """Convert a PyTorch ``.pth``/``.safetensors`` checkpoint of model ``name`` into an orbax
    checkpoint directory ``out`` (metadata: model, source file name and SHA-256, version)."""
    _spec(name)
    weights = Path(weights).expanduser()
    if weights.is_dir():
        raise ValueError(f"{weights} is a directory: pass the .pth or .safetensors file to "
                         f"convert")
    model = models.create(name, rngs=nnx.Rngs(0))
    converted, meta = load_weights(name, weights, model)
    return save_converted(out, converted, meta, overwrite=overwrite)
