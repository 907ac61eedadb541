"""The inference view of the Converse blocks: each branch over groups of hidden channels
(:func:`converse_jax.nn.inference_view`), the path every restorer runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converse_jax.evaluation import Restorer, get_model_spec
from converse_jax.models.conversenet import ConverseNet
from converse_jax.nn import INFERENCE_HIDDEN_GROUPS, ConverseBlock, inference_view
from converse_jax.tasks import DEBLUR, jit_forward
from converse_jax.tiling import compiled_bytes
from converse_jax.train.step import mode_view


def _block(alpha: bool, param_dtype=jnp.float64, **kw) -> ConverseBlock:
    block = ConverseBlock(8, 3, alpha=alpha, param_dtype=param_dtype, rngs=nnx.Rngs(0), **kw)
    if alpha:  # non-trivial branch weights (they start at zero)
        block.alpha1[...] = jnp.linspace(0.5, 1.5, 8, dtype=param_dtype)
        block.alpha2[...] = jnp.linspace(-1.0, 1.0, 8, dtype=param_dtype)
    return block


@pytest.mark.parametrize("alpha", [False, True])
@pytest.mark.parametrize("groups", [4, 16])
def test_grouped_hidden_channels_compute_the_same_block(x64, alpha, groups):
    """Grouped or not, a block computes the same function (float64: equal to rounding), with and
    without the alpha-variant's branch weights, on a batch of two non-square images."""
    block = _block(alpha)
    x = jax.random.normal(jax.random.key(1), (2, 8, 20, 24), jnp.float64)
    want = np.asarray(jax.jit(lambda x: block.channels_first(x))(x))
    view = inference_view(block, groups)
    assert view.hidden_groups == groups and block.hidden_groups == 1  # a view: the block is unchanged
    got = np.asarray(jax.jit(lambda x: view.channels_first(x))(x))
    assert np.abs(got - want).max() <= 1e-12 * np.abs(want).max()
    got = np.asarray(jax.jit(lambda x: view(x))(jnp.moveaxis(x, 1, -1)))  # channels-last entry too
    assert np.abs(np.moveaxis(got, -1, 1) - want).max() <= 1e-12 * np.abs(want).max()


def test_grouped_block_in_bf16_stays_close_to_ungrouped():
    """Mixed precision: each group's share is rounded to bfloat16 on its own, so the sums differ at
    bfloat16 precision and no more."""
    block = _block(False, jnp.float32, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (1, 8, 16, 16), jnp.float32)
    want = np.asarray(jax.jit(lambda x: block.channels_first(x))(x), np.float32)
    view = inference_view(block, 4)
    got = np.asarray(jax.jit(lambda x: view.channels_first(x))(x), np.float32)
    assert got.dtype == want.dtype and np.abs(got - want).max() <= 2e-2 * np.abs(want).max()


def test_bad_hidden_groups_is_refused():
    with pytest.raises(ValueError, match="hidden_groups must be an integer >= 1"):
        inference_view(_block(False, jnp.float32), 0)
    with pytest.raises(ValueError, match="hidden_groups must be an integer >= 1"):
        _block(False, jnp.float32, hidden_groups=True)


def test_grouped_network_needs_about_half_the_memory():
    """ConverseNet's compiled temporaries: the 128-channel hidden planes of one block dominate, so
    four groups need well under two thirds of the ungrouped network's bytes."""
    model = ConverseNet(num_iterations=1, rngs=nnx.Rngs(0))
    shape = (1, 96, 96, 3)
    full = jit_forward(DEBLUR, model).lower(
        nnx.state(model), {"input": jax.ShapeDtypeStruct(shape, jnp.float32)}).compile().memory_analysis()
    grouped = compiled_bytes(model, DEBLUR, shape)  # the restorers' path
    assert grouped < 0.66 * (full.temp_size_in_bytes + full.argument_size_in_bytes + full.output_size_in_bytes)


def test_restorers_and_evaluation_mode_run_the_grouped_blocks():
    """The whole-image restorer and the evaluation view run the grouped blocks; training does not."""
    model = ConverseNet(num_blocks=2, num_iterations=1, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).random((24, 24, 3), dtype=np.float32)
    want = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x[None])))[0]
    task = get_model_spec("conversenet").task
    restorer = Restorer(model, task)

    def loops(forward):
        return forward.lower(nnx.state(model), {"input": x[None]}).as_text().count("stablehlo.while")

    assert loops(restorer._forward) > loops(jit_forward(task, model))  # the loops over groups
    np.testing.assert_allclose(restorer(x), want, atol=1e-5)

    def groups(m):
        return {b.hidden_groups for _, b in nnx.iter_graph(m) if isinstance(b, ConverseBlock)}

    assert groups(mode_view(model, False)) == {INFERENCE_HIDDEN_GROUPS}
    assert groups(mode_view(model, True)) == {1}
