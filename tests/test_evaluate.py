"""Test protocols, the evaluation loop and the evaluate/restore command lines."""

import dataclasses
import json
import subprocess
import sys
import types
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import require_asset
from converse_jax import degradations as D
from converse_jax import evaluation as E
from converse_jax import metrics as M
from converse_jax.imageio import ImageError, read_image, write_image
from converse_jax.models.spec import EvalProtocol
from converse_jax.tasks import DEBLUR, DEBLUR_NONBLIND, DENOISE, SR

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------
# Stand-in networks: the loop's logic without the cost of the real ones


class Gain(nnx.Module):
    def __init__(self, gain: float = 1.0):
        self.gain = nnx.Param(jnp.asarray(gain, jnp.float32))

    def __call__(self, x):
        return x * self.gain[...]


class CircularBlur(nnx.Module):
    """Non-blind stand-in: convolves the input with the given kernel (circularly)."""

    def __init__(self):
        self.gain = nnx.Param(jnp.ones((), jnp.float32))

    def __call__(self, x, kernel, sf=1):
        b, h, w, _ = x.shape
        kh, kw = kernel.shape[1:]
        otf = jnp.zeros((b, h, w), x.dtype).at[:, :kh, :kw].set(kernel)
        otf = jnp.fft.fft2(jnp.roll(otf, (-(kh // 2), -(kw // 2)), axis=(1, 2)))
        y = jnp.fft.ifft2(jnp.fft.fft2(x, axes=(1, 2)) * otf[..., None], axes=(1, 2)).real
        return y * self.gain[...]


def _spec(task, channels, protocol, name="standin", scale=1):
    return types.SimpleNamespace(name=name, task=task, in_channels=channels, scale=scale, protocol=protocol)


DENOISE_PROTOCOL = EvalProtocol(dataset="set12", color="gray", border=0, metric="rgb", sigma=25.0,
                                paper={"set12": 30.70})
DEBLUR_PROTOCOL = EvalProtocol(dataset="set5", color="rgb", border=1, metric="rgb", modcrop=8,
                               kernels=(1, 2, 3, 4, 5), blur_noise=2.55, paper={"bsd100": [1.0, 2.0, 3.0, 4.0, 5.0]})


def test_dihedral_transforms_are_the_eight_symmetries_and_invert():
    x = np.arange(12.0).reshape(3, 4, 1)
    seen = set()
    for mode in range(8):
        t = D.dihedral(x, mode)
        np.testing.assert_array_equal(D.dihedral_inverse(t, mode), x)
        seen.add(t.tobytes() + bytes(t.shape))
    assert len(seen) == 8


def test_protocol_pair_follows_each_protocol():
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (37, 42, 3), dtype=np.uint8)
    gt, lq = DENOISE.protocol_pair(hr[..., :1], DENOISE_PROTOCOL)
    np.testing.assert_array_equal(gt, hr[..., :1])
    np.testing.assert_array_equal(lq, D.add_noise(D.to_float(hr[..., :1]), 25.0, rng=0))
    sr = EvalProtocol(dataset="set5", color="rgb", border=4, metric="y", scale=4, modcrop=4)
    gt, lq = SR.protocol_pair(hr, sr)
    assert gt.shape == (36, 40, 3) and lq.shape == (9, 10, 3) and lq.dtype == np.float32
    np.testing.assert_array_equal(lq, D.imresize(D.to_float(hr[:36, :40]), 0.25))
    k = D.normalize_kernel(rng.random((5, 5)))
    for task in (DEBLUR, DEBLUR_NONBLIND):
        gt, lq = task.protocol_pair(hr, DEBLUR_PROTOCOL, k)
        assert gt.shape == (32, 40, 3)
        np.testing.assert_array_equal(lq, D.add_noise(D.to_float(D.blur(hr[:32, :40], k)), 2.55, rng=0))
        with pytest.raises(ValueError, match="kernel"):
            task.protocol_pair(hr, DEBLUR_PROTOCOL)


def test_x8_ensemble_transforms_the_kernel_with_the_image():
    rng = np.random.default_rng(1)
    x = rng.random((12, 16, 3)).astype(np.float32)
    k = rng.random((5, 5))
    k[0, :] += 3.0  # clearly asymmetric
    k /= k.sum()
    r = E.Restorer(CircularBlur(), DEBLUR_NONBLIND)
    plain = r(x, k)
    np.testing.assert_allclose(plain, D.blur(x.astype(np.float64), k), atol=1e-5)
    np.testing.assert_allclose(r(x, k, x8=True), plain, atol=1e-5)
    # Without transforming the kernel the ensemble would differ: the check above has teeth.
    wrong = np.mean([D.dihedral_inverse(r(D.dihedral(x, m), k), m) for m in range(8)], axis=0)
    assert np.abs(wrong - plain).max() > 1e-2


def test_x8_ensemble_averages_non_equivariant_outputs():
    class AddRamp(nnx.Module):
        def __init__(self):
            self.gain = nnx.Param(jnp.ones((), jnp.float32))

        def __call__(self, x):
            ramp = jnp.arange(x.shape[2], dtype=x.dtype)[None, None, :, None]
            return x * self.gain[...] + ramp

    x = np.zeros((4, 4, 1), np.float32)
    out = E.Restorer(AddRamp())(x, x8=True)
    want = np.mean([D.dihedral_inverse(D.dihedral(x, m) + np.arange(4.0)[None, :, None], m)
                    for m in range(8)], axis=0)
    np.testing.assert_allclose(out, want, atol=1e-6)
    assert not np.allclose(out, np.arange(4.0)[None, :, None])


def test_evaluate_loop_with_identity_network(tmp_path):
    gt_img = read_image(require_asset("testsets", "Set12", "01.png"), color="gray")[:40, :48]
    images = [("a.png", gt_img), ("b.png", gt_img[::-1].copy())]
    spec = _spec(DENOISE, 1, DENOISE_PROTOCOL)
    seen = []
    report = E.evaluate(Gain(), spec, images, progress=False, save_dir=tmp_path / "out", on_image=seen.append)
    run = report.runs[0]
    assert [r.image for r in run.per_image] == ["a.png", "b.png"] and len(seen) == 2
    for (name, img), r in zip(images, run.per_image, strict=False):
        noisy = D.to_uint8(D.add_noise(D.to_float(img), 25.0, rng=0))
        assert r.psnr == pytest.approx(M.psnr(noisy, img), abs=1e-12)
        assert r.ssim == pytest.approx(M.ssim(noisy, img), abs=1e-12)
        assert r.psnr_y is None
        np.testing.assert_array_equal(read_image(tmp_path / "out" / name, color="gray"), noisy)
    d = report.to_dict()
    assert d["model"] == "standin" and d["dataset"] == "set12" and d["protocol"]["sigma"] == 25.0
    assert d["average"]["psnr"] == pytest.approx(np.mean([r.psnr for r in run.per_image]))
    assert set(d["average"]) == {"psnr", "ssim"} and "kernels" not in d
    table = report.format_table()
    assert "a.png" in table and "average" in table and "paper PSNR: 30.70" in table


def test_evaluate_deblur_runs_each_kernel_and_reports_per_kernel(tmp_path):
    for k in (1, 2):
        require_asset("blur_kernels", f"kernel_{k}.npy")
    hr = read_image(require_asset("testsets", "Set5", "butterfly.bmp"), color="rgb")[:48, :40]
    proto = dataclasses.replace(DEBLUR_PROTOCOL, kernels=(1, 2), dataset="bsd100")
    spec = _spec(DEBLUR_NONBLIND, 3, proto)
    report = E.evaluate(CircularBlur(), spec, [("butterfly.bmp", hr)], protocol=proto, progress=False,
                        save_dir=tmp_path)
    d = report.to_dict()
    assert [r["kernel"] for r in d["kernels"]] == [1, 2]
    assert [r["paper"] for r in d["kernels"]] == [1.0, 2.0]
    for entry, kid in zip(d["kernels"], (1, 2), strict=False):
        kernel = D.paper_kernel(kid)
        gt, lq = DEBLUR_NONBLIND.protocol_pair(hr, proto, kernel)
        # The stand-in blurs again with the same kernel: recompute its output independently.
        restored = D.to_uint8(D.blur(lq.astype(np.float64), kernel).astype(np.float32))
        restored_file = read_image(tmp_path / f"butterfly_k{kid}.png", color="rgb")
        assert np.abs(restored_file.astype(int) - restored).max() <= 1
        (img,) = entry["per_image"]
        assert set(img) == {"image", "psnr", "ssim", "psnr_y", "ssim_y"}
        assert img["psnr"] == pytest.approx(M.psnr(restored_file, gt, border=1), abs=1e-12)


def test_resolve_protocol_and_dataset_dir(tmp_path):
    spec = _spec(DENOISE, 1, DENOISE_PROTOCOL)
    assert E.resolve_protocol(spec, sigma=50).sigma == 50.0
    assert E.resolve_protocol(spec) is DENOISE_PROTOCOL
    with pytest.raises(ValueError, match="--kernel applies to deblurring"):
        E.resolve_protocol(spec, kernels=[1])
    dspec = _spec(DEBLUR, 3, DEBLUR_PROTOCOL)
    assert E.resolve_protocol(dspec, kernels=[3]).kernels == (3,)
    with pytest.raises(ValueError, match="1..5"):
        E.resolve_protocol(dspec, kernels=[6])
    with pytest.raises(ValueError, match="--sigma applies to denoising"):
        E.resolve_protocol(dspec, sigma=10)
    assert E.paper_value(DEBLUR_PROTOCOL, "BSD100", 2) == 2.0 and E.paper_value(DEBLUR_PROTOCOL, "set5", 2) is None
    with pytest.raises(ValueError, match="not bundled: pass --data-dir"):
        E.dataset_dir("bsd68")
    with pytest.raises(ValueError, match="unknown dataset"):
        E.dataset_dir("nope")
    assert E.dataset_dir("bsd68", tmp_path) == tmp_path


def test_restore_array_handles_modes_and_kernels():
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    gray_spec = _spec(DENOISE, 1, DENOISE_PROTOCOL)
    r = E.Restorer(Gain(1.0))
    np.testing.assert_array_equal(E.restore_array(r, gray_spec, rgb), rgb)
    rgb_spec = _spec(DEBLUR, 3, DEBLUR_PROTOCOL)
    out = E.restore_array(E.Restorer(Gain(0.5), DEBLUR), rgb_spec, rgb[..., :1])
    assert out.shape == (9, 11, 1)
    want = D.to_uint8(D.to_float(rgb[..., :1]) * np.float32(0.5))
    assert np.abs(out.astype(int) - want).max() <= 1  # mean of 3 channels: ties may round either way
    nb_spec = _spec(DEBLUR_NONBLIND, 3, DEBLUR_PROTOCOL)
    with pytest.raises(ValueError, match="non-blind"):
        E.restore_array(E.Restorer(CircularBlur(), DEBLUR_NONBLIND), nb_spec, rgb)
    with pytest.raises(ValueError, match="does not take a blur kernel"):
        E.restore_array(r, gray_spec, rgb, kernel=np.ones((3, 3)))


def test_restore_options_are_checked_in_one_place():
    nb_spec = _spec(DEBLUR_NONBLIND, 3, DEBLUR_PROTOCOL)
    blind = _spec(DEBLUR, 3, DEBLUR_PROTOCOL)
    E.check_restore_options(nb_spec, True, 2)
    E.check_restore_options(blind, False, 1)
    for spec, has_kernel, sf, match in [(nb_spec, False, 1, "pass a blur kernel"), (nb_spec, True, 0, "--sf must be"),
                                        (blind, True, 1, "drop --kernel"), (blind, False, 2, "non-blind models only")]:
        with pytest.raises(ValueError, match=match):
            E.check_restore_options(spec, has_kernel, sf)
        if has_kernel or sf == 2:  # restore_array runs the same checks
            with pytest.raises(ValueError, match=match):
                E.restore_array(E.Restorer(CircularBlur(), spec.task), spec, np.zeros((4, 4, 3), np.uint8),
                                kernel=np.ones((3, 3)) if has_kernel else None, sf=sf)


def test_restorer_calls_the_network_as_its_task_says():
    x = np.full((4, 5, 3), 0.5, np.float32)
    with pytest.raises(ValueError, match="does not take a blur kernel"):
        E.Restorer(Gain(1.0), DEBLUR)(x, np.ones((3, 3)) / 9)
    with pytest.raises(ValueError, match="needs a blur kernel"):
        E.Restorer(CircularBlur(), DEBLUR_NONBLIND)(x)
    with pytest.raises(ValueError, match="spec.task"):
        E.Restorer(CircularBlur(), True)  # the former takes_kernel flag
    delta = np.zeros((3, 3))
    delta[1, 1] = 1.0
    np.testing.assert_allclose(E.Restorer(CircularBlur(), DEBLUR_NONBLIND)(x, delta), x, atol=1e-6)


def test_report_heading_and_layout_follow_the_task():
    run = E.RunResult([E.ImageResult("a.png", 30.0, 0.9)], kernel=None)
    sr = dataclasses.replace(DENOISE_PROTOCOL, scale=4)
    assert E.EvalReport("m", "set5", SR, sr, [run]).format_table().startswith("m on set5 (x4)")
    assert E.EvalReport("m", "set12", DENOISE, DENOISE_PROTOCOL, [run]).format_table().startswith(
        "m on set12 (sigma 25)")
    krun = dataclasses.replace(run, kernel=2)
    d = E.EvalReport("m", "set5", DEBLUR, DEBLUR_PROTOCOL, [krun]).to_dict()
    assert d["kernels"][0]["kernel"] == 2 and "per_image" not in d


# ----------------------------------------------------------------------------------------
# imageio


def test_imageio_modes_and_errors(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(3).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    write_image(tmp_path / "c.png", rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "c.png"), rgb)
    with pytest.raises(ImageError, match="colour image"):
        read_image(tmp_path / "c.png", color="gray")
    write_image(tmp_path / "g.png", rgb[..., 0])
    assert read_image(tmp_path / "g.png", color="rgb").shape == (6, 5, 3)
    Image.fromarray(np.stack([rgb[..., 0]] * 3, -1)).save(tmp_path / "g3.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g3.png", color="gray")[..., 0], rgb[..., 0])
    Image.fromarray(np.zeros((4, 4), np.uint16) + 300).save(tmp_path / "deep.png")
    with pytest.raises(ImageError, match="mode"):
        read_image(tmp_path / "deep.png")
    rgba = np.concatenate([rgb, np.full((6, 5, 1), 7, np.uint8)], -1)
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    with pytest.raises(ImageError, match="transparency"):
        read_image(tmp_path / "alpha.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageError, match="junk.png"):
        read_image(tmp_path / "junk.png")
    with pytest.raises(ImageError, match="not found"):
        read_image(tmp_path / "missing.png")
    # A failed write leaves an existing file untouched.
    before = (tmp_path / "c.png").read_bytes()
    with pytest.raises(ImageError):
        write_image(tmp_path / "c.png", np.zeros((4, 4, 2), np.uint8))
    assert (tmp_path / "c.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ----------------------------------------------------------------------------------------
# The released networks against the reference's outputs (skipped until models and weights exist)


def _released(name):
    try:
        spec = E.get_model_spec(name)
    except Exception as exc:  # noqa: BLE001 - registry not importable yet
        pytest.skip(f"model registry not available ({exc})")
    require_asset("weights", spec.release.filename)
    model, spec = E.load_model(name)
    return model, spec


def _compare_pixels(ours, ref_file):
    ref = read_image(ref_file)
    assert ours.shape == ref.shape
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 1
    assert (diff == 0).mean() >= 0.99
    return diff


@pytest.fixture(scope="module")
def ref_index():
    return json.loads(require_asset("golden", "reference_outputs", "index.json").read_text())


@pytest.mark.slow
def test_converse_dncnn_set12_01_matches_reference(ref_index, tmp_path):
    model, spec = _released("dncnn")
    gt = read_image(require_asset("testsets", "Set12", "01.png"), color="gray")
    report = E.evaluate(model, spec, [("01.png", gt)], progress=False, save_dir=tmp_path)
    entry = ref_index["denoise_converse_dncnn_set12_01.png"]
    result = report.runs[0].per_image[0]
    assert abs(result.psnr - entry["psnr"]) <= 0.005
    assert abs(result.ssim - entry["ssim"]) <= 1e-3
    _compare_pixels(read_image(tmp_path / "01.png"),
                    require_asset("golden", "reference_outputs", "denoise_converse_dncnn_set12_01.png"))


@pytest.mark.slow
def test_converse_srresnet_set5_bird_matches_reference(ref_index, tmp_path):
    model, spec = _released("srresnet")
    gt = read_image(require_asset("testsets", "Set5", "bird.bmp"), color="rgb")
    protocols = np.load(require_asset("golden", "protocols.npz"))
    _, lq = spec.task.protocol_pair(gt, spec.protocol)
    assert np.abs(lq - protocols["sr_x4_set5_bird_lr"]).max() <= 1e-6
    report = E.evaluate(model, spec, [("bird.bmp", gt)], progress=False, save_dir=tmp_path)
    entry = ref_index["sr_x4_converse_srresnet_set5_bird.png"]
    result = report.runs[0].per_image[0]
    assert abs(result.psnr_y - entry["psnr_y"]) <= 0.005
    assert abs(result.psnr - entry["psnr"]) <= 0.005
    _compare_pixels(read_image(tmp_path / "bird.png"),
                    require_asset("golden", "reference_outputs", "sr_x4_converse_srresnet_set5_bird.png"))


@pytest.mark.slow
@pytest.mark.parametrize("name,ref_name,kernel", [("conversenet", "conversenet", 2), ("usrnet", "converse_usrnet", 4)])
def test_deblurring_models_match_reference_psnr(ref_index, name, ref_name, kernel):
    model, spec = _released(name)
    gt = read_image(require_asset("testsets", "Set5", "butterfly.bmp"), color="rgb")
    proto = E.resolve_protocol(spec, kernels=[kernel])
    report = E.evaluate(model, spec, [("butterfly.bmp", gt)], protocol=proto, dataset="set5", progress=False)
    entry = ref_index[f"deblur_{ref_name}_set5_butterfly_kernel{kernel}.png"]
    assert abs(report.runs[0].per_image[0].psnr - entry["psnr"]) <= 0.01


# ----------------------------------------------------------------------------------------
# Command lines


def _cli(module, *args):
    from importlib import import_module

    return import_module(f"experiments.{module}").main(list(args))


def _registry_or_skip():
    try:
        from converse_jax import models

        return list(models.list_models())
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"model registry not available ({exc})")


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    return err[0]


def test_evaluate_cli_bad_input(tmp_path, capsys):
    names = _registry_or_skip()
    dn = "dncnn" if "dncnn" in names else names[0]
    assert _cli("evaluate", "--model=nope") == 2
    assert "unknown model" in _one_error_line(capsys)
    assert _cli("evaluate", f"--model={dn}", "--dataset=nope") == 2
    assert "unknown dataset" in _one_error_line(capsys)
    assert _cli("evaluate", f"--model={dn}", "--dataset=bsd68") == 2
    assert "--data-dir" in _one_error_line(capsys)
    assert _cli("evaluate", f"--model={dn}", f"--data-dir={tmp_path / 'missing'}") == 2
    assert "not found" in _one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert _cli("evaluate", f"--model={dn}", f"--data-dir={tmp_path / 'empty'}") == 2
    assert "no image files" in _one_error_line(capsys)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"garbage")
    assert _cli("evaluate", f"--model={dn}", f"--data-dir={tmp_path / 'bad'}") == 2
    assert "x.png" in _one_error_line(capsys)
    (tmp_path / "color").mkdir()
    write_image(tmp_path / "color" / "c.png", np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8))
    if E.get_model_spec(dn).protocol.color == "gray":
        assert _cli("evaluate", f"--model={dn}", f"--data-dir={tmp_path / 'color'}") == 2
        assert "colour" in _one_error_line(capsys)


def test_restore_cli_bad_input(tmp_path, capsys):
    names = _registry_or_skip()
    nonblind = [n for n in names if E.get_model_spec(n).task.takes_kernel]
    img = tmp_path / "in.png"
    write_image(img, np.zeros((16, 16, 3), np.uint8))
    if nonblind:
        assert _cli("restore", f"--model={nonblind[0]}", f"--input={img}", f"--output={tmp_path / 'o.png'}") == 2
        assert "--kernel" in _one_error_line(capsys)
    assert _cli("restore", f"--model={names[0]}", f"--input={tmp_path / 'none'}", f"--output={tmp_path}") == 2
    assert "does not exist" in _one_error_line(capsys)
    assert _cli("restore", f"--model={names[0]}", f"--input={img}", f"--output={img}") == 2
    assert "input file" in _one_error_line(capsys)
    assert _cli("restore", f"--model={names[0]}", f"--input={img}", f"--output={tmp_path / 'o.jpg'}") == 2
    assert "PNG" in _one_error_line(capsys)


def test_restore_cli_folder_with_unreadable_image(tmp_path, capsys):
    model, spec = _released("dncnn")
    del model
    src = tmp_path / "in"
    src.mkdir()
    gt = read_image(require_asset("testsets", "Set12", "01.png"), color="gray")[100:132, 80:120]
    write_image(src / "a.png", gt)
    (src / "b.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert _cli("restore", "--model=dncnn", f"--input={src}", f"--output={out}") == 1
    err = capsys.readouterr().err
    assert "b.png" in err and "1 of 2" in err and "Traceback" not in err
    restored = read_image(out / "a.png")
    assert restored.shape == gt.shape
    assert not (out / "b.png").exists()
    # a second run keeps a.png unless --overwrite
    assert _cli("restore", "--model=dncnn", f"--input={src}", f"--output={out}") == 2
    assert "--overwrite" in _one_error_line(capsys)
    assert _cli("restore", "--model=dncnn", f"--input={src}", f"--output={out}", "--overwrite", "--tile=16",
                "--tile-overlap=4") == 1
    err = capsys.readouterr().err
    assert "b.png" in err and "Traceback" not in err
    np.testing.assert_array_equal(read_image(out / "a.png").shape, gt.shape)


def _patch_cli_loading(monkeypatch, load):
    """Replace the model loading of both command lines."""
    import experiments.evaluate
    import experiments.restore

    monkeypatch.setattr(experiments.evaluate, "load_model", load)
    monkeypatch.setattr(experiments.restore, "load_model", load)


def test_outputs_are_checked_before_any_compute(tmp_path, capsys, monkeypatch):
    names = _registry_or_skip()
    dn = "dncnn" if "dncnn" in names else names[0]

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(E, "load_model", no_loading)
    _patch_cli_loading(monkeypatch, no_loading)
    img = tmp_path / "in.png"
    write_image(img, np.zeros((16, 16, 1), np.uint8))
    done = tmp_path / "done.png"
    done.write_bytes(b"keep me")
    assert _cli("restore", f"--model={dn}", f"--input={img}", f"--output={done}") == 2
    assert "already exist" in _one_error_line(capsys) and done.read_bytes() == b"keep me"
    assert _cli("restore", f"--model={dn}", f"--input={img}", f"--output={tmp_path / 'no' / 'o.png'}") == 2
    assert "does not exist" in _one_error_line(capsys)
    if Path("/proc/self").is_dir():  # a folder nobody can create files in, even root
        assert _cli("restore", f"--model={dn}", f"--input={img}", "--output=/proc/o.png") == 2
        assert "cannot write" in _one_error_line(capsys)
    assert _cli("restore", f"--model={dn}", f"--input={img}", f"--output={tmp_path / 'o.png'}", "--tile=-1") == 2
    assert "--tile" in _one_error_line(capsys)
    assert _cli("restore", f"--model={dn}", f"--input={img}", f"--output={tmp_path / 'o.png'}", "--tile=64",
                "--tile-overlap=32") == 2
    assert "--tile-overlap" in _one_error_line(capsys)
    data = tmp_path / "data"
    data.mkdir()
    write_image(data / "a.png", np.zeros((16, 16, 1), np.uint8))
    report = tmp_path / "r.json"
    report.write_text("{}")
    assert _cli("evaluate", f"--model={dn}", f"--data-dir={data}", f"--json={report}") == 2
    assert "--overwrite" in _one_error_line(capsys) and report.read_text() == "{}"
    assert _cli("evaluate", f"--model={dn}", f"--data-dir={data}", f"--json={tmp_path / 'x' / 'r.json'}") == 2
    assert "does not exist" in _one_error_line(capsys)
    assert _cli("evaluate", f"--model={dn}", f"--data-dir={data}", f"--save-images={img}") == 2
    assert "is a file" in _one_error_line(capsys)
    assert _cli("evaluate", f"--model={dn}", f"--data-dir={data}", "--tile=8") == 2
    assert "--tile" in _one_error_line(capsys)


def test_evaluate_with_tiles_matches_whole_for_a_pointwise_network():
    images = [("a.png", np.random.default_rng(5).integers(0, 256, (50, 70, 1), np.uint8))]
    spec = _spec(DENOISE, 1, DENOISE_PROTOCOL)
    model = Gain(1.0)
    whole = E.evaluate(model, spec, images, progress=False)
    tiled = E.evaluate(model, spec, images, progress=False, restorer=E.make_restorer(model, spec, 32, 8))
    assert tiled.runs[0].per_image[0].psnr == pytest.approx(whole.runs[0].per_image[0].psnr, abs=1e-6)


def test_evaluate_cli_end_to_end_on_a_crop(tmp_path):
    _released("dncnn")
    data = tmp_path / "data"
    data.mkdir()
    gt = read_image(require_asset("testsets", "Set12", "01.png"), color="gray")[:48, :64]
    write_image(data / "crop.png", gt)
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.evaluate", "--model=dncnn", f"--data-dir={data}",
         "--dataset=set12", f"--json={tmp_path / 'r.json'}", f"--save-images={tmp_path / 'img'}", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "crop.png" in proc.stdout and "dncnn on data" in proc.stdout
    assert "whole" in proc.stderr  # the paper's protocol: whole images, and it says so
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["model"] == "dncnn" and result["dataset"] == "data"  # labelled with the folder, not --dataset
    (entry,) = result["per_image"]
    restored = read_image(tmp_path / "img" / "crop.png", color="gray")
    assert entry["psnr"] == pytest.approx(M.psnr(restored, gt), abs=1e-9)
    assert result["average"]["psnr"] == entry["psnr"]


def test_cli_error_has_no_traceback_in_a_real_process(tmp_path):
    _registry_or_skip()
    proc = subprocess.run([sys.executable, "-m", "experiments.restore", "--model=nope", "--input=x",
                           "--output=y"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("error: unknown model")


def test_restorer_reads_current_weights():
    model = Gain(1.0)
    r = E.Restorer(model)
    x = np.full((4, 5, 1), 0.25, np.float32)
    np.testing.assert_allclose(r(x), x)
    model.gain[...] = jnp.asarray(2.0, jnp.float32)
    np.testing.assert_allclose(r(x), 2 * x)


def test_evaluate_progress_in_a_pipe_is_plain_lines(capsys):
    images = [(f"{i}.png", np.full((16, 16, 1), 100 + i, np.uint8)) for i in range(2)]
    E.evaluate(Gain(1.0), _spec(DENOISE, 1, DENOISE_PROTOCOL), images, progress=True)
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" PSNR")[0] for line in err] == ["standin set12: 1/2 0.png", "standin set12: 2/2 1.png"]
    assert "\r" not in "".join(err)


def test_out_of_memory_is_one_line_naming_a_tile(tmp_path, capsys, monkeypatch):
    _registry_or_skip()

    def oom(*args, **kwargs):
        raise RuntimeError("INTERNAL: Error dispatching computation: Out of memory allocating 5425792516 bytes")

    _patch_cli_loading(monkeypatch, lambda name, weights=None, arch=None: (Gain(1.0), E.get_model_spec(name)))
    monkeypatch.setattr(E, "restore_array", oom)
    monkeypatch.setattr(E, "evaluate", oom)
    img = tmp_path / "big.png"
    write_image(img, np.zeros((300, 200, 1), np.uint8))
    assert _cli("restore", "--model=dncnn", f"--input={img}", f"--output={tmp_path / 'o.png'}", "--tile=0") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: ") and "big.png" in err[0] and "--tile=128" in err[0]
    assert "Traceback" not in "".join(err)
    assert _cli("evaluate", "--model=dncnn", f"--data-dir={tmp_path}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: out of memory") and "--tile=128" in err[-1] and "Traceback" not in "".join(err)


def test_restore_default_gives_the_whole_image_more_memory_only_where_tiles_lose_accuracy(tmp_path, monkeypatch,
                                                                                         capsys):
    from converse_jax.models import ConverseDnCNN, ConverseNet
    from experiments import restore

    def tiny(name, weights=None, arch=None):
        spec = E.get_model_spec(name)
        cls = {"conversenet": ConverseNet, "dncnn": ConverseDnCNN}[name]
        kw = {"num_iterations": 1} if name == "conversenet" else {}
        return cls(in_channels=spec.in_channels, features=4, num_blocks=1, **kw, rngs=nnx.Rngs(0)), spec

    monkeypatch.setattr(restore, "load_model", tiny)
    monkeypatch.setattr(E, "memory_model", lambda *a, **k: E.MemoryModel(fixed=0.0, per_pixel=1000.0))
    # tiles may use 8 MB (a 64² tile fits, a 96² image does not); a whole image 100 MB
    monkeypatch.setattr(E, "memory_budget", lambda gib=None, whole_image=False: 1e8 if whole_image else 8e6)
    img = tmp_path / "in.png"
    write_image(img, np.full((96, 96, 3), 128, np.uint8))
    for name, how in (("conversenet", "whole image"), ("dncnn", "tiles of 64 px")):
        assert _cli("restore", f"--model={name}", f"--input={img}", f"--output={tmp_path / (name + '.png')}",
                    "--no-progress") == 0
        assert how in capsys.readouterr().out, name
        assert read_image(tmp_path / (name + ".png")).shape[:2] == (96, 96)
    monkeypatch.setattr(E, "memory_budget", lambda gib=None, whole_image=False: 1.0)  # the smallest tile, 32 px
    assert _cli("restore", "--model=dncnn", f"--input={img}", f"--output={tmp_path / 'small.png'}",
                "--no-progress") == 0
    assert "tiles of 32 px, overlap 15" in capsys.readouterr().out  # the default overlap shrinks to fit
