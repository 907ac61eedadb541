"""Mixed precision (precision="bf16"): bfloat16 compute, float32 parameters, solver, outputs and training state."""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from converse_jax import models
from converse_jax.nn import precision as P
from converse_jax.tasks import jit_forward
from converse_jax.train import TrainConfigError, config_from_spec, init_train_state, make_train_step, split_state
from converse_jax.train.parallel import make_data_mesh, replicate, shard_batch
from experiments import evaluate, train

TINY_DNCNN = dict(features=8, num_blocks=2, kernel_size=3, padding=2)


@pytest.fixture(autouse=True)
def _restore_default(monkeypatch):
    """Every test leaves the process default precision and $CONVERSE_JAX_PRECISION as it found them."""
    monkeypatch.setattr(P, "_default", [P.get_default_precision()])
    monkeypatch.delenv(P.ENV_VAR, raising=False)


def _input(shape, seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _param_leaves(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def _pair(name, **arch):
    """The same network (same initial parameters) in float32 and in bf16."""
    return (models.create(name, rngs=0, precision="float32", **arch),
            models.create(name, rngs=0, precision="bf16", **arch))


def test_bf16_dncnn_computes_in_bf16_with_float32_params_solver_and_output():
    f32, bf16 = _pair("dncnn", **TINY_DNCNN)
    assert (f32.precision, bf16.precision) == ("float32", "bf16")
    for a, b in zip(_param_leaves(f32), _param_leaves(bf16), strict=True):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_array_equal(a, b)
    batch = {"input": jnp.asarray(_input((1, 24, 24, 1)))}
    task = models.get_spec("dncnn").task
    text = jit_forward(task, bf16).lower(nnx.state(bf16), batch).as_text()
    dots = [ln for ln in text.splitlines() if "stablehlo.dot_general" in ln]
    assert any(re.search(r"tensor<[\dx]*bf16>.*tensor<[\dx]*bf16>", ln) for ln in dots)  # bf16 1x1 convolutions
    ffts = [ln for ln in text.splitlines() if "stablehlo.fft" in ln]
    assert ffts and not any("bf16" in ln for ln in ffts)  # the Converse2D solver stays float32
    y32, y16 = (np.asarray(jit_forward(task, m)(nnx.state(m), batch)) for m in (f32, bf16))
    assert jit_forward(task, bf16)(nnx.state(bf16), batch).dtype == jnp.float32
    assert np.all(np.isfinite(y16)) and not np.array_equal(y16, y32)  # it did compute in another precision
    np.testing.assert_allclose(y16, y32, atol=0.05 * np.abs(y32).max())


@pytest.mark.slow
@pytest.mark.parametrize("name, arch, kernel", [
    ("usrnet", dict(features=8, num_blocks=1, num_iterations=2), True),  # data step, KernelNet, alpha blocks
    ("dncnn_original", dict(features=8, num_blocks=2), False),  # 3x3 convolutions, BatchNorm
    ("msrresnet_converse_up", dict(features=8, num_blocks=1, upscale=2), False),  # Converse2D x2 upsampler
    ("srresnet_convt", dict(features=8, num_blocks=1, upscale=2), False),  # depthwise transposed convolutions
])
def test_every_family_builds_in_bf16_close_to_float32(name, arch, kernel):
    f32, bf16 = _pair(name, **arch)
    assert all(p.dtype == jnp.float32 for p in _param_leaves(bf16))
    spec = models.get_spec(name)
    batch = {"input": jnp.asarray(_input((1, 16, 16, spec.in_channels), seed=1))}
    if kernel:
        batch["kernel"] = jnp.full((1, 7, 7), 1 / 49, jnp.float32)
    y32, y16 = (jit_forward(spec.task, m)(nnx.state(m), batch) for m in (f32, bf16))
    assert y16.dtype == jnp.float32 and y16.shape == y32.shape
    np.testing.assert_allclose(np.asarray(y16), np.asarray(y32), atol=0.05 * float(jnp.abs(y32).max()) + 1e-7)


def test_float32_weights_load_into_a_bf16_model_unchanged():
    """The state is float32 in both precisions: a float32 model's state (what the weight converter
    produces) updates a bf16 model as it is."""
    f32 = models.create("dncnn", rngs=1, precision="float32", **TINY_DNCNN)
    bf16 = models.create("dncnn", rngs=2, precision="bf16", **TINY_DNCNN)
    state = nnx.state(f32)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == jax.tree.map(lambda a: (a.shape, a.dtype),
                                                                            nnx.state(bf16))
    nnx.update(bf16, state)
    x = jnp.asarray(_input((1, 16, 16, 1), seed=2))
    np.testing.assert_allclose(np.asarray(bf16(x)), np.asarray(f32(x)), atol=0.05 * float(jnp.abs(f32(x)).max()))


def test_unknown_precision_is_a_one_line_error(capsys):
    with pytest.raises(ValueError, match=r"^unknown precision 'fp16': choose one of float32, bf16$"):
        models.create("dncnn", precision="fp16", **TINY_DNCNN)
    with pytest.raises(ValueError, match="unknown precision"):
        models.ConverseNet(precision="half", rngs=nnx.Rngs(0))
    with pytest.raises(TrainConfigError, match=r"--precision must be one of float32, bf16, got 'fp16'"):
        config_from_spec("dncnn", precision="fp16").validate()
    with pytest.raises(SystemExit) as exit_info:
        evaluate.build_parser().parse_args(["--model", "dncnn", "--precision", "fp16"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--precision" in err and "choose one of float32, bf16" in err


def test_default_precision_scoped_env_and_flag(monkeypatch):
    assert models.create("dncnn", **TINY_DNCNN).precision == "float32"
    with P.default_precision("bf16"):
        assert models.create("dncnn", **TINY_DNCNN).precision == "bf16"
    assert P.get_default_precision() == "float32"
    monkeypatch.setattr(P, "_default", [None])  # not read yet: the environment decides
    monkeypatch.setenv(P.ENV_VAR, "bf16")
    assert P.get_default_precision() == "bf16"
    monkeypatch.setattr(P, "_default", [None])
    monkeypatch.setenv(P.ENV_VAR, "fp8")
    with pytest.raises(ValueError, match=r"CONVERSE_JAX_PRECISION='fp8' is not a precision"):
        P.get_default_precision()
    # the flag sets the default (and the variable workers inherit); a parse without it resets both
    args = train.build_parser().parse_args(["--model", "dncnn", "--precision=bf16", "--steps", "1"])
    assert args.precision == P.get_default_precision() == "bf16"
    assert os.environ[P.ENV_VAR] == "bf16"
    assert train.config_from_args(args).precision == "bf16"
    assert evaluate.build_parser().parse_args(["--model", "dncnn"]).precision == "float32"
    assert P.get_default_precision() == os.environ[P.ENV_VAR] == "float32"


def test_bf16_train_step_keeps_float32_state():
    model = models.create("dncnn", rngs=0, precision="bf16", **TINY_DNCNN)
    mesh = make_data_mesh(1)
    tx = optax.adam(1e-3)
    params, extra = split_state(model)
    state = replicate(init_train_state(params, tx, extra=extra), mesh)
    step = make_train_step(model, tx, models.get_spec("dncnn").task, "l1", mesh)
    target = _input((2, 16, 16, 1), seed=3)
    batch = shard_batch({"input": target + 0.1 * _input((2, 16, 16, 1), seed=4), "target": target}, mesh)
    new, metrics = step(state, batch)
    assert bool(metrics["finite"]) and metrics["loss"].dtype == jnp.float32
    for tree in (new["params"], new["opt_state"]):
        floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert floats and all(x.dtype == jnp.float32 for x in floats)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state["params"]),
                                                         jax.tree.leaves(new["params"]), strict=True)]
    assert all(changed)  # every parameter got a gradient through the bf16 layers


def test_evaluation_json_and_table_say_which_precision_ran(tmp_path, monkeypatch, capsys):
    """``experiments.evaluate --json`` records the precision the network was built in (by ``--precision``)."""
    from converse_jax import evaluation as E
    from converse_jax.imageio import write_image

    data = tmp_path / "data"
    data.mkdir()
    write_image(data / "a.png", np.random.default_rng(0).integers(0, 256, (24, 24, 1), np.uint8))

    def tiny(name, weights, arch):  # a fresh small network, built after the flag set the default precision
        return models.create("dncnn", rngs=0, **TINY_DNCNN), E.get_model_spec("dncnn")

    monkeypatch.setattr(evaluate, "load_model", tiny)
    for flags, want in (([], "float32"), (["--precision=bf16"], "bf16")):
        out = tmp_path / f"{want}.json"
        assert evaluate.main(["--model=dncnn", f"--data-dir={data}", "--dataset=set12", f"--json={out}",
                              "--no-progress", *flags]) == 0
        assert json.loads(out.read_text())["precision"] == want
        assert f"dncnn on data (sigma 25), precision {want}\n" in capsys.readouterr().out
    report = E.EvalReport("m", "set12", models.get_spec("dncnn").task, E.get_model_spec("dncnn").protocol,
                          [E.RunResult([E.ImageResult("a.png", 30.0, 0.9)])])
    assert report.to_dict()["precision"] is None  # a model that does not say is not called float32


def test_benchmark_report_meta_and_header_say_which_precision_ran():
    from benchmarks import suite

    env = {"backend": "cpu", "device_count": 1, "device_kind": "cpu", "cpu_threads": 2, "jax_version": jax.__version__}
    for precision in P.PRECISIONS:
        with P.default_precision(precision):
            report = suite._new_report(["infer"], True, None, False, {}, "none", env)
        assert report["meta"]["precision"] == precision
        assert any(line.startswith(f"precision: {precision} ") for line in suite.format_table(report).splitlines())


def test_bf16_usrnet_writes_its_image_in_float32():
    """USRNet's last 1x1 convolution (the restored image) and its kernel path stay float32 in bf16: its
    output is not a bfloat16-rounded image, while the first convolution does compute in bfloat16."""
    model = models.create("usrnet", rngs=0, precision="bf16", features=8, num_blocks=1, num_iterations=2)
    assert model.conv1.dtype == jnp.bfloat16 and model.conv2.dtype is None and model.kernelnet.fc1.dtype is None
    x = jnp.asarray(_input((1, 16, 16, 3), seed=5))
    y = np.asarray(model(x, jnp.full((1, 7, 7), 1 / 49, jnp.float32)))
    assert y.dtype == np.float32
    rounded = np.asarray(jnp.asarray(y).astype(jnp.bfloat16).astype(jnp.float32))
    assert np.mean(rounded != y) > 0.5  # most values carry more than bfloat16's 8 significant bits


def test_bf16_check_parts_name_real_layers_and_reject_unknown_ones(tmp_path, capsys):
    """The ablation's parts (benchmarks.bf16_check --only=parts) select USRNet layers that have a compute dtype."""
    from benchmarks import bf16_check

    model = models.create("usrnet", rngs=0, precision="bf16", features=8, num_blocks=1, num_iterations=2)
    for part, select in bf16_check.USRNET_PARTS.items():
        layers = select(model)
        assert part in ("float32", "bf16") or layers, part
        assert all(hasattr(layer, "dtype") for layer in layers), part
    assert model.conv1 in bf16_check.USRNET_PARTS["conv1"](model)
    assert bf16_check.main(["--only=parts", "--parts=conv1,conv3", f"--out={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "conv3" in err and "parts float32, bf16, conv1" in err
    assert not list(tmp_path.iterdir())  # nothing written
