"""Channels-first internals and scanned blocks compute what the channels-last public calls compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converse_jax.models import create
from converse_jax.nn import ConverseBlock, ScanBlocksView, apply_channels_first, layer_norm, pointwise, run_blocks
from converse_jax.ops import PADDING_MODES, converse2d, converse2d_channels_first, pad_planes
from converse_jax.train.step import mode_view

_NP_MODE = {"circular": "wrap", "reflect": "reflect", "replicate": "edge", "constant": "constant"}


def _nchw(x):
    return jnp.moveaxis(x, -1, 1)


def _nhwc(x):
    return jnp.moveaxis(x, 1, -1)


@pytest.mark.parametrize("mode", PADDING_MODES)
def test_pad_planes_equals_numpy_pad_and_its_gradient_is_the_adjoint(x64, mode):
    x = jax.random.normal(jax.random.key(0), (2, 3, 7, 6))
    y = pad_planes(x, 3, mode)
    np.testing.assert_array_equal(y, np.pad(np.asarray(x), ((0, 0), (0, 0), (3, 3), (3, 3)), mode=_NP_MODE[mode]))
    ct = jax.random.normal(jax.random.key(1), y.shape)
    (g,) = jax.vjp(lambda a: pad_planes(a, 3, mode), x)[1](ct)
    # <pad(x), ct> = <x, pad^T(ct)> for a random x' checks the gradient is the adjoint.
    x2 = jax.random.normal(jax.random.key(2), x.shape)
    np.testing.assert_allclose(jnp.vdot(pad_planes(x2, 3, mode), ct), jnp.vdot(x2, g), rtol=1e-12)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("scale", [1, 2])
def test_channels_first_operator_equals_the_channels_last_one(x64, per_sample, scale):
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(k1, (2, 9, 8, 3))
    kernel = jax.nn.softmax(jax.random.normal(k2, ((2,) if per_sample else ()) + (9, 3)), axis=-2)
    kernel = kernel.reshape(((2,) if per_sample else ()) + (3, 3, 3))
    lam = jax.nn.sigmoid(jax.random.normal(k3, (3,)) - 9) + 1e-5
    ref = converse2d(x, kernel, lam, scale=scale, padding=2, padding_mode="reflect")
    kernel_cf = jnp.moveaxis(kernel, -1, -3)
    out = converse2d_channels_first(_nchw(x), kernel_cf, lam, scale=scale, padding=2, padding_mode="reflect")
    np.testing.assert_allclose(_nhwc(out), ref, rtol=1e-12, atol=1e-12)


def test_channels_first_operator_rejects_channels_last_kernels():
    x = jnp.ones((1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"kernel channels must equal the input channels: kernel \(3, 3, 4\)"):
        converse2d_channels_first(x, jnp.ones((3, 3, 4)) / 9, 1e-3)


def test_layers_channels_first_methods_equal_their_calls(x64):
    rngs = nnx.Rngs(0)
    x = jax.random.normal(jax.random.key(4), (2, 5, 6, 8), jnp.float64) * 2 + 0.5
    ln = layer_norm(8, param_dtype=jnp.float64, rngs=rngs)
    ln.scale[...] = jax.random.normal(jax.random.key(5), (8,), jnp.float64)
    ln.bias[...] = jax.random.normal(jax.random.key(6), (8,), jnp.float64)
    np.testing.assert_allclose(_nhwc(ln.channels_first(_nchw(x))), ln(x), rtol=1e-12, atol=1e-12)
    pw = pointwise(8, 4, param_dtype=jnp.float64, rngs=rngs)
    pw.bias[...] = jnp.arange(4.0)
    np.testing.assert_allclose(_nhwc(pw.channels_first(_nchw(x))), pw(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alpha", [False, True])
def test_block_channels_first_equals_call_and_fallback_mixer(x64, alpha):
    block = ConverseBlock(4, 3, alpha=alpha, param_dtype=jnp.float64, rngs=nnx.Rngs(1))
    if alpha:
        block.alpha1[...] = jnp.full((4,), 0.7)
        block.alpha2[...] = jnp.full((4,), -0.3)
    x = jax.random.normal(jax.random.key(7), (2, 6, 7, 4), jnp.float64)
    out = block(x)
    np.testing.assert_allclose(_nhwc(block.channels_first(_nchw(x))), out, rtol=1e-12, atol=1e-12)

    class OnlyChannelsLast(nnx.Module):  # a mixer without a channels_first method
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, h):
            return self.inner(h)

    wrapped = OnlyChannelsLast(block.mixer)
    h = jax.random.normal(jax.random.key(8), (2, 8, 6, 7), jnp.float64)
    np.testing.assert_allclose(apply_channels_first(wrapped, h), block.mixer.channels_first(h), rtol=1e-12)


def test_scanned_and_unrolled_blocks_agree_in_value_and_gradient(x64):
    model = create("dncnn", rngs=nnx.Rngs(2), num_blocks=3, features=4, param_dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(9), (2, 10, 9, 1), jnp.float64)

    def loss(m, v):
        return jnp.sum(jnp.sin(nnx.view(m, scan_blocks=v)(x)))

    values = {}
    for scan in (True, False):
        values[scan] = nnx.value_and_grad(loss)(model, scan)
    np.testing.assert_allclose(values[True][0], values[False][0], rtol=1e-12)
    for a, b in zip(jax.tree.leaves(nnx.state(values[True][1])), jax.tree.leaves(nnx.state(values[False][1]))):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_scan_reduces_the_compiled_memory_of_a_deep_network():
    model = create("dncnn", rngs=nnx.Rngs(0), num_blocks=8, features=8)
    x = jnp.zeros((1, 64, 64, 1))
    temp = {}
    for scan in (True, False):
        gd, st = nnx.split(nnx.view(model, scan_blocks=scan))
        compiled = jax.jit(lambda s, v: nnx.merge(gd, s)(v)).lower(st, x).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:
            pytest.skip("this backend reports no compiled memory analysis")
        temp[scan] = analysis.temp_size_in_bytes
    assert temp[True] < temp[False] / 2, temp


def test_training_view_unrolls_and_evaluation_view_scans():
    for name in ("dncnn", "srresnet", "conversenet", "usrnet"):
        model = create(name, rngs=nnx.Rngs(0), num_blocks=2)
        assert isinstance(model, ScanBlocksView) and model.scan_blocks
        assert not mode_view(model, True).scan_blocks
        assert mode_view(model, False).scan_blocks
        assert model.scan_blocks  # the view is a copy


def test_blocks_with_mutable_state_are_not_scanned():
    class Counting(nnx.Module):
        def __init__(self):
            self.calls = nnx.Variable(jnp.zeros(()))  # not a Param: a scan could not update it

        def channels_first(self, h):
            self.calls[...] += 1
            return h + 1

    blocks = [Counting(), Counting()]
    out = run_blocks(blocks, jnp.zeros((1, 1, 2, 2)))
    np.testing.assert_array_equal(out, 2.0)
    assert [float(b.calls[...]) for b in blocks] == [1.0, 1.0]
