"""Properties of the Converse2D operator that hold for any input (hypothesis), and its argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from converse_jax.ops import PADDING_MODES, converse2d, converse2d_channels_first, lambda_from_bias, p2o

SETTINGS = settings(max_examples=6, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _objective(x_out, y, kernel, lam, scale):
    """||y - (x ⊛ k)↓s||² + λ||x - x0||² for one batch, computed directly in the pixel domain (NHWC)."""
    b, hs, ws, c = x_out.shape
    fk = jnp.moveaxis(p2o(jnp.moveaxis(kernel, -1, 0), (hs, ws)), 0, -1)  # (Hs, Ws, C)
    conv = jnp.fft.ifft2(jnp.fft.fft2(x_out, axes=(1, 2)) * fk, axes=(1, 2)).real
    down = conv[:, ::scale, ::scale, :]
    x0 = jnp.repeat(jnp.repeat(y, scale, axis=1), scale, axis=2)
    return jnp.sum((y - down) ** 2) + jnp.sum(lam * (x_out - x0) ** 2)


@st.composite
def problems(draw):
    scale = draw(st.integers(1, 3))
    k = draw(st.integers(1, 5))
    h = draw(st.integers(max(2, k), 9))
    w = draw(st.integers(max(2, k), 9))
    c = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    lam = draw(st.sampled_from([1e-4, 1e-2, 0.5]))
    return scale, k, h, w, c, seed, lam


@SETTINGS
@given(problems())
# every scale 1-4 and kernel size 2, 3, 5, 7 at least once, whatever hypothesis draws
@example((1, 3, 5, 4, 2, 3, 0.5))
@example((2, 5, 9, 6, 1, 11, 1e-4))
@example((3, 2, 4, 5, 2, 7, 1e-2))  # an even kernel
@example((4, 7, 7, 8, 1, 5, 1e-2))  # a kernel as tall as the image, larger than the scale cell
def test_output_is_a_stationary_point_of_the_objective(x64, problem):
    scale, k, h, w, c, seed, lam = problem
    rng = np.random.default_rng(seed)
    y = jnp.asarray(rng.standard_normal((2, h, w, c)))
    kernel = jnp.asarray(rng.random((k, k, c)))
    step = 1e-3 * jnp.asarray(rng.standard_normal((2, h * scale, w * scale, c)))

    @jax.jit  # one compilation per example (op by op, every new shape compiles dozens of programs)
    def solve_and_check(y, kernel, step):
        x_star = converse2d(y, kernel, lam, scale=scale)
        grad = jax.grad(_objective)(x_star, y, kernel, lam, scale)
        return (grad, _objective(x_star + step, y, kernel, lam, scale),
                _objective(x_star, y, kernel, lam, scale))

    grad, moved, at_x_star = solve_and_check(y, kernel, step)
    # The gradient vanishes (relative to the size of the objective's terms).
    assert float(jnp.abs(grad).max()) <= 1e-9 * (1 + float(jnp.abs(y).max()))
    # And it is a minimum: moving away increases the objective.
    assert moved > at_x_star


@SETTINGS
@given(st.integers(1, 4), st.integers(3, 9), st.integers(3, 9), st.sampled_from(PADDING_MODES), st.integers(0, 2),
       st.integers(0, 1000))
def test_delta_kernel_returns_the_input_or_its_nearest_upsampling(x64, scale, h, w, mode, padding, seed):
    if mode == "reflect" and padding >= min(h, w):
        padding = 0
    rng = np.random.default_rng(seed)
    y = jnp.asarray(rng.standard_normal((2, h, w, 3)))
    delta = jnp.zeros((3, 3, 3)).at[1, 1, :].set(1.0)
    out = jax.jit(lambda a: converse2d(a, delta, 1e-4, scale=scale, padding=padding, padding_mode=mode))(y)
    expected = jnp.repeat(jnp.repeat(y, scale, axis=1), scale, axis=2)
    np.testing.assert_allclose(out, expected, atol=1e-10)


@SETTINGS
@given(st.integers(1, 3), st.integers(0, 1000), st.sampled_from(PADDING_MODES))
def test_per_sample_kernels_equal_solving_each_sample_alone(x64, scale, seed, mode):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((3, 6, 7, 2)))
    kernels = jnp.asarray(rng.random((3, 3, 3, 2)))
    lam = jnp.asarray(rng.uniform(1e-4, 1e-1, (3, 2)))
    solve = jax.jit(lambda a, k, lam: converse2d(a, k, lam, scale=scale, padding=1, padding_mode=mode))
    together = solve(x, kernels, lam)
    for i in range(3):
        alone = solve(x[i:i + 1], kernels[i], lam[i])  # one compilation for the three samples
        np.testing.assert_allclose(together[i:i + 1], alone, rtol=1e-12, atol=1e-12)


def test_shared_kernel_with_per_sample_lambda_equals_separate_calls(x64):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 6, 3)))
    kernel = jnp.asarray(rng.random((2, 2, 3)))
    lam = jnp.asarray([[1e-3, 1e-2, 1e-1], [1.0, 1e-4, 0.5]])
    both = converse2d(x, kernel, lam, scale=2)
    for i in range(2):
        np.testing.assert_allclose(both[i:i + 1], converse2d(x[i:i + 1], kernel, lam[i], scale=2), atol=1e-12)


def test_jit_vmap_grad_compose():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 2, 6, 6, 3)), jnp.float32)  # a leading axis to vmap over
    kernel = jnp.asarray(rng.random((3, 3, 3)), jnp.float32)
    bias = jnp.zeros((3,), jnp.float32)

    def loss(x, kernel, bias):
        return jnp.sum(converse2d(x, kernel, lambda_from_bias(bias, 1e-5), scale=2, padding=2,
                                  padding_mode="replicate") ** 2)

    grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2)), in_axes=(0, None, None)))(x, kernel, bias)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))  # jit against eager: on the loss, below
    for i in (0, 3):
        direct = grad(x[i], kernel, bias)
        for a, b in zip(grads, direct, strict=True):
            np.testing.assert_allclose(a[i], b, rtol=2e-4, atol=2e-4)
    # jit gives the same as eager
    np.testing.assert_allclose(jax.jit(loss)(x[0], kernel, bias), loss(x[0], kernel, bias), rtol=1e-5)


def test_gradient_matches_finite_differences_in_lambda(x64):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((1, 5, 5, 2)))
    kernel = jnp.asarray(rng.random((3, 3, 2)))

    def f(lam):
        return jnp.sum(jnp.sin(converse2d(x, kernel, lam, scale=2)))

    lam = jnp.asarray([0.03, 0.2])
    g = jax.grad(f)(lam)  # op by op, as a user would call it
    f_jit = jax.jit(f)  # the four evaluations of the differences share one compilation
    eps = 1e-6
    for c in range(2):
        e = jnp.zeros(2).at[c].set(eps)
        fd = (f_jit(lam + e) - f_jit(lam - e)) / (2 * eps)
        np.testing.assert_allclose(g[c], fd, rtol=1e-6)


def test_non_square_and_even_kernels_shapes():
    x = jnp.ones((2, 5, 9, 4), jnp.float32)
    for k in (2, 4):
        for s in (1, 2, 3):
            out = jax.jit(lambda a, k=k, s=s: converse2d(a, jnp.ones((k, k, 4)) / k**2, 1e-3, scale=s, padding=k - 1,
                                                         padding_mode="reflect"))(x)
            assert out.shape == (2, 5 * s, 9 * s, 4)
            assert out.dtype == jnp.float32
            np.testing.assert_allclose(out, 1.0, atol=1e-4)  # a constant image is a fixed point


@pytest.mark.parametrize("kwargs, message", [
    (dict(padding=5, padding_mode="reflect"), "reflect padding must be smaller"),
    (dict(scale=0), "scale must be an integer >= 1"),
    (dict(scale=1.5), "scale must be an integer >= 1"),
    (dict(padding=-1), "padding must be a non-negative integer"),
    (dict(padding_mode="mirror"), "padding_mode must be one of"),
])
def test_bad_options_are_rejected(kwargs, message):
    x = jnp.ones((1, 5, 5, 2))
    with pytest.raises(ValueError, match=message):
        converse2d(x, jnp.ones((3, 3, 2)), 1e-3, **kwargs)


@pytest.mark.parametrize("x, kernel, lam, message", [
    (np.ones((1, 5, 5, 2)), np.ones((3, 3, 3)), 1e-3, "kernel channels must equal the input channels"),
    (np.ones((1, 5, 5, 2)), np.ones((2, 3, 3, 2)), 1e-3, "per-sample kernel must have shape"),
    (np.ones((1, 5, 5, 2)), np.ones((3, 3)), 1e-3, "kernel must be"),
    (np.ones((1, 5, 5, 2)), np.ones((3, 3, 2)), np.ones((3,)), "lam must be a scalar"),
    (np.ones((1, 5, 5, 2)), np.ones((3, 3, 2)), np.ones((2, 2)), "lam must be a scalar"),
    (np.ones((1, 5, 5, 2), np.int32), np.ones((3, 3, 2)), 1e-3, "x must be a real floating array"),
    (np.ones((5, 5, 2)), np.ones((3, 3, 2)), 1e-3, "x must be a 4-D array"),
    (np.ones((1, 5, 5, 2)), np.ones((7, 7, 2)), 1e-3, "larger than the"),
])
def test_bad_arrays_are_rejected(x, kernel, lam, message):
    with pytest.raises(ValueError, match=message):
        converse2d(x, kernel, lam)


def test_lambda_from_bias():
    np.testing.assert_allclose(lambda_from_bias(jnp.zeros(2), 1e-5), 1 / (1 + np.exp(9.0)) + 1e-5, rtol=1e-6)


@pytest.mark.parametrize("kh, kw, h, w", [(7, 7, 20, 23), (2, 2, 8, 8), (3, 5, 9, 12), (4, 4, 4, 6)])
def test_kernel_spectrum_by_dft_matrices_equals_p2o(x64, kh, kw, h, w):
    from converse_jax.ops.converse2d import kernel_spectrum
    k = jnp.asarray(np.random.default_rng(kh * w).random((kh, kw)))
    for real in (False, True):
        np.testing.assert_allclose(kernel_spectrum(k, (h, w), real=real), p2o(k, (h, w), real=real), atol=1e-13)


@pytest.mark.parametrize("kh, kw, h, w, scale", [(7, 7, 9, 11, 2), (2, 2, 8, 8, 2), (3, 5, 6, 7, 3), (5, 4, 5, 4, 4),
                                                 (1, 3, 4, 5, 2)])
def test_folded_power_from_the_autocorrelation_equals_folding_the_spectrum(x64, kh, kw, h, w, scale):
    from converse_jax.ops.converse2d import _folded_power
    k = jnp.asarray(np.random.default_rng(kh + 10 * w).random((kh, kw)))
    power = jnp.abs(p2o(k, (h * scale, w * scale))) ** 2
    folded = power.reshape(scale, h, scale, w).mean(axis=(0, 2))  # the average of the s×s blocks
    np.testing.assert_allclose(_folded_power(k, h, w, scale), folded, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("planes, h, w", [((3, 2), 6, 8), ((1,), 5, 7), ((5,), 4, 9), ((2, 1), 7, 6)])
def test_paired_inverse_fft_equals_irfft2(x64, planes, h, w):
    """Two planes per complex inverse FFT, an odd count included: the same as irfft2 of each plane."""
    from converse_jax.ops.converse2d import _hermitian_full, _irfft2_paired, irfft2_planes
    x = np.random.default_rng(h * w).standard_normal(planes + (h, w))
    z = jnp.fft.rfft2(jnp.asarray(x))
    np.testing.assert_allclose(_hermitian_full(z, w), jnp.fft.fft2(x), atol=1e-12)
    np.testing.assert_allclose(_irfft2_paired(z, (h, w)), x, atol=1e-12)
    np.testing.assert_allclose(irfft2_planes(z, (h, w)), x, atol=1e-12)
    # Differentiated as irfft2, in reverse and forward mode.
    ct = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape))
    grad_ours = jax.grad(lambda a: jnp.sum(irfft2_planes(a, (h, w)) * ct))(z)
    grad_ref = jax.grad(lambda a: jnp.sum(jnp.fft.irfft2(a, s=(h, w)) * ct))(z)
    np.testing.assert_allclose(grad_ours, grad_ref, atol=1e-12)
    _, tangent = jax.jvp(lambda a: irfft2_planes(a, (h, w)), (z,), (z * 0.5,))
    np.testing.assert_allclose(tangent, 0.5 * x, atol=1e-12)


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("per_sample", [False, True])
def test_one_cell_solver_equals_the_fft_solver(x64, scale, per_sample):
    """kh, kw <= s: the FFT-free solver (both layouts) equals the spectral closed form, every kernel size."""
    from converse_jax.ops import converse_filter, filtered_spectrum, irfft2_planes
    from converse_jax.ops.one_cell import solve_one_cell

    rng = np.random.default_rng(scale)
    b, c, h, w = 2, 2, 5, 7
    x = jnp.asarray(rng.standard_normal((b, c, h, w)))
    for kh in range(1, scale + 1):
        for kw in range(1, scale + 1):
            kernel = jnp.asarray(rng.standard_normal((b, c, kh, kw) if per_sample else (c, kh, kw)))
            lam = jnp.asarray(rng.random((b, c) if per_sample else (c,)) + 1e-3)
            ks = kernel if per_sample else jnp.broadcast_to(kernel, (b, c, kh, kw))
            ls = lam if per_sample else jnp.broadcast_to(lam, (b, c))
            ref = jnp.stack([jnp.stack([
                irfft2_planes(filtered_spectrum(x[i, j], converse_filter(ks[i, j], ls[i, j], (h * scale, w * scale),
                                                                          scale), scale), (h * scale, w * scale))
                for j in range(c)]) for i in range(b)])
            first = solve_one_cell(x, kernel, lam, scale, channels_last=False)
            last = solve_one_cell(jnp.moveaxis(x, 1, -1), kernel, lam, scale, channels_last=True)
            np.testing.assert_allclose(first, ref, atol=1e-12, err_msg=f"k {kh}x{kw}")
            np.testing.assert_allclose(jnp.moveaxis(last, -1, 1), ref, atol=1e-12, err_msg=f"k {kh}x{kw}")


def test_one_cell_solver_is_chosen_and_uses_no_fft():
    x = jnp.ones((1, 6, 6, 3), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda a: converse2d(a, jnp.ones((2, 2, 3)) / 4, 1e-2, scale=2, padding=1,
                                                    padding_mode="replicate"))(x))
    assert "fft" not in jaxpr
    # Only the small kernel-sized weights are transposed, never the (1, 8, 8, 3) planes.
    transposed = [line.split("=")[0] for line in jaxpr.splitlines() if "transpose[" in line]
    assert all("8," not in t and ",8" not in t for t in transposed), transposed
    assert "fft" in str(jax.make_jaxpr(lambda a: converse2d(a, jnp.ones((3, 3, 3)) / 9, 1e-2, scale=2))(x))


@pytest.mark.parametrize("mode", PADDING_MODES)
def test_channels_last_to_padded_planes_and_back_equal_plain_transposes_with_their_gradients(x64, mode, monkeypatch):
    """ops.layout's row-by-row padded planes copy exactly what moveaxis with jnp.pad gives, and their
    reverse- and forward-mode derivatives are those of the plain operations; the way back is a crop."""
    from converse_jax.ops.layout import cropped_channels_last, padded_planes

    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((2, 5, 7, 3)))
    pad = 2
    monkeypatch.setattr("converse_jax.ops.layout.ROW_LOOP_MIN_BYTES", 0)  # the loop even for this small input
    monkeypatch.setattr("converse_jax.ops.layout.ROW_SCAN_MIN_BYTES", 0)  # and the scan on the way back
    ref = jnp.pad(jnp.moveaxis(x, -1, 1), [(0, 0), (0, 0), (pad, pad), (pad, pad)],
                  mode={"circular": "wrap", "reflect": "reflect", "replicate": "edge", "constant": "constant"}[mode])
    out = jax.jit(lambda a: padded_planes(a, pad, mode))(x)
    np.testing.assert_array_equal(out, ref)
    ct = jnp.asarray(rng.standard_normal(ref.shape))
    (g,) = jax.vjp(lambda a: padded_planes(a, pad, mode), x)[1](ct)
    (g_ref,) = jax.vjp(lambda a: jnp.pad(jnp.moveaxis(a, -1, 1), [(0, 0), (0, 0), (pad, pad), (pad, pad)],
                                         mode="wrap" if mode == "circular" else "edge" if mode == "replicate"
                                         else mode), x)[1](ct)
    np.testing.assert_allclose(g, g_ref, atol=1e-12)
    np.testing.assert_array_equal(jax.jvp(lambda a: padded_planes(a, pad, mode), (x,), (x,))[1], ref)

    planes = jnp.asarray(rng.standard_normal((2, 3, 9, 11)))
    back = jax.jit(lambda p: cropped_channels_last(p, 2))(planes)
    np.testing.assert_array_equal(back, jnp.moveaxis(planes[:, :, 2:7, 2:9], 1, -1))
    ct_back = jnp.asarray(rng.standard_normal(back.shape))
    (gb,) = jax.vjp(lambda p: cropped_channels_last(p, 2), planes)[1](ct_back)
    np.testing.assert_array_equal(gb, jnp.zeros_like(planes).at[:, :, 2:7, 2:9].set(jnp.moveaxis(ct_back, -1, 1)))
    tangent = jax.jit(lambda p: jax.jvp(lambda q: cropped_channels_last(q, 2), (p,), (p,))[1])(planes)
    np.testing.assert_array_equal(tangent, back)


def test_channels_last_fft_path_builds_its_planes_row_by_row_on_cpu_and_keeps_forward_mode():
    """On CPU the channels-last FFT path changes layout in a loop over rows (ops.layout), not in
    one whole-array transpose towards channels-first; jax.jvp still runs through it without padding."""
    from converse_jax.ops.layout import ROW_LOOP_MIN_BYTES

    x = jnp.ones((1, 96, 96, 32), jnp.float32)
    assert x.size * 4 >= ROW_LOOP_MIN_BYTES
    kernel = jnp.ones((3, 3, 32)) / 9
    fn = jax.jit(lambda a: converse2d(a, kernel, 1e-2, scale=1, padding=2))
    hlo = fn.lower(x).compile().as_text()
    if jax.default_backend() == "cpu":
        assert "while(" in hlo
    np.testing.assert_allclose(fn(x), 1.0, atol=1e-5)  # a constant image is a fixed point of a normalised blur
    # The operator is linear in x, so its tangent along x equals its value at x.
    value, tangent = jax.jit(lambda a: jax.jvp(lambda b: converse2d(b, kernel, 1e-2, scale=2), (a,), (a,)))(x)
    np.testing.assert_allclose(tangent, value, atol=1e-5)


def test_large_channels_last_planes_send_the_cotangent_back_row_by_row_with_every_transformation(monkeypatch):
    """Above ROW_SCAN_MIN_BYTES per sample, the crop back to channels-last is differentiated through a scan
    over rows (ops.layout): its gradient (a loop in the compiled reverse pass), jvp and vmap of the gradient
    equal those of the channels-first operator on the same values."""
    import converse_jax.ops.layout as layout

    monkeypatch.setattr(layout, "ROW_SCAN_MIN_BYTES", 0)  # the scan even for these small planes
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((2, 6, 7, 3)), jnp.float32)
    kernel = jnp.asarray(rng.random((3, 3, 3)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((2, 6, 7, 3)), jnp.float32)
    kw = dict(padding=2, padding_mode="circular")

    def loss_last(a, k):
        return jnp.sum(converse2d(a, k, 1e-2, **kw) * ct)

    def loss_first(a, k):
        out = converse2d_channels_first(jnp.moveaxis(a, -1, 1), jnp.moveaxis(k, -1, 0), 1e-2, **kw)
        return jnp.sum(jnp.moveaxis(out, 1, -1) * ct)

    grad_last = jax.jit(jax.grad(loss_last, argnums=(0, 1)))
    if jax.default_backend() == "cpu":
        assert "while(" in grad_last.lower(x, kernel).compile().as_text()
    grad_first = jax.jit(jax.grad(loss_first, argnums=(0, 1)))  # the reference, compiled once
    for a, b in zip(grad_last(x, kernel), grad_first(x, kernel), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # forward mode: the operator is linear in x
    value, tangent = jax.jit(lambda a: jax.jvp(lambda b: converse2d(b, kernel, 1e-2, **kw), (a,), (a,)))(x)
    np.testing.assert_allclose(tangent, value, rtol=1e-4, atol=1e-5)
    # vmap of the gradient over a leading axis equals per-item gradients
    xs = jnp.stack([x, 2 * x])
    batched = jax.jit(jax.vmap(jax.grad(loss_last), in_axes=(0, None)))(xs, kernel)
    for i in range(2):
        np.testing.assert_allclose(batched[i], grad_first(xs[i], kernel)[0], rtol=1e-4, atol=1e-5)
