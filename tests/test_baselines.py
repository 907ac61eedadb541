"""The paper's baselines: layers, parameter counts, train/eval modes, a train step and an evaluation run."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import require_asset
from converse_jax import evaluation as E
from converse_jax import models as M
from converse_jax import train as T
from converse_jax.models import baselines as B
from converse_jax.nn.conv import (
    DepthwiseConv,
    DepthwiseConvTranspose,
    circular_conv_per_sample,
    conv2d,
    nearest_upsample,
    pixel_shuffle,
)
from converse_jax.ops import p2o
from converse_jax.tasks import SR, Task

BASELINES = ["dncnn_k5", "dncnn_original", "dncnn_conv", "dncnn_convt", "msrresnet", "msrresnet_converse_up",
             "srresnet_conv", "srresnet_convt", "convnet", "usrnet_conv"]
TINY = dict(features=8, num_blocks=1)
ONE_ITERATION = dict(TINY, num_iterations=1)  # the iterative deblurring nets: one unrolled pass compiles faster
SR_X2 = dict(features=8, num_blocks=0, upscale=2)  # still two blocks (upsampling, HR) and one upsampler


def _tiny(name):
    task = M.get_spec(name).task
    return ONE_ITERATION if task.uses_kernels else SR_X2 if task == SR else TINY


def _count(name, **overrides):
    model = nnx.eval_shape(lambda: M.create(name, rngs=nnx.Rngs(0), **overrides))
    return M.count_params(model)


def _conv(cin, cout, k, bias=True):
    return k * k * cin * cout + (cout if bias else 0)


# ----------------------------------------------------------------------------------------------------
# Parameter counts at full size (abstract init, no forward pass)

# The paper's DnCNN table and the released checkpoints; the others from the architectures' arithmetic.
_MSR_BODY = _conv(3, 64, 3) + 16 * 2 * _conv(64, 64, 3) + _conv(64, 64, 3) + _conv(64, 3, 3)
EXPECTED = {
    "dncnn_original": 557_057,
    "dncnn_conv": 734_913,
    "dncnn_convt": 734_913,
    "dncnn_k5": 734_913,
    "srresnet_convt": 699_072,  # the released Converse-SRResNet's count: same-size replacements
    "srresnet_conv": 699_072 - 2 * (2 * 2 * 64 + 64) + 2 * (3 * 3 * 64 + 64),  # 3x3 resize-conv upsamplers
    "convnet": 243_267,  # the released ConverseNet's count
    "usrnet_conv": 307_987,  # the released Converse-USRNet's count
    "msrresnet": _MSR_BODY + 2 * _conv(64, 256, 3),
    "msrresnet_converse_up": _MSR_BODY + 2 * (_conv(64, 64, 3) + 2 * 2 * 64 + 64),
}


@pytest.mark.parametrize("name", BASELINES)
def test_parameter_count(name):
    assert M.get_spec(name).num_params == EXPECTED[name]
    assert _count(name) == EXPECTED[name]


def test_baselines_registered_like_their_originals():
    names = set(M.list_models())
    assert set(BASELINES) <= names
    for name, like in [("dncnn_conv", "dncnn"), ("msrresnet", "srresnet"), ("convnet", "conversenet"),
                       ("usrnet_conv", "usrnet")]:
        spec, base = M.get_spec(name), M.get_spec(like)
        assert isinstance(spec.task, Task) and spec.task is base.task and spec.recipe == base.recipe
        assert (spec.in_channels, spec.out_channels, spec.scale) == (base.in_channels, base.out_channels, base.scale)
        assert spec.release is None and spec.torch_key_to_path is None
        assert spec.protocol.dataset == base.protocol.dataset and spec.protocol.border == base.protocol.border
    assert M.get_spec("dncnn_original").protocol.paper == {"set12": 30.43, "bsd68": 29.23}


# ----------------------------------------------------------------------------------------------------
# Layers


def test_depthwise_conv_circular_is_a_wrapped_cross_correlation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 7, 3)).astype(np.float32)
    layer = DepthwiseConv(3, 5, rngs=nnx.Rngs(0))
    layer.conv.bias[...] = jnp.asarray([0.5, -1.0, 2.0])
    w = np.asarray(layer.conv.kernel[...])[:, :, 0, :]
    ref = np.zeros_like(x)
    for a in range(5):
        for b in range(5):
            ref += w[a, b] * np.roll(x, (-(a - 2), -(b - 2)), axis=(1, 2))
    ref += np.asarray([0.5, -1.0, 2.0], np.float32)
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), ref, atol=1e-5)


@pytest.mark.parametrize("k,stride,padding", [(5, 1, 2), (2, 2, 0), (3, 2, 1)])
def test_depthwise_conv_transpose_is_the_adjoint_of_the_strided_conv(k, stride, padding):
    rng = np.random.default_rng(1)
    c, h, w = 3, 5, 6
    layer = DepthwiseConvTranspose(c, k, stride=stride, padding=padding, use_bias=False, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.normal(size=(1, h, w, c)).astype(np.float32))
    y = layer(x)
    assert y.shape == (1, (h - 1) * stride - 2 * padding + k, (w - 1) * stride - 2 * padding + k, c)
    z = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))
    kernel = layer.kernel[...][:, :, None, :]
    conv_z = jax.lax.conv_general_dilated(z, kernel, (stride, stride), ((padding, padding), (padding, padding)),
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
    assert conv_z.shape == x.shape
    np.testing.assert_allclose(float(jnp.vdot(y, z)), float(jnp.vdot(x, conv_z)), rtol=1e-4)


def test_circular_conv_per_sample_matches_the_fft_forward_model():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 9, 8, 3)).astype(np.float32)
    k = rng.random(size=(2, 7, 7, 3)).astype(np.float32)
    out = np.asarray(circular_conv_per_sample(jnp.asarray(x), jnp.asarray(k)))
    otf = np.asarray(p2o(jnp.asarray(np.moveaxis(k, -1, 1)), (9, 8)))  # (B, C, H, W)
    ref = np.fft.ifft2(np.fft.fft2(np.moveaxis(x, -1, 1)) * otf).real
    np.testing.assert_allclose(out, np.moveaxis(ref, 1, -1), atol=1e-4)


def test_pixel_shuffle_and_nearest_upsample_layout():
    x = jnp.arange(2 * 3 * 4 * 8, dtype=jnp.float32).reshape(2, 3, 4, 8)
    y = np.asarray(pixel_shuffle(x, 2))
    assert y.shape == (2, 6, 8, 2)
    xn = np.asarray(x)
    for c in range(2):
        for i in range(2):
            for j in range(2):
                np.testing.assert_array_equal(y[:, i::2, j::2, c], xn[..., c * 4 + i * 2 + j])
    up = np.asarray(nearest_upsample(x, 3))
    np.testing.assert_array_equal(up[:, 2::3, 1::3], xn)
    with pytest.raises(ValueError, match="multiple of scale"):
        pixel_shuffle(x[..., :6], 2)


def test_layer_arguments_are_checked():
    with pytest.raises(ValueError, match="padding_mode"):
        DepthwiseConv(4, 3, padding_mode="mirror", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="padding must be at most"):
        DepthwiseConvTranspose(4, 3, padding=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="odd kernel_size"):
        conv2d(4, 4, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="odd"):
        M.create("dncnn_convt", kernel_size=4, **TINY)
    with pytest.raises(ValueError, match="upsampler"):
        B.MSRResNet(upsampler="bicubic", rngs=nnx.Rngs(0))


def test_baseline_init_is_truncated_normal_and_zero_bias():
    model = M.create("dncnn_conv", **TINY)
    kernel = np.asarray(model.body.block(0).mixer.conv.kernel[...])  # 5 x 5 x 1 x 16 draws
    assert np.all(np.asarray(model.body.block(0).mixer.conv.bias[...]) == 0)
    assert 0.015 < kernel.std() < 0.025 and np.abs(kernel).max() <= 2 * 0.02 / 0.87962566 + 1e-6


# ----------------------------------------------------------------------------------------------------
# Model behaviour


def test_dncnn_original_train_and_eval_modes():
    model = M.create("dncnn_original", **TINY)
    assert all(bn.use_running_average for bn in model.norms)  # built for evaluation
    x = jnp.asarray(np.random.default_rng(4).random((4, 10, 10, 1)).astype(np.float32))
    # eval: a sample's output does not depend on the rest of the batch, running stats stay put
    mean0 = np.asarray(model.norms[0].mean[...]).copy()
    np.testing.assert_allclose(np.asarray(model(x))[:1], np.asarray(model(x[:1])), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(model.norms[0].mean[...]), mean0)
    model.train()
    assert not any(bn.use_running_average for bn in model.norms)
    out_batch = np.asarray(model(x))[:1]
    assert not np.allclose(np.asarray(model.norms[0].mean[...]), mean0)  # running stats were updated
    assert not np.allclose(out_batch, np.asarray(model(x[:1])), atol=1e-4)  # batch statistics
    view = nnx.view(model, use_running_average=True)  # an eval view shares the variables
    assert view.norms[0].use_running_average and view.norms[0].mean is model.norms[0].mean
    model.eval()
    assert all(bn.use_running_average for bn in model.norms)
    # residual learning: with a zero last layer the network returns its input
    model.tail.kernel[...] = jnp.zeros_like(model.tail.kernel[...])
    model.tail.bias[...] = jnp.zeros_like(model.tail.bias[...])
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(x), atol=1e-6)


def test_conv_usrnet_data_step():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)).astype(np.float32))
    k = jnp.asarray(rng.random(size=(2, 3, 3, 4)).astype(np.float32))
    bias = jnp.asarray([0.0, 1.0, -1.0, 2.0])
    out = B.conv_data_step(x, k, bias, 2)
    assert out.shape == (2, 16, 16, 4)
    np.testing.assert_allclose(np.asarray(out), np.asarray(circular_conv_per_sample(nearest_upsample(x, 2), k)
                                                           + bias), atol=1e-6)
    model = M.create("usrnet_conv", **ONE_ITERATION)
    model.data_alpha[...] = jnp.arange(8, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(model.data_weight()), np.arange(8))  # the bias, used as is
    with pytest.raises(ValueError, match="data step"):
        B.ConvUSRNet(data_step=B.conv_data_step, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------------------------------
# A train step and an evaluation run per baseline (tiny sizes)


def _batch(spec, rng, scale):
    """A tiny training batch ``{"input", "target"[, "kernel"]}`` for the spec's task."""
    c = spec.in_channels
    if spec.task == SR:
        hr = rng.random((2, 16, 16, c)).astype(np.float32)
        lr = hr.reshape(2, 16 // scale, scale, 16 // scale, scale, c).mean(axis=(2, 4))
        return {"input": lr, "target": hr}
    clean = rng.random((2, 16, 16, c)).astype(np.float32)
    batch = {"input": clean + 0.1 * rng.normal(size=clean.shape).astype(np.float32), "target": clean}
    if spec.task.takes_kernel:
        kern = np.zeros((2, 7, 7), np.float32)
        kern[:, 3, 3] = 1.0
        batch["kernel"] = kern
    return batch


@pytest.mark.slow
@pytest.mark.parametrize("name", BASELINES)
def test_train_step_and_evaluate(name, tmp_path):
    """Three steps of the project's training step, then the evaluation loop on the result."""
    spec = M.get_spec(name)
    overrides = _tiny(name)
    model = M.create(name, rngs=nnx.Rngs(0), **overrides)
    if name.startswith("msrresnet"):
        assert (model.upsamplers is None) == (name == "msrresnet")  # pixel shuffle vs Converse2D x2
    params, extra = T.split_state(model)
    tx = T.make_optimizer(T.config_from_spec(name, lr=1e-2, lr_milestones=())).tx
    mesh = T.make_data_mesh(1)
    state = T.replicate(T.init_train_state(params, tx, extra=extra), mesh)
    train_step = T.make_train_step(model, tx, spec.task, "l1", mesh)
    scale = overrides.get("upscale", spec.scale)
    batch = T.shard_batch(_batch(spec, np.random.default_rng(6), scale), mesh)
    losses = []
    for _ in range(3):
        state, metrics = train_step(state, batch)
        assert bool(metrics["finite"])
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    before = jax.tree_util.tree_leaves(params)
    after = jax.tree_util.tree_leaves(state["params"])
    changed = sum(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(before, after, strict=True))
    assert changed > len(before) // 2
    if name == "dncnn_original":  # BatchNorm running statistics travel in the state's "extra"
        mean0 = extra["norms"][0]["mean"]
        assert not np.allclose(np.asarray(state["extra"]["norms"][0]["mean"]), np.asarray(mean0))

    trained = nnx.merge(nnx.graphdef(T.mode_view(model, False)), state["params"], state["extra"])  # evaluation mode
    protocol = spec.protocol
    if spec.task.uses_kernels:
        require_asset("blur_kernels", "kernel_1.npy")
        protocol = E.resolve_protocol(spec, kernels=[1])
    if spec.task == SR:
        protocol = dataclasses.replace(protocol, scale=scale)
    size = 16 if spec.task != SR else 24
    channels = 1 if protocol.color == "gray" else 3
    gt = (np.random.default_rng(7).random((size, size, channels)) * 255).astype(np.uint8)
    report = E.evaluate(trained, spec, [("tiny.png", gt)], protocol=protocol, progress=False, save_dir=tmp_path)
    assert len(report.runs) == 1 and len(report.runs[0].per_image) == 1
    result = report.runs[0].per_image[0]
    assert np.isfinite(result.psnr) and 0 < result.psnr < 100 and -1 <= result.ssim <= 1
    assert list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------
# experiments/compare.py


def _compare_args(out, images, *extra):
    return ["--models=dncnn_conv,dncnn_original", f"--out={out}", "--steps=2", "--batch-size=2", "--patch-size=16",
            "--arch=features=8,num_blocks=1", "--eval-every=1", "--val-count=1", "--val-size=16",
            f"--test-sets=mine={images}", "--no-progress", *extra]


@pytest.mark.slow
def test_compare_trains_evaluates_and_writes_table_and_plot(tmp_path, capsys):
    import json

    from PIL import Image

    from converse_jax.imageio import write_image
    from experiments import compare

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(8)
    for i in range(2):
        write_image(images / f"g{i}.png", (rng.random((20, 24, 1)) * 255).astype(np.uint8))
    out = tmp_path / "cmp"
    assert compare.main(_compare_args(out, images)) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert [r["model"] for r in summary["models"]] == ["dncnn_conv", "dncnn_original"]
    for row in summary["models"]:
        assert row["status"] == "ok" and row["steps"] == 2
        assert [step for step, _ in row["val_curve"]] == [1, 2]
        assert np.isfinite(row["test"]["mine"]["psnr"])
        assert row["params"] == _count(row["model"], features=8, num_blocks=1)
    assert summary["settings"]["model_kwargs"] == {"features": 8, "num_blocks": 1}
    table = (out / "compare.md").read_text()
    assert "| dncnn_conv |" in table and "| dncnn_original |" in table and "2 steps, batch 2" in table
    assert f"{summary['models'][1]['test']['mine']['psnr']:.2f}" in table
    with Image.open(out / "val_psnr.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
    assert "written:" in capsys.readouterr().out


@pytest.mark.parametrize("extra,message", [
    (["--models=dncnn_conv,srresnet_conv"], "share the task"),
    (["--models=dncnn_conv,nope"], "unknown model"),
    (["--arch=num_iterations=2"], "does not fit dncnn_conv"),
    (["--test-sets=bsd68"], "--test-sets=bsd68=PATH"),
    (["--steps=0"], "--steps"),
])
def test_compare_rejects_bad_settings(tmp_path, capsys, extra, message):
    from experiments import compare

    out = tmp_path / "cmp"
    args = [a for a in _compare_args(out, tmp_path) if not any(a.startswith(e.split("=")[0] + "=") for e in extra)]
    assert compare.main(args + extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()
