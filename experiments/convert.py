"""Convert a released PyTorch checkpoint into a converse_jax (orbax) checkpoint directory.

    python -m experiments.convert --model=dncnn --weights=converse_dncnn.pth --out=ckpt/dncnn

Reads the file without PyTorch and without running anything in it, maps names and layouts
onto the NNX model, and writes the arrays plus metadata (model, source file name and SHA-256,
converse_jax version) atomically. Errors are one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from converse_jax.weights.checkpoint import read_metadata
from converse_jax.weights.pretrained import convert_checkpoint
from experiments._cli import one_line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m experiments.convert",
                     description="Convert released PyTorch weights (.pth or .safetensors) into an "
                                 "orbax checkpoint directory for converse_jax.load_pretrained.")
    parser.add_argument("--model", required=True,
                        help="model name: dncnn, srresnet, conversenet or usrnet")
    parser.add_argument("--weights", required=True, help="the .pth or .safetensors file")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    parser.add_argument("--force", action="store_true",
                        help="replace --out if it is an existing converted checkpoint")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        out = convert_checkpoint(args.model, args.weights, args.out, overwrite=args.force)
        meta = read_metadata(out)
    except (ValueError, OSError) as exc:
        print(f"{parser.prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(f"wrote {out} (model {meta['model']}, from {meta['source_file']} sha256 "
          f"{meta['source_sha256'][:12]}..., converse_jax {meta['converse_jax_version']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
