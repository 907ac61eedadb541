"""Export a network for deployment: a serialized jax.export (StableHLO) module or an ONNX graph.

    python -m experiments.export --model=NAME --format=stablehlo|onnx --height=H --width=W --out=PATH
        [--weights=PATH | --arch=K=V,... [--seed=N]] [--batch=B] [--sf=1] [--platforms=cpu,cuda]
        [--fft=matmul|dft] [--opset=N] [--precision=float32|bf16] [--overwrite]

The artifact computes the network's task forward for NHWC float32 images in [0, 1] of exactly
H x W pixels (the Converse2D FFT sizes depend on them); non-blind networks (usrnet) take a second
input, the (B, 7, 7) blur kernels, and export with a fixed --sf. Without --batch the batch is
symbolic (StableHLO) or 1 (ONNX, whose batch is fixed). Without --weights: the released weights, or with
--arch a freshly initialised smaller network (seed --seed). --precision=bf16 exports the network's
mixed-precision forward (bfloat16 compute, float32 parameters, inputs and outputs; docs/precision.md),
StableHLO only: ONNX Runtime's CPU provider has no bfloat16 kernels for the graph's operators.
PATH.json describes the artifact (shapes, layout, value range, precision, weights' SHA-256, versions).
See docs/deploy.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from experiments._cli import add_precision_flag, run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.export", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model name (dncnn, srresnet, conversenet, usrnet)")
    p.add_argument("--format", required=True, choices=("stablehlo", "onnx"))
    p.add_argument("--height", type=int, required=True, help="input height in pixels (fixed per artifact)")
    p.add_argument("--width", type=int, required=True, help="input width in pixels (fixed per artifact)")
    p.add_argument("--batch", type=int, help="fixed batch size (default: symbolic for StableHLO, 1 for ONNX)")
    p.add_argument("--sf", type=int, default=1, help="scale factor of non-blind models (default 1)")
    p.add_argument("--weights", help="checkpoint (.pth, .safetensors, converted or training checkpoint, or a "
                                     "training workdir); default: the released weights (assets folder, cache, "
                                     "download)")
    p.add_argument("--arch", help="architecture overrides, e.g. 'features=8,num_blocks=1' (fresh weights "
                                  "unless --weights holds a checkpoint of that architecture)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed with --arch and no --weights")
    p.add_argument("--platforms", default="cpu", help="StableHLO: comma-separated lowering platforms "
                                                      "(cpu, cuda, rocm, tpu; default cpu)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's, 23)")
    p.add_argument("--fft", choices=("matmul", "dft"), default=None,
                   help="ONNX only: the 2-D FFTs as products with DFT matrices (default; constants) or as 1-D "
                        "DFT nodes (opset >= 20, no constants); docs/deploy.md compares their speed")
    add_precision_flag(p)
    p.add_argument("--out", required=True, help="artifact path (.stablehlo / .onnx); PATH.json is written too")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing --out (or its .json) without --overwrite, and a folder that cannot be written."""
    for p in (out, Path(str(out) + ".json")):
        if p.is_dir():
            raise ValueError(f"--out {p} is a folder; give a file name")
        if p.exists() and not overwrite:
            raise ValueError(f"--out {p} exists; pass --overwrite to replace it or choose another name")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"--out folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--out folder {parent} is not writable; choose another --out")


def load(args: argparse.Namespace):
    """(model, model spec, weights path or None, arch dict). The weights are found as every command
    finds them (converse_jax.weights.pretrained.find_weights), unless --arch without --weights asks
    for a freshly initialised network. The network is built in --precision."""
    from flax import nnx

    from converse_jax import evaluation as E
    from converse_jax.models import create
    from converse_jax.nn.precision import default_precision
    from converse_jax.train.config import parse_model_kwargs
    from converse_jax.weights.pretrained import load_with_source

    spec = E.get_model_spec(args.model)
    arch = parse_model_kwargs(args.arch) if args.arch is not None else None
    if arch is None or args.weights is not None:
        with default_precision(args.precision):
            loaded = load_with_source(args.model, args.weights, arch=arch)
        return loaded.model, spec, str(loaded.weights.path), loaded.arch
    try:
        model = create(args.model, rngs=nnx.Rngs(args.seed), precision=args.precision, **arch)
    except TypeError as exc:
        raise ValueError(f"--arch {args.arch!r} does not fit {args.model}: {exc}") from None
    return model, spec, None, arch


def run(args: argparse.Namespace) -> int:
    from converse_jax import export as X

    out = Path(args.out).expanduser()
    check_out(out, args.overwrite)
    platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
    if args.format != "onnx" and (args.fft is not None or args.opset is not None):
        raise ValueError("--fft and --opset apply to --format=onnx only; drop them for StableHLO")
    if args.format == "onnx":
        from converse_jax.export.onnx_export import check_onnx_precision
        check_onnx_precision(args.precision)
    spec = X.ExportSpec(height=args.height, width=args.width, batch=args.batch, sf=args.sf, platforms=platforms)
    from converse_jax import evaluation as E
    if args.sf != 1 and not E.get_model_spec(args.model).task.takes_kernel:
        raise ValueError(f"--sf applies to non-blind models only; {args.model} has a fixed scale")
    t0 = time.perf_counter()
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    model, mspec, weights, arch = load(args)
    print(f"exporting {args.model} ({args.precision}) as {args.format} for {args.height}x{args.width} ...",
          file=sys.stderr, flush=True)
    if args.format == "stablehlo":
        blob = X.export_stablehlo(model, mspec, spec).serialize()
        how = "jax.export.deserialize(bytearray(open(PATH, 'rb').read())).call(x[, kernel])"
        meta = X.describe(mspec, spec, fmt="stablehlo", model=model, weights=weights, arch=arch, extra={"load": how})
    else:
        from converse_jax.export import onnx_export as O
        blob, extra = O.export_onnx(model, mspec, spec, opset=args.opset, fft=args.fft or O.DEFAULT_FFT)
        meta = X.describe(mspec, spec, fmt="onnx", model=model, weights=weights, arch=arch, extra=extra)
    meta_path = X.write_artifact(out, blob, meta, overwrite=args.overwrite)
    print(f"wrote {out} ({len(blob) / 2**20:.2f} MiB) and {meta_path} in {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
