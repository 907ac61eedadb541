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
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import numpy as np

from converse_jax.train.checkpointing import CheckpointStore, prepare_workdir
from converse_jax.train.config import TrainConfig
from converse_jax.train.errors import NonFiniteLossError, TrainConfigError
from converse_jax.train.parallel import check_batch_size, make_data_mesh, replicate, replicated, shard_batch
from converse_jax.train.step import (ParamCodec, init_train_state, lr_schedule, make_optimizer, make_predict,
                                     make_train_step)

__all__ = ["TrainResult", "train", "initial_params", "make_grid", "MetricsLog", "evaluate_command"]

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
    checkpoint: Optional[Path]  # the last checkpoint written (or found)
    interrupted: bool = False
    losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    val_psnr: Optional[float] = None
    val_psnr_input: Optional[float] = None
    steps_per_sec: Optional[float] = None


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


def initial_params(config: TrainConfig, codec: ParamCodec) -> tuple[tuple[dict, dict], str]:
    """``((params, extra), description)`` to start from: fresh (``init_from`` None), the released weights
    (``"pretrained"``: the shared assets' copy if present, else load_pretrained's cache or
    download), or a checkpoint ``PATH`` (.pth, .safetensors, converted or training checkpoint
    directory, or a training workdir: its latest checkpoint)."""
    from converse_jax.assets import asset
    from converse_jax.models import create, get_spec
    from converse_jax.train.checkpointing import latest_checkpoint
    from converse_jax.weights import assign_weights, load_pretrained, load_weights

    if not config.init_from:
        return (codec.initial(), codec.initial_extra()), f"random initialisation (seed {config.seed})"
    spec = get_spec(config.model)
    path: Optional[Path] = None
    if config.init_from == "pretrained":
        if spec.release is None:
            raise TrainConfigError(f"{config.model} has no released weights: use --init-from=PATH")
        shared = asset("weights", spec.release.filename)
        path = shared if shared.is_file() else None
    else:
        path = Path(config.init_from).expanduser()
        if not path.exists():
            raise TrainConfigError(f"--init-from {path} does not exist: pass 'pretrained' or a checkpoint path")
        if path.is_dir() and not (path / "params").is_dir():
            found = latest_checkpoint(path)
            if found is None:
                raise TrainConfigError(f"--init-from {path} is neither a checkpoint nor a training workdir "
                                       f"with checkpoints")
            path = found
    if config.model_kwargs:
        model = create(config.model, rngs=0, **config.model_kwargs)
        weights, meta = load_weights(config.model, path, model) if path is not None else (None, None)
        if weights is None:
            raise TrainConfigError("--init-from=pretrained needs the released architecture: drop --arch")
        assign_weights(model, weights, source=str(path), model_name=config.model)
    else:
        model = load_pretrained(config.model, path, progress=False)
    where = str(path) if path is not None else "the released weights (cache)"
    return codec.from_model(model), f"weights from {where}"


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
    from converse_jax.degradations import imresize

    scale = shape[0] / inp.shape[0]
    return np.asarray(imresize(inp, scale), np.float32)[:shape[0], :shape[1]]


def evaluate_command(model: str, checkpoint: Path) -> str:
    """The command that evaluates a checkpoint with the paper's protocol."""
    return f"python -m experiments.evaluate --model={model} --weights={checkpoint}"


class _Interrupt:
    """First SIGINT/SIGTERM: finish the step, save, stop. A second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "_Interrupt":
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


def _state_sharding_abstract(state_shapes: Any, mesh: Any) -> Any:
    rep = replicated(mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), state_shapes)


def train(config: TrainConfig, *, batches: Optional[BatchSource] = None, progress: bool = True,
          num_devices: Optional[int] = None, echo: Optional[Callable[[str], None]] = None) -> TrainResult:
    """Train ``config.model``; resume from the workdir's latest checkpoint if there is one.

    ``batches(start_step)`` replaces the data pipeline (an iterator of host batches from
    ``start_step`` on); ``num_devices`` limits the mesh (default: every device). Raises
    :class:`TrainConfigError`/``ValueError`` for bad settings or data and
    :class:`NonFiniteLossError` when the loss diverges. A SIGINT or SIGTERM saves a checkpoint
    and returns with ``interrupted`` set.
    """
    from converse_jax.data import make_train_loader, make_val_set
    from converse_jax.metrics import psnr
    from converse_jax.models import count_params, create, get_spec

    config = config.validate()
    spec = get_spec(config.model)
    main = jax.process_index() == 0
    say = echo if echo is not None else print

    mesh = make_data_mesh(num_devices)
    local_batch = check_batch_size(config.batch_size, mesh)
    try:
        model = create(config.model, rngs=config.seed, **dict(config.model_kwargs))
    except TypeError as exc:
        raise TrainConfigError(f"--arch does not fit {config.model}: {exc}") from None
    codec = ParamCodec(model)
    tx = make_optimizer(config)
    schedule = lr_schedule(config.lr, tuple(config.lr_milestones), config.lr_decay)

    # Everything that can be wrong with the settings or the data fails before anything is written.
    workdir, changed = prepare_workdir(config, write=False)
    store: Optional[CheckpointStore] = None
    loader: Any = None
    try:
        if (workdir / "checkpoints").is_dir():
            store = CheckpointStore(workdir / "checkpoints", keep=config.keep)
        start = (store.latest_step() if store is not None else None) or 0
        channels, task = spec.in_channels, spec.task
        val_set = make_val_set(task, config.val_data, count=config.val_count, size=config.val_size, seed=0,
                               sigma=config.sigma, blur_noise=config.blur_noise, scale=spec.scale,
                               channels=channels)
        if batches is not None:
            loader = batches(start)
        else:
            loader = make_train_loader(task, config.data, patch_size=config.patch_size, batch_size=local_batch,
                                       seed=config.seed, sigma=config.sigma, blur_noise=config.blur_noise,
                                       scale=spec.scale, channels=channels, num_workers=config.num_workers,
                                       start_step=start, shard_index=jax.process_index(),
                                       shard_count=jax.process_count())
        if start:
            shapes = _state_sharding_abstract(
                jax.eval_shape(lambda: init_train_state(codec.initial(), tx, extra=codec.initial_extra())), mesh)
            full, opt_state, _ = store.restore(start, codec.combine(shapes["params"], shapes["extra"]),
                                               shapes["opt_state"])
            params, extra = codec.separate(full)
            state = {"params": params, "extra": extra, "opt_state": opt_state,
                     "step": replicate(np.int32(start), mesh)}
            origin = f"resumed from {store.path(start)}"
            if config.init_from:
                origin += f" (--init-from {config.init_from} ignored: the run already has checkpoints)"
        else:
            (params, extra), origin = initial_params(config, codec)
            state = replicate(jax.device_get(init_train_state(params, tx, extra=extra)), mesh)
        prepare_workdir(config, write=True)
        if store is None:
            store = CheckpointStore(workdir / "checkpoints", keep=config.keep)
    except BaseException:
        _close_all(store, loader)
        raise
    last_saved: Optional[int] = start if start else None

    result = TrainResult(workdir=workdir, start_step=start, step=start,
                         checkpoint=store.path(start) if start else None)
    if main:
        say(f"{config.model}: {count_params(model):,} parameters, {origin}")
        say(f"data {config.data} ({task}), global batch {config.batch_size} over {mesh.size} "
            f"{mesh.devices.flat[0].platform} device(s) x {jax.process_count()} host(s), patch {config.patch_size}, "
            f"lr {config.lr:g}, {config.loss}; workdir {workdir}")
        if changed:
            say(f"note: settings changed since the saved run: {', '.join(changed)}")
    if start >= config.steps:
        _close_all(store, loader)
        if main:
            say(f"already trained for {start} steps (--steps {config.steps}); nothing to do")
        return result

    train_step = make_train_step(codec, tx, task, config.loss, mesh)
    predict = make_predict(codec, task)
    log: Optional[MetricsLog] = None
    tb: Any = None
    bar: Any = None

    def checkpoint_meta(loss: Optional[float]) -> dict:
        return {"model": config.model, "loss": loss, "model_kwargs": dict(config.model_kwargs),
                "config": config.to_json()}

    def validate(step: int) -> float:
        rows, scores = [], []
        for item, batch in zip(val_set, val_batches):
            out = np.asarray(predict(state["params"], state["extra"], batch))[0]
            scores.append(psnr(out, item["target"]))
            if len(rows) < _GRID_ROWS:
                rows.append((item["input"], out, item["target"]))
        value = float(np.mean(scores))
        if main:
            from converse_jax.imageio import write_image

            grid = make_grid(rows)
            write_image(workdir / "val" / f"step_{step:07d}.png", grid)
            log.write({"step": step, "val_psnr": value, "val_psnr_input": result.val_psnr_input})
            tb.add_scalar("val/psnr", value, step)
            tb.add_image("val/input_output_target", np.clip(grid, 0, 1), step, dataformats="HWC")
        return value

    def save(step: int, loss: Optional[float]) -> None:
        nonlocal last_saved
        store.save(step, codec.combine(state["params"], state["extra"]), state["opt_state"], checkpoint_meta(loss))
        last_saved = step
        result.checkpoint = store.path(step)

    try:
        log = MetricsLog(workdir / "metrics.jsonl", start, enabled=main)
        if main:
            from tensorboardX import SummaryWriter

            tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=start, flush_secs=30)
            (workdir / "val").mkdir(exist_ok=True)
        val_batches = [replicate({k: v[None] for k, v in item.items()}, mesh) for item in val_set]
        input_psnrs = []
        for item in val_set:
            inp = item["input"]
            if inp.shape != item["target"].shape:
                inp = _upscale_input(inp, item["target"].shape)
            input_psnrs.append(psnr(inp, item["target"]))
        result.val_psnr_input = float(np.mean(input_psnrs))

        from tqdm import tqdm

        show_bar = progress and main and sys.stderr.isatty()
        try:
            width = os.get_terminal_size(sys.stderr.fileno()).columns if show_bar else 0
        except OSError:
            width = 0
        # a terminal that reports no width (a bare pty) would get an empty bar: use 100 columns there
        bar = tqdm(total=config.steps, initial=start, unit="step", desc=config.model, dynamic_ncols=width > 0,
                   ncols=None if width > 0 else 100, disable=not show_bar, file=sys.stderr, smoothing=0.1)
        write = (lambda s: bar.write(s, file=sys.stdout)) if show_bar else (say if main else (lambda s: None))
        if main:
            write(f"validation PSNR of the inputs: {result.val_psnr_input:.2f} dB ({len(val_set)} images)")
        step = start
        loss_value: Optional[float] = None
        ema: Optional[float] = None
        window_t0, window_step = None, start
        timed_steps, timed_seconds = 0, 0.0
        last_print = -math.inf
        with _Interrupt() as interrupt:
            while step < config.steps:
                t0 = time.perf_counter()
                try:
                    host_batch = next(loader)
                except StopIteration:
                    raise TrainDataError(f"the batch source ended at step {step}") from None
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as exc:  # grain re-raises worker errors with their message
                    if last_saved != step and step > start:
                        save(step, loss_value)
                    msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                    raise TrainDataError(f"training data failed at step {step + 1}: {msg}") from None
                new_state, metrics = train_step(state, shard_batch(host_batch, mesh))
                metrics = jax.device_get(metrics)
                seconds = time.perf_counter() - t0
                loss = float(metrics["loss"])
                if not bool(metrics["finite"]):
                    where = (f"the last good checkpoint is step {last_saved} ({store.path(last_saved)})"
                             if last_saved is not None else "no checkpoint had been saved yet")
                    raise NonFiniteLossError(
                        f"loss became {loss} (or a gradient/parameter non-finite) at step {step + 1}: training "
                        f"stopped and nothing of that step was saved; {where}. Lower --lr (now {config.lr:g}) or "
                        f"check the data, then rerun to resume", step + 1, last_saved)
                state, step, loss_value = new_state, step + 1, loss
                result.losses.append((step, loss))
                if step > start + 1:  # the first step includes compilation
                    timed_steps += 1
                    timed_seconds += seconds
                if window_t0 is None:
                    window_t0, window_step = time.perf_counter(), step
                ema = loss if ema is None else 0.9 * ema + 0.1 * loss
                bar.update(1)
                bar.set_postfix(loss=f"{ema:.4g}", refresh=False)

                if step % config.log_every == 0 or step == config.steps:
                    now = time.perf_counter()
                    rate = (step - window_step) / (now - window_t0) if step > window_step else None
                    window_t0, window_step = now, step
                    lr = float(schedule(step - 1))
                    record = {"step": step, "loss": loss, "lr": lr, "grad_norm": float(metrics["grad_norm"]),
                              "steps_per_sec": rate, "time": time.time()}
                    log.write(record)
                    if progress and main and not show_bar and (now - last_print >= _PRINT_SECONDS
                                                                 or step == config.steps):
                        last_print = now
                        speed = f", {rate:.2f} steps/s" if rate else ""
                        write(f"step {step}/{config.steps}: loss {loss:.5f} (avg {ema:.5f}), lr {lr:g}{speed}")
                    if tb is not None:
                        tb.add_scalar("train/loss", loss, step)
                        tb.add_scalar("train/lr", lr, step)
                        tb.add_scalar("train/grad_norm", record["grad_norm"], step)
                        if rate:
                            tb.add_scalar("train/steps_per_sec", rate, step)
                if step % config.eval_every == 0 or step == config.steps:
                    result.val_psnr = validate(step)
                    write(f"step {step}: loss {loss:.5f}, validation PSNR {result.val_psnr:.2f} dB "
                          f"(inputs {result.val_psnr_input:.2f} dB)")
                if step % config.save_every == 0 or step == config.steps:
                    save(step, loss)
                if window_t0 is not None and step == window_step:
                    window_t0 = time.perf_counter()  # validation and saving do not count in the rate
                if interrupt.requested:
                    if last_saved != step:
                        save(step, loss)
                    result.interrupted = True
                    write(f"{interrupt.requested} received: stopped after step {step}, checkpoint saved")
                    break
    finally:
        if bar is not None:
            bar.close()
        _close_all(store, loader, log, tb)
    result.step = step
    if timed_steps:
        result.steps_per_sec = timed_steps / timed_seconds
    return result
