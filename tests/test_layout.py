"""Channels-first internals and scanned blocks compute what the channels-last public calls compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converse_jax.models import create, get_spec
from converse_jax.nn import BlockStack, ConverseBlock, apply_channels_first, layer_norm, pointwise
from converse_jax.ops import PADDING_MODES, converse2d, converse2d_channels_first, pad_planes
from converse_jax.train.step import mode_view
from converse_jax.weights import WeightMismatchError, assign_weights, convert_state_dict
from converse_jax.weights.convert import path_key, stack_legacy_blocks

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
    # each side compiled once (op by op, the block's many small operations compile one by one)
    out = nnx.jit(lambda b, a: b(a))(block, x)
    first = nnx.jit(lambda b, a: b.channels_first(a))(block, _nchw(x))
    np.testing.assert_allclose(_nhwc(first), out, rtol=1e-12, atol=1e-12)

    class OnlyChannelsLast(nnx.Module):  # a mixer without a channels_first method
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, h):
            return self.inner(h)

    wrapped = OnlyChannelsLast(block.mixer)
    h = jax.random.normal(jax.random.key(8), (2, 8, 6, 7), jnp.float64)
    np.testing.assert_allclose(nnx.jit(apply_channels_first)(wrapped, h),
                               nnx.jit(lambda m, a: m.channels_first(a))(block.mixer, h), rtol=1e-12)


def test_scanned_and_unrolled_blocks_agree_in_value_and_gradient(x64):
    model = create("dncnn", rngs=nnx.Rngs(2), num_blocks=3, features=4, param_dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(9), (2, 10, 9, 1), jnp.float64)

    def loss(m, v):
        return jnp.sum(jnp.sin(nnx.view(m, scan_blocks=v)(x)))

    value_and_grad = nnx.jit(nnx.value_and_grad(loss), static_argnums=1)  # one compilation per view
    values = {}
    for scan in (True, False):
        values[scan] = value_and_grad(model, scan)
    np.testing.assert_allclose(values[True][0], values[False][0], rtol=1e-12)
    scanned, unrolled = (jax.tree.leaves(nnx.state(values[v][1])) for v in (True, False))
    for a, b in zip(scanned, unrolled, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_scan_reduces_the_compiled_memory_of_a_deep_network():
    # only compiled, never run: an abstract model (nnx.eval_shape) is enough
    model = nnx.eval_shape(lambda: create("dncnn", rngs=nnx.Rngs(0), num_blocks=8, features=8))
    x = jnp.zeros((1, 64, 64, 1))
    temp = {}
    for scan in (True, False):
        gd, st = nnx.split(nnx.view(model, scan_blocks=scan))
        compiled = jax.jit(lambda s, v, gd=gd: nnx.merge(gd, s)(v)).lower(st, x).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:
            pytest.skip("this backend reports no compiled memory analysis")
        temp[scan] = analysis.temp_size_in_bytes
    assert temp[True] < temp[False] / 2, temp


def _stacks(model):
    return [node for _, node in nnx.iter_graph(model) if isinstance(node, BlockStack)]


def test_training_view_unrolls_and_evaluation_view_scans():
    # the views are a matter of structure: abstract models (nnx.eval_shape) have it without the weights
    for name in ("dncnn", "srresnet", "conversenet", "usrnet", "msrresnet"):
        model = nnx.eval_shape(lambda name=name: create(name, rngs=nnx.Rngs(0), num_blocks=2))
        assert len(_stacks(model)) == 1 and _stacks(model)[0].scan_blocks
        assert not any(s.scan_blocks for s in _stacks(mode_view(model, True)))
        assert all(s.scan_blocks for s in _stacks(mode_view(model, False)))
        assert _stacks(model)[0].scan_blocks  # the view is a copy
        unrolled = nnx.eval_shape(lambda name=name: create(name, rngs=nnx.Rngs(0), num_blocks=2, scan_blocks=False))
        assert not _stacks(unrolled)[0].scan_blocks


def test_blocks_are_stored_stacked_with_one_draw_per_block():
    model = create("dncnn", rngs=nnx.Rngs(0), num_blocks=3, features=4)
    paths = {tuple(str(k) for k in p) for p, _ in nnx.to_flat_state(nnx.state(model))}
    assert model.body.num_blocks == 3 and ("body", "layers", "mixer", "weight") in paths
    assert not any(p[:2] == ("body", "0") for p in paths)
    weight = np.asarray(model.body.layers.mixer.weight[...])
    assert weight.shape == (3, 7, 7, 8)
    assert not np.allclose(weight[0], weight[1]) and not np.allclose(weight[1], weight[2])
    block = model.body.block(2)
    assert isinstance(block, ConverseBlock)
    np.testing.assert_array_equal(block.mixer.weight[...], weight[2])
    with pytest.raises(IndexError, match="block index 3 out of range for 3 blocks"):
        model.body.block(3)
    with pytest.raises(ValueError, match="num_blocks must be an integer >= 0"):
        BlockStack(-1, lambda r: pointwise(2, 2, rngs=r), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("scan", [True, False])
def test_a_stack_runs_its_blocks_in_order_and_writes_back_mutable_state(scan):
    class Counting(nnx.Module):
        def __init__(self, rngs):
            self.calls = nnx.Variable(jnp.zeros(()))  # not a Param: updated by every call
            self.scale = nnx.Param(jax.random.uniform(rngs.params(), ()) + 1)

        def channels_first(self, h):
            self.calls[...] += 1
            return h * self.scale[...] + 1

    stack = BlockStack(3, Counting, scan_blocks=scan, rngs=nnx.Rngs(0))
    scales = np.asarray(stack.layers.scale[...])
    expected = ((0 * scales[0] + 1) * scales[1] + 1) * scales[2] + 1
    out = stack.channels_first(jnp.zeros((1, 1, 2, 2)))
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_array_equal(stack.layers.calls[...], [1.0, 1.0, 1.0])
    stack.channels_first(jnp.zeros((1, 1, 2, 2)))
    np.testing.assert_array_equal(stack.layers.calls[...], [2.0, 2.0, 2.0])


def test_an_empty_stack_is_the_identity():
    stack = BlockStack(0, lambda r: ConverseBlock(4, 3, rngs=r), rngs=nnx.Rngs(0))
    x = jnp.ones((1, 4, 5, 5))
    for scan in (True, False):
        np.testing.assert_array_equal(nnx.view(stack, scan_blocks=scan).channels_first(x), x)


# ----------------------------------------------------------------------------------------------------
# Stacked leaves in the weights layer: per-block names, legacy (per-block) checkpoints


def _flat(model):
    return {path_key(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _legacy_layout(model, stack="prior"):
    """The model's weights as checkpoints converted before blocks were stacked held them: one entry per
    block (``prior.3.mixer.weight``), built from each block's own state."""
    out = {k: v for k, v in _flat(model).items() if k[0] != stack}
    blocks = getattr(model, stack)
    for i in range(blocks.num_blocks):
        out.update({(stack, str(i), *k): v for k, v in _flat(blocks.block(i)).items()})
    return out


def _randomised(name, **kwargs):
    model = create(name, rngs=nnx.Rngs(3), **kwargs)
    rng = np.random.default_rng(0)
    state = nnx.state(model)
    nnx.update(model, jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), state))
    return model


def test_a_legacy_checkpoint_on_disk_loads_into_the_stacked_model(tmp_path):
    from converse_jax.weights import load_pretrained, make_metadata, save_converted

    original = _randomised("usrnet")  # alphas and every other leaf non-trivial
    legacy = _legacy_layout(original)
    assert ("prior", "6", "alpha1") in legacy and not any(k[:2] == ("prior", "layers") for k in legacy)
    src = tmp_path / "usrnet.pth"
    src.write_bytes(b"stands for the release file")
    out = save_converted(tmp_path / "old", legacy, make_metadata("usrnet", src))
    loaded = load_pretrained("usrnet", out)
    want, got = _flat(original), _flat(loaded)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=".".join(k))


def test_stack_legacy_blocks_stacks_complete_groups_only():
    model = create("conversenet", rngs=nnx.Rngs(0), num_blocks=3, features=4)
    legacy = _legacy_layout(model)
    stacked = stack_legacy_blocks(legacy, model)
    assert set(stacked) == set(_flat(model))
    np.testing.assert_array_equal(stacked[("prior", "layers", "pw1", "kernel")],
                                  np.stack([legacy[("prior", str(i), "pw1", "kernel")] for i in range(3)]))
    del legacy[("prior", "1", "pw1", "kernel")]
    partial = stack_legacy_blocks(legacy, model)
    assert ("prior", "layers", "pw1", "kernel") not in partial and ("prior", "0", "pw1", "kernel") in partial


def test_assign_weights_reports_per_block_problems_together():
    model = create("conversenet", rngs=nnx.Rngs(0), num_blocks=3, features=4)
    before = _flat(model)
    legacy = _legacy_layout(model)
    del legacy[("prior", "2", "mixer", "weight")]
    legacy[("prior", "1", "pw2", "bias")] = np.zeros(5, np.float32)
    legacy[("prior", "3", "pw1", "bias")] = np.zeros(8, np.float32)
    with pytest.raises(WeightMismatchError) as info:
        assign_weights(model, legacy, source="old.ckpt", model_name="conversenet")
    err = info.value
    assert err.missing == ["prior.2.mixer.weight"]
    assert err.unexpected == ["prior.3.pw1.bias"]
    assert err.mismatched == ["prior.1.pw2.bias (5,) vs model (4,)"]
    whole = _flat(model)
    whole[("prior", "0", "norm1", "scale")] = np.ones(4, np.float32)
    with pytest.raises(WeightMismatchError, match=r"prior.0.norm1.scale given both per block and within "
                                                  r"prior.layers.norm1.scale"):
        assign_weights(model, whole)
    without = {k: v for k, v in _flat(model).items() if k[-1] != "kernel"}
    with pytest.raises(WeightMismatchError, match=r"missing: conv1.kernel, conv2.kernel, prior.layers.pw1.kernel"):
        assign_weights(model, without)
    for k, v in _flat(model).items():
        np.testing.assert_array_equal(v, before[k])  # nothing was written


def test_convert_state_dict_places_each_block_at_its_index_with_the_layout_per_slice():
    model = create("dncnn", rngs=nnx.Rngs(0), num_blocks=2, features=4, kernel_size=3, padding=2)
    rng = np.random.default_rng(1)
    torch_state = {"m_head.0.weight": rng.standard_normal((4, 1, 1, 1)), "m_head.0.bias": rng.standard_normal(4),
                   "m_tail.0.weight": rng.standard_normal((1, 4, 1, 1)), "m_tail.0.bias": rng.standard_normal(1)}
    for i in range(2):
        for conv, idx, ci, co in (("conv1", 1, 4, 8), ("conv1", 5, 8, 4), ("conv2", 1, 4, 8), ("conv2", 3, 8, 4)):
            torch_state[f"m_body.{i}.{conv}.{idx}.weight"] = rng.standard_normal((co, ci, 1, 1))
            torch_state[f"m_body.{i}.{conv}.{idx}.bias"] = rng.standard_normal(co)
        for conv in ("conv1", "conv2"):
            torch_state[f"m_body.{i}.{conv}.0.weight"] = rng.standard_normal(4)
            torch_state[f"m_body.{i}.{conv}.0.bias"] = rng.standard_normal(4)
        torch_state[f"m_body.{i}.conv1.3.weight"] = rng.standard_normal((1, 8, 3, 3))
        torch_state[f"m_body.{i}.conv1.3.bias"] = rng.standard_normal((1, 8, 1, 1))
    spec_map = get_spec("dncnn").torch_key_to_path
    out = convert_state_dict(torch_state, model, spec_map)
    assert set(out) == set(_flat(model))
    np.testing.assert_array_equal(out[("body", "layers", "mixer", "weight")][1],
                                  torch_state["m_body.1.conv1.3.weight"][0].transpose(1, 2, 0))
    np.testing.assert_array_equal(out[("body", "layers", "pw1", "kernel")][0],
                                  torch_state["m_body.0.conv1.1.weight"][:, :, 0, 0].T)
    torch_state["m_body.1.conv1.3.weight"] = rng.standard_normal((1, 8, 5, 5))
    del torch_state["m_body.0.conv2.3.bias"]
    with pytest.raises(WeightMismatchError) as info:
        convert_state_dict(torch_state, model, spec_map)
    assert info.value.missing == ["body.0.pw4.bias"]
    assert info.value.mismatched == ["m_body.1.conv1.3.weight (1, 8, 5, 5) -> body.1.mixer.weight (3, 3, 8)"]
