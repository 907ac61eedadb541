"""Train a network of the paper (data-parallel over every device, resumable).

    python -m experiments.train --model=NAME [--data=SPEC] [--steps=N] [--batch-size=N] [--patch-size=N]
        [--sigma=25|LOW,HIGH] [--lr=X] [--seed=N] [--workdir=DIR] [--eval-every=N] [--save-every=N]
        [--keep=N] [--num-workers=N] [--val-data=SPEC] [--init-from=pretrained|PATH] [--arch=K=V,...]

Rerunning the same command resumes from the workdir's last checkpoint. Ctrl-C (SIGINT) or SIGTERM
finishes the current step, saves a checkpoint and exits with status 130. Compiled programs are cached
in $CONVERSE_JAX_COMPILE_CACHE (default ~/.cache/converse_jax/xla; 'off' disables it).

Multi-process (several hosts, or one process per GPU): the same command in every process with
--multihost and one --workdir that all of them see; outside SLURM, Open MPI and Cloud TPU also
--coordinator-address, --num-processes and --process-id. A signal to any process stops all of them
after the same step.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import jax

from converse_jax.models import get_spec, list_models
from converse_jax.train import (
    IncompatibleWorkdirError,
    NonFiniteLossError,
    TrainConfigError,
    TrainDataError,
    config_from_spec,
    enable_compilation_cache,
    evaluate_command,
    parse_int_list,
    parse_model_kwargs,
    parse_range,
    setup_distributed,
    train,
)
from converse_jax.train.loop import SecondInterrupt
from experiments import _cli
from experiments._cli import one_line

PROG = "python -m experiments.train"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _recipes_epilog() -> str:
    lines = ["Defaults per model (the paper publishes no training recipe; practice of docs/training.md, "
             "see experiments/configs/<model>.py):"]
    for name in list_models():
        spec = get_spec(name)
        r, noise = spec.recipe, spec.task.recipe_noise(spec.recipe)
        extra = f", {noise}" if noise else ""
        lines.append(f"  {name}: {r.steps} steps, batch {r.batch_size}, patch {r.patch_size}, Adam {r.lr:g} "
                     f"halved at {','.join(map(str, r.lr_milestones)) or 'never'}, {r.loss}{extra}.")
        lines.append(f"    source: {r.source}")
    lines.append("Data SPECs: 'embedded' (synthetic dead-leaves images, no download), 'folder:PATH', "
                 "'tfds:NAME[:SPLIT]'.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n")[0], epilog=_recipes_epilog(),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    recipe = "default: the model's recipe"
    p.add_argument("--model", required=True, choices=list_models(), help="network to train")
    p.add_argument("--data", help="training images: embedded | folder:PATH | tfds:NAME[:SPLIT] "
                                  "(default: embedded)")
    p.add_argument("--val-data", help="validation images (folder:PATH, ...); default: held-out embedded images")
    p.add_argument("--steps", type=int, help=f"total optimisation steps ({recipe})")
    p.add_argument("--batch-size", type=int, help=f"global batch, split over all devices ({recipe})")
    p.add_argument("--patch-size", type=int, help=f"target patch side in pixels ({recipe})")
    p.add_argument("--sigma", help="denoising noise level, a value or a range 'low,high' on the 0..255 scale "
                                   "(default: 25)")
    p.add_argument("--blur-noise", help="deblurring noise level or range on the 0..255 scale (default: 0,2.55)")
    p.add_argument("--lr", type=float, help=f"Adam learning rate ({recipe})")
    p.add_argument("--lr-milestones", help=f"steps at which the lr is halved, comma-separated or 'none' ({recipe})")
    p.add_argument("--loss", choices=("l1", "l2"), help=f"pixel loss ({recipe})")
    p.add_argument("--seed", type=int, help="seed of the initialisation and of the data stream (default: 0)")
    p.add_argument("--workdir", help="checkpoints, logs and config (default: ./runs/<model>); rerun to resume")
    p.add_argument("--eval-every", type=int, help="validate every N steps (default: per model, see configs)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (default: per model)")
    p.add_argument("--log-every", type=int, help="write metrics (JSONL, TensorBoard) every N steps (default: 10)")
    p.add_argument("--keep", type=int, help="checkpoints to keep (default: 3)")
    p.add_argument("--num-workers", type=int, help="data worker processes (default: 0, in-process threads)")
    p.add_argument("--val-count", type=int, help="validation images (default: 8)")
    p.add_argument("--val-size", type=int, help="validation crop side (default: 96)")
    p.add_argument("--init-from", help="start from 'pretrained' (the released weights) or a checkpoint PATH "
                                       "(.pth, .safetensors, converted or training checkpoint, or a workdir)")
    p.add_argument("--arch", help="architecture overrides for the model constructor, e.g. "
                                  "'features=16,num_blocks=4' (checkpoints then need the same --arch)")
    p.add_argument("--multihost", action="store_true", default=None,
                   help="join a multi-process run with jax.distributed.initialize() (also when "
                        "$JAX_COORDINATOR_ADDRESS is set or one of the three options below is given); run the "
                        "same command in every process, with one shared --workdir")
    p.add_argument("--coordinator-address", help="multi-process: HOST:PORT of process 0 (else auto-detected on "
                                                 "SLURM, Open MPI and Cloud TPU)")
    p.add_argument("--num-processes", type=int, help="multi-process: number of processes (else auto-detected)")
    p.add_argument("--process-id", type=int, help="multi-process: this process's index, 0..N-1 (else "
                                                  "auto-detected)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _cli.add_precision_flag(p)
    return p


def load_config(model: str) -> Any:
    """``experiments.configs.<model>.get_config()``, or the registry recipe without such a file."""
    try:
        module = importlib.import_module(f"experiments.configs.{model}")
    except ModuleNotFoundError as exc:
        if exc.name != f"experiments.configs.{model}":
            raise
        return config_from_spec(model)
    return module.get_config()


def config_from_args(args: argparse.Namespace) -> Any:
    """The model's config with the command line's overrides applied."""
    cfg = load_config(args.model)
    over: dict[str, Any] = {}
    for name in ("data", "val_data", "steps", "batch_size", "patch_size", "lr", "loss", "seed", "workdir",
                 "eval_every", "save_every", "log_every", "keep", "num_workers", "val_count", "val_size",
                 "init_from", "precision"):
        value = getattr(args, name)
        if value is not None:
            over[name] = value
    if args.sigma is not None:
        over["sigma"] = parse_range(args.sigma, "sigma")
    if args.blur_noise is not None:
        over["blur_noise"] = parse_range(args.blur_noise, "blur_noise")
    if args.lr_milestones is not None:
        over["lr_milestones"] = parse_int_list(args.lr_milestones)
    if args.arch is not None:
        over["model_kwargs"] = parse_model_kwargs(args.arch)
    return dataclasses.replace(cfg, **over).validate()


def _multihost(args: argparse.Namespace) -> bool | None:
    """--multihost, implied by any of the options that only a multi-process run uses (None: decide
    from the environment)."""
    if args.multihost or any(v is not None for v in (args.coordinator_address, args.num_processes,
                                                     args.process_id)):
        return True
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    err = sys.stderr
    try:
        setup_distributed(_multihost(args), coordinator_address=args.coordinator_address,
                          num_processes=args.num_processes, process_id=args.process_id)
        enable_compilation_cache()
        config = config_from_args(args)
        result = train(config, progress=not args.no_progress)
    except NonFiniteLossError as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=err)
        return 1
    except (TrainConfigError, IncompatibleWorkdirError, TrainDataError) as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=err)
        return 2
    except (ValueError, OSError) as exc:  # bad data source, unreadable file, weights not found, ...
        if os.environ.get("CONVERSE_JAX_TRACEBACK"):
            raise
        print(f"{PROG}: error: {one_line(exc)}", file=err)
        return 2
    except SecondInterrupt:
        print(f"{PROG}: stopped by a second Ctrl-C: the last finished checkpoint is kept; rerun the same "
              f"command to resume", file=err)
        return 130
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted: checkpoints already written are kept; rerun the same command to resume",
              file=err)
        return 130

    if jax.process_index() != 0:
        return 130 if result.interrupted else 0
    out = sys.stdout
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint} (step {result.step})", file=out)
        print(f"evaluate: {evaluate_command(config.model, result.checkpoint)}", file=out)
    if result.val_psnr is not None:
        print(f"validation PSNR {result.val_psnr:.2f} dB (inputs {result.val_psnr_input:.2f} dB)", file=out)
    if result.steps_per_sec:
        print(f"speed: {result.steps_per_sec:.2f} steps/s (after compilation)", file=out)
    if result.interrupted:
        print(f"interrupted: rerun the same command to resume from step {result.step}", file=out)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
