"""The training loop: resume or initialise, step, log, validate, checkpoint, stop cleanly.

What a run writes in its working directory (see :mod:`converse_jax.train.checkpointing` for
the checkpoints)::

    metrics.jsonl        one JSON record per log step (loss, lr, grad_norm, steps_per_sec)
                         and per validation (val_psnr, val_psnr_input)
    tensorboard/         TensorBoard event files (tensorboardX)
    val/step_NNNNNNN.png validation grids: input | output | target, one row per image
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tensorboardX import SummaryWriter

from converse_jax.console import progress_bar
from converse_jax.data import make_train_loader, make_val_set
from converse_jax.degradations import imresize
from converse_jax.imageio import write_image
from converse_jax.metrics import psnr
from converse_jax.models import count_params, create, get_spec
from converse_jax.train.checkpointing import CheckpointStore, latest_checkpoint, prepare_workdir
from converse_jax.train.config import TrainConfig
from converse_jax.train.errors import NonFiniteLossError, TrainConfigError
from converse_jax.train.parallel import (
    any_process,
    check_batch_size,
    make_data_mesh,
    replicate,
    replicated,
    shard_batch,
)
from converse_jax.train.step import (
    Optimizer,
    State,
    TrainState,
    full_state,
    init_train_state,
    make_optimizer,
    make_predict,
    make_train_step,
    split_state,
)
from converse_jax.weights.convert import assign_weights
from converse_jax.weights.pretrained import find_weights, load_weights

__all__ = ["SecondInterrupt", "TrainResult", "train", "initial_params", "make_grid", "MetricsLog", "evaluate_command"]

BatchSource = Callable[[int], Iterator[Mapping[str, np.ndarray]]]
_GRID_ROWS = 4
_PRINT_SECONDS = 20.0  # without a progress bar, a log line at most this often


class TrainDataError(ValueError):
    """Reading or degrading a training batch failed."""


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` did."""

    workdir: Path
    start_step: int
    step: int  # steps completed
    checkpoint: Path | None  # the last checkpoint written (or found)
    interrupted: bool = False
    losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    val_psnr: float | None = None
    val_psnr_input: float | None = None
    steps_per_sec: float | None = None


class MetricsLog:
    """``metrics.jsonl``: appended line by line; on (re)start, records after ``start_step``
    (left by a run killed after its last checkpoint) are dropped, through a temporary file."""

    def __init__(self, path: Path, start_step: int, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        self._fh = None
        if not enabled:
            return
        if path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if isinstance(rec, dict) and int(rec.get("step", 0)) <= start_step:
                    kept.append(json.dumps(rec))
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            os.replace(tmp, path)
        self._fh = open(path, "a")

    def write(self, record: Mapping[str, Any]) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _init_path(config: TrainConfig) -> tuple[Path, str]:
    """The weights file or checkpoint directory that ``config.init_from`` names, and where it was
    found (the released weights are looked up as :func:`converse_jax.weights.pretrained.find_weights`
    says: assets folder, cache, download)."""
    if config.init_from == "pretrained":
        if get_spec(config.model).release is None:
            raise TrainConfigError(f"{config.model} has no released weights: use --init-from=PATH")
        found = find_weights(config.model, progress=False)
        return found.path, found.source
    path = Path(config.init_from).expanduser()
    if not path.exists():
        raise TrainConfigError(f"--init-from {path} does not exist: pass 'pretrained' or a checkpoint path")
    if path.is_dir() and not (path / "params").is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise TrainConfigError(f"--init-from {path} is neither a checkpoint nor a training workdir "
                                   f"with checkpoints")
        path = found
    return path, "--init-from"


def initial_params(config: TrainConfig, model: nnx.Module) -> tuple[tuple[State, State], str]:
    """``((params, extra), description)`` to start from (see :func:`split_state`): ``model`` as built
    (``init_from`` None), or ``model`` with the weights ``init_from`` names loaded into it: the released
    weights (``"pretrained"``, found as ``load_pretrained`` finds them), or a checkpoint ``PATH`` (.pth,
    .safetensors, converted or training checkpoint directory, or a training workdir: its latest
    checkpoint)."""
    if not config.init_from:
        return split_state(model), f"random initialisation (seed {config.seed})"
    path, source = _init_path(config)
    weights, _ = load_weights(config.model, path, model)
    assign_weights(model, weights, source=str(path), model_name=config.model)
    return split_state(model), f"weights: {path} ({source})"


def make_grid(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], gap: int = 2) -> np.ndarray:
    """A float image: one row per (input, output, target) triple, the input upscaled to the
    target's size by pixel repetition (SR), columns separated by ``gap`` white pixels."""
    tiles = []
    for inp, out, tgt in rows:
        h, w = tgt.shape[:2]
        if inp.shape[:2] != (h, w):
            fy, fx = max(1, h // inp.shape[0]), max(1, w // inp.shape[1])
            inp = np.repeat(np.repeat(inp, fy, axis=0), fx, axis=1)[:h, :w]
            inp = np.pad(inp, ((0, h - inp.shape[0]), (0, w - inp.shape[1]), (0, 0)))
        tiles.append([np.clip(t, 0, 1) for t in (inp, out, tgt)])
    height = max(t[0].shape[0] for t in tiles)
    width = max(t[0].shape[1] for t in tiles)
    channels = tiles[0][0].shape[2]
    grid = np.ones((len(tiles) * (height + gap) - gap, 3 * (width + gap) - gap, channels), np.float32)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            y, x = r * (height + gap), c * (width + gap)
            grid[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
    return grid


def _upscale_input(inp: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Bicubic upscaling of an SR input to the target's size (the PSNR baseline)."""
    scale = shape[0] / inp.shape[0]
    return np.asarray(imresize(inp, scale), np.float32)[:shape[0], :shape[1]]


def _input_psnr(val_set: list[dict[str, np.ndarray]]) -> float:
    """Mean PSNR of the validation inputs (SR inputs upscaled) against their targets."""
    scores = []
    for item in val_set:
        inp = item["input"]
        if inp.shape != item["target"].shape:
            inp = _upscale_input(inp, item["target"].shape)
        scores.append(psnr(inp, item["target"]))
    return float(np.mean(scores))


def evaluate_command(model: str, checkpoint: Path) -> str:
    """The shell command that evaluates a checkpoint with the paper's protocol (the checkpoint
    records its architecture, so the command needs no ``--arch``)."""
    return f"python -m experiments.evaluate --model={model} --weights={shlex.quote(str(checkpoint))}"


class SecondInterrupt(KeyboardInterrupt):
    """A second Ctrl-C while the first one's step and checkpoint were still being finished."""


class _Interrupt:
    """First SIGINT/SIGTERM: finish the step, save, stop. A second SIGINT aborts at once
    (:class:`SecondInterrupt`)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise SecondInterrupt
        self.requested = signal.Signals(signum).name
        again = "; Ctrl-C again to stop at once, without saving" if signum == signal.SIGINT else ""
        print(f"\n{self.requested} received: finishing this step and saving a checkpoint{again}",
              file=sys.stderr, flush=True)

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _close_all(*resources: Any) -> None:
    """Close each resource that exists (checkpoint store, loader, logs), even if one fails."""
    errors = []
    for res in resources:
        close = getattr(res, "close", None)
        if close is None:
            continue
        try:
            close()
        except Exception as exc:  # keep closing the others; report the first failure
            errors.append(exc)
    if errors:
        raise errors[0]


def _state_sharding_abstract(state_shapes: Any, mesh: Mesh) -> Any:
    rep = replicated(mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), state_shapes)


@dataclasses.dataclass
class _Setup:
    """A run ready to step: its model, optimizer and state, and what :func:`_setup` opened."""

    workdir: Path
    changed: list[str]  # resumable settings changed since the saved run
    model: nnx.Module
    mesh: Mesh
    optimizer: Optimizer
    store: CheckpointStore
    loader: Iterator[Mapping[str, np.ndarray]]
    val_set: list[dict[str, np.ndarray]]
    state: TrainState
    start: int
    origin: str  # where the state comes from, for the first log line


def _create_model(config: TrainConfig) -> nnx.Module:
    try:
        return create(config.model, rngs=config.seed, precision=config.precision, **dict(config.model_kwargs))
    except TypeError as exc:
        raise TrainConfigError(f"--arch does not fit {config.model}: {exc}") from None


def _open_data(config: TrainConfig, start: int, local_batch: int,
               batches: BatchSource | None) -> tuple[list[dict[str, np.ndarray]], Iterator]:
    """The validation set and the training batches from ``start`` on."""
    spec = get_spec(config.model)
    common = dict(sigma=config.sigma, blur_noise=config.blur_noise, scale=spec.scale, channels=spec.in_channels)
    val_set = make_val_set(spec.task, config.val_data, count=config.val_count, size=config.val_size, seed=0,
                           **common)
    if batches is not None:
        return val_set, batches(start)
    loader = make_train_loader(spec.task, config.data, patch_size=config.patch_size, batch_size=local_batch,
                               seed=config.seed, num_workers=config.num_workers, start_step=start,
                               shard_index=jax.process_index(), shard_count=jax.process_count(), **common)
    return val_set, loader


def _restore_state(store: CheckpointStore, step: int, model: nnx.Module, optimizer: Optimizer,
                   mesh: Mesh) -> TrainState:
    """The train state saved at ``step``, replicated over ``mesh`` (a checkpoint of another structure
    is refused by :meth:`CheckpointStore.restore`)."""
    params, extra = split_state(model)
    shapes = jax.eval_shape(lambda: init_train_state(params, optimizer.tx, extra=extra))
    abstract = _state_sharding_abstract(shapes, mesh)
    full, opt_state, _ = store.restore(step, full_state(abstract["params"], abstract["extra"]),
                                       abstract["opt_state"])
    params, extra = split_state(nnx.merge(nnx.graphdef(model), full))
    return {"params": params, "extra": extra, "opt_state": opt_state, "step": replicate(np.int32(step), mesh)}


def _setup(config: TrainConfig, batches: BatchSource | None, num_devices: int | None) -> _Setup:
    """Build the model, open the data and the checkpoints, resume or initialise the state.

    Everything that can be wrong with the settings or the data fails before anything is written."""
    mesh = make_data_mesh(num_devices)
    local_batch = check_batch_size(config.batch_size, mesh)
    workdir, changed = prepare_workdir(config, write=False)  # a workdir that cannot be used fails first
    model = _create_model(config)
    optimizer = make_optimizer(config)
    store: CheckpointStore | None = None
    loader: Any = None
    try:
        if (workdir / "checkpoints").is_dir():
            store = CheckpointStore(workdir / "checkpoints", keep=config.keep)
        start = (store.latest_step() if store is not None else None) or 0
        val_set, loader = _open_data(config, start, local_batch, batches)
        if start:
            state = _restore_state(store, start, model, optimizer, mesh)
            origin = f"resumed from {store.path(start)}"
            if config.init_from:
                origin += f" (--init-from {config.init_from} ignored: the run already has checkpoints)"
        else:
            (params, extra), origin = initial_params(config, model)
            state = replicate(jax.device_get(init_train_state(params, optimizer.tx, extra=extra)), mesh)
        prepare_workdir(config, write=True)
        if store is None:
            store = CheckpointStore(workdir / "checkpoints", keep=config.keep)
    except BaseException:
        _close_all(store, loader)
        raise
    return _Setup(workdir=workdir, changed=changed, model=model, mesh=mesh, optimizer=optimizer, store=store,
                  loader=loader, val_set=val_set, state=state, start=start, origin=origin)


def _announce(config: TrainConfig, run: _Setup, say: Callable[[str], None]) -> None:
    say(f"{config.model}: {count_params(run.model):,} parameters, {run.origin}")
    say(f"data {config.data} ({get_spec(config.model).task}), global batch {config.batch_size} over "
        f"{run.mesh.size} {run.mesh.devices.flat[0].platform} device(s) x {jax.process_count()} host(s), "
        f"patch {config.patch_size}, lr {config.lr:g}, {config.loss}; workdir {run.workdir}")
    if run.changed:
        say(f"note: settings changed since the saved run: {', '.join(run.changed)}")


@dataclasses.dataclass
class _Speed:
    """Step timing: the rate over each logging window, and the mean after the first (compiling) step.
    Validation and saving do not count."""

    start: int
    window_step: int = 0
    window_t0: float | None = None
    timed_steps: int = 0
    timed_seconds: float = 0.0

    def step_done(self, step: int, seconds: float) -> None:
        if step > self.start + 1:  # the first step includes compilation
            self.timed_steps += 1
            self.timed_seconds += seconds
        if self.window_t0 is None:
            self.window_t0, self.window_step = time.perf_counter(), step

    def window_rate(self, step: int) -> tuple[float | None, float]:
        """``(steps per second since the last call, now)``; starts the next window."""
        now = time.perf_counter()
        rate = (step - self.window_step) / (now - self.window_t0) if step > self.window_step else None
        self.window_t0, self.window_step = now, step
        return rate, now

    def resume_after(self, step: int) -> None:
        """Restart the window's clock after the periodic actions of ``step``."""
        if self.window_t0 is not None and step == self.window_step:
            self.window_t0 = time.perf_counter()

    def mean(self) -> float | None:
        return self.timed_steps / self.timed_seconds if self.timed_steps else None


class _Session:
    """The step loop of one :func:`train` call and its periodic actions: log, validate, checkpoint."""

    def __init__(self, config: TrainConfig, run: _Setup, result: TrainResult, *, progress: bool,
                 say: Callable[[str], None]) -> None:
        self.config, self.run, self.result, self.progress = config, run, result, progress
        self.main = jax.process_index() == 0
        task = get_spec(config.model).task
        self.train_step = make_train_step(run.model, run.optimizer.tx, task, config.loss, run.mesh)
        self.predict = make_predict(run.model, task)
        self.state = run.state
        self.last_saved: int | None = run.start if run.start else None
        self.loss: float | None = None  # of the last step
        self.ema: float | None = None
        self.speed = _Speed(run.start, window_step=run.start)
        self.last_print: tuple[int, float] | None = None  # (step, time) of the last step line (no bar)
        self.write: Callable[[str], None] = say if self.main else (lambda s: None)
        self.log: MetricsLog | None = None
        self.tb: Any = None
        self.bar: Any = None
        self.show_bar = False
        self.val_batches: list[dict[str, jax.Array]] = []

    def open_outputs(self) -> None:
        """The metrics log, TensorBoard, the validation batches and their input PSNR, the progress bar."""
        run = self.run
        self.log = MetricsLog(run.workdir / "metrics.jsonl", run.start, enabled=self.main)
        if self.main:
            self.tb = SummaryWriter(str(run.workdir / "tensorboard"), purge_step=run.start, flush_secs=30)
            (run.workdir / "val").mkdir(exist_ok=True)
        self.val_batches = [replicate({k: v[None] for k, v in item.items()}, run.mesh) for item in run.val_set]
        self.result.val_psnr_input = _input_psnr(run.val_set)
        self.show_bar = self.progress and self.main and sys.stderr.isatty()
        self.bar = progress_bar(self.config.steps, desc=self.config.model, unit="step", initial=run.start,
                                disable=not self.show_bar, smoothing=0.1)
        if self.show_bar:
            self.write = lambda s: self.bar.write(s, file=sys.stdout)
        if self.main:
            self.write(f"validation PSNR of the inputs: {self.result.val_psnr_input:.2f} dB "
                       f"({len(run.val_set)} images)")
            if self.progress:
                self.write("compiling the training step (the first step takes longest) ...")

    def loop(self, interrupt: _Interrupt) -> int:
        """Step until ``config.steps`` or an interrupt; returns the number of steps completed."""
        step = self.run.start
        while step < self.config.steps:
            t0 = time.perf_counter()
            host_batch = self._next_batch(step)
            new_state, metrics = self.train_step(self.state, shard_batch(host_batch, self.run.mesh))
            metrics = jax.device_get(metrics)
            seconds = time.perf_counter() - t0
            loss = float(metrics["loss"])
            if not bool(metrics["finite"]):
                raise self._diverged(loss, step + 1)
            self.state, step, self.loss = new_state, step + 1, loss
            self.result.losses.append((step, loss))
            self.speed.step_done(step, seconds)
            self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{self.ema:.4g}", refresh=False)
            self._print_step(step, loss, seconds)
            self._periodic(step, loss, metrics)
            # every process stops after the same step, even when the signal reached only some of them
            if any_process(interrupt.requested is not None):
                if self.last_saved != step:
                    self.save(step, loss)
                self.result.interrupted = True
                self.write(f"{interrupt.requested or 'a signal to another process'} received: stopped after "
                           f"step {step}, checkpoint saved")
                break
        return step

    def _next_batch(self, step: int) -> Mapping[str, np.ndarray]:
        try:
            return next(self.run.loader)
        except StopIteration:
            raise TrainDataError(f"the batch source ended at step {step}") from None
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # grain re-raises worker errors with their message
            if self.last_saved != step and step > self.run.start:
                self.save(step, self.loss)
            msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise TrainDataError(f"training data failed at step {step + 1}: {msg}") from None

    def _diverged(self, loss: float, step: int) -> NonFiniteLossError:
        where = (f"the last good checkpoint is step {self.last_saved} ({self.run.store.path(self.last_saved)})"
                 if self.last_saved is not None else "no checkpoint had been saved yet")
        return NonFiniteLossError(
            f"loss became {loss} (or a gradient/parameter non-finite) at step {step}: training stopped and "
            f"nothing of that step was saved; {where}. Lower --lr (now {self.config.lr:g}) or check the data, "
            f"then rerun to resume", step, self.last_saved)

    def _periodic(self, step: int, loss: float, metrics: Mapping[str, Any]) -> None:
        config, last = self.config, step == self.config.steps
        if step % config.log_every == 0 or last:
            self._log(step, loss, metrics)
        if step % config.eval_every == 0 or last:
            self.result.val_psnr = self.validate(step)
            self.write(f"step {step}: loss {loss:.5f}, validation PSNR {self.result.val_psnr:.2f} dB "
                       f"(inputs {self.result.val_psnr_input:.2f} dB)")
        if step % config.save_every == 0 or last:
            self.save(step, loss)
        self.speed.resume_after(step)

    def _print_step(self, step: int, loss: float, seconds: float) -> None:
        """Without a progress bar (a pipe, a log file): a line after the first step, which includes the
        compilation, then at most every ``_PRINT_SECONDS`` and after the last step."""
        if not (self.progress and self.main and not self.show_bar):
            return
        now = time.perf_counter()
        if self.last_print is None:
            self.last_print = (step, now)
            self.write(f"step {step}/{self.config.steps}: loss {loss:.5f} (this step took {seconds:.1f} s "
                       f"with the compilation; a line every {_PRINT_SECONDS:.0f} s from now on)")
            return
        if now - self.last_print[1] < _PRINT_SECONDS and step != self.config.steps:
            return
        rate = (step - self.last_print[0]) / (now - self.last_print[1])
        self.last_print = (step, now)
        lr = float(self.run.optimizer.schedule(step - 1))
        self.write(f"step {step}/{self.config.steps}: loss {loss:.5f} (avg {self.ema:.5f}), lr {lr:g}, "
                   f"{rate:.2f} steps/s")

    def _log(self, step: int, loss: float, metrics: Mapping[str, Any]) -> None:
        rate, now = self.speed.window_rate(step)
        lr = float(self.run.optimizer.schedule(step - 1))
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": float(metrics["grad_norm"]),
                  "steps_per_sec": rate, "time": time.time()}
        self.log.write(record)
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/lr", lr, step)
            self.tb.add_scalar("train/grad_norm", record["grad_norm"], step)
            if rate:
                self.tb.add_scalar("train/steps_per_sec", rate, step)

    def validate(self, step: int) -> float:
        """Validation PSNR of the current state; on the main host also the grid PNG and the logs."""
        rows, scores = [], []
        for item, batch in zip(self.run.val_set, self.val_batches, strict=True):
            out = np.asarray(self.predict((self.state["params"], self.state["extra"]), batch))[0]
            scores.append(psnr(out, item["target"]))
            if len(rows) < _GRID_ROWS:
                rows.append((item["input"], out, item["target"]))
        value = float(np.mean(scores))
        if self.main:
            grid = make_grid(rows)
            write_image(self.run.workdir / "val" / f"step_{step:07d}.png", grid)
            self.log.write({"step": step, "val_psnr": value, "val_psnr_input": self.result.val_psnr_input})
            self.tb.add_scalar("val/psnr", value, step)
            self.tb.add_image("val/input_output_target", np.clip(grid, 0, 1), step, dataformats="HWC")
        return value

    def save(self, step: int, loss: float | None) -> None:
        meta = {"model": self.config.model, "loss": loss, "model_kwargs": dict(self.config.model_kwargs),
                "config": self.config.to_json()}
        self.run.store.save(step, full_state(self.state["params"], self.state["extra"]), self.state["opt_state"],
                            meta)
        self.last_saved = step
        self.result.checkpoint = self.run.store.path(step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        _close_all(self.run.store, self.run.loader, self.log, self.tb)


def train(config: TrainConfig, *, batches: BatchSource | None = None, progress: bool = True,
          num_devices: int | None = None, echo: Callable[[str], None] | None = None) -> TrainResult:
    """Train ``config.model``; resume from the workdir's latest checkpoint if there is one.

    ``batches(start_step)`` replaces the data pipeline (an iterator of host batches from
    ``start_step`` on); ``num_devices`` limits the mesh (default: every device). Raises
    :class:`TrainConfigError`/``ValueError`` for bad settings or data,
    :class:`IncompatibleWorkdirError` for a checkpoint that does not fit the model, and
    :class:`NonFiniteLossError` when the loss diverges. A SIGINT or SIGTERM saves a checkpoint
    and returns with ``interrupted`` set.
    """
    config = config.validate()
    say = echo if echo is not None else print
    main = jax.process_index() == 0
    if main:
        say(f"{config.model}: building the network, opening the data and {config.resolved_workdir()} ...")
    run = _setup(config, batches, num_devices)
    result = TrainResult(workdir=run.workdir, start_step=run.start, step=run.start,
                         checkpoint=run.store.path(run.start) if run.start else None)
    if main:
        _announce(config, run, say)
    if run.start >= config.steps:
        _close_all(run.store, run.loader)
        if main:
            say(f"already trained for {run.start} steps (--steps {config.steps}); nothing to do")
        return result
    session = _Session(config, run, result, progress=progress, say=say)
    try:
        session.open_outputs()
        with _Interrupt() as interrupt:
            result.step = session.loop(interrupt)
    finally:
        session.close()
    result.steps_per_sec = session.speed.mean()
    return result
