"""Speed benchmark: the Converse2D operator and the four networks against a PyTorch baseline.

    python -m experiments.benchmark [--quick] [--only=op,infer,train,memory] [--nets=LIST] [--json=FILE]
        [--no-torch] [--torch-python=PY] [--torch-memory] [--alt] [--repeats=N] [--budget=SECONDS]
        [--reference=PATH] [--large-size=WxH]

The baseline is the paper's Algorithm 1 as published, written in PyTorch in
benchmarks/torch_ref.py. It runs in a separate process of an interpreter that has torch:
this one if torch is importable, else --torch-python or $CONVERSE_TORCH_PYTHON. Every figure
is the median of several runs after a warm-up. --only=micro adds component timings
(GELU, 1x1 convolution, FFT layout, kernel spectrum) behind the optimisation notes.

--reference=PATH adds a third column: the official PyTorch code (a checkout of cszn/ConverseNet,
never part of this project) timed on the same shapes and inputs, its networks with their
released weights (benchmarks/official.py). --only=large restores a large generated image per
network with `python -m experiments.restore` and its defaults, reporting peak memory and
megapixels per second, and tiled against whole-image throughput (benchmarks/restore_large.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks import cases as C
from experiments import _cli

_ALL = C.SECTIONS + C.EXTRA_SECTIONS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (smoke test)")
    p.add_argument("--only", metavar="LIST", default=",".join(C.SECTIONS),
                   help=f"comma-separated sections among {', '.join(_ALL)} (default: {','.join(C.SECTIONS)})")
    p.add_argument("--nets", metavar="LIST", default=",".join(C.NETWORKS),
                   help=f"comma-separated networks for infer and train (default: {','.join(C.NETWORKS)})")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON here")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    p.add_argument("--torch-python", metavar="PY", help="python interpreter with torch for the baseline")
    p.add_argument("--torch-memory", action="store_true",
                   help="also measure the baseline's peak memory (slow: minutes per large image)")
    p.add_argument("--alt", action="store_true",
                   help="also time the alternative implementations of benchmarks/ in infer and train")
    p.add_argument("--repeats", type=int, metavar="N", help="minimum number of timed runs per figure")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="stop adding timed runs (beyond the minimum) after this many seconds per figure")
    p.add_argument("--torch-timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="give up on one baseline measurement after this long (default 3600)")
    _cli.add_precision_flag(p)
    _add_reference_flags(p)
    return p


def _add_reference_flags(p: argparse.ArgumentParser) -> None:
    """The official-code baseline and the large-restore section's flags."""
    p.add_argument("--reference", metavar="PATH",
                   help="a checkout of the official code (git clone https://github.com/cszn/ConverseNet "
                        "third_party/ConverseNet): also time its Converse2D and networks")
    p.add_argument("--large-size", metavar="WxH",
                   help="input size of the 'large' section for every network (default: per network, "
                        "x4 SR 1000x750 -> 4000x3000)")


def parse_sections(text: str) -> list[str]:
    """The --only list, validated and in canonical order."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in _ALL]
    if bad or not names:
        raise ValueError(f"--only: unknown section(s) {', '.join(bad) or '(none given)'}; "
                         f"choose from {', '.join(_ALL)}")
    return [s for s in _ALL if s in names]


def parse_nets(text: str) -> list[str]:
    """The --nets list, validated and in canonical order."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in C.NETWORKS]
    if bad or not names:
        raise ValueError(f"--nets: unknown network(s) {', '.join(bad) or '(none given)'}; "
                         f"choose from {', '.join(C.NETWORKS)}")
    return [s for s in C.NETWORKS if s in names]


def run(args: argparse.Namespace) -> int:
    from benchmarks import suite
    from benchmarks.timing import DEFAULT_POLICY, QUICK_POLICY

    sections = parse_sections(args.only)
    nets = parse_nets(args.nets)
    json_path = Path(args.json).expanduser() if args.json else None
    if json_path is not None and not json_path.parent.is_dir():
        raise ValueError(f"--json: folder {json_path.parent} does not exist; create it first")
    policy = dict(QUICK_POLICY if args.quick else DEFAULT_POLICY)
    if args.repeats is not None:
        if args.repeats < 1:
            raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
        policy["min_repeats"] = args.repeats
        policy["max_repeats"] = max(policy["max_repeats"], args.repeats)
    if args.budget is not None:
        if args.budget < 0:
            raise ValueError(f"--budget must be non-negative, got {args.budget}")
        policy["budget_s"] = args.budget

    reference, large_size = _reference_options(args, sections)
    torch = None
    note = "disabled by --no-torch"
    if not args.no_torch and any(s in sections for s in ("op", "infer", "train", "memory")):
        python, note = suite.find_torch_python(args.torch_python)
        if python is not None:
            torch = suite.TorchBaseline(python, args.torch_timeout, reference=reference)
        elif reference is not None:
            raise ValueError(f"--reference needs torch to run the official code: {note}")
    report = suite.run_suite(sections=sections, quick=args.quick, torch=torch, torch_note=note,
                             torch_memory=args.torch_memory, alt=args.alt, nets=nets, policy=policy,
                             large_size=large_size, log=lambda m: print(f"... {m}", file=sys.stderr, flush=True))
    print(suite.format_table(report))
    if json_path is not None:
        suite.write_json_atomic(report, json_path)
        print(f"wrote {json_path}", file=sys.stderr)
    return 0


def _reference_options(args: argparse.Namespace, sections: list[str]) -> tuple[Path | None, tuple[int, int] | None]:
    """The checked --reference checkout and the parsed --large-size (None when not given)."""
    from benchmarks import official, restore_large

    reference = None
    if args.reference is not None:
        if args.no_torch:
            raise ValueError("--reference runs the official PyTorch code: drop --no-torch")
        reference = official.check_reference(args.reference)
    size = restore_large.parse_size(args.large_size) if args.large_size is not None else None
    if size is not None and "large" not in sections:
        raise ValueError("--large-size applies to the 'large' section: add it to --only")
    return reference, size


def main(argv: Sequence[str] | None = None) -> int:
    # On a GPU, JAX would otherwise reserve most of the memory up front, which hides the peak we
    # measure and starves the baseline's and the memory runs' processes. No effect on CPU.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
