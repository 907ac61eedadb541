"""Evaluate a network with the paper's test protocol and print PSNR/SSIM per image.

    python -m experiments.evaluate --model=NAME [--dataset=NAME] [--data-dir=DIR]
        [--weights=PATH] [--arch=K=V,...] [--sigma=25] [--kernel=N] [--x8] [--save-images=DIR] [--json=FILE]
        [--tile=N] [--tile-overlap=M] [--overwrite]

Datasets: set12, bsd68 (denoising), set5, set14, bsd100, urban100 (SR, deblurring). Set12
and Set5 are bundled with the shared assets; the others need --data-dir. Without --dataset
the model's own protocol picks it; --data-dir alone evaluates any folder of images, and
results are labelled with that folder's name. Images are restored whole (the paper's protocol)
unless --tile=N asks for overlapping tiles (docs/restore.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from converse_jax import evaluation as E
from converse_jax.evaluation import DATASETS
from converse_jax.fileio import write_json_atomic
from converse_jax.tiling import is_out_of_memory
from experiments import _cli
from experiments._cli import (
    add_tile_flags,
    add_weights_flags,
    check_output_dir,
    check_output_file,
    check_tile_flags,
    load_model,
    oom_hint,
    run_main,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model name (see converse_jax.models.list_models())")
    p.add_argument("--dataset", help=f"one of {', '.join(DATASETS)} (default: the model's protocol)")
    p.add_argument("--data-dir", help="folder of ground-truth images (required for sets not bundled)")
    add_weights_flags(p)
    p.add_argument("--sigma", type=float, help="denoising noise level on the 0..255 scale (default 25)")
    p.add_argument("--kernel", type=int, help="deblurring: run only kernel N (1..5) of the paper's table")
    p.add_argument("--x8", action="store_true", help="8-fold flip/rotate self-ensemble")
    p.add_argument("--save-images", metavar="DIR", help="write the restored images (PNG) here")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON here")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_tile_flags(p, whole_by_default=True)
    _cli.add_precision_flag(p)
    return p


def run(args: argparse.Namespace) -> int:
    spec = E.get_model_spec(args.model)
    if args.dataset is not None and args.dataset.lower() not in DATASETS:
        raise ValueError(f"unknown dataset {args.dataset!r}: choose one of {', '.join(DATASETS)}, or omit "
                         "--dataset and pass --data-dir=DIR to evaluate any folder")
    if args.data_dir is not None:  # the folder names the results, even when --dataset picked the protocol
        dataset = Path(args.data_dir).expanduser().resolve().name.lower() or "images"
    elif args.dataset is not None:
        dataset = args.dataset.lower()
    else:
        dataset = spec.protocol.dataset
    protocol = E.resolve_protocol(spec, dataset=dataset, sigma=args.sigma,
                                  kernels=None if args.kernel is None else [args.kernel])
    folder = E.dataset_dir(dataset, args.data_dir)
    json_path = Path(args.json).expanduser() if args.json else None
    if json_path is not None:
        check_output_file(json_path, "--json", args.overwrite)
    if args.save_images is not None:
        check_output_dir(Path(args.save_images).expanduser(), "--save-images")
    check_tile_flags(args.tile, args.tile_overlap)
    tile = args.tile or 0
    images = E.load_test_images(folder, protocol.color)  # all readable before the long part
    print("restoring each image " + (f"in tiles of {tile} px, overlap {args.tile_overlap} (--tile)" if tile else
                                     "whole, as the paper's protocol does (--tile=N for tiles)"), file=sys.stderr)
    model, model_spec = load_model(args.model, args.weights, args.arch)
    if model_spec != spec:  # trained with --arch: its own scale, no paper figures
        spec = model_spec
        protocol = E.resolve_protocol(spec, dataset=dataset, sigma=args.sigma,
                                      kernels=None if args.kernel is None else [args.kernel])
    restorer = E.make_restorer(model, spec, tile, args.tile_overlap, blend=args.tile_blend)
    try:
        report = E.evaluate(model, spec, images, protocol=protocol, dataset=dataset, x8=args.x8,
                            save_dir=args.save_images, progress=not args.no_progress, restorer=restorer)
    except Exception as exc:  # noqa: BLE001 - out-of-memory is any of several XLA error types
        if is_out_of_memory(exc):
            side = max(max(img.shape[:2]) for _, img in images)
            raise ValueError(oom_hint(tile, side, side)) from None
        raise
    print(report.format_table())
    if json_path is not None:
        write_json_atomic(json_path, report.to_dict())
        print(f"results written to {json_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
