"""The Colab notebooks: valid nbformat, committed without outputs, and runnable top to bottom.

Execution uses the small setting (``CONVERSE_NOTEBOOK_SMALL=1``: tiny crops, a tiny network, a
few training steps) on the CPU, through nbclient with the ``python3`` kernel of this interpreter.
The training notebook runs over two virtual CPU devices, so its batch really is split.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import require_asset

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
NAMES = ("quickstart.ipynb", "train_tpu.ipynb")
MARK = "__NOTEBOOK_TEST__"
DEVICES = 2  # virtual CPU devices for the training notebook


def _nbformat() -> Any:
    return pytest.importorskip("nbformat", reason="nbformat is not installed (pip install nbformat)")


def _read(name: str) -> Any:
    path = NOTEBOOKS / name
    assert path.is_file(), f"{path} is missing"
    return _nbformat().read(path, as_version=4)


def _code(nb: Any) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_valid_and_without_outputs(name: str) -> None:
    nb = _read(name)
    _nbformat().validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: code cell {i} has committed outputs: clear them"
            assert cell.execution_count is None, f"{name}: code cell {i} has an execution count: clear it"
    # One clearly marked install location, at the top.
    first = _code(nb)[0]
    assert re.search(r'^REPO_URL = "https://github\.com/[^"]+/converse_jax"$', first, re.M), first
    assert sum("REPO_URL =" in src for src in _code(nb)) == 1
    assert "colab.research.google.com/github/" in nb.cells[0].source
    # Nothing tied to the CI machine: no float64 and no hard-coded device count.
    text = "\n".join(_code(nb))
    for banned in ("float64", "jax_enable_x64", "xla_force_host_platform_device_count", "JAX_PLATFORMS"):
        assert banned not in text, f"{name} mentions {banned}"
    assert not re.search(r"devices\(\)\[\d", text), f"{name} indexes a fixed device"


def _kernel_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JUPYTER_PATH")}
    env.update(CONVERSE_NOTEBOOK_SMALL="1", JAX_PLATFORMS="cpu", CONVERSE_JAX_CACHE=str(tmp_path / "cache"))
    env.update(extra)
    return env


def _execute(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, probe: str,
             **extra_env: str) -> tuple[Any, dict[str, Any]]:
    """Run notebook ``name`` in ``tmp_path`` with ``probe`` appended; returns the executed notebook and
    the JSON the probe printed after the marker."""
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install nbclient)")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed in this environment "
                                            "(pip install ipykernel)")
    nbformat = _nbformat()
    # Resolve the python3 kernel from this environment only (not a kernel registered elsewhere);
    # jupyter_client starts it with sys.executable.
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter"))
    monkeypatch.delenv("JUPYTER_PATH", raising=False)
    nb = _read(name)
    nb.cells.append(nbformat.v4.new_code_cell(probe))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=900, allow_errors=False,
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute(env=_kernel_env(tmp_path, **extra_env))
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{name} failed:\n{exc}")
    texts = [out.get("text", "") for out in nb.cells[-1].outputs if out.get("output_type") == "stream"]
    line = next((ln for t in texts for ln in t.splitlines() if ln.startswith(MARK)), None)
    assert line is not None, f"{name}: the probe printed nothing: {texts}"
    info = json.loads(line[len(MARK):])
    assert Path(info["prefix"]).resolve() == Path(sys.prefix).resolve(), \
        f"the kernel ran in {info['prefix']}, not in this environment ({sys.prefix})"
    return nb, info


def _images(nb: Any) -> int:
    return sum(1 for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
               if "image/png" in out.get("data", {}))


def test_quickstart_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = require_asset("weights")
    for name in ("converse_dncnn.pth", "converse_srresnet.pth", "conversenet.pth", "converse_usrnet.pth"):
        require_asset("weights", name)
    probe = (f"import json, sys\nprint({MARK!r} + json.dumps({{'prefix': sys.prefix, 'results': RESULTS, "
             "'weights': {k: [str(w.path), w.source] for k, w in WEIGHTS.items()}, 'nets': sorted(nets)}))")
    # The notebook uses the library's lookup: with CONVERSE_ASSETS set, every file comes from its weights/.
    nb, info = _execute("quickstart.ipynb", tmp_path, monkeypatch, probe, CONVERSE_ASSETS=str(weights.parent))
    assert {k: src for k, (_, src) in info["weights"].items()} == dict.fromkeys(info["nets"], "assets folder")
    assert all(Path(path).parent.resolve() == weights.resolve() for path, _ in info["weights"].values())
    assert info["nets"] == ["conversenet", "dncnn", "srresnet", "usrnet"]
    results = info["results"]
    assert set(results) == {"denoise", "sr", "deblur", "deblur_nonblind"}
    for task, (before, after) in results.items():
        assert after > before, f"{task}: the released network made the image worse ({before:.2f} -> {after:.2f} dB)"
    # sigma 25 noise is ~20 dB; the released denoiser gains far more than a few dB
    assert results["denoise"][1] - results["denoise"][0] > 4.0, results["denoise"]
    # the non-blind network knows the kernel: it should beat the blind one
    assert results["deblur_nonblind"][1] > results["deblur"][1], results
    assert _images(nb) >= 4, "the before/after figures were not displayed"
    assert not (tmp_path / "cache").exists(), "weights were fetched into the cache although a folder was given"


def test_train_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workdir = tmp_path / "run"
    probe = (f"import json, sys\nprint({MARK!r} + json.dumps({{'prefix': sys.prefix, 'devices': jax.device_count(), "
             "'global_batch': GLOBAL_BATCH, 'per_device': PER_DEVICE_BATCH, 'steps': STEPS, 'extra': EXTRA_STEPS, "
             "'start': result.start_step, 'step': result.step, 'val_psnr': result.val_psnr, "
             "'restored_psnr': val_psnr, 'input_psnr': input_psnr, 'checkpoint': str(checkpoint), "
             "'exported': str(exported), 'arch': ARCH, 'losses': [loss for _, loss in train_log], "
             "'report': report.to_dict()}))")
    nb, info = _execute("train_tpu.ipynb", tmp_path, monkeypatch, probe, CONVERSE_NOTEBOOK_WORKDIR=str(workdir),
                        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
    assert info["devices"] == DEVICES
    assert info["global_batch"] == info["per_device"] * DEVICES
    final = info["steps"] + info["extra"]
    assert info["start"] == info["steps"] and info["step"] == final
    # the checkpoint of the last step, restored, reproduces the validation PSNR of training
    assert Path(info["checkpoint"]) == workdir / "checkpoints" / str(final)
    assert abs(info["restored_psnr"] - info["val_psnr"]) < 0.01
    from converse_jax.weights.checkpoint import is_converted_checkpoint, read_metadata

    assert is_converted_checkpoint(info["exported"]) and read_metadata(info["exported"])["model"] == "dncnn"
    # one logged loss per step over both sessions (log every step in the small setting)
    losses = info["losses"]
    assert len(losses) == final and all(np.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < sum(losses[:5]), f"the loss did not decrease: {losses}"
    report = info["report"]
    assert report["model"] == "dncnn" and len(report["per_image"]) >= 1
    assert all(r["psnr"] > 0 for r in report["per_image"])
    assert _images(nb) >= 2, "the loss curves and sample grid were not displayed"
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["steps"] == final and saved["model_kwargs"] == info["arch"]
