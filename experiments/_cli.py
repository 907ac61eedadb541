"""What every command-line entry point shares: one-line errors and exit codes, the --precision flag;
for restore and evaluate also the tile flags, output checks and per-tile progress."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from converse_jax.console import interactive, progress_bar


def one_line(exc: BaseException) -> str:
    """An exception's message folded onto one line (its type's name when it has no message)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def run_main(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Call ``run(args)``: bad input (ValueError, OSError) -> one ``error:`` line and exit 2; Ctrl-C -> 130."""
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2


def add_precision_flag(p: argparse.ArgumentParser) -> None:
    """--precision float32|bf16 (default float32).

    Parsing sets the process-wide default precision (:mod:`converse_jax.nn.precision`) and
    $CONVERSE_JAX_PRECISION, which the worker processes the command starts inherit, so that every
    network the command builds, released weights included, computes in it. Every parse sets both,
    also when the flag is absent (argparse passes a string default through ``type``), so a second
    command in the same process does not inherit the first one's choice.
    """
    from converse_jax.nn.precision import PRECISIONS  # imports jax: only for the commands that take the flag

    p.add_argument("--precision", default="float32", type=_use_precision, metavar="{" + ",".join(PRECISIONS) + "}",
                   help="compute precision: float32 (default), or bf16: bfloat16 1x1 convolutions, LayerNorm, "
                        "GELU and linear layers with float32 parameters and Converse2D solver (docs/precision.md)")


def _use_precision(text: str) -> str:
    """``--precision``'s type: validate ``text`` and make it the default precision of this process."""
    from converse_jax.nn import precision as P

    try:
        name = P.check_precision(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    P.set_default_precision(name)
    os.environ[P.ENV_VAR] = name
    return name


# ------------------------------------------------------------------------------------------------
# Weights (restore and evaluate)


def add_weights_flags(p: argparse.ArgumentParser) -> None:
    """--weights and --arch."""
    p.add_argument("--weights", metavar="PATH",
                   help="a .pth, .safetensors, converted or training checkpoint, or a training workdir (its "
                        "latest checkpoint). Default: the released weights from $CONVERSE_ASSETS/weights, the "
                        "cache ($CONVERSE_JAX_CACHE) or a download, in this order")
    p.add_argument("--arch", metavar="K=V,...",
                   help="architecture of a network trained with --arch (e.g. 'features=16,num_blocks=4'); "
                        "a training checkpoint records its own, so it needs none")


def load_model(name: str, weights: str | None, arch: str | None) -> tuple[Any, Any]:
    """``(model with weights, registry spec)``, the weights found as ``load_pretrained`` finds them;
    prints the ``weights: <file> (<source>)`` line. A network of another architecture (``--arch``, or
    a training checkpoint's) gets a test protocol without the paper's figures, and one of its own scale
    when its ``upscale`` differs."""
    import dataclasses

    from converse_jax import evaluation as E
    from converse_jax.train.config import parse_model_kwargs
    from converse_jax.weights.pretrained import load_with_source

    spec = E.get_model_spec(name)
    kwargs = parse_model_kwargs(arch) if arch is not None else None
    loaded = load_with_source(name, weights, arch=kwargs, progress=interactive())
    model, arch_used = loaded.model, loaded.arch
    if arch_used and spec.protocol is not None:  # not the paper's network: no paper figure to compare with
        spec = dataclasses.replace(spec, protocol=dataclasses.replace(spec.protocol, paper={}))
    up = int(arch_used.get("upscale", spec.scale))
    if up != int(spec.scale) and spec.protocol is not None:
        spec = dataclasses.replace(spec, scale=up, protocol=dataclasses.replace(spec.protocol, scale=up, modcrop=up,
                                                                                 border=up))
    return model, spec


# ------------------------------------------------------------------------------------------------
# Tiles, memory and outputs (restore and evaluate)


def add_tile_flags(p: argparse.ArgumentParser, whole_by_default: bool = False) -> None:
    """--tile, --tile-overlap, --tile-blend, --max-memory (restore only) and --overwrite."""
    from converse_jax.evaluation import DEFAULT_OVERLAP

    default = ("0: the whole image, the paper's protocol" if whole_by_default else
               "the whole image when its estimated peak memory fits --max-memory, else the largest tile that does")
    p.add_argument("--tile", type=int, metavar="N",
                   help=f"restore in overlapping N x N tiles (input pixels; 0 = whole image). Default: {default}")
    p.add_argument("--tile-overlap", type=int, default=DEFAULT_OVERLAP, metavar="M",
                   help=f"input pixels shared by neighbouring tiles (default {DEFAULT_OVERLAP}; "
                        "the task's context margin can widen it)")
    p.add_argument("--tile-blend", choices=("crop", "window"), default="crop",
                   help="how overlaps are joined: centre crops (default) or a smooth window")
    if not whole_by_default:
        p.add_argument("--max-memory", type=float, metavar="GiB",
                       help="memory budget for choosing the tile (default: 90%% of the accelerator's memory; "
                            "on CPU half the available RAM, at most 2 GiB for tiles; uncapped for the whole "
                            "image and its tiles with the deblurring networks, whose small tiles lose accuracy)")
    p.add_argument("--overwrite", action="store_true", help="replace output files that already exist")


def check_tile_flags(tile: int | None, overlap: int) -> None:
    """ValueError for --tile/--tile-overlap values that no image could use (checked before any compute)."""
    from converse_jax.tiling import MIN_TILE

    if tile is not None and tile < 0:
        raise ValueError(f"--tile must be >= 0 (0: the whole image), got {tile}")
    if tile and tile < MIN_TILE:
        raise ValueError(f"--tile must be 0 (whole image) or at least {MIN_TILE} pixels, got {tile}")
    if overlap < 0 or (tile and 2 * overlap >= tile):
        raise ValueError("--tile-overlap must be >= 0" + (f" and less than half the tile ({tile})" if tile else "")
                         + f", got {overlap}")


def check_output_file(path: Path, flag: str, overwrite: bool) -> None:
    """ValueError unless ``path`` can be written: its folder exists and is writable, it is not a
    folder, and it does not exist yet (or ``overwrite``)."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder: give a file name")
    if not path.parent.is_dir():
        raise ValueError(f"{flag}: folder {path.parent} does not exist; create it first")
    _check_writable(path.parent, flag)
    if path.exists() and not overwrite:
        raise ValueError(f"{flag} {path} already exists; pass --overwrite to replace it or choose another name")


def check_output_dir(path: Path, flag: str) -> None:
    """ValueError unless ``path`` is (or can be created as) a writable folder."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file: give a folder")
    parent = path
    while not parent.exists():
        parent = parent.parent
    _check_writable(parent, flag)


def _check_writable(folder: Path, flag: str) -> None:
    """Create and remove a probe file in ``folder`` (permission bits alone miss read-only mounts
    and virtual file systems, and say yes to root)."""
    probe = folder / f".write-test-{os.getpid()}"
    try:
        probe.open("x").close()
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"{flag}: cannot write in {folder} ({exc.strerror or exc}); choose another place") from None


def oom_hint(tile: int, height: int, width: int) -> str:
    """The ``--tile`` value to try after running out of memory at ``tile`` (0: whole image)."""
    current = tile if tile > 0 else max(height, width)
    suggest = max(64, 1 << max(6, (current // 2).bit_length() - 1))
    return f"out of memory; try --tile={suggest} (smaller tiles need less memory)"


class Progress:
    """Per-tile progress of one image: a tqdm bar in a terminal or notebook (a fixed width when the
    terminal reports 0 columns), plain ``label: tile i/n`` lines at most every few seconds in a pipe."""

    def __init__(self, label: str, stream: Any = None, every_s: float = 5.0, enabled: bool = True) -> None:
        self.label, self.stream, self.every_s, self.enabled = label, stream or sys.stderr, every_s, enabled
        self._bar: Any = None
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 1:
            return
        if interactive(self.stream):
            if self._bar is None:
                self._bar = progress_bar(total, desc=self.label, unit="tile", stream=self.stream, leave=False)
            if done < self._bar.n:  # a gray network restores an RGB image channel by channel
                self._bar.reset(total)
            self._bar.update(done - self._bar.n)
            return
        now = time.monotonic()
        if done == total or now - self._last >= self.every_s or self._last == 0.0:
            self._last = now
            print(f"{self.label}: tile {done}/{total}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Heartbeat:
    """Elapsed time of one long step that reports nothing finer (an image restored whole), from a
    background thread: a tqdm counter of seconds in a terminal or notebook, a plain ``label: N s``
    line every ``every_s`` seconds in a pipe. Use as a context manager around the step."""

    def __init__(self, label: str, stream: Any = None, every_s: float = 5.0, enabled: bool = True) -> None:
        self.label, self.stream, self.every_s, self.enabled = label, stream or sys.stderr, every_s, enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self.enabled:
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _beat(self) -> None:
        t0 = time.monotonic()
        if not interactive(self.stream):
            while not self._stop.wait(self.every_s):
                print(f"{self.label}: {time.monotonic() - t0:.0f} s", file=self.stream, flush=True)
            return
        bar = progress_bar(None, desc=self.label, unit="s", stream=self.stream, leave=False,
                           bar_format="{desc}: {elapsed}")
        while not self._stop.wait(1.0):
            bar.refresh()
        bar.close()
