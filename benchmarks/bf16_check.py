"""Mixed precision (``precision="bf16"``) against float32: accuracy, training, speed and what XLA compiles.

    python -m benchmarks.bf16_check [--only=accuracy,parts,train,speed,hlo] [--nets=dncnn,srresnet,...]
        [--parts=float32,bf16,conv1,...] [--steps=1000]
        [--deblur-kernels=1,2,3,4,5] [--repeats=5] [--out=DIR] [--overwrite]

- accuracy: each released network through the evaluation path (:mod:`converse_jax.evaluation`,
  the paper's protocol: DnCNN on Set12 at sigma 25, SRResNet x4 on Set5, the deblurring networks on
  Set5 with the chosen kernels), once in float32 and once in bf16, from the same weights.
- parts: the released Converse-USRNet on Set5 (the same protocol) with one part at a time kept in
  float32 in an otherwise bf16 model (:data:`USRNET_PARTS`): which part costs the accuracy.
- train: a small Converse-DnCNN trained for ``--steps`` steps from the same initialisation on the
  same batches in float32 and in bf16 (:func:`converse_jax.train.make_train_step`); the mean loss
  of every 50 steps goes to ``<out>/bf16_train_loss.csv`` and a plot to ``<out>/bf16_train_loss.png``.
- speed: inference of the four networks (released architectures) on one 256 x 256 output,
  float32 and bf16 runs interleaved, median of ``--repeats`` after a warm-up.
- hlo: the dtypes of the products, convolutions and FFTs in a bf16 network's program, before and
  after XLA's optimisation on this backend (does it keep bfloat16 or convert to float32?).

Everything is printed; ``<out>/bf16_check.json`` gets the figures with the CPU model and load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import cases as C
from benchmarks.timing import cpu_info
from converse_jax import evaluation as E
from converse_jax import models
from converse_jax.fileio import write_json_atomic
from converse_jax.nn.precision import default_precision
from converse_jax.tasks import jit_forward

SECTIONS = ("accuracy", "parts", "train", "speed", "hlo")
NETWORKS = ("dncnn", "srresnet", "conversenet", "usrnet")
PRECISIONS = ("float32", "bf16")
TRAIN_ARCH = {"features": 16, "num_blocks": 2}  # the small DnCNN of the training check
TRAIN = {"batch": 8, "patch": 32, "lr": 1e-3, "every": 50}


def log(msg: str) -> None:
    print(f"... {msg}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    """CPU model and vector extensions, visible cores, load average and the JAX backend, for every figure."""
    return {**cpu_info(), "loadavg": list(os.getloadavg()), "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}


# ----------------------------------------------------------------------------------------- accuracy

def accuracy(nets: Sequence[str], kernels: Sequence[int]) -> list[dict[str, Any]]:
    """Average PSNR (the protocol's metric) of each released network in float32 and bf16."""
    rows = []
    for name in nets:
        spec = E.get_model_spec(name)
        protocol = E.resolve_protocol(spec, kernels=list(kernels) if spec.task.uses_kernels else None)
        images = E.load_test_images(E.dataset_dir(protocol.dataset), protocol.color)
        psnr, params = {}, {}
        for prec in PRECISIONS:
            log(f"accuracy: {name} on {protocol.dataset} in {prec}")
            with default_precision(prec):
                model, _ = E.load_model(name)
            params[prec] = jax.tree.leaves(nnx.state(model, nnx.Param))
            report = E.evaluate(model, spec, images, protocol=protocol, progress=False)
            psnr[prec] = [r.average[report.metric_key] for r in report.runs]
        same = all(a.dtype == jnp.float32 and np.array_equal(a, b) for a, b in zip(*params.values(), strict=True))
        for i, (p32, p16) in enumerate(zip(psnr["float32"], psnr["bf16"], strict=True)):
            rows.append({"net": name, "dataset": protocol.dataset, "metric": report.metric_key,
                         "kernel": protocol.kernels[i] if spec.task.uses_kernels else None,
                         "float32": p32, "bf16": p16, "delta_db": p16 - p32, "same_float32_weights": same})
            log(f"{name} {protocol.dataset} k{rows[-1]['kernel']}: float32 {p32:.3f} dB, bf16 {p16:.3f} dB")
    return rows


# ----------------------------------------------------------------------------------------- USRNet's parts

# The parts of a bf16 Converse-USRNet that the ``parts`` section keeps in float32, one at a time: each
# maps the model to the layers whose compute ``dtype`` is cleared (None: they compute in their float32
# parameters' and inputs' dtype). "float32" and "bf16" are the two whole models, for reference.
USRNET_PARTS: dict[str, Any] = {
    "float32": lambda m: [],
    "bf16": lambda m: [],
    "conv1": lambda m: [m.conv1],  # the first 1x1 conv (3 -> 64): its output is the first data step's input
    "conv2": lambda m: [m.conv2],  # the last 1x1 conv (64 -> 3): its output is the restored image
    "kernel_path": lambda m: [m.kernelnet.fc1, m.kernelnet.fc2, m.kernelnet.fc3, *m.kernel_convs],
    "prior_norms": lambda m: [m.prior.layers.norm1, m.prior.layers.norm2],
    "prior_pointwise": lambda m: [m.prior.layers.pw1, m.prior.layers.pw2, m.prior.layers.pw3, m.prior.layers.pw4],
    "prior_mixer": lambda m: [m.prior.layers.mixer],
}


def usrnet_parts(parts: Sequence[str], kernels: Sequence[int], save: Any) -> list[dict[str, Any]]:
    """Set5 PSNR of the released Converse-USRNet for each of ``parts`` (:data:`USRNET_PARTS`): the bf16
    model with that part kept in float32, and PSNR - float32 PSNR (when "float32" ran first). ``save(rows)``
    is called after every part, so a long run that is stopped keeps what it measured."""
    spec = E.get_model_spec("usrnet")
    protocol = E.resolve_protocol(spec, kernels=list(kernels))
    images = E.load_test_images(E.dataset_dir(protocol.dataset), protocol.color)
    rows: list[dict[str, Any]] = []
    ref: dict[int, float] = {}
    for part in parts:
        log(f"parts: usrnet on {protocol.dataset}, kernels {list(kernels)}, {part} in float32")
        with default_precision("float32" if part == "float32" else "bf16"):
            model, _ = E.load_model("usrnet")
        for layer in USRNET_PARTS[part](model):
            layer.dtype = None
        report = E.evaluate(model, spec, images, protocol=protocol, progress=False)
        for kid, run in zip(protocol.kernels, report.runs, strict=True):
            psnr = run.average[report.metric_key]
            if part == "float32":
                ref[kid] = psnr
            rows.append({"net": "usrnet", "dataset": protocol.dataset, "kernel": kid, "float32_part": part,
                         "psnr": psnr, "delta_db": psnr - ref[kid] if kid in ref else None,
                         "loadavg": list(os.getloadavg())})
            log(f"usrnet k{kid}, {part} in float32: {psnr:.3f} dB"
                + (f" ({rows[-1]['delta_db']:+.4f} dB against float32)" if kid in ref else ""))
        save(rows)
    return rows


# ----------------------------------------------------------------------------------------- training

def _batches(steps: int) -> list[dict[str, np.ndarray]]:
    """``steps`` denoising batches (the embedded images, sigma 25), drawn once for both runs."""
    from converse_jax.data import make_train_loader

    spec = models.get_spec("dncnn")
    loader = make_train_loader(spec.task, "embedded", patch_size=TRAIN["patch"], batch_size=TRAIN["batch"],
                               seed=0, sigma=(25.0, 25.0), scale=1, channels=1)
    return [next(loader) for _ in range(steps)]


def train_curves(steps: int) -> dict[str, Any]:
    """Mean L1 loss per ``TRAIN["every"]`` steps of the small DnCNN in each precision, and the time."""
    import optax

    from converse_jax.train import init_train_state, make_train_step, split_state
    from converse_jax.train.parallel import make_data_mesh, replicate, shard_batch

    log(f"train: drawing {steps} batches")
    batches = _batches(steps)
    mesh = make_data_mesh()
    out: dict[str, Any] = {"arch": TRAIN_ARCH, **TRAIN, "steps": steps}
    for prec in PRECISIONS:
        model = models.create("dncnn", rngs=0, precision=prec, **TRAIN_ARCH)
        tx = optax.adam(TRAIN["lr"])
        params, extra = split_state(model)
        state = replicate(init_train_state(params, tx, extra=extra), mesh)
        step = make_train_step(model, tx, models.get_spec("dncnn").task, "l1", mesh)
        losses, t0 = [], time.perf_counter()
        for i, batch in enumerate(batches, 1):
            state, metrics = step(state, shard_batch(batch, mesh))
            losses.append(metrics["loss"])
            if i % 100 == 0:
                log(f"train {prec}: step {i}/{steps}, loss {float(losses[-1]):.5f}")
        losses = np.asarray(jax.device_get(losses), np.float64)
        out[prec] = {"loss": [float(losses[i:i + TRAIN["every"]].mean()) for i in range(0, steps, TRAIN["every"])],
                     "seconds": time.perf_counter() - t0,
                     "opt_state_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(state["opt_state"])
                                                 if hasattr(x, "dtype") and x.ndim})}
    return out


def write_curves(curves: dict[str, Any], out: Path) -> list[Path]:
    """The loss table as CSV and, when matplotlib is there, a PNG of both curves."""
    every, n = curves["every"], len(curves["float32"]["loss"])
    csv = out / "bf16_train_loss.csv"
    lines = ["step,float32_l1,bf16_l1"] + [f"{(i + 1) * every},{curves['float32']['loss'][i]:.6f},"
                                           f"{curves['bf16']['loss'][i]:.6f}" for i in range(n)]
    csv.write_text("\n".join(lines) + "\n")
    written = [csv]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [(i + 1) * every for i in range(n)]
    for prec in PRECISIONS:
        ax.plot(steps, curves[prec]["loss"], label=prec)
    ax.set_xlabel("step")
    ax.set_ylabel(f"L1 loss (mean of {every} steps)")
    ax.set_title(f"Converse-DnCNN {curves['arch']}, batch {curves['batch']}, patch {curves['patch']}, sigma 25")
    ax.title.set_fontsize(8)
    ax.legend()
    fig.tight_layout()
    png = out / "bf16_train_loss.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return written + [png]


# ----------------------------------------------------------------------------------------- speed

def _speed_batch(name: str) -> dict[str, np.ndarray]:
    cin, _, scale = C.NET_IO[name]
    side = C.INFER_SIZE["full"] // scale
    batch = {"input": np.random.default_rng(0).random((1, side, side, cin), dtype=np.float32)}
    if name == "usrnet":
        batch["kernel"] = C.blur_kernels(1)
    return batch


def speed(nets: Sequence[str], repeats: int) -> list[dict[str, Any]]:
    """Median inference seconds of each network in float32 and bf16, runs interleaved."""
    rows = []
    for name in nets:
        spec = models.get_spec(name)
        batch = {k: jnp.asarray(v) for k, v in _speed_batch(name).items()}
        fns = {}
        for prec in PRECISIONS:
            model = models.create(name, rngs=0, precision=prec)
            fwd, state = jit_forward(spec.task, model), nnx.state(model)
            log(f"speed: compiling {name} {prec}")
            fwd(state, batch).block_until_ready()
            fns[prec] = (fwd, state)
        times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
        load0 = os.getloadavg()[0]
        for _ in range(repeats):
            for prec, (fwd, state) in fns.items():
                t0 = time.perf_counter()
                fwd(state, batch).block_until_ready()
                times[prec].append(time.perf_counter() - t0)
        med = {p: statistics.median(t) for p, t in times.items()}
        rows.append({"net": name, "output": C.INFER_SIZE["full"], "float32_s": med["float32"], "bf16_s": med["bf16"],
                     "bf16_over_float32": med["bf16"] / med["float32"], "repeats": repeats,
                     "loadavg_1min": [load0, os.getloadavg()[0]]})
        log(f"{name}: float32 {med['float32']:.3f} s, bf16 {med['bf16']:.3f} s, "
            f"ratio {rows[-1]['bf16_over_float32']:.2f}")
    return rows


# ----------------------------------------------------------------------------------------- HLO

_OPS = ("dot_general", "convolution", "fft")
_HLO_OPS = {"dot_general": " dot(", "convolution": " convolution(", "fft": " fft("}


def hlo_dtypes(name: str = "dncnn", arch: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per kind of op: how many there are in the bf16 network's StableHLO (as written, before XLA) and in
    the optimised HLO (what runs), by result element type. A bfloat16 product that XLA runs natively keeps
    a bf16 result; one it upcasts turns into a float32 ``dot`` between ``convert``s."""
    arch = {"num_blocks": 2, "features": 16} if arch is None else arch
    model = models.create(name, rngs=0, precision="bf16", **arch)
    spec = models.get_spec(name)
    batch = {k: jnp.asarray(v[:, :64, :64] if k == "input" else v) for k, v in _speed_batch(name).items()}
    lowered = jit_forward(spec.task, model).lower(nnx.state(model), batch)
    before, after = lowered.as_text(), lowered.compile().as_text()
    out: dict[str, Any] = {"net": name, "arch": arch, "lowered": {}, "compiled": {}}
    for op in _OPS:
        found = re.findall(rf"stablehlo\.{op}.*?->\s*tensor<(?:[\d?]+x)*(\w+(?:<\w+>)?)>", before)
        out["lowered"][op] = dict(sorted({t: found.count(t) for t in set(found)}.items()))
        types = [m.group(1) for line in after.splitlines() if _HLO_OPS[op] in line
                 for m in [re.search(r"=\s*(\w+)\[", line)] if m]
        out["compiled"][op] = dict(sorted({t: types.count(t) for t in set(types)}.items()))
    out["compiled_converts_bf16_to_f32"] = len(re.findall(r"f32\[[^\]]*\][^=\n]*\bconvert\(", after))
    out["onednn_custom_calls"] = after.lower().count("onednn")
    return out


# ----------------------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bf16_check", description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(SECTIONS), help=f"sections among {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--nets", default=",".join(NETWORKS), help="networks for accuracy and speed (default: all four)")
    p.add_argument("--steps", type=int, default=1000, help="training steps per precision (default 1000)")
    p.add_argument("--parts", default=",".join(USRNET_PARTS),
                   help="parts section: the USRNet parts kept in float32, one per run (default: all, "
                        "float32 first)")
    p.add_argument("--deblur-kernels", default="1,2,3,4,5", help="the paper's kernels for the deblurring networks")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per network and precision (default 5)")
    p.add_argument("--out", default="docs/benchmarks", help="folder for bf16_check.json and the loss curves")
    p.add_argument("--json", help="the figures as JSON (default: <out>/bf16_check.json)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return p


def _check_args(args: argparse.Namespace) -> tuple[list[str], list[str], list[int], Path, Path]:
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    nets = [s.strip() for s in args.nets.split(",") if s.strip()]
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS] + [n for n in nets if n not in NETWORKS]
    bad += [p for p in parts if p not in USRNET_PARTS]
    if bad or not only or not nets or not parts:
        raise ValueError(f"unknown section, network or part {', '.join(bad) or '(none given)'}: sections "
                         f"{', '.join(SECTIONS)}, networks {', '.join(NETWORKS)}, parts {', '.join(USRNET_PARTS)}")
    args.parts = parts
    if args.steps < TRAIN["every"] or args.steps % TRAIN["every"]:
        raise ValueError(f"--steps must be a positive multiple of {TRAIN['every']}, got {args.steps}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    kernels = [int(k) for k in args.deblur_kernels.split(",")]
    out = Path(args.out)
    if not out.is_dir():
        raise ValueError(f"--out folder {out} does not exist; create it first")
    json_path = Path(args.json) if args.json else out / "bf16_check.json"
    if not json_path.parent.is_dir():
        raise ValueError(f"--json: folder {json_path.parent} does not exist; create it first")
    paths = [json_path] + ([out / "bf16_train_loss.csv", out / "bf16_train_loss.png"] if "train" in only else [])
    taken = [str(p) for p in paths if p.exists()]
    if taken and not args.overwrite:
        raise ValueError(f"{', '.join(taken)} already exist(s): pass --overwrite or choose another --out/--json")
    return only, nets, kernels, out, json_path


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        only, nets, kernels, out, json_path = _check_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result: dict[str, Any] = {"machine": machine()}
    log(f"{result['machine']}")

    def save_parts(rows: list[dict[str, Any]]) -> None:
        write_json_atomic(json_path, dict(result, parts=rows, machine_after=machine()))

    sections = {"hlo": lambda: hlo_dtypes(), "accuracy": lambda: accuracy(nets, kernels),
                "parts": lambda: usrnet_parts(args.parts, kernels, save_parts),
                "train": lambda: train_curves(args.steps), "speed": lambda: speed(nets, args.repeats)}
    for name in only:
        result[name] = sections[name]()
        if name == "train":
            result["train_files"] = [str(p) for p in write_curves(result["train"], out)]
        result["machine_after"] = machine()
        write_json_atomic(json_path, result)  # after every section: a long run that is stopped keeps its figures
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
