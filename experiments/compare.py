"""Train several networks with one configuration on the same data and compare them (the paper's tables).

    python -m experiments.compare --models=dncnn_k5,dncnn_conv,dncnn_convt,dncnn_original --out=DIR
        [--steps=N] [--batch-size=N] [--patch-size=N] [--lr=X] [--lr-milestones=...] [--loss=l1|l2]
        [--arch=features=16,num_blocks=4] [--data=SPEC] [--val-data=SPEC] [--val-count=N] [--val-size=N]
        [--eval-every=N] [--sigma=25] [--seed=N] [--test-sets=set12,bsd68=PATH]

Every model gets the same settings: the first model's recipe with the command line's overrides, the
same seed, hence the same batches and validation images (all models must share the task). Each is
trained in ``DIR/<model>/`` (rerunning resumes, and skips finished models), then its last checkpoint
is evaluated with the paper's protocol on every test set. Written to ``DIR``:

    compare.md       the table: PSNR per model and test set (Y-PSNR for SR, per kernel for deblurring)
    compare.json     the same numbers, the settings, the paper's values, validation curves
    val_psnr.png     validation PSNR against training steps, one line per model
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from flax import nnx

from converse_jax import evaluation as E
from converse_jax.fileio import write_json_atomic
from converse_jax.models import count_params, create, get_spec, list_models
from converse_jax.train import (
    IncompatibleWorkdirError,
    NonFiniteLossError,
    TrainConfigError,
    TrainDataError,
    config_from_spec,
    parse_int_list,
    parse_model_kwargs,
    parse_range,
    train,
)
from converse_jax.weights import assign_weights, load_weights
from experiments._cli import one_line

PROG = "python -m experiments.compare"


class CompareError(ValueError):
    """A bad setting of the comparison (reported as a one-line error)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, help="comma-separated registry names, all of the same task")
    p.add_argument("--out", required=True, help="output folder (one training workdir per model inside)")
    p.add_argument("--steps", type=int, help="training steps of every model (default: the first model's recipe)")
    p.add_argument("--batch-size", type=int, help="global batch")
    p.add_argument("--patch-size", type=int, help="target patch side in pixels")
    p.add_argument("--lr", type=float, help="Adam learning rate")
    p.add_argument("--lr-milestones", help="steps at which the lr is halved, comma-separated or 'none'")
    p.add_argument("--loss", choices=("l1", "l2"), help="pixel loss")
    p.add_argument("--arch", help="constructor overrides given to every model, e.g. 'features=16,num_blocks=4'")
    p.add_argument("--data", help="training images: embedded | folder:PATH | tfds:NAME[:SPLIT] (default embedded)")
    p.add_argument("--val-data", help="validation images (default: held-out embedded images)")
    p.add_argument("--val-count", type=int, help="validation images (default 8)")
    p.add_argument("--val-size", type=int, help="validation crop side (default 96)")
    p.add_argument("--eval-every", type=int, help="validate (a point of the curve) every N steps")
    p.add_argument("--sigma", help="denoising noise level or range 'low,high' (0..255 scale)")
    p.add_argument("--blur-noise", help="deblurring noise level or range (0..255 scale)")
    p.add_argument("--seed", type=int, help="seed of the initialisation and of the data stream (default 0)")
    p.add_argument("--test-sets", help="comma-separated test sets: a name (set12, set5, ... bundled or not) or "
                                       "NAME=PATH for a folder of images (default: the models' protocol set)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


# ----------------------------------------------------------------------------------------------------
# Settings


def parse_models(text: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``: known registry names, no duplicates, one task and scale."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise CompareError("--models needs at least one model name")
    unknown = [n for n in names if n not in list_models()]
    if unknown:
        raise CompareError(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(list_models())}")
    if len(set(names)) != len(names):
        raise CompareError(f"--models lists a model twice: {text}")
    tasks = {(get_spec(n).task, get_spec(n).scale, get_spec(n).in_channels) for n in names}
    if len(tasks) > 1:
        what = ", ".join(f"{n} ({get_spec(n).task.name}, x{get_spec(n).scale})" for n in names)
        raise CompareError(f"the models must share the task, scale and channels to train on the same data: {what}")
    return names


def parse_test_sets(text: str | None, default: str) -> list[tuple[str, str | None]]:
    """``"set12,bsd68=/data/BSD68"`` -> ``[("set12", None), ("bsd68", "/data/BSD68")]``."""
    if text is None or not text.strip():
        return [(default, None)]
    out = []
    for item in text.split(","):
        name, sep, path = item.strip().partition("=")
        name = name.strip().lower()
        if not name or (sep and not path.strip()):
            raise CompareError(f"--test-sets must look like 'set12,bsd68=PATH', got {text!r}")
        out.append((name, path.strip() or None))
    if len({n for n, _ in out}) != len(out):
        raise CompareError(f"--test-sets names a test set twice: {text}")
    return out


def build_configs(models: Sequence[str], args: argparse.Namespace, out: Path) -> list[Any]:
    """One :class:`~converse_jax.train.TrainConfig` per model: the first model's recipe with the
    command line's overrides, identical except for the model name and the workdir."""
    over: dict[str, Any] = {}
    for name in ("steps", "batch_size", "patch_size", "lr", "loss", "data", "val_data", "val_count", "val_size",
                 "eval_every", "seed"):
        value = getattr(args, name, None)
        if value is not None:
            over[name] = value
    if getattr(args, "lr_milestones", None) is not None:
        over["lr_milestones"] = parse_int_list(args.lr_milestones)
    if getattr(args, "sigma", None) is not None:
        over["sigma"] = parse_range(args.sigma, "sigma")
    if getattr(args, "blur_noise", None) is not None:
        over["blur_noise"] = parse_range(args.blur_noise, "blur_noise")
    if getattr(args, "arch", None):
        over["model_kwargs"] = parse_model_kwargs(args.arch)
    base = config_from_spec(models[0], **over)
    if "eval_every" not in over:  # a curve needs points: about 20 validations per run
        base = dataclasses.replace(base, eval_every=max(1, base.steps // 20))
    base = dataclasses.replace(base, save_every=min(base.save_every, base.steps),
                               log_every=min(base.log_every, base.steps), keep=1,
                               source=f"experiments.compare: the recipe of {models[0]} for every model")
    return [dataclasses.replace(base, model=m, workdir=str(out / m)).validate() for m in models]


def check_architectures(configs: Sequence[Any]) -> dict[str, int]:
    """Parameter count of each model with the configs' ``model_kwargs`` (abstract init, nothing computed);
    an override a constructor does not take is a :class:`CompareError` naming the model."""
    counts = {}
    for cfg in configs:
        try:
            model = nnx.eval_shape(functools.partial(create, cfg.model, rngs=0, **dict(cfg.model_kwargs)))
        except (TypeError, ValueError) as exc:
            raise CompareError(f"--arch does not fit {cfg.model}: {one_line(exc)}") from None
        counts[cfg.model] = count_params(model)
    return counts


# ----------------------------------------------------------------------------------------------------
# Results


def read_val_curve(workdir: Path) -> tuple[list[tuple[int, float]], float | None]:
    """``([(step, validation PSNR)], PSNR of the validation inputs)`` from a training workdir's
    ``metrics.jsonl`` (the last record of each step counts)."""
    path = Path(workdir) / "metrics.jsonl"
    points: dict[int, float] = {}
    inputs: float | None = None
    if not path.is_file():
        return [], None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("val_psnr") is not None:
            points[int(rec["step"])] = float(rec["val_psnr"])
            if rec.get("val_psnr_input") is not None:
                inputs = float(rec["val_psnr_input"])
    return sorted(points.items()), inputs


def load_trained(name: str, checkpoint: Path, model_kwargs: dict[str, Any]) -> Any:
    """The model ``name`` built with ``model_kwargs`` and the weights of a training checkpoint
    (evaluation mode)."""
    model = create(name, rngs=nnx.Rngs(0), **model_kwargs)
    with warnings.catch_warnings():  # orbax: "Sharding info not provided when restoring" (host arrays wanted)
        warnings.filterwarnings("ignore", message="Sharding info not provided")
        weights, _ = load_weights(name, checkpoint, model)
    assign_weights(model, weights, source=str(checkpoint), model_name=name)
    return model


def evaluate_model(model: Any, spec: Any, test_sets: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """``{column: PSNR}`` on every test set (``"set5 k1"``... per kernel for deblurring); the PSNR the
    paper's table reports (Y channel for SR)."""
    out: dict[str, Any] = {}
    for name, images in test_sets:
        protocol = E.resolve_protocol(spec, dataset=name)
        report = E.evaluate(model, spec, images, protocol=protocol, dataset=name, progress=False)
        key = report.metric_key
        for run in report.runs:
            column = name if run.kernel is None else f"{name} k{run.kernel}"
            out[column] = {"psnr": run.average[key], "paper": run.paper, "metric": key}
    return out


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _milestones(settings: dict[str, Any]) -> str:
    return ", ".join(map(str, settings["lr_milestones"])) or "never"


def format_table(summary: dict[str, Any]) -> str:
    """The comparison as a Markdown table (the paper's value in parentheses where it has one)."""
    columns: list[str] = []
    for row in summary["models"]:
        for col in row.get("test", {}):
            if col not in columns:
                columns.append(col)
    metric = "Y-PSNR" if summary.get("metric") == "psnr_y" else "PSNR"
    head = ["model", "params", "val PSNR"] + [f"{c} {metric}" for c in columns] + ["train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in summary["models"]:
        cells = [row["model"], f"{row['params']:,}"]
        cells.append(f"{row['val_psnr']:.2f}" if row.get("val_psnr") is not None else row.get("status", "-"))
        for col in columns:
            entry = row.get("test", {}).get(col)
            if entry is None:
                cells.append("-")
            else:
                paper = f" ({entry['paper']:.2f})" if entry.get("paper") is not None else ""
                cells.append(f"{entry['psnr']:.2f}{paper}")
        cells.append(f"{row['train_seconds']:.0f}" if row.get("train_seconds") is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    s = summary["settings"]
    lines.append("")
    lines.append(f"Same settings for every model: {s['steps']} steps, batch {s['batch_size']}, "
                 f"patch {s['patch_size']}, Adam {s['lr']:g} (halved at {_milestones(s)}), {s['loss']}, "
                 f"data {s['data'] or 'embedded'}, seed {s['seed']}, arch {s['model_kwargs'] or 'full size'}. "
                 f"In parentheses: the paper's value (full-size networks, the paper's unpublished training budget).")
    return "\n".join(lines) + "\n"


def plot_curves(summary: dict[str, Any], path: Path) -> None:
    """Validation PSNR against steps, one line per model (PNG).

    matplotlib is imported here, not at module top: selecting its Agg backend is a process-wide
    side effect that importing this module should not have.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for row in summary["models"]:
        curve = row.get("val_curve") or []
        if curve:
            steps, values = zip(*curve, strict=False)
            ax.plot(steps, values, marker="o", markersize=3, label=row["model"])
    if summary.get("val_psnr_input") is not None:
        ax.axhline(summary["val_psnr_input"], color="gray", linestyle="--", linewidth=1, label="input")
    s = summary["settings"]
    ax.set_xlabel("training step")
    ax.set_ylabel("validation PSNR (dB)")
    ax.set_title(f"{summary['task']}: batch {s['batch_size']}, patch {s['patch_size']}, lr {s['lr']:g}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# The comparison


def run_comparison(configs: Sequence[Any], test_sets: Sequence[tuple[str, str | None]], out: Path, *,
                   progress: bool = True, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train every config (resuming), evaluate its last checkpoint, write the table, JSON and plot.

    A model whose loss diverges is reported as such and the others go on. Returns the summary
    written to ``compare.json``; ``summary["interrupted"]`` is true when a signal stopped training
    (nothing is evaluated then; rerun to resume).
    """
    counts = check_architectures(configs)
    spec0 = get_spec(configs[0].model)
    loaded = []  # all test images read before any training
    for name, path in test_sets:
        if path is None and name in E.DATASETS and E.DATASETS[name].bundled is None:
            raise CompareError(f"test set {name} is not bundled: pass --test-sets={name}=PATH with the folder of "
                               f"its images")
        folder = E.dataset_dir(name, path)
        loaded.append((name, E.load_test_images(folder, spec0.protocol.color)))
    out.mkdir(parents=True, exist_ok=True)
    s = configs[0]
    summary: dict[str, Any] = {
        "task": spec0.task.name, "metric": "psnr_y" if spec0.protocol.metric == "y" else "psnr",
        "settings": {k: v for k, v in s.to_json().items() if k not in ("model", "workdir", "init_from")},
        "test_sets": [n for n, _ in test_sets], "models": [], "val_psnr_input": None, "interrupted": False,
    }
    for cfg in configs:
        row: dict[str, Any] = {"model": cfg.model, "params": counts[cfg.model], "status": "ok"}
        summary["models"].append(row)
        echo(f"== {cfg.model} ({counts[cfg.model]:,} parameters) ==")
        t0 = time.perf_counter()
        try:
            result = train(cfg, progress=progress, echo=echo)
        except NonFiniteLossError as exc:
            row["status"] = "diverged"
            row["error"] = " ".join(str(exc).split())
            echo(f"{cfg.model}: {row['error']}")
            continue
        if result.step > result.start_step:  # trained in this invocation (not only resumed and found done)
            row["train_seconds"] = time.perf_counter() - t0
        row["steps"] = result.step
        row["steps_per_sec"] = result.steps_per_sec
        row["val_curve"], inputs = read_val_curve(cfg.resolved_workdir())
        row["val_psnr"] = row["val_curve"][-1][1] if row["val_curve"] else result.val_psnr
        if inputs is not None or result.val_psnr_input is not None:
            summary["val_psnr_input"] = inputs if inputs is not None else result.val_psnr_input
        if result.interrupted:
            summary["interrupted"] = True
            row["status"] = "interrupted"
            break
        if result.checkpoint is None:
            row["status"] = "no checkpoint"
            continue
        row["checkpoint"] = str(result.checkpoint)
        model = load_trained(cfg.model, Path(result.checkpoint), dict(cfg.model_kwargs))
        row["test"] = evaluate_model(model, get_spec(cfg.model), loaded)
        echo(f"{cfg.model}: " + ", ".join(f"{c} {v['psnr']:.2f} dB" for c, v in row["test"].items()))
    write_json_atomic(out / "compare.json", summary)
    table = format_table(summary)
    _atomic_write(out / "compare.md", lambda tmp: tmp.write_text(table))
    plot_curves(summary, out / "val_psnr.png")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    err = sys.stderr
    try:
        models = parse_models(args.models)
        out = Path(args.out).expanduser().absolute()
        if out.exists() and not out.is_dir():
            raise CompareError(f"--out {out} exists and is not a folder")
        test_sets = parse_test_sets(args.test_sets, get_spec(models[0]).protocol.dataset)
        configs = build_configs(models, args, out)
        summary = run_comparison(configs, test_sets, out, progress=not args.no_progress)
    except (CompareError, TrainConfigError, IncompatibleWorkdirError, TrainDataError) as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=err)
        return 2
    except (ValueError, OSError) as exc:
        if os.environ.get("CONVERSE_JAX_TRACEBACK"):
            raise
        print(f"{PROG}: error: {one_line(exc)}", file=err)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted: finished checkpoints are kept; rerun to resume", file=err)
        return 130
    print((out / "compare.md").read_text(), end="")
    print(f"written: {out / 'compare.md'}, {out / 'compare.json'}, {out / 'val_psnr.png'}")
    if summary["interrupted"]:
        print("interrupted: rerun the same command to resume")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
