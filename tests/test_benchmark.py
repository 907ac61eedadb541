"""Tests of the benchmark suite: the PyTorch baseline against the reference goldens (skipped
without torch), the alternative JAX implementations, the timing policy and the command line."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from benchmarks import cases as C
from benchmarks.timing import cpu_info, cpu_summary, measure
from conftest import require_asset

NETS = {"converse_dncnn.pth": "dncnn", "converse_srresnet.pth": "srresnet", "conversenet.pth": "conversenet",
        "converse_usrnet.pth": "usrnet"}


def _index() -> dict:
    return json.loads(require_asset("golden", "index.json").read_text())


# ----------------------------------------------------------------------------- torch baseline

@pytest.fixture(scope="module")
def T():
    pytest.importorskip("torch", reason="torch is not installed (the 'bench' extra)")
    from benchmarks import torch_ref

    return torch_ref


def test_torch_operator_matches_golden_float64(T):
    """The published closed form in float64 reproduces the reference's float64 outputs exactly."""
    import torch

    for entry in _index()["ops"]:
        d = np.load(require_asset("golden", entry["file"]))
        lam = torch.sigmoid(torch.from_numpy(d["bias"]).double() - 9.0) + entry["eps"]
        y = T.converse2d(torch.from_numpy(d["x"]).double(), torch.from_numpy(d["weight"]).double(), lam,
                         entry["scale"], entry["padding"], entry["padding_mode"]).numpy()
        ref = d["y_f64"]
        assert y.shape == ref.shape, entry["file"]
        assert np.abs(y - ref).max() <= 1e-9 * np.abs(ref).max(), entry["file"]


def test_torch_operator_float32_within_reference_noise(T):
    """In float32 the division by λ costs digits (docs/operator.md: up to 3.7e-3 relative); ours stays in that band."""
    import torch

    for entry in _index()["ops"]:
        d = np.load(require_asset("golden", entry["file"]))
        lam = torch.sigmoid(torch.from_numpy(d["bias"]) - 9.0) + entry["eps"]
        y = T.converse2d(torch.from_numpy(d["x"]), torch.from_numpy(d["weight"]), lam, entry["scale"],
                         entry["padding"], entry["padding_mode"]).numpy()
        assert np.abs(y - d["y_f32"]).max() <= 1e-2 * np.abs(d["y_f64"]).max(), entry["file"]


@pytest.mark.parametrize("checkpoint", sorted(NETS))
def test_torch_networks_match_released_goldens(T, checkpoint):
    """Released weights load strictly; float32 outputs match the reference's y_f32 to ~1e-4, float64 ones
    match y_f64 to rounding."""
    import torch

    entry = next(m for m in _index()["models"] if m["checkpoint"] == checkpoint)
    name = NETS[checkpoint]
    net = T.load_released(name, require_asset("weights", checkpoint).parent)
    d = np.load(require_asset("golden", entry["file"]))
    args = [torch.from_numpy(d["input0"])]
    if name == "usrnet":
        args += [torch.from_numpy(d["input1"])[:, 0], 1]
    with torch.no_grad():
        y32 = net(*args).numpy()
        y64 = net.double()(*[a.double() if isinstance(a, torch.Tensor) else a for a in args]).numpy()
    ref_noise = np.abs(d["y_f32"] - d["y_f64"]).max()  # the reference's own float32 error
    assert y32.shape == tuple(entry["out_shape"])
    assert np.abs(y32 - d["y_f32"]).max() <= max(1e-4, 2 * ref_noise)
    assert np.abs(y64 - d["y_f64"]).max() <= 1e-9 * np.abs(d["y_f64"]).max()


def test_torch_checkpoints_need_every_key(T):
    import torch

    path = require_asset("weights", "conversenet.pth")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state.pop("conv2.bias")
    with pytest.raises(RuntimeError, match="conv2.bias"):
        T.build("conversenet").load_state_dict(state, strict=True)


def test_torch_worker_reports_timings(T):
    from benchmarks.suite import TorchBaseline

    base = TorchBaseline(sys.executable, timeout=300)
    out = base.run("op", C.op_cases(True)[1], {"warmup": 1, "min_repeats": 2, "max_repeats": 2, "budget_s": 0})
    for mode in ("fwd", "fwd+bwd"):
        assert out[mode]["runs"] == 2 and out[mode]["median_s"] > 0
    assert base.info["torch_threads"] >= 1 and base.info["OMP_WAIT_POLICY"]


# ----------------------------------------------------------------------------- JAX alternatives

def _golden_op(entry):
    d = np.load(require_asset("golden", entry["file"]))
    return d, d["x"].transpose(0, 2, 3, 1), d["weight"][0].transpose(1, 2, 0), d["bias"].reshape(-1)


def test_alt_operator_matches_float64_golden():
    """Every fifth reference case (all scales, padding modes and kernel sizes occur among them)."""
    import jax
    import jax.numpy as jnp

    from benchmarks import alt_ops

    op = jax.jit(alt_ops.converse2d, static_argnames=("scale", "padding", "padding_mode", "layout"))
    entries = _index()["ops"][::5]
    assert {(e["scale"], e["padding_mode"]) for e in entries} == {(s, m) for s in (1, 2, 3, 4) for m in
                                                                  ("circular", "reflect", "replicate", "constant")}
    for entry in entries:
        d, x, w, b = _golden_op(entry)
        lam = alt_ops.lam_from_bias(jnp.asarray(b), entry["eps"])
        y = op(jnp.asarray(x), jnp.asarray(w), lam, scale=entry["scale"], padding=entry["padding"],
               padding_mode=entry["padding_mode"])
        y = np.asarray(y).transpose(0, 3, 1, 2)
        assert np.abs(y - d["y_f64"]).max() <= 1e-5 * np.abs(d["y_f64"]).max(), entry["file"]
    assert jax.default_backend()  # ran on whatever backend is present


@pytest.mark.parametrize("index", [1, 43, 45, 97])  # s = 1, 2, 2, 4; circular, reflect, replicate, circular
def test_alt_operator_gradients_match_golden(index):
    import jax
    import jax.numpy as jnp

    from benchmarks import alt_ops

    entry = _index()["ops"][index]
    d, x, w, b = _golden_op(entry)
    ct = jnp.asarray(d["cotangent"].transpose(0, 2, 3, 1))

    def loss(x, w, b):
        lam = alt_ops.lam_from_bias(b, entry["eps"])
        return jnp.sum(alt_ops.converse2d(x, w, lam, scale=entry["scale"], padding=entry["padding"],
                                          padding_mode=entry["padding_mode"]) * ct)

    # compiled once (op by op, the backward pass compiles dozens of small programs)
    gx, gw, gb = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b))
    for got, ref in ((np.asarray(gx).transpose(0, 3, 1, 2), d["grad_x_f64"]),
                     (np.asarray(gw).transpose(2, 0, 1)[None], d["grad_weight_f64"]),
                     (np.asarray(gb).reshape(d["grad_bias_f64"].shape), d["grad_bias_f64"])):
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max() + 1e-6, entry["file"]


def test_alt_operator_per_sample_kernels_match_per_sample_calls():
    import jax.numpy as jnp

    from benchmarks import alt_ops

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((2, 10, 12, 3), dtype=np.float32))
    k = jnp.asarray(rng.random((2, 3, 3, 3), dtype=np.float32))
    lam = jnp.asarray([1e-2, 2e-2, 3e-2], jnp.float32)
    for s in (1, 2):
        both = alt_ops.converse2d(x, k, lam, scale=s)
        for i in range(2):
            one = alt_ops.converse2d(x[i:i + 1], k[i], lam, scale=s)
            np.testing.assert_allclose(np.asarray(both[i:i + 1]), np.asarray(one), atol=1e-5)


def test_alt_operator_rejects_bad_arguments():
    import jax.numpy as jnp

    from benchmarks import alt_ops

    x = jnp.zeros((1, 8, 8, 2))
    k = jnp.ones((3, 3, 2)) / 9
    with pytest.raises(ValueError, match="padding_mode"):
        alt_ops.converse2d(x, k, 1e-2, padding=1, padding_mode="mirror")
    with pytest.raises(ValueError, match="layout"):
        alt_ops.converse2d(x, k, 1e-2, layout="hwcn")


@pytest.mark.slow
@pytest.mark.parametrize("name", C.NETWORKS)
def test_alt_networks_equal_library_networks(name):
    """benchmarks.alt_models computes the library model's function (same parameters; the networks
    shrunk as in --quick to keep compilation short)."""
    pytest.importorskip("converse_jax.models", reason="converse_jax.models not available")
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks import alt_models
    from converse_jax import models

    graphdef, state = nnx.split(models.create(name, rngs=nnx.Rngs(0), **C.QUICK_ARCH[name]))
    rng = np.random.default_rng(1)
    # move every parameter off its initial value (alphas start at 0, which would hide branches)
    state = jax.tree_util.tree_map(lambda a: a + 0.05 * rng.standard_normal(a.shape).astype(a.dtype), state)
    cin = C.NET_IO[name][0]
    x = jnp.asarray(rng.random((1, 12, 8, cin), dtype=np.float32))
    k = jnp.asarray(C.blur_kernels(1))

    @jax.jit
    def both(state, x, k):
        model = nnx.merge(graphdef, state)
        if name == "usrnet":
            return model(x, k, sf=1), alt_models.forward(name, model, x, k, 1)
        return model(x), alt_models.forward(name, model, x)

    ref, got = both(state, x, k)
    assert got.shape == ref.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=2e-5 * float(jnp.abs(ref).max()))


# ----------------------------------------------------------------------------- cases and timing

def test_full_cases_are_the_issue_shapes():
    ops = {c["name"]: c for c in C.op_cases(False)}
    a, b, t = ops["dncnn-256"], ops["srresnet-up"], ops["dncnn-train"]
    assert (a["B"], a["C"], a["H"], a["k"], a["scale"], a["padding_mode"], a["padding"]) == \
        (1, 128, 256, 7, 1, "circular", 6)
    assert (b["B"], b["C"], b["H"], b["k"], b["scale"], b["padding_mode"], b["padding"]) == \
        (1, 64, 128, 2, 2, "replicate", 2)
    assert (t["B"], t["C"], t["H"], t["k"], t["scale"]) == (8, 128, 64, 7, 1)
    infer = {c["net"]: c for c in C.infer_cases(False)}
    assert infer["srresnet"]["in_hw"] == 64 and infer["srresnet"]["out_hw"] == 256
    assert all(c["out_hw"] == 256 and c["batch"] == 1 for c in infer.values())
    assert all(c["batch"] == 8 and c["out_hw"] == 64 for c in C.train_cases(False))
    assert [c["out_hw"] for c in C.memory_cases(False)] == [512, 1024]


def test_inputs_are_deterministic_and_well_formed():
    case = C.op_cases(True)[1]
    a, b = C.op_inputs(case), C.op_inputs(case)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_allclose(a["kernel"].sum(axis=(1, 2)), 1.0, rtol=1e-5)
    assert a["cotangent"].shape == (case["B"], case["C"], case["H"] * 2, case["W"] * 2)
    k = C.blur_kernels(3)
    assert k.shape == (3, 7, 7) and np.allclose(k.sum(axis=(1, 2)), 1.0) and (k > 0).all()
    net = C.net_inputs(C.train_cases(True)[1])
    assert net["x"].shape[-1] * 4 == net["target"].shape[-1]


def test_measure_respects_policy():
    calls = []
    r = measure(lambda: calls.append(1), warmup=2, min_repeats=3, max_repeats=5, budget_s=0.0)
    assert r["runs"] == 3 and len(calls) == 2 + 3 and len(r["times_s"]) == 3
    assert r["min_s"] <= r["median_s"] <= r["max_s"]
    calls.clear()
    r = measure(lambda: calls.append(1), warmup=1, min_repeats=1, max_repeats=4, budget_s=1e9)
    assert r["runs"] == 4 and len(calls) == 5
    with pytest.raises(ValueError):
        measure(lambda: None, min_repeats=3, max_repeats=2)


# ----------------------------------------------------------------------------- command line

def _cli(args, capsys):
    from experiments import benchmark

    rc = benchmark.main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_rejects_unknown_section(capsys):
    rc, _, err = _cli(["--only=op,speed"], capsys)
    assert rc == 2 and "speed" in err and "choose from" in err and "Traceback" not in err


def test_cli_rejects_missing_json_folder(tmp_path, capsys):
    rc, _, err = _cli(["--quick", "--no-torch", f"--json={tmp_path / 'nope' / 'r.json'}"], capsys)
    assert rc == 2 and "does not exist" in err


def test_cli_rejects_bad_torch_python(tmp_path, capsys):
    rc, _, err = _cli(["--quick", "--only=op", f"--torch-python={tmp_path / 'python'}"], capsys)
    assert rc == 2 and "--torch-python" in err and "--no-torch" in err


@pytest.mark.slow
def test_cli_quick_op_smoke(tmp_path, capsys):
    path = tmp_path / "report.json"
    path.write_text("previous")
    rc, out, _ = _cli(["--quick", "--only=op", "--no-torch", f"--json={path}"], capsys)
    assert rc == 0
    report = json.loads(path.read_text())
    assert report["meta"]["quick"] and report["meta"]["jax"]["device_count"] >= 1
    rows = report["results"]
    names = {r["name"] for r in rows}
    assert names == {c["name"] for c in C.op_cases(True)}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    timed = [r for r in rows if r["ours"]]
    assert timed and all(r["ours"]["median_s"] > 0 and r["torch"] is None for r in timed)
    assert "dncnn-256" in out and "baseline: none" in out
    assert report["meta"]["cpu"] == cpu_info() and f"cpu: {cpu_summary()}" in out


def test_cpu_info_reads_model_and_vector_extensions(tmp_path):
    text = ("processor\t: 0\nmodel name\t: Example Xeon 8480\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n\n"
            "processor\t: 1\nmodel name\t: Example Xeon 8480\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n")
    (tmp_path / "cpuinfo").write_text(text)
    info = cpu_info(str(tmp_path / "cpuinfo"))
    assert info["cpu"] == "Example Xeon 8480" and info["isa"] == ["avx2", "avx512f", "avx512_bf16", "amx_tile"]
    assert cpu_summary(info).startswith("Example Xeon 8480 (avx2, avx512f, avx512_bf16, amx_tile), ")
    missing = cpu_info(str(tmp_path / "absent"))
    assert missing["cpu"] == "unknown CPU" and missing["isa"] == [] and missing["cores"] >= 1


def test_json_write_is_atomic(tmp_path):
    from benchmarks.suite import write_json_atomic

    path = tmp_path / "r.json"
    path.write_text('{"old": 1}')
    with pytest.raises(TypeError):
        write_json_atomic({"bad": object()}, path)
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    write_json_atomic({"new": 2}, path)
    assert json.loads(path.read_text()) == {"new": 2}


# ----------------------------------------------------------------------------- the official code

def _reference_checkout():
    """The official code's checkout ($CONVERSE_REFERENCE, else third_party/ConverseNet), or skip saying
    how to get it."""
    import os
    from pathlib import Path

    from benchmarks import official

    path = Path(os.environ.get("CONVERSE_REFERENCE") or Path(__file__).resolve().parent.parent / "third_party" /
                "ConverseNet")
    try:
        return official.check_reference(path)
    except official.CheckoutError:
        pytest.skip(f"no checkout of the official code at {path}: `{official.CLONE_HINT}` "
                    "(or set CONVERSE_REFERENCE) to run this test")


# k 2 s 2 replicate (the one-cell path in ours); s 1 circular (the FFT path)
@pytest.mark.parametrize("index", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_official_operator_computes_what_we_time(T, index, tmp_path, x64):
    """The official Converse2D as the benchmark runs it gives our PyTorch baseline's output, and ours
    (JAX) agrees with it in float64 and, in float32, within the official code's own float32 error."""
    import jax
    import jax.numpy as jnp

    from benchmarks.suite import TorchBaseline
    from converse_jax.ops import converse2d_channels_first, lambda_from_bias

    ref = _reference_checkout()
    case = C.op_cases(True)[index]
    base = TorchBaseline(sys.executable, timeout=300, reference=ref)
    outs = {}
    for official in (True, False):
        out = tmp_path / f"{official}.npz"
        res = base.run("op_output", dict(case, out=str(out)), {}, official=official)
        assert "error" not in res, res
        outs[official] = np.load(out)
    assert base.official_info["reference"] == str(ref)
    off32, off64 = outs[True]["float32"], outs[True]["float64"]
    scale = np.abs(off64).max()
    assert off32.shape == (case["B"], case["C"], case["H"] * case["scale"], case["W"] * case["scale"])
    np.testing.assert_allclose(outs[False]["float64"], off64, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(outs[False]["float32"], off32, rtol=0, atol=1e-6 * scale)
    d = C.op_inputs(case)

    @jax.jit  # compiled, as the benchmark times it (and one compilation instead of dozens op by op)
    def converse(x, kernel, bias):
        return converse2d_channels_first(x, kernel, lambda_from_bias(bias, case["eps"]), scale=case["scale"],
                                         padding=case["padding"], padding_mode=case["padding_mode"])

    ours = {}
    for dtype in ("float32", "float64"):
        dd = {k: jnp.asarray(v.astype(dtype)) for k, v in d.items()}
        ours[dtype] = np.asarray(converse(dd["x"], dd["kernel"], dd["bias"]))
    assert ours["float64"].dtype == np.float64
    np.testing.assert_allclose(ours["float64"], off64, rtol=0, atol=1e-9 * scale)
    official_f32_error = np.abs(off32 - off64).max()
    assert np.abs(ours["float32"] - off32).max() <= 2 * official_f32_error + 1e-5 * scale


@pytest.mark.slow
def test_official_network_reproduces_released_golden(T):
    """The official Converse-DnCNN, built and loaded as the benchmark does, gives the golden output
    (which the official code produced): the network timed is the released one."""
    import torch

    from benchmarks import official

    ref = _reference_checkout()
    if not (ref / "model_zoo" / "converse_dncnn.pth").is_file():
        pytest.skip(f"{ref}/model_zoo/converse_dncnn.pth is missing (the checkout's released weights)")
    entry = next(m for m in _index()["models"] if m["checkpoint"] == "converse_dncnn.pth")
    d = np.load(require_asset("golden", entry["file"]))
    net, weights = official.build_network(ref, "dncnn")
    assert weights == "model_zoo/converse_dncnn.pth"
    with torch.no_grad():
        y = official.call_network(net.eval(), "dncnn", {"x": torch.from_numpy(d["input0"])}).numpy()
    # Within float32 rounding of the exact (float64) golden, on the scale of the reference's own float32
    # error: PyTorch's float32 kernels round differently on another CPU (6.5e-5 on an AVX2-only EPYC).
    ref_noise = np.abs(d["y_f32"] - d["y_f64"]).max()
    assert np.abs(y - d["y_f64"]).max() <= max(1e-4, 2 * ref_noise)


def test_check_reference_names_what_is_missing(tmp_path):
    from benchmarks import official

    with pytest.raises(official.CheckoutError, match="git clone https://github.com/cszn/ConverseNet"):
        official.check_reference(tmp_path / "nope")
    with pytest.raises(official.CheckoutError, match="util_converse.py is missing"):
        official.check_reference(tmp_path)
    for rel, needle in official.SIGNATURE.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"{needle}(nn.Module):\n")
    assert official.check_reference(tmp_path) == tmp_path.resolve()
    (tmp_path / "models" / "converse_dncnn.py").write_text("x = 1\n")
    with pytest.raises(official.CheckoutError, match="class ConverseDnCNN"):
        official.check_reference(tmp_path)


def test_cli_rejects_missing_reference(tmp_path, capsys):
    rc, _, err = _cli(["--quick", "--only=op", f"--reference={tmp_path / 'ConverseNet'}"], capsys)
    assert rc == 2 and "git clone https://github.com/cszn/ConverseNet" in err and "Traceback" not in err
    rc, _, err = _cli(["--quick", "--only=op", "--no-torch", f"--reference={tmp_path}"], capsys)
    assert rc == 2 and "--no-torch" in err


def test_result_table_shows_official_column():
    from benchmarks.suite import _result_lines, _row

    row = _row("op", "dncnn-256", "fwd", "B1", "s", {"median_s": 0.1}, {"median_s": 0.5},
               official={"median_s": 0.6})
    assert row["speedup"] == pytest.approx(5.0) and row["speedup_official"] == pytest.approx(6.0)
    lines = _result_lines([row])
    assert "official" in lines[1] and "6.0x" in lines[3] and "than the official code" in lines[-1]
    assert "official" not in _result_lines([_row("op", "a", "fwd", "B1", "s", {"median_s": 1.0}, None)])[1]


# ----------------------------------------------------------------------------- large restoration

def test_large_size_and_image():
    from benchmarks import restore_large as R

    assert R.parse_size("1000x750") == (1000, 750)
    for bad in ("1000", "4x750", "axb"):
        with pytest.raises(ValueError, match="--large-size"):
            R.parse_size(bad)
    a = R.test_image(70, 40, 3)
    assert a.shape == (40, 70, 3) and a.dtype == np.uint8 and a.std() > 10
    np.testing.assert_array_equal(a, R.test_image(70, 40, 3))
    assert R.LARGE_INPUT["full"]["srresnet"] == (1000, 750)  # the issue's 4000x3000 output


def test_cli_large_size_needs_large_section(capsys):
    rc, _, err = _cli(["--quick", "--only=op", "--no-torch", "--large-size=64x48"], capsys)
    assert rc == 2 and "--only" in err


@pytest.mark.slow
def test_large_restore_end_to_end_reports_memory_and_rate():
    """A small image through `python -m experiments.restore` with its defaults: the child's peak RSS
    and the rate are measured, the output size is the network's."""
    require_asset("weights", "converse_dncnn.pth")
    from benchmarks import restore_large as R
    from benchmarks.suite import _subprocess_env

    r = R.run_end_to_end("dncnn", 64, 48, env=_subprocess_env(), log=lambda m: None)
    assert "error" not in r, r
    assert r["output"] == [64, 48] and r["how"] == "whole image"
    assert 50 * 2**20 < r["peak_rss_bytes"] < 8 * 2**30  # a JAX process, not this one's or zero
    assert r["mp_per_s_wall"] > 0 and r["restore_s"] is not None
    lines = R.format_lines({"runs": [r], "tiled_vs_whole": None})
    assert "peak RSS" in lines[-1] and "MP/s" in lines[-1]


@pytest.mark.slow
def test_tiled_vs_whole_counts_output_pixels():
    require_asset("weights", "converse_dncnn.pth")
    from benchmarks import restore_large as R

    policy = {"warmup": 1, "min_repeats": 1, "max_repeats": 1, "budget_s": 0.0}
    r = R.tiled_vs_whole("dncnn", 160, 96, policy, log=lambda m: None)
    # 96-px tiles keep a 64-px core (DnCNN's 16-px context on each side): 3 x 3 tiles cover 160 x 160
    assert r["tiles"] == 9 and r["processed_over_image"] == pytest.approx(9 * 96 * 96 / 160**2)
    for k in ("whole", "tiled"):
        assert r[k]["mp_per_s"] == pytest.approx(160 * 160 / 1e6 / r[k]["median_s"])
    assert r["ratio"] == pytest.approx(r["tiled"]["mp_per_s"] / r["whole"]["mp_per_s"])
    assert "tiles of 96" in R.format_lines({"runs": [], "tiled_vs_whole": r})[-1]
