"""Deployment artifacts: StableHLO modules run without converse_jax and match the library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from converse_jax import export as X
from converse_jax.models import create, get_spec
from converse_jax.nn import precision as P
from converse_jax.train.config import parse_model_kwargs
from experiments import export as cli

ROOT = Path(__file__).resolve().parents[1]
SMALL = {  # small architectures of the four networks (fresh weights): the export path, not the values
    "dncnn": dict(features=8, num_blocks=2),
    "srresnet": dict(features=8, num_blocks=1),
    "conversenet": dict(features=8, num_blocks=1, num_iterations=2),
    "usrnet": dict(features=8, num_blocks=1, num_iterations=2),
}

# Largest |bf16 artifact - float32 library| accepted for the small fresh networks below: half a bfloat16
# ulp at 1 (8 mantissa bits), one rounding of an image value. They differ by about 1.5e-5 (their
# freshly initialised branches add little to the residual stream); the released networks differ by
# 7.5e-3 (DnCNN) to 3.7e-2 (USRNet) at 64², docs/deploy.md.
BF16_VS_FLOAT32_ATOL = 2.0**-9


@pytest.fixture(autouse=True)
def _restore_default_precision(monkeypatch):
    """The command's --precision sets the process default and $CONVERSE_JAX_PRECISION: put both back."""
    monkeypatch.setattr(P, "_default", [P.get_default_precision()])
    monkeypatch.setenv(P.ENV_VAR, P.get_default_precision())


# Runs in a fresh interpreter with JAX only: loads each artifact, checks that no converse_jax module
# was imported, and saves the outputs.
RUNNER = textwrap.dedent("""
    import sys, jax, numpy as np
    data = np.load(sys.argv[1])
    out = {}
    for name in sys.argv[3:]:
        exp = jax.export.deserialize(bytearray(open(f"{sys.argv[2]}/{name}.stablehlo", "rb").read()))
        args = [data[name + "_x"]] + ([data[name + "_k"]] if name + "_k" in data.files else [])
        out[name] = np.asarray(exp.call(*args))
    leaked = sorted(m for m in sys.modules if m.startswith("converse_jax"))
    assert not leaked, leaked
    np.savez(sys.argv[1].replace(".npz", "_out.npz"), **out)
""")


def _inputs(name: str, batch: int, h: int, w: int):
    rng = np.random.default_rng(0)
    spec = get_spec(name)
    x = rng.uniform(0, 1, (batch, h, w, spec.in_channels)).astype(np.float32)
    if not spec.task.takes_kernel:
        return x, None
    k = rng.uniform(0, 1, (batch, 7, 7)).astype(np.float32)
    return x, k / k.sum(axis=(1, 2), keepdims=True)


@pytest.mark.slow
def test_stablehlo_runs_without_converse_jax(tmp_path):
    data, ref = {}, {}
    for name, arch in SMALL.items():
        spec = get_spec(name)
        model = create(name, rngs=nnx.Rngs(1), **arch)
        exported = X.export_stablehlo(model, spec, X.ExportSpec(height=16, width=20))  # symbolic batch
        assert "b" in str(exported.in_avals[0].shape[0])
        (tmp_path / f"{name}.stablehlo").write_bytes(exported.serialize())
        # Called at a batch size the artifact was not traced with: the batch is symbolic.
        x, k = _inputs(name, 3, 16, 20)
        data[name + "_x"] = x
        batch = {"input": x}
        if k is not None:
            data[name + "_k"] = k
            batch["kernel"] = k
        ref[name] = np.asarray(jax.jit(lambda b, m=model, t=spec.task: t.forward(m, b))(batch))
    np.savez(tmp_path / "in.npz", **data)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "in.npz"), str(tmp_path), *SMALL],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = np.load(tmp_path / "in_out.npz")
    for name in SMALL:
        assert out[name].shape == ref[name].shape, name
        np.testing.assert_allclose(out[name], ref[name], rtol=0, atol=1e-6, err_msg=name)


def test_cli_stablehlo_writes_artifact_and_description(tmp_path, capsys):
    out = tmp_path / "usr.stablehlo"
    args = ["--model=usrnet", "--arch=features=8,num_blocks=1,num_iterations=1", "--format=stablehlo",
            "--height=12", "--width=16", "--batch=2", "--sf=2", f"--out={out}"]
    assert cli.main(args) == 0
    meta = json.loads(Path(str(out) + ".json").read_text())
    assert meta["model"] == "usrnet" and meta["sf"] == 2 and meta["batch"] == "fixed"
    assert meta["inputs"][0]["shape"] == [2, 12, 16, 3] and meta["inputs"][1]["shape"] == [2, 7, 7]
    assert meta["outputs"][0]["shape"] == [2, 24, 32, 3] and meta["inputs"][0]["layout"] == "NHWC"
    assert meta["versions"]["jax"] == jax.__version__ and len(meta["weights"]["params_sha256"]) == 64
    exp = jax.export.deserialize(bytearray(out.read_bytes()))
    x, k = _inputs("usrnet", 2, 12, 16)
    assert np.asarray(exp.call(x, k)).shape == (2, 24, 32, 3)
    # An existing artifact is kept unless --overwrite.
    before = out.read_bytes()
    assert cli.main(args) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before


@pytest.mark.parametrize("bad, message", [
    (["--out=/nonexistent_dir/x.stablehlo"], "does not exist"),
    (["--height=0"], "height must be a positive integer"),
    (["--model=dncnn", "--sf=2"], "sf applies to non-blind models only"),
    (["--fft=dft"], "apply to --format=onnx only"),
    (["--format=onnx", "--fft=dft", "--opset=18"], "needs opset 20 or later"),
])
def test_cli_bad_input_one_line(tmp_path, capsys, bad, message):
    args = ["--model=usrnet", "--arch=features=8,num_blocks=1,num_iterations=1", "--format=stablehlo",
            "--height=12", "--width=16", f"--out={tmp_path / 'a.stablehlo'}"]
    keys = {a.split("=")[0] for a in bad}
    args = [a for a in args if a.split("=")[0] not in keys] + bad
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([e for e in err if e.startswith("error:")]) == 1 and message in err[-1]


@pytest.mark.slow
@pytest.mark.parametrize("fft", ["dft", "matmul"])
def test_onnx_matches_library_in_onnxruntime(fft):
    from converse_jax.export import onnx_export as O

    for i, (name, arch) in enumerate(SMALL.items()):
        h, w = [(16, 20), (24, 16)][i % 2]  # two image sizes across the four networks
        spec = get_spec(name)
        model = create(name, rngs=nnx.Rngs(2), **arch)
        sf = 2 if spec.task.takes_kernel else 1  # the non-blind model with a fixed sf > 1
        blob, extra = O.export_onnx(model, spec, X.ExportSpec(height=h, width=w, batch=2, sf=sf), fft=fft)
        ops = extra["onnx"]["operators"]
        assert extra["onnx"]["nodes"] == sum(ops.values()) > 0 and extra["onnx"]["fft"] == fft
        assert (ops.get("DFT", 0) > 0) == (fft == "dft"), ops  # matmul: no DFT node at all
        x, k = _inputs(name, 2, h, w)
        batch = {"input": x} if k is None else {"input": x, "kernel": k}
        ref = np.asarray(jax.jit(lambda b, m=model, t=spec.task, s=sf: t.forward(m, b, sf=s))(batch))
        out = O.run_onnx(blob, x, *([] if k is None else [k]))
        assert out.shape == ref.shape, name
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4, err_msg=f"{name} fft={fft}")


def test_cli_onnx_writes_artifact_and_description(tmp_path):
    import onnxruntime as ort

    out = tmp_path / "dncnn.onnx"
    assert cli.main(["--model=dncnn", "--arch=features=8,num_blocks=1", "--format=onnx", "--height=12",
                     "--width=10", "--fft=matmul", f"--out={out}"]) == 0
    meta = json.loads(Path(str(out) + ".json").read_text())
    assert meta["onnx"]["fft"] == "matmul" and meta["batch_size"] == 1 and meta["precision"] == "float32"
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x"] and list(sess.get_inputs()[0].shape) == [1, 12, 10, 1]


@pytest.mark.parametrize("name, arch", [("dncnn", "features=8,num_blocks=1"),
                                        ("usrnet", "features=8,num_blocks=1,num_iterations=2")])
def test_cli_stablehlo_bf16_reloads_and_matches_library(tmp_path, name, arch):
    out = tmp_path / f"{name}_bf16.stablehlo"
    assert cli.main([f"--model={name}", f"--arch={arch}", "--format=stablehlo", "--height=16", "--width=20",
                     "--precision=bf16", "--seed=3", f"--out={out}"]) == 0
    meta = json.loads(Path(str(out) + ".json").read_text())
    assert meta["precision"] == "bf16"
    assert {d["dtype"] for d in meta["inputs"] + meta["outputs"]} == {"float32"}
    exp = jax.export.deserialize(bytearray(out.read_bytes()))
    assert [a.dtype for a in exp.in_avals + exp.out_avals] == [np.float32] * (len(exp.in_avals) + 1)
    x, k = _inputs(name, 2, 16, 20)
    got = np.asarray(exp.call(x, *([] if k is None else [k])))
    batch = {"input": x} if k is None else {"input": x, "kernel": k}
    refs, task = {}, get_spec(name).task
    for precision in ("bf16", "float32"):  # the same parameters (seed 3) in both precisions
        model = create(name, rngs=nnx.Rngs(3), precision=precision, **parse_model_kwargs(arch))
        refs[precision] = np.asarray(jax.jit(lambda b, m=model: task.forward(m, b))(batch))
    np.testing.assert_allclose(got, refs["bf16"], rtol=0, atol=1e-6)
    diff = np.abs(got - refs["float32"]).max()
    assert 0 < diff < BF16_VS_FLOAT32_ATOL, diff  # it computed in bfloat16, within bfloat16's rounding


def test_onnx_bf16_refused_before_loading(tmp_path, capsys):
    out = tmp_path / "d.onnx"
    args = ["--model=dncnn", "--weights=/nonexistent/w.pth", "--format=onnx", "--height=16", "--width=16",
            "--precision=bf16", f"--out={out}"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "float32 only" in err[0] and "--format=stablehlo --precision=bf16" in err[0], err
    assert not out.exists() and not Path(str(out) + ".json").exists()
    from converse_jax.export import onnx_export as O

    model = create("dncnn", rngs=nnx.Rngs(0), precision="bf16", features=8, num_blocks=1)
    with pytest.raises(ValueError, match="float32 only"):  # the library refuses it too
        O.export_onnx(model, get_spec("dncnn"), X.ExportSpec(height=16, width=16))


def test_realify_matches_fft_and_complex_ops():
    from converse_jax.export.realify import realify

    def fn(x):
        z = jax.numpy.fft.rfft2(x)
        full = jax.numpy.fft.fft2(x.astype(jax.numpy.complex64))
        g = jax.numpy.fft.rfft2(jax.numpy.ones(x.shape[-2:]) * 0.5)  # a constant, folded at export
        back = jax.numpy.fft.irfft2(z * g + jax.numpy.conj(z) * 0.1, s=x.shape[-2:])
        return back + jax.numpy.fft.ifft2(full * 1j).real

    for shape in [(2, 6, 7), (1, 8, 6)]:  # odd and even last axes (the inverse real FFT's Nyquist bin)
        x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
        for fft in ("matmul", "dft"):
            real_fn = realify(fn, x, fft=fft)
            jaxpr = jax.make_jaxpr(real_fn)(x).jaxpr
            prims = {e.primitive.name for e in jaxpr.eqns}
            assert "fft" not in prims and not any(v.aval.dtype.kind == "c" for v in jaxpr.outvars)
            assert ("converse_onnx_dft" in prims) == (fft == "dft")
            # jit: evaluated eagerly, realify would fold the whole function into constants
            np.testing.assert_allclose(np.asarray(jax.jit(real_fn)(x)), np.asarray(fn(x)), rtol=0, atol=1e-5)


def test_realify_matmul_shares_one_matrix_per_size():
    from converse_jax.export.realify import realify

    def fn(x):  # three real FFTs of one size: their DFT matrices should enter the graph once
        a = jax.numpy.fft.rfft2(x)
        b = jax.numpy.fft.rfft2(2 * x)
        return jax.numpy.fft.irfft2(a * b, s=x.shape[-2:]) + jax.numpy.fft.rfft2(x * x).real.sum()

    x = np.ones((1, 8, 8), np.float32)
    consts = jax.make_jaxpr(realify(fn, x, fft="matmul"))(x).consts
    shapes = sorted(tuple(c.shape) for c in consts if np.ndim(c) == 2)
    # rfft: cos and sin (8, 5); complex FFT over rows: cos and sin (8, 8) (forward) and again (inverse);
    # inverse real FFT: weighted cos and sin (5, 8)
    assert shapes == [(5, 8)] * 2 + [(8, 5)] * 2 + [(8, 8)] * 4, shapes


def test_realify_gathers_outer_products_as_takes(monkeypatch):
    from converse_jax.export import realify as R
    from converse_jax.export.realify import realify

    # Index grids above the fold limit (large images) are still computed at export time: they are integral.
    monkeypatch.setattr(R, "FOLD_LIMIT", 16)

    ih, iw = np.array([2, 1, 0, 1, 2, 3, 2]), np.array([4, 0, 1, 2, 3, 4, 0, 1])  # padding-like indices

    def fn(x):
        return (x[..., ih[:, None], iw[None, :]],  # channels-first padding (index axes last)
                x[:, ih[:, None], iw[None, :], :],  # channels-last
                x[..., np.array([[0, 1], [2, 3]]), np.array([[1, 1], [0, 2]])])  # not an outer product

    x = np.random.default_rng(0).normal(size=(2, 4, 5, 5)).astype(np.float32)
    real_fn = realify(fn, x)
    index_ranks = [e.invars[1].aval.ndim for e in jax.make_jaxpr(real_fn)(x).jaxpr.eqns if e.primitive.name == "gather"]
    assert index_ranks == [3], index_ranks  # only the last stays a gather with a 2-D grid of index pairs
    for got, want in zip(jax.jit(real_fn)(x), fn(x), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_realify_rejects_unknown_fft_mode():
    from converse_jax.export.realify import realify

    with pytest.raises(ValueError, match="fft must be one of matmul, dft"):
        realify(lambda x: x, np.ones(2, np.float32), fft="fftw")
