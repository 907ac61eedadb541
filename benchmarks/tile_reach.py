"""How far a network reaches: the context a tile needs to reproduce the whole image.

A small region at the centre of a generated photo (as ``benchmarks.tile_accuracy --inputs photo``
makes them) is restored from crops that give it ``c`` pixels of real context on every side, and
compared with the same region of the whole-image restoration (float PSNR, "agreement"). Where the
agreement stops rising with ``c`` the network's reach ends; ``task.tile_context`` is chosen from it
(docs/restore.md).

    python -m benchmarks.tile_reach --model conversenet --name bird --photo-size 1024 --contexts 64,128,192,256
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks.tile_accuracy import MODELS, _ints, agreement, photo_pair, select_images
from converse_jax import degradations as D
from converse_jax import evaluation as E


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=MODELS, default="conversenet")
    p.add_argument("--photo-size", type=int, default=1024, help="side of the generated photo (input px)")
    p.add_argument("--contexts", type=lambda t: _ints(t, "--contexts"), default=[64, 128, 192, 256],
                   help="contexts per side to try (input px)")
    p.add_argument("--region", type=int, default=64, help="side of the centre region compared (input px)")
    p.add_argument("--kernel", type=int, default=1, help="paper blur kernel (1-5) for the deblurring networks")
    p.add_argument("--name", default="", help="test image the photo is made from (default: the test set's first)")
    args = p.parse_args(argv)
    if not 1 <= args.kernel <= 5:
        p.error(f"--kernel must be one of the paper's kernels 1-5, got {args.kernel}")
    if args.region < 1:
        p.error(f"--region must be at least 1 pixel, got {args.region}")
    if args.region + 2 * max(args.contexts) > args.photo_size:
        p.error(f"--photo-size {args.photo_size} is too small for a {args.region} px region with "
                f"{max(args.contexts)} px of context on each side; use a larger photo or smaller contexts")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, spec = E.load_model(args.model)
    images = E.load_test_images(E.dataset_dir(spec.protocol.dataset), spec.protocol.color)
    name, hr = select_images(images, [args.name] if args.name else [], spec.protocol.dataset)[0]
    kernel = D.paper_kernel(args.kernel) if spec.task.uses_kernels else None
    _, lq = photo_pair(spec, hr, args.photo_size, kernel)
    restore = E.Restorer(model, spec.task)
    given = kernel if spec.task.takes_kernel else None
    s, n = int(spec.scale), args.region
    t0 = time.perf_counter()
    whole = restore(lq, given)
    blur = f", kernel {args.kernel}" if kernel is not None else ""
    print(f"{args.model}, a {lq.shape[1]}x{lq.shape[0]} photo made from {name}{blur}: whole image "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    y0 = x0 = args.photo_size // 2 - n // 2
    reference = whole[y0 * s:(y0 + n) * s, x0 * s:(x0 + n) * s]
    for c in args.contexts:
        t0 = time.perf_counter()
        out = restore(lq[y0 - c:y0 + n + c, x0 - c:x0 + n + c], given)[c * s:(c + n) * s, c * s:(c + n) * s]
        print(f"  context {c}: agreement {agreement(out, reference):.1f} dB ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
