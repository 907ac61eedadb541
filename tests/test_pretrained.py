"""Released weights in JAX: layout conversion, converted checkpoints, the download cache, the CLI
and the four networks against the reference outputs."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import urllib.error
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import require_asset
from converse_jax.models.spec import Release
from converse_jax.nn import inference_view
from converse_jax.weights import (
    ChecksumMismatchError,
    WeightMismatchError,
    WeightsUnavailableError,
    assign_weights,
    convert_state_dict,
    load_converted,
    load_pretrained,
    load_torch_state_dict,
    make_metadata,
    read_metadata,
    save_converted,
    to_jax_layout,
)
from converse_jax.weights import pretrained as pretrained_mod

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Layout conversion on a toy model (independent of the real networks)
# ---------------------------------------------------------------------------------------------
class _Solver(nnx.Module):
    """Converse2D-shaped parameters: weight (k, k, C), bias (C,)."""

    def __init__(self, c: int, k: int) -> None:
        self.weight = nnx.Param(jnp.zeros((k, k, c)))
        self.bias = nnx.Param(jnp.zeros((c,)))


class _Toy(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.norm = nnx.LayerNorm(3, rngs=rngs)
        self.conv = nnx.Conv(3, 4, (3, 2), rngs=rngs)
        self.solver = _Solver(4, 5)
        self.fc = nnx.Linear(6, 2, rngs=rngs)
        self.alpha = nnx.Param(jnp.zeros((4,)))


def _toy_map(key: str):
    table = {"ln.weight": ("norm", "scale"), "ln.bias": ("norm", "bias"),
             "c.weight": ("conv", "kernel"), "c.bias": ("conv", "bias"),
             "s.weight": ("solver", "weight"), "s.bias": ("solver", "bias"),
             "f.weight": ("fc", "kernel"), "f.bias": ("fc", "bias"), "a": ("alpha",)}
    return table[key]


def _toy_torch_state(rng) -> dict[str, np.ndarray]:
    return {"ln.weight": rng.standard_normal(3).astype(np.float32),
            "ln.bias": rng.standard_normal(3).astype(np.float32),
            "c.weight": rng.standard_normal((4, 3, 3, 2)).astype(np.float32),
            "c.bias": rng.standard_normal(4).astype(np.float32),
            "s.weight": rng.standard_normal((1, 4, 5, 5)).astype(np.float32),
            "s.bias": rng.standard_normal((1, 4, 1, 1)).astype(np.float32),
            "f.weight": rng.standard_normal((2, 6)).astype(np.float32),
            "f.bias": rng.standard_normal(2).astype(np.float32),
            "a": rng.standard_normal((1, 4, 1, 1)).astype(np.float32)}


def test_layouts_compute_what_torch_computes():
    rng = np.random.default_rng(0)
    sd = _toy_torch_state(rng)
    model = _Toy(nnx.Rngs(0))
    assign_weights(model, convert_state_dict(sd, model, _toy_map))
    # convolution: torch's cross-correlation on NCHW with (out, in, kh, kw) weights
    x = rng.standard_normal((1, 3, 6, 5)).astype(np.float32)
    w = sd["c.weight"]
    ref = np.zeros((1, 4, 4, 4), np.float32)
    for i in range(4):
        for j in range(4):
            ref[0, :, i, j] = np.einsum("oihw,ihw->o", w, x[0, :, i:i + 3, j:j + 2])
    ref += sd["c.bias"][None, :, None, None]
    conv = nnx.Conv(3, 4, (3, 2), padding="VALID", rngs=nnx.Rngs(0))
    conv.kernel[...] = model.conv.kernel[...]
    conv.bias[...] = model.conv.bias[...]
    got = np.asarray(conv(jnp.asarray(x.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # linear: x @ W.T + b
    v = rng.standard_normal((2, 6)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(model.fc(jnp.asarray(v))),
                               v @ sd["f.weight"].T + sd["f.bias"], rtol=1e-5, atol=1e-5)
    # Converse2D weight (1, C, k, k) -> (k, k, C); vectors (1, C, 1, 1) -> (C,)
    np.testing.assert_array_equal(np.asarray(model.solver.weight[...])[:, :, 2],
                                  sd["s.weight"][0, 2])
    np.testing.assert_array_equal(np.asarray(model.solver.bias[...]), sd["s.bias"].reshape(-1))
    np.testing.assert_array_equal(np.asarray(model.alpha[...]), sd["a"].reshape(-1))
    np.testing.assert_array_equal(np.asarray(model.norm.scale[...]), sd["ln.weight"])


def test_to_jax_layout_rules():
    a = np.arange(2 * 3 * 1 * 1, dtype=np.float32).reshape(2, 3, 1, 1)
    assert to_jax_layout(a, (1, 1, 3, 2), "kernel").shape == (1, 1, 3, 2)
    # a square 1x1 conv must still be transposed, never copied
    sq = np.arange(9.0).reshape(3, 3, 1, 1)
    np.testing.assert_array_equal(to_jax_layout(sq, (1, 1, 3, 3), "kernel")[0, 0], sq[:, :, 0, 0].T)
    assert to_jax_layout(a, (6,), "kernel") is None
    assert to_jax_layout(np.zeros((1, 4, 1, 1)), (4,), "alpha1").shape == (4,)
    assert to_jax_layout(np.zeros((1, 4, 1, 1)), (5,), "alpha1") is None
    # a (C, D) matrix is never silently reshaped into another matrix
    assert to_jax_layout(np.zeros((3, 4)), (4, 3), "weight") is None


def test_mismatch_lists_everything_in_one_error():
    rng = np.random.default_rng(1)
    sd = _toy_torch_state(rng)
    del sd["ln.bias"], sd["f.bias"]                      # missing
    sd["extra.0.weight"] = np.zeros(2, np.float32)       # unexpected
    sd["extra.1.weight"] = np.zeros(2, np.float32)
    sd["c.weight"] = np.zeros((4, 3, 3, 3), np.float32)  # wrong kernel size
    sd["a"] = np.zeros((1, 5, 1, 1), np.float32)         # wrong channels
    model = _Toy(nnx.Rngs(0))
    before = np.asarray(model.conv.kernel[...]).copy()
    with pytest.raises(WeightMismatchError) as info:
        convert_state_dict(sd, model, lambda k: _toy_map(k), source="toy.pth", model_name="toy")
    err = info.value
    assert sorted(err.missing) == ["fc.bias", "norm.bias"]
    assert sorted(err.unexpected) == ["extra.0.weight", "extra.1.weight"]
    assert len(err.mismatched) == 2
    msg = str(err)
    assert "\n" not in msg
    for part in ("fc.bias", "norm.bias", "extra.{0..1}.weight", "c.weight (4, 3, 3, 3)",
                 "conv.kernel (3, 2, 3, 4)", "a (1, 5, 1, 1)"):
        assert part in msg, part
    np.testing.assert_array_equal(np.asarray(model.conv.kernel[...]), before)


# ---------------------------------------------------------------------------------------------
# Converted (orbax) checkpoints
# ---------------------------------------------------------------------------------------------
def test_orbax_round_trip_keeps_metadata_and_values(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "toy.pth"
    src.write_bytes(b"any bytes stand for the source file")
    weights = {("blocks", "0", "conv", "kernel"): rng.standard_normal((1, 1, 3, 4)).astype(
        np.float32), ("blocks", "1", "alpha"): rng.standard_normal(4),
        ("head", "bias"): np.arange(3, dtype=np.float32)}
    meta = make_metadata("toy", src)
    out = save_converted(tmp_path / "ckpt", weights, meta)
    got, got_meta = load_converted(out)
    assert got_meta["model"] == "toy" and got_meta["source_file"] == "toy.pth"
    assert got_meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert got_meta["converse_jax_version"] == meta["converse_jax_version"]
    assert set(got) == set(weights)
    for k, v in weights.items():
        assert got[k].dtype == v.dtype
        np.testing.assert_array_equal(got[k], v)
    assert read_metadata(out) == got_meta
    # no temporary directories are left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "toy.pth"]


def test_orbax_save_never_clobbers(tmp_path):
    w = {("a",): np.ones(2, np.float32)}
    meta = {"model": "toy", "source_file": "x", "source_sha256": "0", "converse_jax_version": "0"}
    out = save_converted(tmp_path / "ck", w, meta)
    with pytest.raises(FileExistsError, match="already exists"):
        save_converted(out, {("a",): np.zeros(2, np.float32)}, meta)
    np.testing.assert_array_equal(load_converted(out)[0][("a",)], 1)
    save_converted(out, {("a",): np.full(2, 3, np.float32)}, meta, overwrite=True)
    np.testing.assert_array_equal(load_converted(out)[0][("a",)], 3)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a converted"):
        save_converted(precious, w, meta, overwrite=True)
    assert (precious / "thesis.tex").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "precious"]


# ---------------------------------------------------------------------------------------------
# Download into the cache (no network: a replaced opener serves bytes)
# ---------------------------------------------------------------------------------------------
class _Response(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


class _FakeSpec:
    def __init__(self, release: Release) -> None:
        self.release = release


@pytest.fixture
def served(monkeypatch, tmp_path):
    """A fake model 'toy' whose release is served from memory; returns (calls, set_payload)."""
    blob = b"released weights " * 1000
    release = Release("toy.pth", hashlib.sha256(blob).hexdigest(),
                      "https://example.invalid/toy.pth")
    monkeypatch.setattr(pretrained_mod, "_spec", lambda name: _FakeSpec(release))
    monkeypatch.setenv("CONVERSE_JAX_CACHE", str(tmp_path / "cache"))
    state = {"payload": blob, "calls": []}

    def opener(url, timeout=60.0):
        state["calls"].append(url)
        payload = state["payload"]
        if isinstance(payload, Exception):
            raise payload
        return payload() if callable(payload) else _Response(payload)

    monkeypatch.setattr(pretrained_mod, "_open_url", opener)
    return state, blob, tmp_path / "cache"


def test_download_verifies_and_caches(served):
    state, blob, cache = served
    path = pretrained_mod.fetch_release("toy", progress=False)
    assert path == cache / "toy.pth" and path.read_bytes() == blob
    assert state["calls"] == ["https://example.invalid/toy.pth"]
    assert pretrained_mod.fetch_release("toy", progress=False) == path  # served from cache
    assert len(state["calls"]) == 1
    assert sorted(p.name for p in cache.iterdir()) == ["toy.pth"]


def test_checksum_mismatch_leaves_nothing(served):
    state, blob, cache = served
    state["payload"] = blob[:-1] + b"X"
    with pytest.raises(ChecksumMismatchError, match="nothing was saved"):
        pretrained_mod.fetch_release("toy", progress=False)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_offline_error_says_where_to_put_the_file(served):
    state, _, cache = served
    state["payload"] = urllib.error.URLError("no network")
    with pytest.raises(WeightsUnavailableError) as info:
        pretrained_mod.fetch_release("toy", progress=False)
    msg = str(info.value)
    assert "toy.pth" in msg and str(cache / "toy.pth") in msg and "no network" in msg
    assert list(cache.iterdir()) == []
    with pytest.raises(WeightsUnavailableError, match="not in the cache"):
        pretrained_mod.fetch_release("toy", download=False)


def test_corrupt_cached_file_is_reported_not_deleted(served):
    _, _, cache = served
    cache.mkdir(parents=True)
    (cache / "toy.pth").write_bytes(b"half a file")
    with pytest.raises(ChecksumMismatchError, match="delete it"):
        pretrained_mod.fetch_release("toy", progress=False)
    assert (cache / "toy.pth").read_bytes() == b"half a file"


def test_broken_download_leaves_nothing(served):
    state, blob, cache = served

    class _Broken(_Response):
        def read(self, n=-1):
            if self.tell() > 100:
                raise ConnectionResetError("reset by peer")
            return super().read(n)

    state["payload"] = lambda: _Broken(blob)
    with pytest.raises(WeightsUnavailableError, match="broke off"):
        pretrained_mod.fetch_release("toy", progress=False)
    assert list(cache.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The four released networks
# ---------------------------------------------------------------------------------------------
NETWORKS = {  # registry name -> (released file, golden file)
    "dncnn": ("converse_dncnn.pth", "model_converse_dncnn.npz"),
    "srresnet": ("converse_srresnet.pth", "model_converse_srresnet.npz"),
    "conversenet": ("conversenet.pth", "model_conversenet.npz"),
    "usrnet": ("converse_usrnet.pth", "model_converse_usrnet.npz"),
}


def _run_golden(model, name: str, golden, dtype) -> np.ndarray:
    """The model on the golden inputs (NCHW -> NHWC and back), jitted (cheaper than eager)."""
    x = jnp.asarray(golden["input0"].transpose(0, 2, 3, 1), dtype)
    if name == "usrnet":
        k = jnp.asarray(golden["input1"][:, 0], dtype)  # (N, 1, 7, 7) -> (N, 7, 7)
        y = nnx.jit(lambda m, x, k: m(x, k, 1))(model, x, k)
    else:
        y = nnx.jit(lambda m, x: m(x))(model, x)
    assert y.dtype == dtype
    return np.asarray(y).transpose(0, 3, 1, 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NETWORKS))
def test_released_network_float64_matches_reference(name, x64):  # x64: conftest fixture
    weights, golden_file = NETWORKS[name]
    golden = np.load(require_asset("golden", golden_file))
    model = load_pretrained(name, require_asset("weights", weights), dtype=jnp.float64)
    y = _run_golden(model, name, golden, jnp.float64)
    assert y.shape == golden["y_f64"].shape
    assert np.abs(y - golden["y_f64"]).max() <= 1e-8
    # what the restorers run: the blocks' hidden channels in groups (the same function, sums reordered)
    y = _run_golden(inference_view(model), name, golden, jnp.float64)
    assert np.abs(y - golden["y_f64"]).max() <= 1e-8


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NETWORKS))
def test_released_network_float32_matches_reference(name):
    weights, golden_file = NETWORKS[name]
    golden = np.load(require_asset("golden", golden_file))
    model = load_pretrained(name, require_asset("weights", weights))
    y = _run_golden(model, name, golden, jnp.float32)
    assert np.abs(y - golden["y_f64"]).max() <= 5e-5


def _params(model) -> dict:
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}


def test_one_network_loaded_as_another_lists_everything():
    with pytest.raises(WeightMismatchError) as info:
        load_pretrained("usrnet", require_asset("weights", "conversenet.pth"))
    err = info.value
    assert "data_alpha" in err.missing and "kernelnet.fc1.kernel" in err.missing
    assert "prior.3.alpha1" in err.missing
    msg = str(err)
    assert "\n" not in msg and "conversenet.pth" in msg and "prior.{0..6}.alpha1" in msg
    with pytest.raises(WeightMismatchError) as info:
        load_pretrained("srresnet", require_asset("weights", "converse_dncnn.pth"))
    err = info.value
    assert len(err.unexpected) == len(load_torch_state_dict(
        require_asset("weights", "converse_dncnn.pth")))
    assert "body.15.mixer.weight" in err.missing
    assert "m_body.{0..19}.conv1.3.weight" in str(err) and "body.{0..15}.mixer.weight" in str(err)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        load_pretrained("resnet50", "x.pth")
    if not jax.config.jax_enable_x64:
        with pytest.raises(ValueError, match="jax_enable_x64"):
            load_pretrained("dncnn", "x.pth", dtype=jnp.float64)
    with pytest.raises(ValueError, match="float32 or float64"):
        load_pretrained("dncnn", "x.pth", dtype=jnp.int32)


def test_safetensors_and_converted_checkpoint_load_the_same_model(tmp_path, capsys):
    from safetensors.numpy import save_file

    from experiments.convert import main as convert_main

    pth = require_asset("weights", "conversenet.pth")
    reference = _params(load_pretrained("conversenet", pth))
    st = tmp_path / "conversenet.safetensors"
    save_file(load_torch_state_dict(pth), str(st))
    from_st = _params(load_pretrained("conversenet", st))
    out = tmp_path / "converted"
    assert convert_main(["--model=conversenet", f"--weights={pth}", f"--out={out}"]) == 0
    assert "wrote" in capsys.readouterr().out
    meta = read_metadata(out)
    assert meta["model"] == "conversenet" and meta["source_file"] == "conversenet.pth"
    expected_sha = dict(reversed(line.split()) for line in
                        require_asset("weights", "SHA256SUMS").read_text().splitlines())
    assert meta["source_sha256"] == expected_sha["conversenet.pth"]
    from_dir = _params(load_pretrained("conversenet", out))
    assert set(reference) == set(from_st) == set(from_dir)
    for k, v in reference.items():
        np.testing.assert_array_equal(from_st[k], v)
        np.testing.assert_array_equal(from_dir[k], v)
    with pytest.raises(WeightMismatchError, match="not 'usrnet'"):
        load_pretrained("usrnet", out)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from experiments.convert import main as convert_main

    pth = require_asset("weights", "conversenet.pth")
    cases = [
        ["--model=resnet", f"--weights={pth}", f"--out={tmp_path / 'a'}"],       # unknown model
        ["--model=dncnn", f"--weights={tmp_path / 'nope.pth'}", f"--out={tmp_path / 'b'}"],
        ["--model=usrnet", f"--weights={pth}", f"--out={tmp_path / 'c'}"],       # wrong network
        ["--model=conversenet", f"--weights={tmp_path}", f"--out={tmp_path / 'd'}"],
    ]
    for argv in cases:
        assert convert_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("python -m experiments.convert: error:"), err
    assert not any((tmp_path / n).exists() for n in "abcd")
    out = tmp_path / "ok"
    assert convert_main(["--model=conversenet", f"--weights={pth}", f"--out={out}"]) == 0
    before = read_metadata(out)
    assert convert_main(["--model=conversenet", f"--weights={pth}", f"--out={out}"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert convert_main(["--model=conversenet", f"--weights={pth}", f"--out={out}", "--force"]) == 0
    assert read_metadata(out)["source_sha256"] == before["source_sha256"]
    # argparse errors too: one line, exit 2, no traceback
    proc = subprocess.run([sys.executable, "-m", "experiments.convert", "--model=dncnn"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "required" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_load_pretrained_from_cache_and_download(monkeypatch, tmp_path):
    pth = require_asset("weights", "conversenet.pth")
    blob = pth.read_bytes()
    cache = tmp_path / "cache"
    monkeypatch.setenv("CONVERSE_JAX_CACHE", str(cache))
    monkeypatch.setenv("CONVERSE_ASSETS", str(tmp_path / "no_assets"))  # else ../shared/weights comes first
    calls = []

    def opener(url, timeout=60.0):
        calls.append(url)
        return _Response(blob)

    monkeypatch.setattr(pretrained_mod, "_open_url", opener)
    model = load_pretrained("conversenet", progress=False)
    assert calls and calls[0].endswith("/conversenet.pth")
    assert (cache / "conversenet.pth").read_bytes() == blob
    reference = _params(load_pretrained("conversenet", pth))
    for k, v in _params(model).items():
        np.testing.assert_array_equal(v, reference[k])
    load_pretrained("conversenet", progress=False)  # second time: from the cache
    assert len(calls) == 1
    # the registry's checksum guards the cache: a tampered download is not kept
    other = tmp_path / "other"
    monkeypatch.setenv("CONVERSE_JAX_CACHE", str(other))
    monkeypatch.setattr(pretrained_mod, "_open_url",
                        lambda url, timeout=60.0: _Response(blob[:-10] + bytes(10)))
    with pytest.raises(ChecksumMismatchError):
        load_pretrained("conversenet", progress=False)
    assert not other.exists() or list(other.iterdir()) == []


def test_load_pretrained_is_exported_at_top_level():
    import converse_jax

    assert converse_jax.load_pretrained is load_pretrained


def test_registry_release_entries_match_shared_checksums():
    from converse_jax import models

    sums = dict(reversed(line.split()) for line in
                require_asset("weights", "SHA256SUMS").read_text().splitlines())
    for name, (weights, _) in NETWORKS.items():
        release = models.get_spec(name).release
        assert release.filename == weights
        assert release.sha256 == sums[weights]
        assert release.url.startswith("https://") and release.url.endswith("/" + weights)


_SAVE_SHARDED = """
import sys
import jax, jax.numpy as jnp, orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec
from converse_jax.weights.checkpoint import FORMAT, FORMAT_VERSION, _checkpointer
mesh = jax.make_mesh((4,), ("data",))
x = jax.device_put(jnp.arange(6.0), NamedSharding(mesh, PartitionSpec()))
meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": "dncnn"}
_checkpointer().save(sys.argv[1], ocp.args.Composite(params=ocp.args.StandardSave({"head": {"bias": x}}),
                                                     metadata=ocp.args.JsonSave(meta)))
"""


def test_a_checkpoint_written_from_four_devices_loads_on_one(tmp_path):
    """Arrays saved with a 4-device sharding come back as host arrays in a 1-device process."""
    target = tmp_path / "ckpt"
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", _SAVE_SHARDED, str(target)], check=True, env=env, timeout=300)
    weights, meta = load_converted(target)
    assert meta["model"] == "dncnn"
    np.testing.assert_array_equal(weights[("head", "bias")], np.arange(6.0))
    assert isinstance(weights[("head", "bias")], np.ndarray)
