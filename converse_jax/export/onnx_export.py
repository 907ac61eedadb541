"""ONNX export through jax2onnx, after rewriting the forward into real arithmetic (:mod:`realify`).

ONNX Runtime has no complex tensors and ONNX's ``DFT`` operator is one-dimensional; jax2onnx
converts only 1-D FFTs. The forward is therefore first rewritten by :func:`realify.realify`: the
Converse2D filters become constants and each 2-D FFT becomes products with DFT matrices, which
jax2onnx emits as ``MatMul`` / ``Einsum`` nodes. The batch is fixed per ONNX model (jax2onnx's
``Pad`` lowering does not accept a symbolic batch). Only float32 networks export: jax2onnx writes a
bf16 network's graph, but ONNX Runtime's CPU provider has no bfloat16 kernels for its operators
(``MatMul``, ``Add``, ``Mul``, ``Erf``, ...; ``Einsum`` takes no bfloat16 at all), so
:func:`check_onnx_precision` refuses it up front.

Needs the ``export`` extra: ``pip install -e ".[export]"``.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
from flax import nnx

from converse_jax.export.realify import FFT_MODES, dft_p, realify
from converse_jax.export.stablehlo import ExportSpec, forward_fn
from converse_jax.nn.precision import model_precision

DEFAULT_OPSET = 23
DEFAULT_FFT = "matmul"  # the faster in ONNX Runtime on CPU at the networks' sizes (docs/deploy.md)
FFT_DESCRIPTION = {"matmul": "DFT-matrix products (MatMul/Einsum with shared constant matrices)",
                   "dft": "1-D ONNX DFT nodes (opset >= 20; real input onesided, inverse real FFT via the "
                          "Hermitian-completed spectrum)"}


BF16_REFUSAL = ("ONNX export is float32 only (ONNX Runtime's CPU provider has no bfloat16 kernels for the "
                "graph's MatMul/Einsum/Add/Mul/Erf); export float32 ONNX (--precision=float32), or bf16 as "
                "StableHLO (--format=stablehlo --precision=bf16)")


def check_onnx_precision(precision: str) -> None:
    """A one-line ValueError unless ``precision`` is ``"float32"`` (see the module docstring)."""
    if precision != "float32":
        raise ValueError(BF16_REFUSAL if precision == "bf16" else
                         f"ONNX export is float32 only, got precision {precision!r}; use --precision=float32")


def _require() -> tuple[Any, Any]:
    try:
        import jax2onnx
        import onnx
    except ImportError as exc:
        raise ValueError(f"ONNX export needs jax2onnx and onnx ({exc.name} is missing): "
                         "pip install -e '.[export]'") from None
    return jax2onnx, onnx


def _scalar_i64(ctx: Any, ir: Any, value: int, hint: str) -> Any:
    from jax2onnx.plugins._ir_shapes import _ensure_value_metadata, _stamp_type_and_shape

    v = ctx.builder.add_initializer_from_array(name=ctx.fresh_name(hint), array=np.asarray(value, np.int64))
    v.type = ir.TensorType(ir.DataType.INT64)
    _stamp_type_and_shape(v, ())
    _ensure_value_metadata(ctx, v)
    return v


def _register_dft() -> None:
    """Teach jax2onnx :data:`realify.dft_p`: one ONNX ``DFT`` node (opset 20's, axis as an input)."""
    import onnx_ir as ir
    from jax2onnx.plugins._ir_shapes import _ensure_value_metadata, _stamp_type_and_shape
    from jax2onnx.plugins.plugin_system import PLUGIN_REGISTRY, PrimitiveLeafPlugin, register_primitive

    if dft_p.name in PLUGIN_REGISTRY:
        return

    @register_primitive(jaxpr_primitive=dft_p.name, since="converse_jax", context="converse_jax",
                        component="dft", onnx=[{"component": "DFT"}], testcases=[])
    class _DFTPlugin(PrimitiveLeafPlugin):
        def lower(self, ctx: Any, eqn: Any) -> None:
            (x_var,), (out_var,), params = eqn.invars, eqn.outvars, eqn.params
            x = ctx.get_value_for_var(x_var, name_hint=ctx.fresh_name("dft_in"))
            out = ctx.builder.DFT(x, _scalar_i64(ctx, ir, params["length"], "dft_length"),
                                  _scalar_i64(ctx, ir, params["axis"], "dft_axis"),
                                  _outputs=[ctx.fresh_name("dft")], inverse=int(params["inverse"]),
                                  onesided=int(params["onesided"]))
            out.type = ir.TensorType(ir.DataType.FLOAT)
            _stamp_type_and_shape(out, tuple(out_var.aval.shape))
            _ensure_value_metadata(ctx, out)
            ctx.bind_value_for_var(out_var, out)


def export_onnx(model: nnx.Module, model_spec: Any, spec: ExportSpec, opset: int | None = None,
                fft: str = DEFAULT_FFT) -> tuple[bytes, dict[str, Any]]:
    """(serialized ONNX model, description fields) of ``model_spec.task.forward(model, ...)``.

    Inputs ``x`` (batch, H, W, C) float32 NHWC and, for non-blind models, ``kernel`` (batch, k, k);
    output ``y``. ``spec.batch`` None exports batch 1. ``fft``: how the 2-D FFTs are written, ``"matmul"``
    (products with DFT matrices) or ``"dft"`` (ONNX ``DFT`` nodes); docs/deploy.md compares them.
    """
    if fft not in FFT_MODES:
        raise ValueError(f"fft must be one of {', '.join(FFT_MODES)}, got {fft!r}")
    check_onnx_precision(model_precision(model, "float32"))
    opset = opset or DEFAULT_OPSET
    if fft == "dft" and opset < 20:
        raise ValueError(f"--fft=dft needs opset 20 or later (DFT with its axis as an input), got {opset}; "
                         "raise --opset or use --fft=matmul")
    jax2onnx, onnx = _require()
    _register_dft()
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
    proto = jax2onnx.to_onnx(realify(forward_fn(model, task, spec.sf), *structs, fft=fft), shapes,
                             model_name=model_spec.name, opset=opset, input_names=names, output_names=["y"])
    onnx.checker.check_model(proto)
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    extra = {
        "batch_size": batch,
        "onnx": {"opset": [{"domain": o.domain or "ai.onnx", "version": o.version} for o in proto.opset_import],
                 "ir_version": proto.ir_version, "fft": fft, "fft_how": FFT_DESCRIPTION[fft],
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
