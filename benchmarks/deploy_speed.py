"""Time exported artifacts against the library: ONNX Runtime and StableHLO per image, one network, one size.

    python -m benchmarks.deploy_speed --model=dncnn --size=256 --onnx=dft:a.onnx,matmul:b.onnx [--repeats=7]
        [--only-onnx --ratio-to=onnx-matmul]

The ONNX files are written beforehand (``python -m experiments.export --format=onnx --fft=...``, with the
same network and weights: the released ones unless ``--weights``; batch 1); the StableHLO module is exported
here. Each variant is first checked against the library (largest absolute difference, which the deployment
guide requires below 1e-4), then all are timed round-robin, one call of each per round, so that a change of
load on a shared machine affects all alike; the medians after one warm-up round are printed as ratios to the
library (or to the variant ``--ratio-to`` names), with the CPU model and the load average. ``--only-onnx``
times the ONNX files only (the library still computes the reference once; no StableHLO export): the
way to compare ``--fft=dft`` with ``--fft=matmul`` where the library's own time is not needed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.timing import cpu_summary


def _variants(args: argparse.Namespace) -> tuple[dict[str, Callable[[], Any]], list[np.ndarray], np.ndarray]:
    """name -> zero-argument call of each variant on one fixed input, the inputs, the library's output."""
    import jax
    import onnxruntime as ort

    from converse_jax import evaluation as E
    from converse_jax import export as X

    model, spec = E.load_model(args.model, args.weights)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (1, args.size, args.size, spec.in_channels)).astype(np.float32)
    inputs, batch = [x], {"input": x}
    if spec.task.takes_kernel:
        k = rng.uniform(0, 1, (1, 7, 7)).astype(np.float32)
        inputs.append(k / k.sum())
        batch["kernel"] = inputs[1]
    lib = jax.jit(lambda b: spec.task.forward(model, b))
    ref = np.asarray(lib(batch))
    calls: dict[str, Callable[[], Any]] = {}
    if not args.only_onnx:
        blob = X.export_stablehlo(model, spec, X.ExportSpec(args.size, args.size)).serialize()
        print(f"stablehlo: {len(blob) / 2**20:.2f} MiB serialized", flush=True)
        hlo = jax.jit(jax.export.deserialize(blob).call)
        calls["library"] = lambda: lib(batch).block_until_ready()
        calls["stablehlo"] = lambda: hlo(*inputs).block_until_ready()
    for item in args.onnx.split(",") if args.onnx else []:
        label, path = item.split(":", 1)
        print(f"onnx-{label}: {Path(path).stat().st_size / 2**20:.2f} MiB", flush=True)
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        feeds = {i.name: a for i, a in zip(sess.get_inputs(), inputs, strict=True)}
        calls[f"onnx-{label}"] = lambda s=sess, f=feeds: s.run(None, f)[0]
    return calls, inputs, ref


def run(args: argparse.Namespace) -> int:
    print(f"preparing {args.model} at {args.size}x{args.size} ...", file=sys.stderr, flush=True)
    load_start = os.getloadavg()[0]
    calls, _, ref = _variants(args)
    base_name = args.ratio_to or ("library" if not args.only_onnx else next(iter(calls), ""))
    if base_name not in calls:
        raise SystemExit(f"error: --ratio-to {base_name!r} is not a timed variant: choose one of {', '.join(calls)}")
    for name, call in calls.items():  # also the warm-up round (compilation, session set-up)
        t0 = time.perf_counter()
        out = np.asarray(call())
        print(f"{name}: max |difference to library| {np.abs(out - ref).max():.2e}; warm-up call "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(args.repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
    base = statistics.median(times[base_name])
    print(f"{args.model} {args.size}x{args.size}, batch 1, median of {args.repeats} interleaved rounds; "
          f"{cpu_summary()}, load average {load_start:.2f} at the start, "
          f"{os.getloadavg()[0]:.2f} at the end")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:14s} {med * 1e3:9.1f} ms/image  {med / base:5.2f}x {base_name}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.deploy_speed", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--size", type=int, required=True, help="square image size the ONNX files were exported for")
    p.add_argument("--onnx", default="", help="LABEL:PATH,... ONNX artifacts of this network and size")
    p.add_argument("--weights", default=None, help="checkpoint the ONNX files were exported with (default: released)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--only-onnx", action="store_true", help="time the ONNX files only (no library, no StableHLO)")
    p.add_argument("--ratio-to", default=None, help="variant the ratios are to (default: library, or with "
                                                    "--only-onnx the first ONNX file), e.g. onnx-matmul")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
