"""How much tiled restoration loses against restoring the whole image, per network and tile setting.

For every model, test image, tile size, overlap and context: PSNR of the tiled result against the
ground truth minus that of the whole-image result (dPSNR, in dB; negative: tiles lose), and the
PSNR of the tiled result against the whole-image one (agreement). Two kinds of input:

- ``protocol``: the model's paper test protocol on its bundled test set (Set12 / Set5; the
  deblurring protocol blurs the whole ground truth circularly, one paper kernel per run);
- ``photo``: larger images made from the same test images, upscaled (bicubic) to at least
  ``--photo-size`` + a margin, degraded as the protocol does, then cropped to ``--photo-size``
  pixels, so the input does not wrap around its border, as in a real photo.

PSNR is the protocol's score (Y channel for x4 SR, the border crop of the protocol).

    python -m benchmarks.tile_accuracy --models usrnet --tiles 128,256 --overlaps 32 --contexts 0,32,64 \
        --inputs protocol,photo --photo-size 512 --json tile_acc.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from converse_jax import degradations as D
from converse_jax import evaluation as E
from converse_jax.tiling import BORDERS, TiledRestorer, axis_context

MODELS = ("dncnn", "srresnet", "conversenet", "usrnet")
INPUTS = ("protocol", "photo")


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{name} must be non-negative integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--tiles", type=lambda t: _ints(t, "--tiles"), default=[128, 256], help="tile sizes (input px)")
    p.add_argument("--overlaps", type=lambda t: _ints(t, "--overlaps"), default=[32], help="tile overlaps")
    p.add_argument("--contexts", type=lambda t: _ints(t, "--contexts"), default=None,
                   help="tile contexts per side (default: each task's tile_context)")
    p.add_argument("--borders", default=None,
                   help=f"comma-separated image-border modes, of {', '.join(BORDERS)} (default: each task's "
                        "tile_border)")
    p.add_argument("--blend", choices=("crop", "window"), default="crop")
    p.add_argument("--inputs", default="protocol,photo", help=f"comma-separated, of {', '.join(INPUTS)}")
    p.add_argument("--photo-size", type=int, default=512, help="side of the generated photos (input px)")
    p.add_argument("--kernels", type=lambda t: _ints(t, "--kernels"), default=[1],
                   help="paper kernels for the deblurring networks (1..5)")
    p.add_argument("--images", type=int, default=0, help="use the first N test images only (0: all)")
    p.add_argument("--names", default="", help="comma-separated test image file names to use (default: all)")
    p.add_argument("--no-photo-border", dest="photo_border", action="store_false",
                   help="restore the photos without the tapered border that experiments.restore adds for "
                        "networks with a task.photo_margin (Converse-USRNet); it is on by default")
    p.add_argument("--json", type=Path, help="write the rows here (refused if the file exists)")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.inputs = [i.strip() for i in args.inputs.split(",") if i.strip()]
    args.names = [n.strip() for n in args.names.split(",") if n.strip()]
    args.borders = [b.strip() for b in args.borders.split(",")] if args.borders else None
    if args.borders and any(b not in BORDERS for b in args.borders):
        p.error(f"--borders: choose from {', '.join(BORDERS)}, got {args.borders}")
    for m in args.models:
        if m not in MODELS:
            p.error(f"--models: unknown model {m!r}; choose from {', '.join(MODELS)}")
    for i in args.inputs:
        if i not in INPUTS:
            p.error(f"--inputs: unknown input kind {i!r}; choose from {', '.join(INPUTS)}")
    if args.photo_size < 64:
        p.error(f"--photo-size must be at least 64, got {args.photo_size}")
    if any(not 1 <= k <= 5 for k in args.kernels):
        p.error(f"--kernels must be among 1..5, got {args.kernels}")
    if args.json is not None and (args.json.exists() or not args.json.parent.is_dir()):
        p.error(f"--json {args.json}: the file exists or its folder does not; choose a new file in an existing folder")
    return args


def photo_pair(spec: Any, hr: np.ndarray, size: int, kernel: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(ground truth, input) of a ``size`` px photo made from test image ``hr`` (see the module doc)."""
    scale = int(spec.scale)
    margin = 64 * scale
    factor = int(np.ceil((size * scale + 2 * margin) / min(hr.shape[:2])))
    big = D.to_uint8(D.imresize(D.to_float(hr), float(factor)))
    gt_big, lq_big = spec.task.protocol_pair(big, spec.protocol, kernel)
    y0 = (gt_big.shape[0] - size * scale) // (2 * scale) // 2 * scale  # off-centre, a multiple of the scale
    x0 = (gt_big.shape[1] - size * scale) // (3 * scale) * scale
    gt = gt_big[y0:y0 + size * scale, x0:x0 + size * scale]
    lq = lq_big[y0 // scale:y0 // scale + size, x0 // scale:x0 // scale + size]
    return gt, np.ascontiguousarray(lq, dtype=np.float32)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two float images in [0, 1] (clipped), without rounding to uint8."""
    mse = float(np.mean((np.clip(a, 0, 1).astype(np.float64) - np.clip(b, 0, 1)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def _score(spec: Any, out: np.ndarray, gt: np.ndarray) -> float:
    m = spec.task.score(D.to_uint8(out), gt, spec.protocol)
    return float(m["psnr_y"] if spec.protocol.metric == "y" else m["psnr"])


def cases(spec: Any, images: list[tuple[str, np.ndarray]], args: argparse.Namespace):
    """(input kind, image label, kernel id, ground truth, input) for every measured case."""
    kids: list[int | None] = list(args.kernels) if spec.task.uses_kernels else [None]
    for kind in args.inputs:
        for name, hr in images:
            for kid in kids:
                kernel = D.paper_kernel(kid) if kid is not None else None
                if kind == "protocol":
                    gt, lq = spec.task.protocol_pair(hr, spec.protocol, kernel)
                else:
                    gt, lq = photo_pair(spec, hr, args.photo_size, kernel)
                yield kind, name, kid, gt, lq


def select_images(images: list, names: list[str], dataset: str) -> list:
    """The test images named in ``names`` (file name with or without its extension; all when empty),
    refusing names that match none so that a typo does not silently measure nothing."""
    if not names:
        return images
    stem = lambda n: n.rsplit(".", 1)[0]  # noqa: E731
    wanted = {stem(n) for n in names}
    chosen = [im for im in images if stem(im[0]) in wanted]
    missing = sorted(wanted - {stem(im[0]) for im in chosen})
    if missing:
        have = ", ".join(im[0] for im in images)
        raise SystemExit(f"error: --names {', '.join(missing)} not among the {dataset} images ({have})")
    return chosen


def _distinct_settings(args: argparse.Namespace, contexts: list[int], borders: list[str],
                       log: Any) -> list[tuple[int, int, int, str]]:
    """(tile, overlap, context, border) to measure: overlaps below half the tile, and one setting per
    context the tile actually gets (contexts are capped at a quarter of the tile), saying which it dropped."""
    settings: list[tuple[int, int, int, str]] = []
    for t in args.tiles:
        for o in args.overlaps:
            if 2 * o >= t:
                log(f"  tile {t} overlap {o}: skipped, the overlap must be under half the tile")
                continue
            for b in borders:
                seen: dict[int, int] = {}
                for c in contexts:
                    used = axis_context(10 * t, t, c)  # the context a tile gets inside a large image
                    if used in seen:
                        log(f"  tile {t} context {c}: as context {seen[used]} (capped at {used} px), measured once")
                        continue
                    seen[used] = c
                    settings.append((t, o, c, b))
    return settings


def measure_model(name: str, args: argparse.Namespace, log: Any) -> list[dict[str, Any]]:
    """All rows of one model: whole image once per case, then every tile setting."""
    model, spec = E.load_model(name)
    images = E.load_test_images(E.dataset_dir(spec.protocol.dataset), spec.protocol.color)
    images = select_images(images, args.names, spec.protocol.dataset)
    images = images[:args.images] if args.images else images
    whole_r = E.Restorer(model, spec.task)
    contexts = args.contexts if args.contexts is not None else [spec.task.tile_context]
    borders = args.borders or [spec.task.tile_border]
    settings = _distinct_settings(args, contexts, borders, log)
    restorers = {s: TiledRestorer(model, spec.task, scale=int(spec.scale), tile=s[0], overlap=s[1], context=s[2],
                                  border=s[3], blend=args.blend) for s in settings}
    margin = E.photo_margin(spec, args.photo_border)
    rows = []
    for kind, img, kid, gt, lq in cases(spec, images, args):
        kernel = D.paper_kernel(kid) if spec.task.takes_kernel else None
        # photos get the border experiments.restore gives them; protocol inputs wrap around as blurred
        as_input = (lambda r: E.PhotoRestorer(r, margin, int(spec.scale))) if kind == "photo" and margin else None
        t0 = time.perf_counter()
        whole = (as_input(whole_r) if as_input else whole_r)(lq, kernel)
        base = _score(spec, whole, gt)
        plain = _score(spec, whole_r(lq, kernel), gt) if as_input else base
        border_note = f" (without the {margin} px photo border: {plain:.3f} dB)" if as_input else ""
        log(f"{name} {kind} {img} k{kid} {lq.shape[0]}x{lq.shape[1]}: whole {base:.3f} dB{border_note} "
            f"({time.perf_counter() - t0:.1f} s)")
        for (tile, overlap, context, border), r in restorers.items():
            if tile >= max(lq.shape[:2]):
                log(f"  tile {tile}: skipped, one tile covers the {lq.shape[0]}x{lq.shape[1]} input (the whole image)")
                continue
            t0 = time.perf_counter()
            tiled = (as_input(r) if as_input else r)(lq, kernel)
            row = dict(model=name, input=kind, image=img, kernel=kid, height=int(lq.shape[0]),
                       width=int(lq.shape[1]), tile=tile, overlap=overlap, context=context, border=border,
                       blend=args.blend, photo_margin=margin if as_input else 0, whole_psnr=base,
                       whole_psnr_no_border=plain, dpsnr=_score(spec, tiled, gt) - base,
                       agreement=agreement(tiled, whole))
            rows.append(row)
            log(f"  tile {tile} overlap {overlap} context {context} {border}: dPSNR {row['dpsnr']:+.3f} dB, "
                f"agreement {row['agreement']:.1f} dB ({time.perf_counter() - t0:.1f} s)")
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table: model, input, sizes, tile / overlap / context -> dPSNR mean (worst), agreement."""
    keys: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        keys.setdefault((r["model"], r["input"], r["tile"], r["overlap"], r["context"], r["border"]), []).append(r)
    out = ["| network | input | sizes | tile / overlap / context, border | dPSNR mean (worst) | agreement mean (worst) "
           "| n |",
           "|---|---|---|---|---|---|---|"]
    for (model, kind, tile, overlap, context, border), rs in keys.items():
        d = [r["dpsnr"] for r in rs]
        a = [r["agreement"] for r in rs]
        sizes = sorted({f"{r['height']}x{r['width']}" for r in rs})
        size_text = sizes[0] if len(sizes) == 1 else f"{len(sizes)} sizes"
        out.append(f"| {model} | {kind} | {size_text} | {tile} / {overlap} / {context}, {border} | "
                   f"{np.mean(d):+.3f} ({min(d):+.3f}) dB | "
                   f"{np.mean(a):.1f} ({min(a):.1f}) dB | {len(rs)} |")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    rows: list[dict[str, Any]] = []
    for name in args.models:
        log(f"{name}: loading the model and test images")
        rows += measure_model(name, args, log)
    print("\n".join(summarize(rows)))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
