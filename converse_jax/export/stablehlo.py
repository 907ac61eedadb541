"""StableHLO export through ``jax.export``: the network's forward with its weights as constants.

The serialized module runs with ``jax.export.deserialize(blob).call(x[, kernel])`` in any process
that has JAX, without converse_jax. Converse2D's inverse FFT is platform dependent
(``jax.lax.platform_dependent``: paired complex FFTs on CPU), so the module is lowered for every
platform in ``platforms`` and carries one branch per platform.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converse_jax.nn.precision import model_precision

FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    """What one artifact computes: input (B, height, width, channels) NHWC float32 images in [0, 1];
    ``batch`` None for a symbolic batch; ``kernel_size`` and ``sf`` for networks that take a kernel."""

    height: int
    width: int
    batch: int | None = None
    sf: int = 1
    kernel_size: int = 7
    platforms: tuple[str, ...] = ("cpu",)

    def __post_init__(self) -> None:
        for name in ("height", "width", "sf", "kernel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.batch is not None and (isinstance(self.batch, bool) or not isinstance(self.batch, int)
                                       or self.batch < 1):
            raise ValueError(f"batch must be a positive integer or None (symbolic), got {self.batch!r}")
        if not self.platforms:
            raise ValueError("platforms must name at least one of cpu, cuda, rocm, tpu")


def _input_structs(spec: ExportSpec, channels: int, takes_kernel: bool) -> list[jax.ShapeDtypeStruct]:
    b = jax.export.symbolic_shape("b")[0] if spec.batch is None else spec.batch
    args = [jax.ShapeDtypeStruct((b, spec.height, spec.width, channels), jnp.float32)]
    if takes_kernel:
        args.append(jax.ShapeDtypeStruct((b, spec.kernel_size, spec.kernel_size), jnp.float32))
    return args


def forward_fn(model: nnx.Module, task: Any, sf: int = 1) -> Any:
    """A pure function ``fn(x[, kernel])`` of the network's task forward, its weights closed over."""
    graphdef, state = nnx.split(model)

    if task.takes_kernel:
        def fn(x, kernel):
            return task.forward(nnx.merge(graphdef, state), {"input": x, "kernel": kernel}, sf=sf)
    else:
        def fn(x):
            return task.forward(nnx.merge(graphdef, state), {"input": x}, sf=sf)
    return fn


def export_stablehlo(model: nnx.Module, model_spec: Any, spec: ExportSpec) -> jax.export.Exported:
    """``jax.export`` of ``model_spec.task.forward(model, ...)`` for inputs of ``spec``'s shapes."""
    task = model_spec.task
    if spec.sf != 1 and not task.takes_kernel:
        raise ValueError(f"--sf applies to non-blind models only; {model_spec.name} has a fixed scale")
    fn = forward_fn(model, task, spec.sf)
    args = _input_structs(spec, model_spec.in_channels, task.takes_kernel)
    return jax.export.export(jax.jit(fn), platforms=tuple(spec.platforms))(*args)


def params_sha256(model: nnx.Module) -> str:
    """SHA-256 of the network's parameters (path-sorted names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for path, leaf in sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)), key=lambda kv: str(kv[0])):
        value = np.asarray(leaf.get_value() if hasattr(leaf, "get_value") else leaf)
        h.update(f"{'/'.join(map(str, path))}|{value.dtype}|{value.shape}|".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe(model_spec: Any, spec: ExportSpec, *, fmt: str, model: nnx.Module, weights: str | None,
             arch: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The artifact's JSON description: model, inputs and output (shapes, dtypes, NHWC layout, value
    range), compute precision (the network's ``precision``: ``float32`` or ``bf16``, whose inputs,
    outputs and parameters are float32 too), weights (file and SHA-256, parameter SHA-256) and the
    versions it was made with."""
    import converse_jax

    task = model_spec.task
    batch = "B" if spec.batch is None else spec.batch
    inputs = [{"name": "x", "shape": [batch, spec.height, spec.width, model_spec.in_channels],
               "dtype": "float32", "layout": "NHWC", "range": [0.0, 1.0]}]
    if task.takes_kernel:
        inputs.append({"name": "kernel", "shape": [batch, spec.kernel_size, spec.kernel_size], "dtype": "float32",
                       "note": "one blur kernel per image, summing to 1"})
    scale = spec.sf if task.takes_kernel else model_spec.scale
    output = {"name": "y", "shape": [batch, spec.height * scale, spec.width * scale, model_spec.out_channels],
              "dtype": "float32", "layout": "NHWC", "range": [0.0, 1.0], "clipped": False}
    out = {
        "format": fmt, "format_version": FORMAT_VERSION, "model": model_spec.name, "task": task.name,
        "description": model_spec.description, "precision": model_precision(model, "float32"),
        "arch": dict(arch or {}), "sf": spec.sf if task.takes_kernel else None,
        "batch": "symbolic" if spec.batch is None else "fixed", "inputs": inputs, "outputs": [output],
        "weights": {"file": None if weights is None else str(weights),
                    "sha256": None if weights is None else file_sha256(weights),
                    "params_sha256": params_sha256(model)},
        "versions": {"converse_jax": converse_jax.__version__ if hasattr(converse_jax, "__version__") else "0.1.0",
                     "jax": jax.__version__},
        "platforms": list(spec.platforms),
    }
    out.update(extra or {})
    return out


def write_artifact(path: Path, blob: bytes, meta: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write ``blob`` to ``path`` and ``meta`` to ``path`` + ``.json``; returns the JSON path."""
    meta_path = Path(str(path) + ".json")
    for p in (path, meta_path):
        if p.exists() and not overwrite:
            raise ValueError(f"{p} exists; pass --overwrite to replace it or choose another --out")
    path.write_bytes(bytes(blob))
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta_path


def run_stablehlo(blob: bytes, *inputs: Sequence[np.ndarray]) -> np.ndarray:
    """Run a serialized artifact on numpy inputs (what a deployment does, with JAX only)."""
    exported = jax.export.deserialize(bytearray(blob))
    return np.asarray(exported.call(*inputs))
