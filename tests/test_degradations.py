"""Degradations of the test protocols against the reference's exact inputs (golden/protocols.npz), and
the shared pieces of the training degradations (random kernels, flips, noise-level ranges)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import require_asset
from converse_jax import degradations as D
from converse_jax.degradations import random_gaussian_kernel, random_kernel, random_motion_kernel
from converse_jax.imageio import read_image, read_kernel, write_image


@pytest.fixture(scope="module")
def protocols():
    return np.load(require_asset("golden", "protocols.npz"))


def test_denoise_noise_is_bitwise_the_reference(protocols):
    img = read_image(require_asset("testsets", "Set12", "01.png"), color="gray")
    noisy = D.add_noise(D.to_float(img), 25.0, rng=0)
    golden = protocols["denoise_set12_01_sigma25"]
    assert noisy.dtype == np.float32 and noisy.shape == golden.shape
    np.testing.assert_array_equal(noisy, golden)


@pytest.mark.parametrize("name", ["baby", "bird"])
def test_bicubic_x4_matches_reference(protocols, name):
    hr = D.modcrop(read_image(require_asset("testsets", "Set5", f"{name}.bmp"), color="rgb"), 4)
    lr = D.imresize(D.to_float(hr), 1 / 4)
    golden = protocols[f"sr_x4_set5_{name}_lr"]
    assert lr.dtype == np.float32 and lr.shape == golden.shape
    assert np.abs(lr.astype(np.float64) - golden).max() <= 1e-6


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_deblur_inputs_are_bitwise_the_reference(protocols, k):
    require_asset("blur_kernels", f"kernel_{k}.npy")
    hr = D.modcrop(read_image(require_asset("testsets", "Set5", "butterfly.bmp"), color="rgb"), 8)
    blurred = D.blur(hr, D.paper_kernel(k))
    assert blurred.dtype == np.uint8
    np.testing.assert_array_equal(blurred, protocols[f"deblur_set5_butterfly_kernel{k}_blurred_uint8"])
    noisy = D.add_noise(D.to_float(blurred), 2.55, rng=0)
    np.testing.assert_array_equal(noisy, protocols[f"deblur_set5_butterfly_kernel{k}"])


def test_modcrop():
    img = np.zeros((13, 18, 3), np.uint8)
    assert D.modcrop(img, 4).shape == (12, 16, 3)
    assert D.modcrop(img[..., 0], 8).shape == (8, 16)
    assert D.modcrop(img, 1).shape == img.shape
    with pytest.raises(ValueError, match="smaller"):
        D.modcrop(img, 16)
    with pytest.raises(ValueError, match="positive"):
        D.modcrop(img, 0)


def test_to_uint8_rounds_and_clips():
    x = np.array([-0.1, 0.0, 0.5 / 255, 1.5 / 255, 0.5, 1.0, 1.2], np.float32)
    np.testing.assert_array_equal(D.to_uint8(x), [0, 0, 0, 2, 128, 255, 255])
    with pytest.raises(ValueError, match="float"):
        D.to_uint8(np.zeros(3, np.uint8))


def test_imresize_scale_one_is_identity():
    x = np.random.default_rng(0).random((9, 7, 2))
    np.testing.assert_allclose(D.imresize(x, 1.0), x, atol=1e-15)


@pytest.mark.parametrize("scale", [0.25, 0.5, 1 / 3, 2.0, 3.0])
def test_imresize_preserves_constants_and_layouts(scale):
    rng = np.random.default_rng(1)
    const = np.full((24, 18, 3), 0.37, np.float32)
    out = D.imresize(const, scale)
    assert out.shape == (int(np.ceil(24 * scale)), int(np.ceil(18 * scale)), 3)
    np.testing.assert_allclose(out, 0.37, atol=1e-6)
    x = rng.random((2, 24, 18, 3)).astype(np.float32)
    batch = D.imresize(x, scale)
    for i in range(2):
        np.testing.assert_array_equal(batch[i], D.imresize(x[i], scale))
    np.testing.assert_array_equal(D.imresize(x[0, ..., 1], scale), D.imresize(x[0], scale)[..., 1])


def test_imresize_equals_its_separable_matrices():
    rng = np.random.default_rng(2)
    x = rng.random((20, 12))
    for scale in (0.25, 3.0):
        mh = D.resize_matrix(20, int(np.ceil(20 * scale)), scale)
        mw = D.resize_matrix(12, int(np.ceil(12 * scale)), scale)
        np.testing.assert_allclose(D.imresize(x, scale), mh @ x @ mw.T, atol=1e-12)
        np.testing.assert_allclose(mh.sum(axis=1), 1.0, atol=1e-12)


def test_imresize_upscale_interpolates_samples_on_the_grid():
    # Without antialiasing, an integer upscale by 3 puts output pixel 3i+1 on input pixel i.
    x = np.random.default_rng(3).random((8, 8))
    up = D.imresize(x, 3.0)
    np.testing.assert_allclose(up[1::3, 1::3], x, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(h=st.integers(1, 30), w=st.integers(1, 30), scale=st.sampled_from([0.25, 0.5, 2.0]))
def test_imresize_is_linear_and_bounded(h, w, scale):
    rng = np.random.default_rng(h * 31 + w)
    a, b = rng.random((h, w)), rng.random((h, w))
    ra, rb = D.imresize(a, scale), D.imresize(b, scale)
    np.testing.assert_allclose(D.imresize(2 * a - b, scale), 2 * ra - rb, atol=1e-12)
    # Bicubic overshoots a little but stays near the data range.
    assert ra.min() > -0.2 and ra.max() < 1.2


def test_imresize_rejects_bad_input():
    with pytest.raises(ValueError, match="float"):
        D.imresize(np.zeros((8, 8), np.uint8), 0.5)
    with pytest.raises(ValueError, match="positive"):
        D.imresize(np.zeros((8, 8)), 0)
    with pytest.raises(ValueError, match="shape"):
        D.imresize(np.zeros(8), 0.5)


def test_add_noise_rng_kinds():
    x = np.zeros((4, 5, 1), np.float32)
    a = D.add_noise(x, 25, rng=7)
    np.testing.assert_array_equal(a, D.add_noise(x, 25, rng=np.random.RandomState(7)))
    g = D.add_noise(x, 25, rng=np.random.default_rng(7))
    assert g.dtype == np.float32 and not np.array_equal(a, g)
    assert abs(float(D.add_noise(np.zeros((200, 200)), 25, rng=0).std()) - 25 / 255) < 2e-3
    np.testing.assert_array_equal(D.add_noise(x, 0.0, rng=0), x)
    with pytest.raises(ValueError, match="float"):
        D.add_noise(np.zeros((4, 4), np.uint8), 25)
    with pytest.raises(ValueError, match="sigma"):
        D.add_noise(x, -1)


def test_blur_is_circular_and_keeps_dtype():
    rng = np.random.default_rng(4)
    img = rng.random((10, 12, 3))
    k = np.zeros((3, 3))
    k[1, 2] = 1.0  # convolution with a delta right of centre shifts the image right by one
    np.testing.assert_allclose(D.blur(img, k), np.roll(img, 1, axis=1), atol=1e-15)
    k = rng.random((5, 5))
    k /= k.sum()
    out = D.blur(img, k)
    assert out.dtype == img.dtype
    np.testing.assert_allclose(out.mean(axis=(0, 1)), img.mean(axis=(0, 1)), atol=1e-12)
    np.testing.assert_allclose(D.blur(img[..., 0], k), out[..., 0], atol=1e-15)
    assert D.blur((img * 255).astype(np.uint8), k).dtype == np.uint8


def test_normalize_and_read_kernel(tmp_path):
    k = np.arange(1.0, 10.0).reshape(3, 3)
    np.testing.assert_allclose(D.normalize_kernel(k).sum(), 1.0)
    np.save(tmp_path / "k.npy", k)
    np.testing.assert_allclose(read_kernel(str(tmp_path / "k.npy")), k / k.sum())
    write_image(tmp_path / "k.png", (k * 20).astype(np.uint8))
    np.testing.assert_allclose(read_kernel(tmp_path / "k.png"), k / k.sum())
    with pytest.raises(ValueError, match="sums to 0"):
        D.normalize_kernel(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="2-D"):
        D.normalize_kernel(np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="does not exist"):
        read_kernel(str(tmp_path / "missing.npy"))
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="cannot read kernel"):
        read_kernel(str(tmp_path / "bad.npy"))


# ----------------------------------------------------------------------------------------
# Shared pieces of the training degradations


@pytest.mark.parametrize("fn", [random_gaussian_kernel, random_motion_kernel, random_kernel])
def test_kernels_are_normalised(fn):
    rng = np.random.default_rng(1)
    for _ in range(20):
        k = fn(rng, 7)
        assert k.shape == (7, 7) and k.dtype == np.float32
        assert k.min() >= 0.0
        assert abs(float(k.sum()) - 1.0) < 1e-5
        assert k.max() < 1.0  # a real blur, not a delta


def test_gaussian_kernel_centred_and_anisotropic():
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:7, 0:7]
    ratios = []
    for _ in range(20):
        k = random_gaussian_kernel(rng, 7).astype(np.float64)
        assert abs((k * yy).sum() - 3) < 1e-6 and abs((k * xx).sum() - 3) < 1e-6
        cov = np.cov(np.stack([yy.ravel(), xx.ravel()]), aweights=k.ravel())
        ev = np.linalg.eigvalsh(cov)
        ratios.append(ev[1] / ev[0])
    assert max(ratios) > 2.0  # some kernels are clearly elongated


def test_motion_kernels_vary_and_are_deterministic():
    a = [random_motion_kernel(np.random.default_rng(s)) for s in range(5)]
    b = [random_motion_kernel(np.random.default_rng(s)) for s in range(5)]
    for x, y in zip(a, b, strict=False):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(a[0], a[1])


def test_kernel_bad_size():
    with pytest.raises(ValueError, match="odd"):
        random_gaussian_kernel(np.random.default_rng(0), 6)


def test_dihedral_modes_and_bad_mode():
    x = np.arange(12.0).reshape(3, 4, 1)
    np.testing.assert_array_equal(D.dihedral(x, 0), x)
    np.testing.assert_array_equal(D.dihedral(x, 1), np.rot90(x))
    np.testing.assert_array_equal(D.dihedral(x, 4), x[:, ::-1])
    np.testing.assert_array_equal(D.dihedral(x, 6), np.rot90(x[:, ::-1], 2))
    k = np.arange(9.0).reshape(3, 3)  # a kernel (no channel axis) transforms alike
    np.testing.assert_array_equal(D.dihedral(k, 5), np.rot90(k[:, ::-1]))
    for bad in (-1, 8):
        with pytest.raises(ValueError, match="0..7"):
            D.dihedral(x, bad)


@pytest.mark.parametrize("value,want", [
    (25, (25.0, 25.0)), ("25", (25.0, 25.0)), ("0,50", (0.0, 50.0)), ((0, 50), (0.0, 50.0)),
    ([2.55], (2.55, 2.55)), (np.float32(10), (10.0, 10.0)), (" 1 , 2 ", (1.0, 2.0)),
])
def test_parse_level_range(value, want):
    assert D.parse_level_range(value) == want


@pytest.mark.parametrize("value,match", [
    ("abc", "level or a range"), ("1,2,3", "level or a range"), ((), "level or a range"), (None, "level or a range"),
    ("50,10", "0 <= low <= high"), (-1, "0 <= low <= high"), ("nan", "0 <= low <= high"), ("0,inf", "0 <= low"),
])
def test_parse_level_range_rejects(value, match):
    with pytest.raises(ValueError, match=match) as err:
        D.parse_level_range(value, "--blur-noise")
    assert str(err.value).startswith("--blur-noise ")


def test_pad_tapered_keeps_the_image_and_wraps_smoothly():
    rng = np.random.default_rng(0)
    img = np.cumsum(rng.random((40, 56, 3)), axis=1).astype(np.float32)  # a ramp: its edges do not match
    img /= img.max()
    kernel = D.normalize_kernel(np.ones((5, 5)))
    out = D.pad_tapered(img, 8, kernel)
    assert out.shape == (56, 72, 3) and out.dtype == img.dtype
    np.testing.assert_array_equal(out[8:-8, 8:-8], img)  # the image's own pixels are untouched
    edge = np.pad(img, ((8, 8), (8, 8), (0, 0)), mode="edge")
    np.testing.assert_allclose(out[0], D.blur(edge, kernel)[0], atol=1e-6)  # the outer ring: fully blurred
    # the jump across the wrap (last column -> first column) is smaller than with the edge alone
    jump = lambda a: float(np.abs(a[:, -1] - a[:, 0]).mean())  # noqa: E731
    assert jump(out) < 0.5 * jump(edge)
    assert D.pad_tapered(img, 0, kernel) is img
    with pytest.raises(ValueError, match="margin must be >= 0"):
        D.pad_tapered(img, -1, kernel)
