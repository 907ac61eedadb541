"""The four networks: parameter counts, shapes, registry behaviour (parity with the released weights is in
test_pretrained.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converse_jax.models import count_params, create, get_spec, list_models
from converse_jax.nn import Converse2D, ConverseBlock, gelu, layer_norm

PAPER_MODELS = {"dncnn": 796_353, "srresnet": 699_072, "conversenet": 243_267, "usrnet": 307_987}


@pytest.mark.parametrize("name, expected", sorted(PAPER_MODELS.items()))
def test_parameter_counts_equal_the_released_checkpoints(name, expected):
    model = nnx.eval_shape(lambda: create(name, rngs=nnx.Rngs(0)))
    assert count_params(model) == expected
    assert get_spec(name).num_params == expected


def test_registry_lists_the_models_and_rejects_unknown_names():
    assert set(PAPER_MODELS) <= set(list_models())
    with pytest.raises(ValueError, match="unknown model 'dcnn'; known models: .*dncnn"):
        create("dcnn", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name, shape, out_shape", [
    ("dncnn", (2, 16, 12, 1), (2, 16, 12, 1)),
    ("srresnet", (1, 6, 5, 3), (1, 24, 20, 3)),
    ("conversenet", (2, 8, 10, 3), (2, 8, 10, 3)),
])
def test_output_shapes_of_small_instances(name, shape, out_shape):
    model = create(name, rngs=nnx.Rngs(0), num_blocks=1, features=8)
    y = jax.jit(lambda m, x: m(x))(model, jnp.ones(shape))
    assert y.shape == out_shape and y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y)))


def test_usrnet_shapes_and_kernel_check():
    model = create("usrnet", rngs=nnx.Rngs(0), num_blocks=1, features=8, num_iterations=2)
    x = jnp.ones((2, 8, 10, 3))
    k = jnp.ones((2, 7, 7)) / 49
    run = nnx.jit(lambda m, x, k, sf: m(x, k, sf), static_argnums=3)  # one compilation per scale factor
    assert run(model, x, k, 1).shape == (2, 8, 10, 3)
    assert run(model, x, k, 2).shape == (2, 16, 20, 3)
    with pytest.raises(ValueError, match=r"kernel must have shape \(B, 7, 7\)"):
        model(x, jnp.ones((2, 5, 5)), 1)


def test_converse2d_layer_initialisation():
    layer = Converse2D(6, 5, rngs=nnx.Rngs(3))
    w = np.asarray(layer.weight[...])
    assert w.shape == (5, 5, 6) and (w >= 0).all()
    np.testing.assert_allclose(w.sum(axis=(0, 1)), 1.0, rtol=1e-6)
    assert not np.allclose(w[..., 0], w[..., 1])  # a different draw per channel
    np.testing.assert_array_equal(layer.bias[...], 0.0)


def test_layer_norm_uses_biased_variance_and_pytorch_eps():
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 8)) * 3 + 1
    ln = layer_norm(8, rngs=nnx.Rngs(0))
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    np.testing.assert_allclose(ln(x), (x - mu) / jnp.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)


def test_gelu_is_the_exact_erf_form(x64):
    x = jnp.linspace(-8, 8, 1001, dtype=jnp.float64)
    # jax.nn.gelu's exact form is written with erfc: an independent evaluation of the same function.
    np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=False), rtol=1e-14, atol=1e-15)
    assert float(jnp.abs(gelu(x) - jax.nn.gelu(x)).max()) > 1e-4  # differs from the tanh approximation
    x32 = x.astype(jnp.float32)
    assert gelu(x32).dtype == jnp.float32
    # In float32 the erf form (PyTorch's too) cancels in the far negative tail: absolute error <= |x|·eps.
    np.testing.assert_allclose(gelu(x32), jax.nn.gelu(x32, approximate=False), rtol=2e-6, atol=8e-7)


def test_alpha_block_starts_as_identity_and_grad_flows():
    block = ConverseBlock(4, 3, alpha=True, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 6, 6, 4))

    @nnx.jit  # the output and the gradients in one compilation
    def output_and_grads(m, x):
        return m(x), nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m)

    out, grads = output_and_grads(block, x)
    np.testing.assert_allclose(out, x)  # alphas are initialised to 0
    assert float(jnp.abs(grads.alpha1[...]).sum()) > 0
