"""PSNR/SSIM against the reference's values on its own restored images (reference_outputs)."""

import json

import numpy as np
import pytest
from scipy import ndimage

from conftest import require_asset
from converse_jax import degradations as D
from converse_jax import metrics as M
from converse_jax.imageio import read_image

# One entry per task: gray denoising, x4 SR (with Y channel), blind and non-blind deblurring.
ENTRIES = [
    "denoise_converse_dncnn_set12_01.png",
    "sr_x4_converse_srresnet_set5_bird.png",
    "deblur_conversenet_set5_butterfly_kernel2.png",
    "deblur_converse_usrnet_set5_butterfly_kernel3.png",
]


@pytest.fixture(scope="module")
def reference_index():
    return json.loads(require_asset("golden", "reference_outputs", "index.json").read_text())


def _pair(entry_name, entry):
    restored = read_image(require_asset("golden", "reference_outputs", entry_name))
    gt_file = entry["ground_truth"].split(" ")[0]
    color = "gray" if restored.shape[-1] == 1 else "rgb"
    gt = read_image(require_asset(*gt_file.split("/")), color=color)
    crop = 8 if entry_name.startswith("deblur") else 4 if entry_name.startswith("sr") else 1
    return restored, D.modcrop(gt, crop)


@pytest.mark.parametrize("name", ENTRIES)
def test_metrics_equal_the_reference(reference_index, name):
    entry = reference_index[name]
    restored, gt = _pair(name, entry)
    got = M.image_metrics(restored, gt, border=entry["border"])
    assert abs(got["psnr"] - entry["psnr"]) <= 1e-6
    assert abs(got["ssim"] - entry["ssim"]) <= 1e-5
    if "psnr_y" in entry:
        assert abs(got["psnr_y"] - entry["psnr_y"]) <= 1e-6
        assert abs(got["ssim_y"] - entry["ssim_y"]) <= 1e-5
    else:
        assert ("psnr_y" in got) == (restored.shape[-1] == 3)


def _ssim_numpy(a, b):
    """Direct float64 SSIM (separable Gaussian, valid region) for one channel."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2))
    g /= g.sum()

    def f(z):
        z = ndimage.correlate1d(z, g, axis=0, mode="constant")
        return ndimage.correlate1d(z, g, axis=1, mode="constant")[5:-5, 5:-5]

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    m1, m2 = f(a), f(b)
    s11, s22, s12 = f(a * a) - m1 ** 2, f(b * b) - m2 ** 2, f(a * b) - m1 * m2
    return float(np.mean((2 * m1 * m2 + c1) * (2 * s12 + c2) / ((m1 ** 2 + m2 ** 2 + c1) * (s11 + s22 + c2))))


def test_psnr_ssim_on_random_images_with_border():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (30, 26, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    border = 2
    ac, bc = a[2:-2, 2:-2].astype(np.float64), b[2:-2, 2:-2].astype(np.float64)
    want_psnr = 10 * np.log10(255.0 ** 2 / np.mean((ac - bc) ** 2))
    assert abs(M.psnr(a, b, border) - want_psnr) < 1e-9
    want_ssim = np.mean([_ssim_numpy(ac[..., c], bc[..., c]) for c in range(3)])
    assert abs(M.ssim(a, b, border) - want_ssim) < 1e-9
    # Gray images may be (H, W) or (H, W, 1).
    assert M.psnr(a[..., 0], b[..., 0]) == pytest.approx(M.psnr(a[..., :1], b[..., :1]), abs=1e-12)


def test_identical_images():
    a = np.random.default_rng(1).integers(0, 256, (16, 16), dtype=np.uint8)
    assert M.psnr(a, a) == float("inf")
    assert M.ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def test_rgb_to_y():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    y = M.rgb_to_y(img)
    r, g, b = (img[..., i].astype(np.float64) for i in range(3))
    assert y.dtype == np.uint8
    assert np.abs(y.astype(float) - (16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255)).max() <= 0.5
    np.testing.assert_array_equal(M.rgb_to_y(np.zeros((2, 2, 3), np.uint8)), 16)
    np.testing.assert_array_equal(M.rgb_to_y(np.full((2, 2, 3), 255, np.uint8)), 235)


def test_float_inputs_are_quantised_like_outputs():
    rng = np.random.default_rng(3)
    a = rng.random((20, 20)).astype(np.float32)
    b = rng.random((20, 20)).astype(np.float32)
    assert M.psnr(a, b) == M.psnr(D.to_uint8(a), D.to_uint8(b))


def test_bad_inputs():
    a = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(ValueError, match="different shapes"):
        M.psnr(a, a[:10])
    with pytest.raises(ValueError, match="too small"):
        M.psnr(a, a, border=10)
    with pytest.raises(ValueError, match="at least 11"):
        M.ssim(a, a, border=5)
    with pytest.raises(ValueError, match="dtype"):
        M.psnr(a.astype(np.int32), a.astype(np.int32))
    with pytest.raises(ValueError, match="RGB"):
        M.image_metrics(a[..., 0], a[..., 0], y_channel=True)
