"""Restore your own images with a released (or trained) network; writes PNG files.

    python -m experiments.restore --model=NAME --input=FILE|DIR --output=FILE|DIR
        [--kernel=FILE] [--sf=1] [--weights=PATH] [--arch=K=V,...] [--x8]
        [--tile=N] [--tile-overlap=M] [--max-memory=GiB] [--overwrite]

A folder input restores every image in it into the output folder (``<name>.png``); an image
that cannot be read is reported and skipped, the others are still written, and the exit code
is 1. Gray models restore each channel of an RGB image; RGB models take gray images as three
equal channels and write gray. Non-blind deblurring needs --kernel (.npy or an image,
normalised to sum 1).

Large images are restored in overlapping tiles of one shape (docs/restore.md): without --tile
the whole image when its estimated peak memory fits --max-memory, else the largest tile that
does (without --max-memory, on CPU, the deblurring networks, whose small tiles lose accuracy, may give
the whole image or their tiles half the available RAM, other networks 2 GiB); --tile=0 forces the whole
image. Existing output files are kept unless --overwrite; every output is checked before the network
is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from converse_jax import evaluation as E
from converse_jax.imageio import ImageError, list_images, read_image, read_kernel, write_image
from converse_jax.tiling import is_out_of_memory
from experiments import _cli
from experiments._cli import (
    Heartbeat,
    Progress,
    add_tile_flags,
    add_weights_flags,
    check_output_dir,
    check_output_file,
    check_tile_flags,
    load_model,
    one_line,
    oom_hint,
    run_main,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.restore", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model name (see converse_jax.models.list_models())")
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--output", required=True, help="a .png file (single input) or a folder")
    p.add_argument("--kernel", help="blur kernel for non-blind deblurring: .npy or an image")
    p.add_argument("--sf", type=int, default=1, help="scale factor of non-blind models (default 1)")
    add_weights_flags(p)
    p.add_argument("--x8", action="store_true", help="8-fold flip/rotate self-ensemble")
    add_tile_flags(p)
    _cli.add_precision_flag(p)
    p.add_argument("--no-progress", action="store_true", help="print only one line per image")
    return p


def plan(inp: Path, out: Path, out_is_dir: bool = False) -> list[tuple[Path, Path]]:
    """(input, output) file pairs; ValueError for impossible requests.

    ``out_is_dir``: the user wrote the output with a trailing slash (a folder to create).
    """
    if not inp.exists():
        raise ValueError(f"--input {inp} does not exist")
    if inp.is_dir():
        files = list_images(inp)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--output {out} is a file but --input is a folder: give a folder")
        if out.exists() and out.resolve() == inp.resolve():
            raise ValueError("--output is the input folder: choose another folder so no input is overwritten")
        names: dict[str, int] = {}
        for f in files:
            names[f.stem] = names.get(f.stem, 0) + 1
        # Two inputs with one stem (a.png, a.bmp) keep their suffix in the output name.
        return [(f, out / (f"{f.stem}.png" if names[f.stem] == 1 else f"{f.name}.png")) for f in files]
    if out.is_dir() or out_is_dir:
        target = out / f"{inp.stem}.png"
    else:
        if out.suffix.lower() != ".png":
            raise ValueError(f"--output {out}: restored images are written as PNG; name it *.png or give a folder")
        target = out
    if target.exists() and target.resolve() == inp.resolve():
        raise ValueError(f"--output {target} is the input file: choose another name so it is not overwritten")
    return [(inp, target)]


def _prepare_outputs(args: argparse.Namespace) -> list[tuple[Path, Path]]:
    """The (input, output) pairs, every output checked (and its folder made) before any compute."""
    out_is_dir = args.output.endswith(("/", os.sep))
    inp = Path(args.input).expanduser()
    pairs = plan(inp, Path(args.output).expanduser(), out_is_dir)
    out_dir = pairs[0][1].parent
    if not out_dir.exists():
        if inp.is_dir() or out_is_dir:
            check_output_dir(out_dir, "--output")
            out_dir.mkdir(parents=True, exist_ok=True)
        else:
            raise ValueError(f"--output folder {out_dir} does not exist; create it first")
    existing = [dst for _, dst in pairs if dst.exists()]
    if existing and not args.overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise ValueError(f"--output {existing[0]}{more} already exist(s); pass --overwrite to replace, "
                         "or choose another --output")
    for _, dst in pairs[:1]:
        check_output_file(dst, "--output", overwrite=True)
    return pairs


def _restore_one(args: argparse.Namespace, ctx: dict, src: Path, dst: Path, index: str) -> None:
    """Read, restore (whole or tiled) and write one image, reporting its tiles."""
    img = read_image(src)
    h, w = img.shape[:2]
    tile, overlap = args.tile, args.tile_overlap
    if tile is None:
        if ctx.get("mem") is None:
            print(f"estimating the memory {args.model} needs (XLA's analysis of two small compilations); "
                  "--tile=N skips this", file=sys.stderr, flush=True)
            ctx["mem"] = E.memory_model(ctx["model"], ctx["spec"], args.sf)
        tile = E.auto_tile(ctx["mem"], ctx["spec"], h, w, ctx["budget"], args.sf, photo=True,
                           whole_budget=ctx["whole_budget"])
        if tile:
            overlap = min(overlap, (tile - 1) // 2)  # a small chosen tile takes a smaller overlap
    margin = E.photo_margin(ctx["spec"], True)
    if tile >= max(h, w) + 2 * margin:
        tile = 0  # one tile: the whole image
    how = "whole image" if tile == 0 else f"tiles of {tile} px, overlap {overlap}"
    if margin:
        how += f", {margin} px tapered border"
    print(f"{index} {src} ({w}x{h}): {how}", flush=True)
    progress = Progress(f"{src.name}", enabled=not args.no_progress)
    restorer = E.make_restorer(ctx["model"], ctx["spec"], tile, overlap, blend=args.tile_blend,
                                on_tile=progress, photo=True)
    t0 = time.monotonic()
    try:
        with Heartbeat(f"{src.name} (whole image)", enabled=tile == 0 and not args.no_progress):
            out = E.restore_array(restorer, ctx["spec"], img, kernel=ctx["kernel"], sf=args.sf, x8=args.x8)
    except Exception as exc:  # noqa: BLE001 - out-of-memory is any of several XLA error types
        if is_out_of_memory(exc):
            raise MemoryError(oom_hint(tile, h, w)) from None
        raise
    finally:
        progress.close()
    write_image(dst, out)
    print(f"{index} {src} -> {dst} ({time.monotonic() - t0:.1f} s)", flush=True)


def run(args: argparse.Namespace) -> int:
    spec = E.get_model_spec(args.model)
    E.check_restore_options(spec, args.kernel is not None, args.sf)  # before anything slow
    kernel = read_kernel(args.kernel) if args.kernel is not None else None
    check_tile_flags(args.tile, args.tile_overlap)
    budget = E.memory_budget(args.max_memory)
    pairs = _prepare_outputs(args)
    model, spec = load_model(args.model, args.weights, args.arch)
    E.check_kernel_size(model, kernel)  # once, before the folder
    ctx = {"model": model, "spec": spec, "kernel": kernel, "budget": budget, "mem": None,
           "whole_budget": E.memory_budget(args.max_memory, whole_image=True)}
    failed = 0
    for n, (src, dst) in enumerate(pairs, 1):
        try:
            _restore_one(args, ctx, src, dst, f"[{n}/{len(pairs)}]")
        except ImageError as exc:
            failed += 1
            print(f"error: {exc}", file=sys.stderr)
        except (ValueError, OSError, RuntimeError, MemoryError) as exc:
            failed += 1
            print(f"error: {src}: {one_line(exc)}", file=sys.stderr)
    if failed:
        print(f"{failed} of {len(pairs)} image(s) failed; the others were written", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(run, build_parser().parse_args(argv))


__all__ = ["build_parser", "main", "plan", "run"]

if __name__ == "__main__":
    sys.exit(main())
