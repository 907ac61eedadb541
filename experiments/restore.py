"""Restore your own images with a released (or trained) network; writes PNG files.

    python -m experiments.restore --model=NAME --input=FILE|DIR --output=FILE|DIR
        [--kernel=FILE] [--sf=1] [--weights=PATH] [--x8]

A folder input restores every image in it into the output folder (``<name>.png``); an image
that cannot be read is reported and skipped, the others are still written, and the exit code
is 1. Gray models restore each channel of an RGB image; RGB models take gray images as three
equal channels and write gray. Non-blind deblurring needs --kernel (.npy or an image,
normalised to sum 1).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from converse_jax import evaluation as E
from converse_jax.imageio import ImageError, list_images, read_image, read_kernel, write_image
from experiments._cli import one_line, run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.restore", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model name (see converse_jax.models.list_models())")
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--output", required=True, help="a .png file (single input) or a folder")
    p.add_argument("--kernel", help="blur kernel for non-blind deblurring: .npy or an image")
    p.add_argument("--sf", type=int, default=1, help="scale factor of non-blind models (default 1)")
    p.add_argument("--weights", help="checkpoint (.pth, .safetensors or converted); default: released")
    p.add_argument("--x8", action="store_true", help="8-fold flip/rotate self-ensemble")
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


def run(args: argparse.Namespace) -> int:
    spec = E.get_model_spec(args.model)
    E.check_restore_options(spec, args.kernel is not None, args.sf)  # before anything slow
    kernel = read_kernel(args.kernel) if args.kernel is not None else None
    out_is_dir = args.output.endswith(("/", os.sep))
    pairs = plan(Path(args.input).expanduser(), Path(args.output).expanduser(), out_is_dir)
    out_dir = pairs[0][1].parent
    if not out_dir.exists():
        if Path(args.input).is_dir() or out_is_dir:
            out_dir.mkdir(parents=True, exist_ok=True)
        else:
            raise ValueError(f"--output folder {out_dir} does not exist; create it first")
    model, spec = E.load_model(args.model, args.weights)
    restorer = E.Restorer(model, spec.task)
    failed = 0
    for src, dst in pairs:
        try:
            img = read_image(src)
            out = E.restore_array(restorer, spec, img, kernel=kernel, sf=args.sf, x8=args.x8)
            write_image(dst, out)
            print(f"{src} -> {dst}")
        except ImageError as exc:
            failed += 1
            print(f"error: {exc}", file=sys.stderr)
        except (ValueError, OSError, RuntimeError, MemoryError) as exc:
            failed += 1
            print(f"error: {src}: {type(exc).__name__}: {one_line(exc)}", file=sys.stderr)
    if failed:
        print(f"{failed} of {len(pairs)} image(s) failed; the others were written", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(run, build_parser().parse_args(argv))


__all__ = ["build_parser", "main", "plan", "run"]

if __name__ == "__main__":
    sys.exit(main())
