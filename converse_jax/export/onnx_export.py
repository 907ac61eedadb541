"""ONNX export through jax2onnx, after rewriting the forward into real arithmetic (:mod:`realify`).

ONNX Runtime has no complex tensors and ONNX's ``DFT`` operator is one-dimensional; jax2onnx
converts only 1-D FFTs. The forward is therefore first rewritten by :func:`realify.realify`: the
Converse2D filters become constants and each 2-D FFT becomes products with DFT matrices, which
jax2onnx emits as ``MatMul`` / ``Einsum`` nodes. The batch is fixed per ONNX model (jax2onnx's
``Pad`` lowering does not accept a symbolic batch).

Needs the ``export`` extra: ``pip install -e ".[export]"``.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
from flax import nnx

from converse_jax.export.realify import realify
from converse_jax.export.stablehlo import ExportSpec, forward_fn

DEFAULT_OPSET = 23


def _require() -> tuple[Any, Any]:
    try:
        import jax2onnx
        import onnx
    except ImportError as exc:
        raise ValueError(f"ONNX export needs jax2onnx and onnx ({exc.name} is missing): "
                         "pip install -e '.[export]'") from None
    return jax2onnx, onnx


def export_onnx(model: nnx.Module, model_spec: Any, spec: ExportSpec,
                opset: int | None = None) -> tuple[bytes, dict[str, Any]]:
    """(serialized ONNX model, description fields) of ``model_spec.task.forward(model, ...)``.

    Inputs ``x`` (batch, H, W, C) float32 NHWC and, for non-blind models, ``kernel`` (batch, k, k);
    output ``y``. ``spec.batch`` None exports batch 1.
    """
    jax2onnx, onnx = _require()
    task = model_spec.task
    if spec.sf != 1 and not task.takes_kernel:
        raise ValueError(f"--sf applies to non-blind models only; {model_spec.name} has a fixed scale")
    batch = 1 if spec.batch is None else spec.batch
    shapes = [(batch, spec.height, spec.width, model_spec.in_channels)]
    names = ["x"]
    if task.takes_kernel:
        shapes.append((batch, spec.kernel_size, spec.kernel_size))
        names.append("kernel")
    import jax
    import jax.numpy as jnp

    structs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    proto = jax2onnx.to_onnx(realify(forward_fn(model, task, spec.sf), *structs), shapes, model_name=model_spec.name,
                             opset=opset or DEFAULT_OPSET, input_names=names, output_names=["y"])
    onnx.checker.check_model(proto)
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    extra = {
        "batch_size": batch,
        "onnx": {"opset": [{"domain": o.domain or "ai.onnx", "version": o.version} for o in proto.opset_import],
                 "ir_version": proto.ir_version, "fft": "DFT-matrix products (MatMul/Einsum constants)",
                 "operators": dict(sorted(ops.items(), key=lambda kv: -kv[1])), "nodes": sum(ops.values()),
                 "jax2onnx": getattr(jax2onnx, "__version__", "unknown"), "onnx": onnx.__version__},
    }
    return proto.SerializeToString(), extra


def run_onnx(blob: bytes, *inputs: np.ndarray) -> np.ndarray:
    """Run a serialized ONNX model in ONNX Runtime on CPU (what a deployment does)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    feeds = {i.name: np.asarray(a, np.float32) for i, a in zip(sess.get_inputs(), inputs, strict=True)}
    return sess.run(None, feeds)[0]
