"""Training library and command line: learning, data parallelism, checkpoints, resume, errors.

Everything runs tiny networks (4-8 features, one block) on tiny patches.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import require_asset
from converse_jax.data import make_train_loader
from converse_jax.imageio import read_image, write_image
from converse_jax.models import create, get_spec, list_models
from converse_jax.nn import BlockStack
from converse_jax.train import (
    CheckpointStore,
    IncompatibleWorkdirError,
    NonFiniteLossError,
    Optimizer,
    TrainConfig,
    config_from_spec,
    export_params,
    full_state,
    host_params,
    init_train_state,
    make_data_mesh,
    make_optimizer,
    make_predict,
    make_train_step,
    mode_view,
    prepare_workdir,
    replicate,
    replicated,
    shard_batch,
    split_state,
    train,
)
from converse_jax.train import loop as loop_module

# load_converted reads the arrays back to the host without a sharding: intended here
pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided")

REPO = Path(__file__).resolve().parent.parent
# srresnet at x2 (one Converse2D upsampler): it compiles twice as fast as at x4
TINY = {"dncnn": dict(features=8, num_blocks=1), "srresnet": dict(features=8, num_blocks=1, upscale=2),
        "conversenet": dict(features=8, num_blocks=1, num_iterations=1),
        "usrnet": dict(features=8, num_blocks=1, num_iterations=1), "dncnn_original": dict(features=8, num_blocks=1)}
TINY_ARCH = "features=4,num_blocks=1"
FOUR = ("dncnn", "srresnet", "conversenet", "usrnet")  # the paper's networks
QUIET = dict(progress=False, echo=lambda s: None)


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
    """The subprocesses share one compilation cache (not the user's)."""
    global _CACHE
    _CACHE = str(tmp_path_factory.mktemp("xla_cache"))
    yield


_CACHE = "off"


def _env(devices: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS")}
    env["JAX_PLATFORMS"] = "cpu"
    env["CONVERSE_JAX_COMPILE_CACHE"] = _CACHE
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the many small programs of building the network too
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "experiments.train", *args]


def _tiny_flags(workdir: Path, steps: int, **extra: str) -> list[str]:
    flags = {"model": "dncnn", "arch": TINY_ARCH, "steps": str(steps), "batch-size": "2", "patch-size": "16",
             "save-every": "2", "eval-every": "1000000", "log-every": "1", "val-count": "1", "val-size": "16",
             "workdir": str(workdir)}
    flags.update(extra)
    return [f"--{k}={v}" for k, v in flags.items()] + ["--no-progress"]


def _metrics(workdir: Path) -> dict[int, float]:
    losses: dict[int, float] = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            assert rec["step"] not in losses, f"step {rec['step']} logged twice"
            losses[rec["step"]] = rec["loss"]
    return losses


def _params(checkpoint: Path) -> dict:
    from converse_jax.weights import load_converted

    weights, meta = load_converted(checkpoint)
    return weights


def _fixed_batch(name: str, batch_size: int = 2, patch: int = 16) -> dict:
    spec = get_spec(name)
    scale = TINY.get(name, {}).get("upscale", spec.scale)
    with make_train_loader(spec.task, None, patch_size=patch, batch_size=batch_size, seed=0,
                           channels=spec.in_channels, scale=scale) as loader:
        return next(loader)


def _run_steps(name: str, batch: dict, steps: int, lr: float, num_devices: int = 1,
               with_extra: bool = False) -> tuple[list, dict]:
    model = create(name, rngs=0, **TINY[name])
    tx = make_optimizer(config_from_spec(name, lr=lr, lr_milestones=())).tx
    mesh = make_data_mesh(num_devices)
    step = make_train_step(model, tx, get_spec(name).task, "l1", mesh)
    params, extra = split_state(model)
    state = replicate(jax.device_get(init_train_state(params, tx, extra=extra)), mesh)
    global_batch = shard_batch(batch, mesh)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, global_batch)
        assert bool(metrics["finite"])
        losses.append(float(metrics["loss"]))
    if with_extra:
        return losses, jax.device_get(state)
    return losses, jax.device_get(state["params"])


# ----------------------------------------------------------------------------------------------
# Learning and data parallelism


@pytest.mark.parametrize("name", FOUR)
def test_few_steps_lower_the_loss_on_a_fixed_batch(name):
    # srresnet starts from its bilinear skip (a low loss) and needs a larger step
    losses, _ = _run_steps(name, _fixed_batch(name), steps=15, lr=5e-3 if name == "srresnet" else 3e-3)
    assert all(np.isfinite(losses))
    assert min(losses[-3:]) < 0.9 * losses[0], losses


def test_batchnorm_statistics_are_carried_by_the_train_step():
    """A baseline with BatchNorm (if registered): batch statistics in training, running ones updated."""
    if "dncnn_original" not in list_models():
        pytest.skip("no BatchNorm model registered")
    losses, state = _run_steps("dncnn_original", _fixed_batch("dncnn_original"), steps=3, lr=1e-2,
                               with_extra=True)
    before = split_state(create("dncnn_original", rngs=0, **TINY["dncnn_original"]))[1]["norms"][0]
    after = state["extra"]["norms"][0]
    assert not np.allclose(np.asarray(before["mean"]), np.asarray(after["mean"]))
    assert losses[-1] < losses[0]


def test_training_view_uses_batch_statistics_and_unrolls_the_blocks():
    """mode_view: BatchNorm on batch statistics and Converse blocks unrolled in training, the opposite in
    evaluation; the train step runs the training view, predict the evaluation view."""
    def batch_statistics(model):
        return [not m.use_running_average for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]

    baseline = create("dncnn_original", rngs=0, **TINY["dncnn_original"])
    assert batch_statistics(mode_view(baseline, True)) == [True]
    assert batch_statistics(mode_view(baseline, False)) == [False]
    model = create("dncnn", rngs=0, features=4, num_blocks=2)
    def scanned(view):
        return [m.scan_blocks for _, m in nnx.iter_graph(view) if isinstance(m, BlockStack)]

    assert scanned(mode_view(model, True)) == [False] and scanned(mode_view(model, False)) == [True]
    mesh = make_data_mesh(1)
    tx = make_optimizer(config_from_spec("dncnn")).tx
    params, extra = split_state(model)
    state = replicate(init_train_state(params, tx, extra=extra), mesh)
    batch = shard_batch(_fixed_batch("dncnn"), mesh)
    step_hlo = make_train_step(model, tx, "denoise", "l1", mesh).lower(state, batch).as_text()
    predict_hlo = make_predict(model, "denoise").lower((params, extra), batch).as_text()
    assert "stablehlo.while" not in step_hlo and "stablehlo.while" in predict_hlo  # lax.scan lowers to a while


def test_mode_view_does_not_hide_a_failing_view():
    class Broken(nnx.Module):
        def set_view(self, scan_blocks=None):
            raise ValueError("this view cannot be built")

    with pytest.raises(ValueError, match="this view cannot be built"):
        mode_view(Broken(), True)


def test_four_cpu_devices_give_the_parameters_of_one(tmp_path):
    """Three steps of a tiny Converse-DnCNN, global batch 4 (one sample per device)."""
    batch = _fixed_batch("dncnn", batch_size=4)
    np.savez(tmp_path / "batch.npz", **batch)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
        import jax, numpy as np
        import pytest
        from test_train import _run_steps
        from converse_jax.train import TrainConfigError, check_batch_size, make_data_mesh, shard_batch
        assert jax.device_count() == 4, jax.devices()
        batch = dict(np.load({str(tmp_path / 'batch.npz')!r}))
        mesh = make_data_mesh()
        sharded = shard_batch(batch, mesh)
        assert len({{s.device for s in sharded["input"].addressable_shards}}) == 4
        assert sharded["input"].addressable_shards[0].data.shape[0] == 1
        with pytest.raises(TrainConfigError, match="not divisible by the 4"):
            check_batch_size(6, mesh)
        losses, params = _run_steps("dncnn", batch, steps=3, lr=3e-3)
        flat = {{"/".join(map(str, (getattr(k, "key", k) for k in p))): np.asarray(v)
                for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}}
        np.savez({str(tmp_path / 'four.npz')!r}, losses=np.asarray(losses), **flat)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(4), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    four = dict(np.load(tmp_path / "four.npz"))
    losses, params = _run_steps("dncnn", batch, steps=3, lr=3e-3, num_devices=1)
    np.testing.assert_allclose(four.pop("losses"), losses, rtol=1e-5)
    flat = {"/".join(map(str, (getattr(k, "key", k) for k in p))): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert set(flat) == set(four)
    for key in flat:
        np.testing.assert_allclose(four[key], flat[key], rtol=1e-4, atol=1e-6, err_msg=key)
    # the steps did move the parameters (the comparison is not between two initialisations)
    init = split_state(create("dncnn", rngs=0, **TINY["dncnn"]))[0]
    assert not np.allclose(np.asarray(init["head"]["kernel"]), flat["head/kernel"])


# ----------------------------------------------------------------------------------------------
# Checkpoints: kill, interrupt, resume


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"training exited early ({proc.returncode}): {err[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("timed out waiting for the training subprocess")


def _finished_steps(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def _logged_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return steps


def test_sigkill_then_sigint_then_resume_equals_an_uninterrupted_run(tmp_path):
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    # 1. SIGKILL once a checkpoint is complete (the run may be in the middle of the next one)
    proc = subprocess.Popen(_cli(*_tiny_flags(killed, 100000)), cwd=tmp_path, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(lambda: bool(_finished_steps(killed)), proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    last = _finished_steps(killed)[-1]
    # 2. resume; SIGINT after a few more steps: it saves and exits with 130
    proc = subprocess.Popen(_cli(*_tiny_flags(killed, 100000)), cwd=tmp_path, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(lambda: max(_logged_steps(killed), default=0) > last + 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert "Ctrl-C again" in err and "second Ctrl-C" not in err
    assert f"resumed from {killed / 'checkpoints' / str(last)}" in out
    stopped = max(_finished_steps(killed))
    assert stopped > last + 2
    assert f"stopped after step {stopped}, checkpoint saved" in out
    # 3. the same run without interruption, stopped at the same step
    proc = subprocess.run(_cli(*_tiny_flags(ref, stopped)), cwd=tmp_path, env=_env(), text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = ref / "checkpoints" / str(stopped)
    assert f"evaluate: python -m experiments.evaluate --model=dncnn --weights={shlex.quote(str(ckpt))}" in proc.stdout
    got, want = _metrics(killed), _metrics(ref)
    assert sorted(got) == list(range(1, stopped + 1)) == sorted(want)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-6)
    a, b = _params(killed / "checkpoints" / str(stopped)), _params(ckpt)
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=0, err_msg=str(key))
    assert len(_finished_steps(killed)) <= 3  # --keep default
    assert sorted(p.name for p in (ref / "val").iterdir()) == [f"step_{stopped:07d}.png"]
    assert any((killed / "tensorboard").iterdir())


@pytest.mark.slow
def test_the_printed_evaluate_command_runs_as_printed(tmp_path, capsys):
    """A run trained with --arch prints an evaluate command that runs as printed (the checkpoint
    records its architecture); restore reads the workdir's latest checkpoint and accepts a matching
    --arch, and refuses another one."""
    work = tmp_path / "run"
    env = {**_env(), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(_cli(*_tiny_flags(work, 2)), cwd=tmp_path, env=env, text=True, capture_output=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [line.removeprefix("evaluate: ") for line in proc.stdout.splitlines() if line.startswith("evaluate: ")]
    assert len(printed) == 1
    command = shlex.split(printed[0])
    assert command[:3] == ["python", "-m", "experiments.evaluate"]
    # the bundled test set the command evaluates on, made tiny through CONVERSE_ASSETS
    gt = read_image(require_asset("testsets", "Set12", "01.png"), color="gray")
    bundled = tmp_path / "assets" / "testsets" / "Set12"
    bundled.mkdir(parents=True)
    write_image(bundled / "a.png", gt[:32, :24])
    write_image(bundled / "b.png", gt[40:64, 40:72])
    env["CONVERSE_ASSETS"] = str(tmp_path / "assets")
    ev = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, env=env, text=True, capture_output=True,
                        timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert f"weights: {work / 'checkpoints' / '2'} (given path)" in ev.stderr
    assert "average" in ev.stdout and "a.png" in ev.stdout and "paper" not in ev.stdout
    from experiments.restore import main as restore

    args = ["--model=dncnn", f"--weights={work}", f"--input={bundled / 'a.png'}", "--no-progress"]
    assert restore([*args, f"--output={tmp_path / 'a.png'}", f"--arch={TINY_ARCH}"]) == 0
    assert read_image(tmp_path / "a.png").shape == (32, 24, 1)
    assert restore([*args, f"--output={tmp_path / 'b.png'}", "--arch=features=8,num_blocks=1"]) == 2
    assert "--arch" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "b.png").exists()


def test_only_a_second_ctrl_c_is_called_one(monkeypatch, capsys):
    """The first SIGINT asks to finish the step (and says how to stop at once); the second aborts, and
    only then does the command line speak of a second Ctrl-C."""
    import experiments.train as train_cli
    from converse_jax.train.loop import SecondInterrupt, _Interrupt

    interrupt = _Interrupt()
    interrupt._handler(signal.SIGINT, None)
    assert interrupt.requested == "SIGINT" and "Ctrl-C again" in capsys.readouterr().err
    with pytest.raises(SecondInterrupt):
        interrupt._handler(signal.SIGINT, None)

    def stopped(exc):
        def fake_train(config, progress=True):
            raise exc
        monkeypatch.setattr(train_cli, "train", fake_train)
        monkeypatch.setenv("CONVERSE_JAX_COMPILE_CACHE", "off")
        code = train_cli.main(["--model=dncnn", "--steps=1"])
        return code, capsys.readouterr().err

    code, err = stopped(KeyboardInterrupt())  # e.g. during start-up, before the loop's handler
    assert code == 130 and "second" not in err and "resume" in err
    code, err = stopped(SecondInterrupt())
    assert code == 130 and "second Ctrl-C" in err


def _tiny_config(workdir: Path, **kw) -> TrainConfig:
    base = dict(steps=6, batch_size=2, patch_size=16, save_every=2, eval_every=3, log_every=1, val_count=2,
                val_size=16, workdir=str(workdir), model_kwargs={"features": 4, "num_blocks": 1})
    base.update(kw)
    return config_from_spec("dncnn", **base)


def test_progress_without_a_terminal_is_plain_lines_from_the_start(tmp_path, monkeypatch):
    """In a pipe: a line before the setup, one before the compiling step, one after the first step,
    then at most one per _PRINT_SECONDS, and one after the last step; no bar fragments."""
    monkeypatch.setattr(loop_module, "_PRINT_SECONDS", 3600.0)
    lines: list[str] = []
    train(_tiny_config(tmp_path / "run", steps=4, log_every=10, eval_every=100), progress=True,
          echo=lines.append)
    steps = [line.split(":")[0] for line in lines if line.startswith("step ") and "/" in line.split(":")[0]]
    assert "building the network" in lines[0]
    assert any(line.startswith("compiling the training step") for line in lines)
    assert steps == ["step 1/4", "step 4/4"], lines
    assert "compilation" in next(line for line in lines if line.startswith("step 1/4"))
    assert not any("\r" in line or "%|" in line for line in lines)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    def poisoned(start):
        def gen():
            with make_train_loader("denoise", None, patch_size=16, batch_size=2, seed=0, channels=1,
                                   start_step=start) as loader:
                for i, batch in enumerate(loader, start=start):
                    if i == 3:  # the batch of step 4
                        batch = dict(batch, input=np.full_like(batch["input"], np.nan))
                    yield batch
        return gen()

    config = _tiny_config(tmp_path / "run")
    with pytest.raises(NonFiniteLossError) as info:
        train(config, batches=poisoned, **QUIET)
    msg = str(info.value)
    assert "at step 4" in msg and "last good checkpoint is step 2" in msg and "Lower --lr" in msg
    assert info.value.last_checkpoint == 2
    assert _finished_steps(tmp_path / "run") == [2]
    params = _params(tmp_path / "run" / "checkpoints" / "2")
    assert params and all(np.isfinite(v).all() for v in params.values())
    assert max(_logged_steps(tmp_path / "run")) == 3


def test_training_checkpoints_load_with_load_pretrained(tmp_path):
    from converse_jax.weights import load_pretrained

    model = create("dncnn", rngs=3)
    params, extra = split_state(model)
    tx = make_optimizer(config_from_spec("dncnn")).tx
    store = CheckpointStore(tmp_path / "checkpoints", keep=2)
    store.save(7, full_state(params, extra), tx.init(params), {"model": "dncnn"})
    store.close()
    loaded = load_pretrained("dncnn", tmp_path / "checkpoints" / "7")
    exported = load_pretrained("dncnn", export_params(model, "dncnn", tmp_path / "exported"))
    want = host_params(params)
    for other in (loaded, exported):
        got = host_params(split_state(other)[0])
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))


def test_init_from_pretrained_uses_the_released_weights(tmp_path):
    from converse_jax.train.loop import initial_params
    from converse_jax.weights import load_pretrained

    path = require_asset("weights", "converse_dncnn.pth")
    (params, extra), origin = initial_params(config_from_spec("dncnn", init_from="pretrained"), create("dncnn", rngs=0))
    assert str(path) in origin and extra == {}
    want, _ = split_state(load_pretrained("dncnn", path))
    for key, value in host_params(want).items():
        np.testing.assert_array_equal(np.asarray(host_params(params)[key]), np.asarray(value))


def _string_keys(tree):
    """``tree`` with every dict key a string, as checkpoints held before the state was NNX pure dicts."""
    if isinstance(tree, dict):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        items = [_string_keys(v) for v in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else tuple(items)
    return tree


def test_checkpoints_with_string_keys_resume_where_they_stopped(tmp_path):
    ref = _tiny_config(tmp_path / "ref", steps=4)
    want = dict(train(ref, **QUIET).losses)
    model = create("dncnn", rngs=0, **ref.model_kwargs)
    tx = make_optimizer(ref).tx
    params, extra = split_state(model)
    rep = replicated(make_data_mesh(1))
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
                          jax.eval_shape(lambda: init_train_state(params, tx, extra=extra)))
    store = CheckpointStore(tmp_path / "ref" / "checkpoints")
    full, opt_state, _ = store.restore(2, full_state(shapes["params"], shapes["extra"]), shapes["opt_state"])
    store.close()
    old = _tiny_config(tmp_path / "old", steps=4)
    prepare_workdir(old)
    store = CheckpointStore(tmp_path / "old" / "checkpoints")
    store.save(2, _string_keys(full), _string_keys(opt_state), {"model": "dncnn"})
    store.close()
    result = train(old, **QUIET)
    assert result.start_step == 2
    np.testing.assert_allclose([loss for _, loss in result.losses], [want[3], want[4]], rtol=1e-6)


def test_resuming_a_checkpoint_of_another_structure_is_refused_in_one_line(tmp_path, capsys):
    workdir = tmp_path / "run"
    config = _tiny_config(workdir, steps=4)
    prepare_workdir(config)
    other = create("dncnn_conv", rngs=0, **config.model_kwargs)  # depthwise convolutions instead of Converse2D
    params, extra = split_state(other)
    store = CheckpointStore(workdir / "checkpoints")
    store.save(2, full_state(params, extra), make_optimizer(config).tx.init(params), {"model": "dncnn"})
    store.close()
    ckpt = workdir / "checkpoints" / "2"
    with pytest.raises(IncompatibleWorkdirError) as info:
        train(config, **QUIET)
    msg = str(info.value)
    assert "\n" not in msg and f"checkpoint {ckpt} does not match" in msg
    assert "missing" in msg and "unexpected" in msg and f"--init-from={ckpt}" in msg
    assert not (workdir / "metrics.jsonl").exists() and _finished_steps(workdir) == [2]
    code, err = _main(_tiny_flags(workdir, 4), capsys)
    _assert_one_line_error(code, err, f"checkpoint {ckpt} does not match", f"--init-from={ckpt}")


def test_logged_lr_is_the_one_the_optimizer_applies(tmp_path, monkeypatch):
    optimizer = make_optimizer(config_from_spec("dncnn", lr=1e-3, lr_milestones=(2,)))
    assert [float(optimizer.schedule(i)) for i in range(4)] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4])
    grads = {"w": np.ones(1, np.float32)}
    state = optimizer.tx.init(grads)
    for count in range(3):  # Adam's first steps move by the learning rate (gradients of constant sign)
        updates, state = optimizer.tx.update(grads, state)
        np.testing.assert_allclose(updates["w"], -optimizer.schedule(count), rtol=1e-4)
    schedule = optax.cosine_decay_schedule(1e-3, 4)
    monkeypatch.setattr(loop_module, "make_optimizer", lambda config: Optimizer(optax.adam(schedule), schedule))
    train(_tiny_config(tmp_path / "run", steps=4), **QUIET)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["lr"] for r in records if "lr" in r], [schedule(i) for i in range(4)], rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Command-line errors: one line, exit status 2, no traceback


def _main(argv, capsys) -> tuple[int, str]:
    from experiments.train import main

    saved = os.environ.get("CONVERSE_JAX_COMPILE_CACHE")
    os.environ["CONVERSE_JAX_COMPILE_CACHE"] = "off"  # leave this process's JAX settings alone
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    finally:
        if saved is None:
            del os.environ["CONVERSE_JAX_COMPILE_CACHE"]
        else:
            os.environ["CONVERSE_JAX_COMPILE_CACHE"] = saved
    err = capsys.readouterr().err
    return code, err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, where nobody can create files")
def test_a_workdir_that_cannot_be_written_is_refused_before_the_network_is_built(tmp_path, capsys, monkeypatch):
    def no_building(config):
        raise AssertionError("the network was built before the workdir was checked")

    monkeypatch.setattr(loop_module, "_create_model", no_building)
    code, err = _main(_tiny_flags(Path("/proc/converse_run"), 2), capsys)
    _assert_one_line_error(code, err, "--workdir /proc/converse_run", "cannot write")


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error:" in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("argv, needles", [
    ([], ("--model",)),
    (["--model=nope"], ("invalid choice", "dncnn")),
    (["--model=dncnn", "--steps=ten"], ("--steps", "invalid int")),
    (["--model=dncnn", "--batch-size=0"], ("--batch-size", ">= 1")),
    (["--model=dncnn", "--lr=-1"], ("--lr", "positive")),
    (["--model=dncnn", "--sigma=abc"], ("--sigma",)),
    (["--model=dncnn", "--sigma=50,10"], ("--sigma", "low <= high")),
    (["--model=dncnn", "--arch=features"], ("--arch",)),
    (["--model=dncnn", "--arch=bogus=3"], ("--arch", "bogus")),
    (["--model=srresnet", "--patch-size=30"], ("--patch-size", "multiple")),
    (["--model=dncnn", "--data=folder:/does/not/exist"], ("/does/not/exist",)),
    (["--model=dncnn", "--data=nonsense"], ("nonsense",)),
])
def test_bad_flags_give_one_line_errors(argv, needles, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _main(argv, capsys)
    _assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "runs").exists()  # nothing written for a bad command


def test_bad_data_gives_one_line_errors(capsys, tmp_path):
    from PIL import Image

    small = tmp_path / "small"
    small.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(small / "a.png")
    code, err = _main(["--model=dncnn", f"--data=folder:{small}", "--patch-size=16",
                       f"--workdir={tmp_path / 'w1'}"], capsys)
    _assert_one_line_error(code, err, "8x8", "patch")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _main(["--model=dncnn", f"--val-data=folder:{empty}", f"--workdir={tmp_path / 'w2'}"], capsys)
    _assert_one_line_error(code, err, str(empty))
    assert not (tmp_path / "w1").exists() and not (tmp_path / "w2").exists()


def test_batch_not_divisible_by_devices_is_an_error_in_a_real_process(tmp_path):
    proc = subprocess.run(_cli(*_tiny_flags(tmp_path / "w", 2, **{"batch-size": "6"})), cwd=tmp_path,
                          env=_env(4), capture_output=True, text=True, timeout=120)
    _assert_one_line_error(proc.returncode, proc.stderr, "--batch-size 6", "not divisible by the 4")
    assert not (tmp_path / "w").exists()


def test_workdir_of_another_model_is_refused(tmp_path, capsys):
    workdir = tmp_path / "run"
    prepare_workdir(_tiny_config(workdir))  # what a run writes first
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"] == "dncnn" and saved["model_kwargs"] == {"features": 4, "num_blocks": 1}
    code, err = _main(["--model=conversenet", f"--workdir={workdir}"], capsys)
    _assert_one_line_error(code, err, "holds a run of 'dncnn'", "--workdir")
    code, err = _main(["--model=dncnn", "--arch=features=8,num_blocks=1", f"--workdir={workdir}"], capsys)
    _assert_one_line_error(code, err, "architecture", "features")


def test_help_names_the_defaults_and_their_source():
    from experiments.train import build_parser

    text = " ".join(build_parser().format_help().split())
    for name in FOUR:
        assert f"{name}: {get_spec(name).recipe.steps} steps" in text
    assert "docs/training.md" in text and "--init-from" in text and "default: ./runs/<model>" in text
