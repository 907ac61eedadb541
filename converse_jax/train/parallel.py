"""Data parallelism: a 1-D device mesh over every device of every host, the batch split along
it and the parameters replicated (``jax.make_mesh`` + ``NamedSharding`` under ``jax.jit``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from converse_jax.train.errors import TrainConfigError

__all__ = [
    "DATA_AXIS",
    "multihost_requested",
    "setup_distributed",
    "any_process",
    "make_data_mesh",
    "replicated",
    "batch_sharding",
    "check_batch_size",
    "replicate",
    "shard_batch",
    "enable_compilation_cache",
]

DATA_AXIS = "data"
_COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
_initialized = False


def multihost_requested(flag: bool | None = None) -> bool:
    """Whether to call ``jax.distributed.initialize()``: ``flag`` if given, else whether
    ``$JAX_COORDINATOR_ADDRESS`` is set."""
    if flag is not None:
        return bool(flag)
    return bool(os.environ.get(_COORDINATOR_ENV))


def setup_distributed(multihost: bool | None = None, *, coordinator_address: str | None = None,
                      num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Join a multi-process run when asked to (see :func:`multihost_requested`).

    The arguments go to ``jax.distributed.initialize``; the ones left None are detected there from the
    cluster's environment (SLURM, Open MPI, Cloud TPU, Kubernetes, ...). On CPU the processes exchange
    data through gloo over TCP (set here when no other CPU collectives are configured); gloo gives up
    when a process reaches a collective it has not run before about 30 s after the others. Must run before
    any other JAX call. Returns whether the run is multi-process; settings that cannot be right and a
    failure to reach the coordinator raise :class:`TrainConfigError`.
    """
    global _initialized
    if not multihost_requested(multihost):
        return False
    if num_processes is not None and num_processes < 1:
        raise TrainConfigError(f"--num-processes must be at least 1, got {num_processes}")
    if process_id is not None and (process_id < 0 or (num_processes is not None and process_id >= num_processes)):
        raise TrainConfigError(f"--process-id must be in 0..{(num_processes or 1) - 1} "
                               f"(--num-processes {num_processes}), got {process_id}")
    if coordinator_address is not None and not coordinator_address.rpartition(":")[2].isdigit():
        raise TrainConfigError(f"--coordinator-address must be HOST:PORT (process 0's), got {coordinator_address!r}")
    if _initialized:
        return True
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    given = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    try:
        jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})
    except (RuntimeError, ValueError) as exc:
        where = ", ".join(f"{k} {v}" for k, v in given.items() if v is not None) or "auto-detected settings"
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainConfigError(f"could not join the multi-process run ({where}): {msg}; check that every process "
                               f"got the same coordinator address and process count and that process 0 runs") from exc
    _initialized = True
    return True


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process of the run (every process must call this at the same
    point: it is a collective). Lets all processes take the same decision, e.g. to stop after a signal
    that reached only some of them; a plain ``bool`` in a single-process run."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


def make_data_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh named ``"data"`` over the first ``num_devices`` devices (default: all of them,
    across hosts). Axis type Auto: the compiler propagates the shardings."""
    count = jax.device_count() if num_devices is None else int(num_devices)
    if count < 1 or count > jax.device_count():
        raise TrainConfigError(f"cannot use {num_devices} devices: {jax.device_count()} available")
    return jax.make_mesh((count,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:count])


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> int:
    """The per-host batch; a global batch that does not split evenly is an error saying so."""
    n = mesh.size
    if batch_size % n:
        kind = mesh.devices.flat[0].platform.upper()
        raise TrainConfigError(
            f"--batch-size {batch_size} is not divisible by the {n} {kind} devices the batch is split over: "
            f"use a multiple of {n} (e.g. {max(n, batch_size - batch_size % n)})")
    return batch_size // jax.process_count()


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree of host arrays (the same on every host) on every device of ``mesh``."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This host's slice of the global batch -> global arrays split along the batch axis."""
    sharding = batch_sharding(mesh)
    nproc = jax.process_count()
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        global_shape = (value.shape[0] * nproc, *value.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def enable_compilation_cache(path: str | None = None) -> Path | None:
    """Keep compiled XLA programs on disk so that a restarted run skips compilation.

    ``path`` (default ``$CONVERSE_JAX_COMPILE_CACHE``, else ``~/.cache/converse_jax/xla``);
    ``"off"`` disables it. Returns the folder used (None when disabled or not writable).
    """
    value = path if path is not None else os.environ.get("CONVERSE_JAX_COMPILE_CACHE")
    if value is not None and value.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    folder = Path(value).expanduser() if value else Path("~/.cache/converse_jax/xla").expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return folder
