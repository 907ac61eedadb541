"""The Task objects: training degradations, protocol pairs, the network call and its jitted form, scores,
and the layering that keeps them at the bottom of the package."""

import ast
import pickle
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import ndimage

from converse_jax import degradations as D
from converse_jax import metrics as M
from converse_jax import tasks as T
from converse_jax.models import get_spec, list_models
from converse_jax.models.spec import EvalProtocol, TrainRecipe

REPO = Path(__file__).resolve().parent.parent
GRAY = EvalProtocol(dataset="set12", color="gray", border=0, metric="rgb", sigma=25.0)
RGB = EvalProtocol(dataset="set5", color="rgb", border=4, metric="y", scale=4, modcrop=4)


def _patch(channels=3, size=16, seed=0):
    return np.random.default_rng(seed).random((size, size, channels)).astype(np.float32)


# ----------------------------------------------------------------------------------------
# Identity


def test_tasks_by_name_pickle_to_themselves_and_compare():
    assert [t.name for t in T.TASKS] == ["denoise", "sr", "deblur", "deblur_nonblind"]
    for task in T.TASKS:
        assert T.get_task(task.name) is task and T.get_task(task) is task
        assert pickle.loads(pickle.dumps(task)) is task
        assert str(task) == task.name and task.label
    assert T.DEBLUR != T.DEBLUR_NONBLIND and len(set(T.TASKS)) == 4
    assert T.NonBlindDeblurring() == T.DEBLUR_NONBLIND and hash(T.NonBlindDeblurring()) == hash(T.DEBLUR_NONBLIND)
    with pytest.raises(ValueError, match="unknown task 'inpaint': expected one of denoise, sr"):
        T.get_task("inpaint")


def test_properties_other_modules_ask():
    assert [t.takes_kernel for t in T.TASKS] == [False, False, False, True]
    assert [t.uses_kernels for t in T.TASKS] == [False, False, True, True]
    assert [t.uses_sigma for t in T.TASKS] == [True, False, False, False]
    assert [t.size_multiple(4) for t in T.TASKS] == [1, 4, 1, 1]
    assert [t.protocol_label(RGB) for t in T.TASKS] == ["sigma 0", "x4", "", ""]
    recipe = TrainRecipe(patch_size=8, batch_size=1, steps=1, lr=1.0, sigma=(0.0, 50.0), blur_noise=(0.0, 2.55))
    assert [t.recipe_noise(recipe) for t in T.TASKS] == ["sigma 0-50", "", "blur noise 0-2.55", "blur noise 0-2.55"]


def test_registry_entries_hold_task_objects():
    for name in list_models():
        assert get_spec(name).task in T.TASKS
    assert get_spec("usrnet").task is T.DEBLUR_NONBLIND and get_spec("srresnet").task is T.SR


# ----------------------------------------------------------------------------------------
# Training degradations: the arithmetic of the previous inline implementation, draw for draw


def test_denoise_sample_is_target_plus_drawn_noise():
    target = _patch()
    settings = T.Degradation.make(sigma=(0, 50))
    got = T.DENOISE.train_sample(target, np.random.default_rng(3), settings)
    rng = np.random.default_rng(3)
    s = rng.uniform(0, 50) / 255.0
    np.testing.assert_array_equal(got["input"], (target + rng.normal(0.0, s, target.shape)).astype(np.float32))
    assert got["target"] is target and got["input"].dtype == np.float32 and set(got) == {"input", "target"}


@pytest.mark.parametrize("task", [T.DEBLUR, T.DEBLUR_NONBLIND], ids=str)
def test_deblur_sample_is_blur_then_noise_with_the_drawn_kernel(task):
    target = _patch(seed=1)
    got = task.train_sample(target, np.random.default_rng(5), T.Degradation.make(blur_noise="1,3"))
    rng = np.random.default_rng(5)
    kernel = D.random_kernel(rng, 7)
    s = rng.uniform(1, 3) / 255.0
    blurred = ndimage.convolve(target.astype(np.float64), kernel.astype(np.float64)[..., None], mode="wrap")
    want = (blurred.astype(np.float32) + rng.normal(0.0, s, target.shape)).astype(np.float32)
    np.testing.assert_array_equal(got["input"], want)
    assert ("kernel" in got) == task.takes_kernel
    if task.takes_kernel:
        np.testing.assert_array_equal(got["kernel"], kernel)


def test_sr_sample_is_the_bicubic_downscale():
    target = _patch(size=12)
    got = T.SR.train_sample(target, np.random.default_rng(0), T.Degradation.make(scale=3))
    assert got["input"].shape == (4, 4, 3) and got["input"].dtype == np.float32
    np.testing.assert_array_equal(got["input"], D.imresize(target, 1 / 3))


@pytest.mark.parametrize("kw,match", [
    (dict(sigma=(30, 10)), "sigma"), (dict(blur_noise="x"), "blur_noise"), (dict(scale=0), "scale"),
    (dict(scale=True), "scale"),
])
def test_degradation_settings_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        T.Degradation.make(**kw)


# ----------------------------------------------------------------------------------------
# Protocol pairs, scores


def test_protocol_pair_rejects_non_uint8_ground_truth():
    for task in T.TASKS:
        with pytest.raises(ValueError, match="uint8"):
            task.protocol_pair(np.zeros((8, 8, 1), np.float32), GRAY, np.ones((3, 3)) / 9)


def test_score_crops_the_border_and_adds_y_for_rgb():
    rng = np.random.default_rng(2)
    gt = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    out = np.clip(gt.astype(int) + rng.integers(-9, 10, gt.shape), 0, 255).astype(np.uint8)
    got = T.SR.score(out, gt, RGB)
    assert got == M.image_metrics(out, gt, border=4, y_channel=True) and "psnr_y" in got
    gray = T.DENOISE.score(out[..., :1], gt[..., :1], GRAY)
    assert set(gray) == {"psnr", "ssim"} and gray["psnr"] == M.psnr(out[..., :1], gt[..., :1])


# ----------------------------------------------------------------------------------------
# The network call


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((len(args), sorted(kwargs.items())))
        return args[0]


def test_forward_calls_each_network_with_its_signature():
    batch = {"input": np.zeros((1, 4, 4, 3)), "kernel": np.zeros((1, 3, 3))}
    for task in (T.DENOISE, T.SR, T.DEBLUR):
        rec = _Recorder()
        task.forward(rec, batch)
        assert rec.calls == [(1, [])]
        with pytest.raises(ValueError, match="non-blind models only"):
            task.forward(rec, batch, sf=2)
    rec = _Recorder()
    T.DEBLUR_NONBLIND.forward(rec, batch, sf=2)
    assert rec.calls == [(2, [("sf", 2)])]


class _Scale(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.asarray(2.0))
        self.count = nnx.BatchStat(jnp.asarray(1.0))

    def __call__(self, x, kernel=None, sf=1):
        y = x * self.w[...] * self.count[...]
        return y if kernel is None else y * sf + kernel.sum()


def test_jit_forward_reads_the_weights_it_is_given():
    model = _Scale()
    x = np.ones((1, 2, 2, 1), np.float32)
    fwd = T.jit_forward(T.DENOISE, model)
    np.testing.assert_allclose(fwd(nnx.state(model), {"input": x}), 2 * x)
    model.w[...] = jnp.asarray(5.0)
    np.testing.assert_allclose(fwd(nnx.state(model), {"input": x}), 5 * x)  # same compiled function
    nb = T.jit_forward(T.DEBLUR_NONBLIND, model)
    k = np.full((1, 2, 2), 0.25, np.float32)
    np.testing.assert_allclose(nb(nnx.state(model), {"input": x, "kernel": k}, sf=2), 5 * x * 2 + 1.0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # a graph and a tuple of states
    rest["count"][...] = jnp.asarray(3.0)
    np.testing.assert_allclose(T.jit_forward(T.DENOISE, graphdef)((params, rest), {"input": x}), 15 * x)


# ----------------------------------------------------------------------------------------
# Layering: tasks and the other bottom modules import nothing above them; no model module
# imports the registry; task names are spelled in the task module only


def _imports(path):
    """Every module a file imports, at any depth (function bodies included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in out if m.startswith("converse_jax.")}


@pytest.mark.parametrize("module", ["tasks", "degradations", "imageio", "metrics"])
def test_bottom_modules_import_nothing_above_them(module):
    above = ("models", "nn", "data", "train", "evaluation", "weights", "ops")
    bad = {m for m in _imports(REPO / "converse_jax" / f"{module}.py") if m.split(".")[1] in above}
    assert not bad, f"{module} imports {bad}"
    if module == "degradations":
        assert not {m for m in _imports(REPO / "converse_jax" / "degradations.py")
                    if m.split(".")[1] in ("imageio", "metrics", "tasks")}


def test_no_model_module_imports_the_registry():
    for path in (REPO / "converse_jax" / "models").glob("*.py"):
        if path.stem not in ("registry", "__init__"):
            assert not any("registry" in m for m in _imports(path)), path.name


def test_task_names_are_spelled_only_in_the_task_module():
    pattern = re.compile(r"""['"](denoise|sr|deblur|deblur_nonblind)['"]""")
    files = [*(REPO / "converse_jax").rglob("*.py"), *(REPO / "experiments").rglob("*.py")]
    hits = [f"{p.relative_to(REPO)}:{i}" for p in files if p.name != "tasks.py"
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, f"task names outside converse_jax/tasks.py: {hits}"
