"""Tiled restoration (converse_jax.tiling): tile placement, blending, one compilation, memory estimate."""

import io
import time

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converse_jax import degradations as D
from converse_jax import evaluation as E
from converse_jax import metrics as M
from converse_jax import tiling as T
from converse_jax.tasks import DEBLUR, DEBLUR_NONBLIND, DENOISE, SR, TASKS
from experiments._cli import Heartbeat, Progress, oom_hint

TRACES = {"n": 0}


class Gain(nnx.Module):
    """Pointwise: tiles cannot differ from the whole image. Counts its traces (compilations)."""

    def __init__(self):
        self.gain = nnx.Param(jnp.asarray(0.5, jnp.float32))

    def __call__(self, x):
        TRACES["n"] += 1
        return x * self.gain[...]


class Upsample4(nnx.Module):
    """x4 nearest-neighbour upsampling: a pointwise stand-in for x4 SR."""

    def __init__(self):
        self.gain = nnx.Param(jnp.ones((), jnp.float32))

    def __call__(self, x):
        return jnp.repeat(jnp.repeat(x, 4, axis=1), 4, axis=2) * self.gain[...]


class KernelGain(nnx.Module):
    """Non-blind stand-in: scales by the kernel's centre tap and upsamples by ``sf``."""

    blur_kernel_size = 3

    def __init__(self):
        self.gain = nnx.Param(jnp.ones((), jnp.float32))

    def __call__(self, x, kernel, sf=1):
        y = x * kernel[:, 1, 1][:, None, None, None] * self.gain[...]
        return jnp.repeat(jnp.repeat(y, sf, axis=1), sf, axis=2)


class Wiener(nnx.Module):
    """A Wiener deconvolution by FFT: long-range and circular like the deblurring networks' solvers."""

    def __init__(self, kernel, lam):
        self.kernel = nnx.Variable(jnp.asarray(kernel, jnp.float32))
        self.lam = lam

    def __call__(self, x):
        h, w = x.shape[1:3]
        k = self.kernel[...]
        kh, kw = k.shape
        otf = jnp.fft.rfft2(jnp.roll(jnp.pad(k, ((0, h - kh), (0, w - kw))), (-(kh // 2), -(kw // 2)), (0, 1)))
        gain = jnp.conj(otf) / (jnp.abs(otf) ** 2 + self.lam)
        return jnp.fft.irfft2(jnp.fft.rfft2(x, axes=(1, 2)) * gain[None, :, :, None], s=(h, w), axes=(1, 2))


@pytest.mark.parametrize("length,tile,overlap", [(100, 32, 8), (64, 64, 8), (40, 64, 8), (97, 33, 16), (33, 32, 0)])
def test_tiles_cover_the_image_with_one_shape_and_never_pad(length, tile, overlap):
    starts = T.tile_starts(length, tile, overlap)
    size = min(tile, length)
    covered = np.zeros(length, bool)
    for s in starts:
        assert 0 <= s and s + size <= length  # inside: the last tile is shifted inward, not padded
        covered[s:s + size] = True
    assert covered.all()
    assert starts[-1] + size == length
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))  # at least the overlap


@pytest.mark.parametrize("blend", T.BLENDS)
@pytest.mark.parametrize("scale", [1, 4])
def test_blend_weights_sum_to_one_everywhere(blend, scale):
    starts = T.tile_starts(90, 32, 10)
    w = T.blend_weights(starts, 32, 90, 10, scale, blend)
    total = np.zeros(90 * scale)
    for i, s in enumerate(starts):
        total[s * scale:(s + 32) * scale] += w[i]
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    if blend == "crop":
        assert set(np.unique(w)) <= {0.0, 1.0}
    else:
        assert w[1, 0] < 0.1 and w[1, 16 * scale] == pytest.approx(1.0, abs=1e-6)  # edges low, centre 1


def test_bad_tile_settings_are_refused():
    with pytest.raises(ValueError, match="--tile must be 0"):
        T.plan_tiles(100, 100, 8, 0)
    with pytest.raises(ValueError, match="--tile-overlap"):
        T.plan_tiles(100, 100, 32, 16)
    with pytest.raises(ValueError, match="blend"):
        T.blend_weights([0], 32, 32, 0, 1, "feather")


@pytest.mark.parametrize("blend", T.BLENDS)
def test_tiled_equals_whole_for_a_pointwise_network_and_compiles_once(blend):
    model = Gain()
    restorer = T.TiledRestorer(model, DENOISE, tile=32, overlap=8, batch=3, blend=blend)
    rng = np.random.default_rng(0)
    TRACES["n"] = 0
    for shape in [(70, 45, 1), (33, 90, 1), (100, 100, 1)]:  # three sizes, one tile shape
        x = rng.random(shape, dtype=np.float32)
        np.testing.assert_allclose(restorer(x), x * 0.5, rtol=1e-6, atol=1e-7)
    assert TRACES["n"] == 1


def test_tiled_sr_maps_tiles_to_four_times_larger_outputs():
    x = np.random.default_rng(1).random((37, 50, 3), dtype=np.float32)
    out = T.TiledRestorer(Upsample4(), SR, scale=4, tile=16, overlap=4)(x)
    np.testing.assert_allclose(out, np.repeat(np.repeat(x, 4, 0), 4, 1), atol=1e-6)


def test_tiled_non_blind_gets_kernel_and_sf_and_x8_works():
    x = np.random.default_rng(2).random((40, 29, 3), dtype=np.float32)
    kernel = np.zeros((3, 3), np.float32)
    kernel[1, 1] = 0.25
    kernel[0, 2] = 0.75  # asymmetric: x8 must rotate the kernel with the tiles
    r = T.TiledRestorer(KernelGain(), DEBLUR_NONBLIND, tile=16, overlap=4, batch=2)
    expected = np.repeat(np.repeat(x * 0.25, 2, 0), 2, 1)
    np.testing.assert_allclose(r(x, kernel, sf=2), expected, atol=1e-6)
    np.testing.assert_allclose(r(x, kernel, sf=2, x8=True), expected, atol=1e-6)
    with pytest.raises(ValueError, match="needs a blur kernel"):
        r(x)


def _blurred(shape, kernel, seed=0):
    rng = np.random.default_rng(seed)
    img = D.blur((rng.random(shape) * 255).astype(np.uint8), np.full((9, 9), 1 / 81.0))
    return D.blur(img.astype(np.float32) / 255, kernel).astype(np.float32)  # circular: the whole image is exact


def test_default_context_reproduces_the_whole_image_for_a_long_range_solver():
    """Tiles of a circular FFT deconvolution: the task's context (and the circular padding at the
    image border) reproduce the whole image; no context, or a small one, does not."""
    k = np.outer(np.hanning(7)[1:-1], np.hanning(7)[1:-1])
    k /= k.sum()
    model = Wiener(k, 1e-3)
    x = _blurred((400, 300, 1), k)
    whole = T.TiledRestorer(model, DEBLUR, tile=512)(x)  # one tile spanning the image: the whole image
    err = {c: np.abs(T.TiledRestorer(model, DEBLUR, tile=256, overlap=32, context=c)(x) - whole).max()
           for c in (0, 16, None)}
    assert err[None] < 1e-4 < 1e-2 < err[16] < err[0]
    assert DEBLUR.tile_context == T.TiledRestorer(model, DEBLUR, tile=256).context
    clamp = np.abs(T.TiledRestorer(model, DEBLUR, tile=256, overlap=32, border="clamp")(x) - whole)
    assert clamp[64:-64, 64:-64].max() < 1e-2 < clamp.max()  # inside fine, the image border is not: no wrap


class PaddedWiener(Wiener):
    """Two Wiener deconvolutions, each of the input padded circularly and cropped again, as the
    networks' Converse2D layers do: the whole image is not exactly periodic at its own border."""

    def __call__(self, x):
        p = 6
        for _ in range(2):
            x = super().__call__(jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="wrap"))[:, p:-p, p:-p]
        return x


def test_seam_border_reproduces_a_whole_image_whose_layers_pad_and_crop():
    """With layers that pad and crop, a border tile reproduces the whole image only when the image's
    wrap-around lies on the tile's edge (border "seam"); on "wrap" the image border is off."""
    k = np.outer(np.hanning(7)[1:-1], np.hanning(7)[1:-1])
    model = PaddedWiener(k / k.sum(), 1e-2)
    x = _blurred((300, 400, 1), k / k.sum())
    x = x + np.linspace(0, 0.3, 400, dtype=np.float32)[None, :, None]  # the left and right edges do not match
    whole = T.TiledRestorer(model, DEBLUR, tile=512)(x)  # one tile spanning the image: the whole image
    err = {b: np.abs(T.TiledRestorer(model, DEBLUR, tile=256, overlap=32, border=b)(x) - whole).max()
           for b in T.BORDERS}
    assert DEBLUR.tile_border == "seam" and err["seam"] < 1e-4
    assert err["wrap"] > 1e-2 and err["clamp"] > 1e-2  # off at the image border


@pytest.mark.parametrize("border", T.BORDERS)
def test_every_border_is_exact_for_a_pointwise_network(border):
    x = np.random.default_rng(5).random((70, 45, 1), dtype=np.float32)
    r = T.TiledRestorer(Gain(), DEBLUR, tile=32, overlap=4, context=8, border=border)
    np.testing.assert_allclose(r(x), x * 0.5, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="border must be one of"):
        T.TiledRestorer(Gain(), DEBLUR, tile=32, border="reflect")


def test_context_plan_keeps_a_quarter_tile_at_most_and_none_for_an_axis_in_one_tile():
    p = T.plan_tiles(400, 200, 256, 32, 96)
    assert (p.context_y, p.context_x) == (64, 0)  # a quarter of 256; the width fits one tile
    assert (p.core_h, p.core_w) == (128, 200) and p.overlap_y == 0  # the context covers the overlap
    assert p.rows[0] == 0 and p.rows[-1] + p.core_h == 400  # cores tile the image itself
    assert all(b - a <= p.core_h for a, b in zip(p.rows, p.rows[1:], strict=False))
    assert T.plan_tiles(400, 400, 256, 48, 8).overlap_y == 32  # overlap beyond twice the context
    with pytest.raises(ValueError, match="context"):
        T.plan_tiles(400, 400, 256, 32, -1)
    assert all(t.tile_context >= 0 and t.tile_border in T.BORDERS for t in TASKS)
    assert DEBLUR_NONBLIND.tile_context >= DENOISE.tile_context


def test_memory_estimate_counts_the_padded_input():
    mem = T.MemoryModel(0.0, 1.0, context=64)
    flat = T.MemoryModel(0.0, 1.0)
    assert mem.peak_bytes(1000, 800, 3, 1, tile=256) - flat.peak_bytes(1000, 800, 3, 1, tile=256) == \
        4 * 3 * (1128 * 928 - 1000 * 800)
    assert mem.peak_bytes(1000, 800, 3, 1) == flat.peak_bytes(1000, 800, 3, 1)  # whole image: no padding


def test_progress_is_reported_per_batch():
    calls = []
    T.TiledRestorer(Gain(), DENOISE, tile=16, overlap=4, context=0, batch=2, on_tile=lambda d, n: calls.append((d, n)))(
        np.zeros((40, 40, 1), np.float32))
    assert calls[-1] == (9, 9) and [d for d, _ in calls] == [2, 4, 6, 8, 9]


def test_choose_tile_whole_when_it_fits_else_largest_fitting():
    est = lambda t: 800.0 * 600 if t == 0 else float(t * t)  # noqa: E731
    assert T.choose_tile(est, 800, 600, budget=800 * 600) == 0
    assert T.choose_tile(est, 800, 600, budget=300 * 300) == 256
    assert T.choose_tile(est, 800, 600, budget=1) == 32


def test_memory_model_from_compiled_analysis_grows_with_pixels():
    model = Gain()
    small = T.compiled_bytes(model, DENOISE, (1, 64, 64, 1))
    big = T.compiled_bytes(model, DENOISE, (1, 128, 128, 1))
    assert big > small > 0
    mem = T.fit_memory_model(model, DENOISE, 1)
    assert mem.per_pixel > 0 and mem.context == 0  # denoising tiles end on the image border: no padding
    assert T.fit_memory_model(model, DEBLUR, 1).context == DEBLUR.tile_context  # wrap: padded by the context
    assert mem.peak_bytes(1000, 1000, 1, 1, tile=0) > mem.peak_bytes(1000, 1000, 1, 1, tile=128)
    spec = type("S", (), {"scale": 1, "in_channels": 1})
    whole = mem.peak_bytes(1000, 1000, 1, 1)
    assert E.auto_tile(mem, spec, 1000, 1000, budget=whole * 1.01) == 0
    assert E.auto_tile(mem, spec, 1000, 1000, budget=whole * 0.5) > 0


def test_whole_image_budget_applies_only_where_tiles_lose_accuracy():
    mem = T.MemoryModel(fixed=0.0, per_pixel=100.0)
    whole = mem.peak_bytes(1000, 1000, 3, 1)
    for task, expect_whole in ((DEBLUR, True), (DEBLUR_NONBLIND, True), (DENOISE, False)):
        spec = type("S", (), {"scale": 1, "in_channels": 3, "task": task})
        tile = E.auto_tile(mem, spec, 1000, 1000, budget=whole / 4, whole_budget=whole * 1.01)
        assert (tile == 0) == expect_whole, task.name
        assert E.auto_tile(mem, spec, 1000, 1000, budget=whole / 4, whole_budget=whole / 2) > 0  # still too big
    # An image too large for either budget: the deblurring networks' tiles take the larger one too, so that
    # their long context (a quarter of the tile at most) keeps its full width; denoising keeps small tiles.
    big = T.MemoryModel(fixed=0.0, per_pixel=1000.0)
    budget, larger = (1.01 * big.peak_bytes(3000, 3000, 3, 1, tile=t) for t in (768, 2048))
    for task, expected in ((DEBLUR, 2048), (DEBLUR_NONBLIND, 2048), (DENOISE, 768)):
        spec = type("S", (), {"scale": 1, "in_channels": 3, "task": task})
        assert E.auto_tile(big, spec, 3000, 3000, budget=budget, whole_budget=larger) == expected, task.name
    assert T.axis_context(3000, 2048, DEBLUR.tile_context) == DEBLUR.tile_context
    assert E.memory_budget(whole_image=True) >= E.memory_budget() > 0
    assert E.memory_budget(1.5, whole_image=True) == E.memory_budget(1.5) == 1.5 * 2**30  # --max-memory wins


def _fake_root(tmp_path, files):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize("cgroup, expected_gib", [
    ({}, 8.0),  # no cgroup files: the system's available memory
    ({"sys/fs/cgroup/memory.max": "max\n", "sys/fs/cgroup/memory.current": "1073741824\n"}, 8.0),
    ({"sys/fs/cgroup/memory.max": "5368709120\n", "sys/fs/cgroup/memory.current": "1073741824\n"}, 4.0),  # v2
    ({"sys/fs/cgroup/memory/memory.limit_in_bytes": "3221225472\n",
      "sys/fs/cgroup/memory/memory.usage_in_bytes": "1073741824\n"}, 2.0),  # v1
    ({"sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
      "sys/fs/cgroup/memory/memory.usage_in_bytes": "1073741824\n"}, 8.0),  # v1 without a limit
])
def test_available_ram_respects_a_container_limit(tmp_path, cgroup, expected_gib):
    root = _fake_root(tmp_path, {"proc/meminfo": "MemTotal: 16777216 kB\nMemAvailable: 8388608 kB\n", **cgroup})
    assert E.available_ram(root) == expected_gib * 2**30


def test_heartbeat_in_a_pipe_prints_elapsed_lines_until_the_step_ends():
    stream = io.StringIO()
    with Heartbeat("photo.png (whole image)", stream=stream, every_s=0.02):
        deadline = time.monotonic() + 5
        while stream.getvalue().count("\n") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 2 and all(line.startswith("photo.png (whole image): ") and line.endswith(" s")
                                   for line in lines)
    time.sleep(0.1)
    assert stream.getvalue().splitlines() == lines  # stopped with the step
    quiet = io.StringIO()
    with Heartbeat("x", stream=quiet, every_s=0.01, enabled=False):
        time.sleep(0.05)
    assert quiet.getvalue() == ""


def test_out_of_memory_is_recognised_and_answered_with_a_tile():
    exc = RuntimeError("INTERNAL: Error dispatching computation: Out of memory allocating 5425792516 bytes")
    assert T.is_out_of_memory(exc) and not T.is_out_of_memory(ValueError("bad shape"))
    assert "--tile=512" in oom_hint(0, 1500, 2000)
    assert "--tile=128" in oom_hint(256, 1500, 2000)


def test_progress_in_a_pipe_is_plain_lines():
    stream = io.StringIO()
    p = Progress("photo.png", stream=stream, every_s=0.0)
    for d in range(1, 4):
        p(d, 3)
    p.close()
    lines = stream.getvalue().splitlines()
    assert lines == ["photo.png: tile 1/3", "photo.png: tile 2/3", "photo.png: tile 3/3"]


def test_wrong_kernel_size_is_refused():
    E.check_kernel_size(KernelGain(), np.ones((3, 3)))
    with pytest.raises(ValueError, match="5x5.*3x3"):
        E.check_kernel_size(KernelGain(), np.ones((5, 5)))


@pytest.mark.slow
def test_real_network_tiles_agree_with_the_whole_image():
    model, spec = E.load_model("dncnn")
    hr = (np.random.default_rng(3).random((96, 80, 1)) * 255).astype(np.uint8)
    hr = np.clip(D.blur(hr, np.full((5, 5), 1 / 25.0)), 0, 255).astype(np.uint8)
    _, lq = spec.task.protocol_pair(hr, spec.protocol)
    whole = E.make_restorer(model, spec, 0)(lq)
    tiled = E.make_restorer(model, spec, 64, 16)(lq)
    assert tiled.shape == whole.shape
    assert M.psnr(D.to_uint8(tiled), D.to_uint8(whole)) > 40.0


def test_batches_are_sharded_over_several_devices(tmp_path):
    """Two forced host devices: the batch rounds up to a multiple of 2 and the result is unchanged."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import numpy as np, jax, jax.numpy as jnp\n"
        "from flax import nnx\n"
        "from converse_jax.tiling import TiledRestorer\n"
        "from converse_jax.tasks import DENOISE\n"
        "class G(nnx.Module):\n"
        "    def __init__(self): self.g = nnx.Param(jnp.asarray(0.5))\n"
        "    def __call__(self, x): return x * self.g[...]\n"
        "r = TiledRestorer(G(), DENOISE, tile=16, overlap=4, batch=3)\n"
        "x = np.random.default_rng(0).random((40, 50, 1), dtype=np.float32)\n"
        "assert len(jax.local_devices()) == 2 and r.batch == 4, (jax.local_devices(), r.batch)\n"
        "assert np.abs(r(x) - x * 0.5).max() < 1e-6\n"
        "print('ok')\n")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_an_imported_ipykernel_is_not_a_notebook():
    """A process that merely imported ipykernel (a notebook runner, a pytest worker) still prints plain lines."""
    pytest.importorskip("ipykernel")
    from converse_jax.console import in_notebook, interactive

    assert not in_notebook() and not interactive(io.StringIO())


def test_tile_accuracy_selects_images_by_name_with_or_without_extension():
    from benchmarks.tile_accuracy import select_images

    images = [("bird.bmp", None), ("baby.bmp", None)]
    assert [im[0] for im in select_images(images, ["bird"], "Set5")] == ["bird.bmp"]
    assert [im[0] for im in select_images(images, ["baby.bmp"], "Set5")] == ["baby.bmp"]
    assert select_images(images, [], "Set5") == images
    with pytest.raises(SystemExit, match="brid not among the Set5 images"):
        select_images(images, ["brid"], "Set5")


def test_photo_restorer_pads_and_crops_back():
    """A photo's border: the restorer sees the padded image (tapered towards its blur), the output is cropped
    back to the photo, and only the non-blind task (whose solver wraps the whole image) asks for it."""
    assert DEBLUR_NONBLIND.photo_margin > 0
    assert DENOISE.photo_margin == SR.photo_margin == DEBLUR.photo_margin == 0
    seen = []

    def fake(x, kernel=None, sf=1, x8=False):
        seen.append(x.shape)
        return np.repeat(np.repeat(x, sf, 0), sf, 1)

    x = np.random.default_rng(1).random((20, 24, 3)).astype(np.float32)
    kernel = D.normalize_kernel(np.ones((3, 3)))
    r = E.PhotoRestorer(fake, margin=4, scale=1)
    out = r(x, kernel, sf=2)
    assert seen == [(28, 32, 3)]
    np.testing.assert_allclose(out, np.repeat(np.repeat(x, 2, 0), 2, 1), atol=1e-6)
    assert r(x).shape == x.shape and seen[-1] == x.shape  # no kernel: nothing to taper with
    wrapped = E.make_restorer(KernelGain(), E.get_model_spec("usrnet"), 0, photo=True)
    assert isinstance(wrapped, E.PhotoRestorer) and wrapped.margin == DEBLUR_NONBLIND.photo_margin
    assert not isinstance(E.make_restorer(KernelGain(), E.get_model_spec("usrnet"), 0), E.PhotoRestorer)
    assert not isinstance(E.make_restorer(Gain(), E.get_model_spec("dncnn"), 0, photo=True), E.PhotoRestorer)


@pytest.mark.slow
def test_usrnet_restores_a_photo_better_with_its_tapered_border():
    """A photo blurred without wrapping around (a crop of a larger blurred image): Converse-USRNet's
    whole-image solve wraps, and its edges ring; the tapered border removes most of that."""
    model, spec = E.load_model("usrnet")
    rng = np.random.default_rng(2)
    field = D.blur(rng.random((160, 160, 3)), np.full((9, 9), 1 / 81.0))  # smooth content
    field = (field - field.min()) / (field.max() - field.min())
    kernel = D.paper_kernel(1)
    blurred = D.blur(field, kernel).astype(np.float32)
    gt, lq = field[32:128, 32:128], blurred[32:128, 32:128]  # no wrap-around in the crop
    plain = E.make_restorer(model, spec, 0)(lq, kernel)
    photo = E.make_restorer(model, spec, 0, photo=True)(lq, kernel)
    assert photo.shape == plain.shape == gt.shape
    gain = M.psnr(D.to_uint8(photo), D.to_uint8(gt)) - M.psnr(D.to_uint8(plain), D.to_uint8(gt))
    assert gain > 3.0, gain


def test_tile_accuracy_measures_each_capped_context_once_and_says_so():
    from benchmarks.tile_accuracy import _distinct_settings, parse_args

    args = parse_args(["--tiles", "64,128", "--overlaps", "8,40", "--contexts", "16,32,64"])
    said = []
    settings = _distinct_settings(args, args.contexts, ["wrap"], said.append)
    # tile 64: contexts 16, 32 and 64 are all capped at 16; overlap 40 is over half of 64
    assert settings == [(64, 8, 16, "wrap"), (128, 8, 16, "wrap"), (128, 8, 32, "wrap"), (128, 40, 16, "wrap"),
                        (128, 40, 32, "wrap")]
    assert any("overlap 40: skipped" in m for m in said)
    assert sum("measured once" in m for m in said) == 4


def test_taper_blends_only_each_tiles_context():
    """taper=True: the network sees each tile's context blended towards the tile's blur (the cores are
    the image's own pixels), so a pointwise network's result is unchanged."""
    x = np.random.default_rng(3).random((40, 40, 1)).astype(np.float32)
    kernel = np.zeros((3, 3), np.float32)
    kernel[1, 1], kernel[0, 1] = 0.5, 0.5  # blurs, with a centre tap of 0.5 for the stand-in's gain
    r = T.TiledRestorer(KernelGain(), DEBLUR_NONBLIND, tile=24, overlap=4, context=4, taper=True)
    seen = []
    forward = r._forward
    r._forward = lambda state, batch, sf: seen.append(np.asarray(batch["input"])) or forward(state, batch, sf=sf)
    plain = T.TiledRestorer(KernelGain(), DEBLUR_NONBLIND, tile=24, overlap=4, context=4, taper=False)
    assert T.TiledRestorer(KernelGain(), DEBLUR_NONBLIND, tile=24, overlap=4).taper  # the task's default
    assert DEBLUR_NONBLIND.tile_taper and not (DEBLUR.tile_taper or DENOISE.tile_taper or SR.tile_taper)
    np.testing.assert_allclose(r(x, kernel), plain(x, kernel), atol=1e-6)
    tile = seen[0][0]
    padded = np.pad(x, ((4, 4), (4, 4), (0, 0)), mode="wrap")[:24, :24]
    np.testing.assert_array_equal(tile[4:-4, 4:-4], padded[4:-4, 4:-4])  # inside the context: untouched
    np.testing.assert_allclose(tile[0], D.blur(padded, kernel)[0], atol=1e-6)  # the edge: fully blurred
    assert not np.allclose(tile[0], padded[0])
