"""The paper's test protocols as a library: degrade, restore, measure.

- :func:`resolve_protocol` takes a model's :class:`~converse_jax.models.spec.EvalProtocol` and
  applies overrides (dataset, noise level, kernels);
- the model's task (``spec.task``, a :class:`~converse_jax.tasks.Task`) degrades each ground truth
  exactly as the reference's test scripts do (:meth:`~converse_jax.tasks.Task.protocol_pair`),
  calls the network and scores its output;
- :class:`Restorer` runs a model on one image under ``jax.jit`` (one compilation per input
  shape), optionally with the 8-fold flip/rotate self-ensemble;
- :func:`evaluate` runs a whole folder and returns an :class:`EvalReport` (per-image and
  average PSNR/SSIM, per kernel for deblurring) that prints as a table or dumps to JSON;
- :func:`restore_array` restores a user's image, handling gray/RGB mismatches per model;
- :func:`make_restorer` gives the whole-image :class:`Restorer` or a tiled one
  (:class:`~converse_jax.tiling.TiledRestorer`, images of any size in bounded memory), and
  :func:`memory_budget` / :func:`auto_tile` pick the tile that fits a memory budget.

``experiments/evaluate.py`` and ``experiments/restore.py`` are thin command lines over this.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from converse_jax import degradations as D
from converse_jax.assets import asset
from converse_jax.console import interactive, progress_bar
from converse_jax.imageio import list_images, read_image, write_image
from converse_jax.models import get_spec, list_models
from converse_jax.nn.precision import model_precision
from converse_jax.tasks import DENOISE, Task
from converse_jax.tiling import MemoryModel, TiledRestorer, choose_tile, fit_memory_model, inference_forward
from converse_jax.weights import load_pretrained

__all__ = [
    "CPU_BUDGET_GIB",
    "DATASETS",
    "DEFAULT_OVERLAP",
    "DatasetInfo",
    "EvalReport",
    "ImageResult",
    "Restorer",
    "RunResult",
    "auto_tile",
    "available_ram",
    "check_restore_options",
    "dataset_dir",
    "evaluate",
    "get_model_spec",
    "load_model",
    "load_test_images",
    "make_restorer",
    "PhotoRestorer",
    "photo_margin",
    "memory_budget",
    "memory_model",
    "model_precision",
    "paper_value",
    "resolve_protocol",
    "restore_array",
    "check_kernel_size",
]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """A named test set: where the bundled copy lives (None: the user passes --data-dir)."""

    name: str
    title: str
    bundled: tuple[str, ...] | None


DATASETS: dict[str, DatasetInfo] = {
    "set12": DatasetInfo("set12", "Set12", ("testsets", "Set12")),
    "bsd68": DatasetInfo("bsd68", "BSD68", None),
    "set5": DatasetInfo("set5", "Set5", ("testsets", "Set5")),
    "set14": DatasetInfo("set14", "Set14", None),
    "bsd100": DatasetInfo("bsd100", "BSD100", None),
    "urban100": DatasetInfo("urban100", "Urban100", None),
}


def dataset_dir(name: str, data_dir: str | Path | None = None) -> Path:
    """The folder of test set ``name``: ``data_dir`` if given, else the bundled copy.

    Raises ValueError for an unknown name, a set that is not bundled when no ``data_dir`` is
    given, or a missing bundled copy.
    """
    key = name.lower()
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)} "
                         "(or pass --data-dir=DIR for any folder of images)")
    info = DATASETS[key]
    if info.bundled is None:
        raise ValueError(f"dataset {key} is not bundled: pass --data-dir=DIR pointing at a folder "
                         f"with the {info.title} images")
    path = asset(*info.bundled)
    if not path.is_dir():
        raise ValueError(f"bundled dataset {key} not found at {path}: set CONVERSE_ASSETS to the "
                         "shared folder or pass --data-dir=DIR")
    return path


def resolve_protocol(spec: Any, *, dataset: str | None = None, sigma: float | None = None,
                     kernels: Sequence[int] | None = None, border: int | None = None) -> Any:
    """The model's paper protocol (``spec.protocol``) with the given fields overridden."""
    proto = spec.protocol
    changes: dict[str, Any] = {}
    if dataset is not None:
        changes["dataset"] = dataset.lower()
    if sigma is not None:
        if not sigma >= 0:
            raise ValueError(f"--sigma must be >= 0 (0..255 scale), got {sigma}")
        if not spec.task.uses_sigma:
            raise ValueError(f"--sigma applies to denoising models; {spec.name} is a {spec.task.label} model")
        changes["sigma"] = float(sigma)
    if kernels is not None:
        if not spec.task.uses_kernels:
            raise ValueError(f"--kernel applies to deblurring models; {spec.name} is a {spec.task.label} model")
        for k in kernels:
            if not 1 <= int(k) <= 5:
                raise ValueError(f"--kernel must be one of 1..5 (the paper's kernels), got {k}")
        changes["kernels"] = tuple(int(k) for k in kernels)
    if border is not None:
        if border < 0:
            raise ValueError(f"border must be >= 0, got {border}")
        changes["border"] = int(border)
    return dataclasses.replace(proto, **changes) if changes else proto


def paper_value(protocol: Any, dataset: str, kernel: int | None = None) -> float | None:
    """The paper's table entry for ``dataset`` (and deblurring ``kernel``), if it has one."""
    table = getattr(protocol, "paper", None) or {}
    value = None
    for key in (dataset, dataset.lower()):
        if key in table:
            value = table[key]
            break
    if value is None:
        lowered = {str(k).lower(): v for k, v in table.items()}
        value = lowered.get(dataset.lower())
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if kernel is None or not 1 <= kernel <= len(value):
            return None
        return float(value[kernel - 1])
    return float(value) if kernel is None else None


def get_model_spec(name: str) -> Any:
    """The registry's spec of model ``name`` (ValueError listing the known names otherwise)."""
    names = list_models()
    if name not in names:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(names)}")
    return get_spec(name)


def load_model(name: str, weights: str | Path | None = None) -> tuple[Any, Any]:
    """(model with weights, spec) for ``name``: the weights found by
    :func:`converse_jax.weights.pretrained.find_weights` (``weights`` if given, else the
    assets folder, the cache, a download), as :func:`converse_jax.load_pretrained` loads them."""
    return load_pretrained(name, weights, progress=False), get_model_spec(name)


# ----------------------------------------------------------------------------------------
# Running a model


class Restorer:
    """A model's forward pass on single images, compiled once per input shape.

    ``task`` (the model's ``spec.task``) says how the network is called; None means on the
    image alone, ``model(x)``. ``restorer(x)``: x float32 (H, W, C) in [0, 1] -> float32
    (H*s, W*s, C_out), not clipped. ``kernel`` (kh, kw) and ``sf`` go to networks that take a
    kernel (``model(x, kernel, sf=sf)``). ``x8=True`` averages the outputs of the 8
    flipped/rotated copies of the input (kernel transformed alike), each mapped back. The
    model's current weights are read at every call, so a training loop can keep one Restorer
    (and its compilations) across updates.
    """

    def __init__(self, model: Any, task: Task | None = None) -> None:
        if task is not None and not isinstance(task, Task):
            raise ValueError(f"Restorer's task must be a converse_jax.tasks.Task (the model's spec.task), got {task!r}")
        self.model = model
        self.task = task if task is not None else DENOISE  # any task whose network takes the image alone
        self._forward = inference_forward(self.task, model)

    def _run(self, x: np.ndarray, kernel: np.ndarray | None, sf: int) -> np.ndarray:
        batch = {"input": np.ascontiguousarray(x[None], dtype=np.float32)}
        if self.task.takes_kernel:
            if kernel is None:
                raise ValueError(f"this {self.task.label} model needs a blur kernel")
            batch["kernel"] = np.ascontiguousarray(kernel[None], dtype=np.float32)
        elif kernel is not None:
            raise ValueError(f"this {self.task.label} model does not take a blur kernel")
        # current weights: a training loop may reuse this object
        return np.asarray(self._forward(nnx.state(self.model), batch, sf=int(sf))[0])

    def __call__(self, x: np.ndarray, kernel: np.ndarray | None = None, sf: int = 1,
                 x8: bool = False) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 3:
            raise ValueError(f"Restorer expects an (H, W, C) image, got shape {x.shape}")
        if not x8:
            return self._run(x, kernel, sf)
        acc = None
        for mode in range(8):
            kt = None if kernel is None else D.dihedral(np.asarray(kernel), mode)
            out = D.dihedral_inverse(self._run(D.dihedral(x, mode), kt, sf), mode)
            acc = out.astype(np.float32) if acc is None else acc + out
        return acc / np.float32(8.0)


# ----------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class ImageResult:
    image: str
    psnr: float
    ssim: float
    psnr_y: float | None = None
    ssim_y: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"image": self.image, "psnr": self.psnr, "ssim": self.ssim}
        if self.psnr_y is not None:
            d["psnr_y"] = self.psnr_y
            d["ssim_y"] = self.ssim_y
        return d


@dataclasses.dataclass
class RunResult:
    """One pass over a dataset (one kernel for deblurring)."""

    per_image: list[ImageResult]
    kernel: int | None = None
    paper: float | None = None

    @property
    def average(self) -> dict[str, float]:
        keys = ["psnr", "ssim"]
        if self.per_image and self.per_image[0].psnr_y is not None:
            keys += ["psnr_y", "ssim_y"]
        return {k: float(np.mean([getattr(r, k) for r in self.per_image])) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.kernel is not None:
            d["kernel"] = self.kernel
        d["per_image"] = [r.to_dict() for r in self.per_image]
        d["average"] = self.average
        if self.paper is not None:
            d["paper"] = self.paper
        return d


@dataclasses.dataclass
class EvalReport:
    model: str
    dataset: str
    task: Task
    protocol: Any
    runs: list[RunResult]
    x8: bool = False
    precision: str | None = None  # the model's compute precision ("float32", "bf16"); None: not known

    def protocol_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self.protocol) if dataclasses.is_dataclass(self.protocol) else dict(self.protocol)
        d.pop("paper", None)
        d["x8"] = self.x8
        return d

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"model": self.model, "dataset": self.dataset, "precision": self.precision,
                             "protocol": self.protocol_dict()}
        if self.task.uses_kernels:
            d["kernels"] = [r.to_dict() for r in self.runs]
        else:
            d.update(self.runs[0].to_dict())
        return d

    @property
    def metric_key(self) -> str:
        return "psnr_y" if getattr(self.protocol, "metric", "rgb") == "y" else "psnr"

    def format_table(self) -> str:
        """Per-image rows and the average, with the paper's number where it has one."""
        lines = []
        what = self.task.protocol_label(self.protocol)
        head = f"{self.model} on {self.dataset}" + (f" ({what})" if what else "") + (", x8 ensemble" if self.x8 else "")
        head += f", precision {self.precision}" if self.precision else ""
        lines.append(head)
        for run in self.runs:
            has_y = run.per_image and run.per_image[0].psnr_y is not None
            width = max([len("average")] + [len(r.image) for r in run.per_image])
            if run.kernel is not None:
                lines.append(f"kernel {run.kernel}")
            cols = ["PSNR", "SSIM"] + (["PSNR_Y", "SSIM_Y"] if has_y else [])
            lines.append(f"  {'image':<{width}}  " + "  ".join(f"{c:>8}" for c in cols))
            for r in run.per_image:
                vals = [r.psnr, r.ssim] + ([r.psnr_y, r.ssim_y] if has_y else [])
                cells = "  ".join(_fmt(c, v) for c, v in zip(cols, vals, strict=True))
                lines.append(f"  {r.image:<{width}}  " + cells)
            avg = run.average
            vals = [avg["psnr"], avg["ssim"]] + ([avg["psnr_y"], avg["ssim_y"]] if has_y else [])
            line = f"  {'average':<{width}}  " + "  ".join(_fmt(c, v) for c, v in zip(cols, vals, strict=False))
            if run.paper is not None:
                label = "Y-PSNR" if self.metric_key == "psnr_y" else "PSNR"
                line += f"   (paper {label}: {run.paper:.2f} dB)"
            lines.append(line)
        if len(self.runs) > 1:
            key = self.metric_key
            ours = "  ".join(f"{r.average[key]:.2f}" for r in self.runs)
            lines.append(f"kernels {' '.join(str(r.kernel) for r in self.runs)}: {ours}")
            if all(r.paper is not None for r in self.runs):
                lines.append(f"paper:       {'  '.join(f'{r.paper:.2f}' for r in self.runs)}")
        return "\n".join(lines)


def _fmt(col: str, v: float) -> str:
    return f"{v:8.4f}" if col.startswith("SSIM") else f"{v:8.3f}"


# ----------------------------------------------------------------------------------------
# The evaluation loop


def load_test_images(folder: str | Path, color: str) -> list[tuple[str, np.ndarray]]:
    """All images of ``folder`` as (file name, uint8 (H, W, C)), read up front.

    Raises :class:`~converse_jax.imageio.ImageError` (a ValueError) naming the first file that
    cannot be read, before any time is spent on the network.
    """
    return [(p.name, read_image(p, color=color)) for p in list_images(folder)]


def evaluate(model: Any, spec: Any, images: str | Path | Sequence[tuple[str, np.ndarray]], *,
             protocol: Any = None, dataset: str | None = None, x8: bool = False,
             save_dir: str | Path | None = None, progress: bool = True,
             restorer: Restorer | None = None,
             on_image: Callable[[ImageResult], None] | None = None) -> EvalReport:
    """Run the test protocol of ``spec`` (or ``protocol``) with ``model`` on ``images``.

    ``images``: a folder or a list of (name, uint8 (H, W, C)) ground truths in the protocol's
    colour mode. Deblurring models run every kernel of ``protocol.kernels``. Restored images
    go to ``save_dir`` (``<stem>.png``, or ``<stem>_k<N>.png`` for deblurring) when given.
    """
    protocol = protocol if protocol is not None else spec.protocol
    dataset = dataset or protocol.dataset
    if isinstance(images, (str, Path)):
        images = load_test_images(images, protocol.color)
    images = list(images)
    if not images:
        raise ValueError("no test images given")
    restorer = restorer or Restorer(model, spec.task)
    save_path = Path(save_dir) if save_dir is not None else None
    if save_path is not None:
        save_path.mkdir(parents=True, exist_ok=True)
    kernel_ids: list[int | None] = (list(protocol.kernels) or [1, 2, 3, 4, 5]) if spec.task.uses_kernels else [None]
    runs = []
    for kid in kernel_ids:
        desc = f"{spec.name} {dataset}" + (f" k{kid}" if kid is not None else "")
        bar = _ImageProgress(desc, len(images), progress)
        results = []
        for name, hr in images:
            res = _score_image(restorer, spec.task, protocol, name, hr, kid, x8, save_path)
            results.append(res)
            bar.step(res)
            if on_image is not None:
                on_image(res)
        bar.close()
        runs.append(RunResult(results, kernel=kid, paper=paper_value(protocol, dataset, kid)))
    return EvalReport(spec.name, dataset, spec.task, protocol, runs, x8=x8, precision=model_precision(model))


class _ImageProgress:
    """Per-image progress on stderr: a tqdm bar in a terminal or
    a notebook; in a pipe one plain line per image, so no bar fragments mix into the table."""

    def __init__(self, desc: str, total: int, enabled: bool) -> None:
        self.desc, self.total, self.enabled, self.done = desc, total, enabled, 0
        self.bar = None
        if enabled and interactive():
            self.bar = progress_bar(total, desc=desc, unit="img", leave=False)

    def step(self, res: ImageResult) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix(psnr=f"{res.psnr:.2f}")
            self.bar.update(1)
        elif self.enabled:
            print(f"{self.desc}: {self.done}/{self.total} {res.image} PSNR {res.psnr:.2f}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _score_image(restorer: Restorer, task: Task, protocol: Any, name: str, hr: np.ndarray, kid: int | None,
                 x8: bool, save_path: Path | None) -> ImageResult:
    """Degrade one ground truth (with paper kernel ``kid``), restore it, score it, save it."""
    kernel = D.paper_kernel(kid) if kid is not None else None
    gt, lq = task.protocol_pair(hr, protocol, kernel)
    out = restorer(lq, kernel if task.takes_kernel else None, sf=1, x8=x8)
    if out.shape[:2] != gt.shape[:2]:
        raise ValueError(f"{name}: model output is {out.shape[0]}x{out.shape[1]}, expected "
                         f"{gt.shape[0]}x{gt.shape[1]}; does the model match the protocol?")
    if out.shape[-1] != gt.shape[-1]:
        raise ValueError(f"{name}: model outputs {out.shape[-1]} channels, the ground truth has {gt.shape[-1]}")
    restored = D.to_uint8(out)
    m = task.score(restored, gt, protocol)
    if save_path is not None:
        stem = Path(name).stem + (f"_k{kid}" if kid is not None else "")
        write_image(save_path / f"{stem}.png", restored)
    return ImageResult(name, m["psnr"], m["ssim"], m.get("psnr_y"), m.get("ssim_y"))


# ----------------------------------------------------------------------------------------
# Restoring a user's image


def check_restore_options(spec: Any, has_kernel: bool, sf: int) -> None:
    """Whether a blur kernel and scale factor ``sf`` fit the model of ``spec``; ValueError if not.

    Networks that take a kernel (non-blind) need one and accept ``sf >= 1``; the others take
    neither. The restore command line calls this before loading anything.
    """
    if spec.task.takes_kernel:
        if not has_kernel:
            raise ValueError(f"model {spec.name} does {spec.task.label}: pass a blur kernel (--kernel=FILE, "
                             ".npy or image)")
        if sf < 1:
            raise ValueError(f"--sf must be >= 1, got {sf}")
        return
    if has_kernel:
        raise ValueError(f"model {spec.name} does not take a blur kernel; drop --kernel")
    if sf != 1:
        raise ValueError(f"--sf applies to non-blind models only; {spec.name} has a fixed scale {spec.scale}")


def restore_array(restorer: Restorer, spec: Any, img: np.ndarray, *,
                  kernel: np.ndarray | None = None, sf: int = 1, x8: bool = False) -> np.ndarray:
    """Restore a uint8 image (H, W, 1 or 3) with the model of ``spec``; returns uint8.

    The output keeps the input's mode: a gray model restores each channel of an RGB image
    separately; an RGB model sees a gray image as three equal channels and returns their
    mean. Non-blind models need ``kernel`` (normalised to sum 1 here); ``sf`` is their scale
    (see :func:`check_restore_options`).
    """
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] not in (1, 3):
        raise ValueError(f"restore expects a uint8 gray or RGB image, got {img.dtype} {img.shape}")
    check_restore_options(spec, kernel is not None, sf)
    if kernel is not None:
        kernel = D.normalize_kernel(kernel)
    x = D.to_float(img)
    channels = int(spec.in_channels)
    if channels == 1 and x.shape[-1] == 3:
        out = np.concatenate([restorer(x[..., c:c + 1], kernel, sf=sf, x8=x8) for c in range(3)], axis=-1)
    elif channels == 3 and x.shape[-1] == 1:
        out = restorer(np.repeat(x, 3, axis=-1), kernel, sf=sf, x8=x8).mean(axis=-1, keepdims=True)
    elif channels == x.shape[-1]:
        out = restorer(x, kernel, sf=sf, x8=x8)
    else:
        raise ValueError(f"model {spec.name} takes {channels}-channel images")
    return D.to_uint8(out)


# ----------------------------------------------------------------------------------------
# Tiles and memory

DEFAULT_OVERLAP = 32  # input pixels shared by neighbouring tiles (see docs/restore.md for the measurements)
CPU_BUDGET_GIB = 2.0  # the default memory budget's cap on CPU


class PhotoRestorer:
    """``restorer`` (whole or tiled) on a photo padded by ``margin`` pixels with
    :func:`~converse_jax.degradations.pad_tapered` (the blur kernel it is given), its output cropped
    back: for networks whose solver wraps around the whole image (``task.photo_margin``), whose
    protocol inputs are blurred circularly but whose photos are not. Called like ``restorer``."""

    def __init__(self, restorer: Any, margin: int, scale: int) -> None:
        self.restorer, self.margin, self.scale = restorer, int(margin), int(scale)

    def __call__(self, x: np.ndarray, kernel: np.ndarray | None = None, sf: int = 1,
                 x8: bool = False) -> np.ndarray:
        if kernel is None or self.margin == 0:
            return self.restorer(x, kernel, sf=sf, x8=x8)
        out = self.restorer(D.pad_tapered(np.asarray(x, np.float32), self.margin, kernel), kernel, sf=sf, x8=x8)
        c = self.margin * self.scale * int(sf)
        return out[c:out.shape[0] - c, c:out.shape[1] - c]


def photo_margin(spec: Any, photo: bool) -> int:
    """Pixels :class:`PhotoRestorer` adds on each side of a photo for this model (0 for protocol inputs)."""
    return int(spec.task.photo_margin) if photo else 0


def make_restorer(model: Any, spec: Any, tile: int = 0, overlap: int = DEFAULT_OVERLAP, *, batch: int = 1,
                  blend: str = "crop", on_tile: Callable[[int, int], None] | None = None,
                  photo: bool = False) -> Any:
    """The whole-image :class:`Restorer` (``tile=0``) or a :class:`~converse_jax.tiling.TiledRestorer`
    with tiles of ``tile`` input pixels sharing ``overlap``; both are called ``r(x, kernel, sf=, x8=)``.
    ``photo``: the input is a photo, not a protocol input: networks with a ``task.photo_margin`` get it
    (:class:`PhotoRestorer`)."""
    if tile < 0:
        raise ValueError(f"--tile must be >= 0 (0: the whole image), got {tile}")
    margin = photo_margin(spec, photo)
    if tile == 0:
        restorer: Any = Restorer(model, spec.task)
    else:
        restorer = TiledRestorer(model, spec.task, scale=int(spec.scale), tile=tile, overlap=overlap, batch=batch,
                                 blend=blend, on_tile=on_tile)
    return PhotoRestorer(restorer, margin, int(spec.scale)) if margin else restorer


def memory_budget(max_memory_gib: float | None = None, *, whole_image: bool = False) -> float:
    """Bytes a restoration may use: ``max_memory_gib`` GiB if given; else 90% of the accelerator's
    memory, or on CPU half of the memory available to this process (:func:`available_ram`), at most
    :data:`CPU_BUDGET_GIB` GiB for tiles (on CPU tiles cost little speed, and other programs and the
    host copies XLA makes need the rest). ``whole_image``: the budget for restoring an image whole
    (and its tiles) with a network whose small tiles do not reproduce the whole image
    (``task.tiles_match_whole`` false), for which tiles would cost accuracy rather than speed: on CPU
    half the available memory, uncapped."""
    if max_memory_gib is not None:
        if not max_memory_gib > 0:
            raise ValueError(f"--max-memory must be > 0 GiB, got {max_memory_gib}")
        return float(max_memory_gib) * 2**30
    dev = jax.local_devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        if stats.get("bytes_limit"):
            return 0.9 * float(stats["bytes_limit"])
    half = 0.5 * available_ram()
    return half if whole_image else min(half, CPU_BUDGET_GIB * 2**30)


def available_ram(root: str | Path = "/") -> float:
    """Bytes of RAM this process can still use: the system's available memory, lowered to what is left
    under a container's memory limit (cgroup v2 ``memory.max``, or v1 ``memory.limit_in_bytes``), which
    ``/proc/meminfo`` does not show. ``root``: the file system to read (tests)."""
    root = Path(root)
    avail = None
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = float(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if avail is None:
        avail = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    cgroups = root / "sys/fs/cgroup"
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = (cgroups / limit_file).read_text().strip()
            usage = float((cgroups / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and float(limit) < 2**60:  # "max" or a huge number: no limit
            return max(0.0, min(avail, float(limit) - usage))
    return avail


def memory_model(model: Any, spec: Any, sf: int = 1) -> MemoryModel:
    """Peak bytes of one call of this network as a function of pixels, from XLA's compiled memory
    analysis at two small sizes (:func:`~converse_jax.tiling.fit_memory_model`)."""
    ksize = getattr(model, "blur_kernel_size", None) if spec.task.takes_kernel else None
    return fit_memory_model(model, spec.task, int(spec.in_channels), ksize, sf)


def auto_tile(mem: MemoryModel, spec: Any, height: int, width: int, budget: float, sf: int = 1,
              photo: bool = False, whole_budget: float | None = None) -> int:
    """0 (the whole image) when restoring a ``height`` x ``width`` input whole fits ``budget``
    bytes by ``mem``'s estimate, else the largest standard tile that does (``photo``: with the
    border :func:`make_restorer` adds to a photo). ``whole_budget`` (see :func:`memory_budget`)
    replaces ``budget`` when the network's small tiles do not reproduce the whole image
    (``task.tiles_match_whole`` false): for the whole image, and then for the largest tile, whose
    context (up to a quarter of the tile) then costs the least."""
    scale = int(spec.scale) * int(sf)
    margin = photo_margin(spec, photo)
    height, width = height + 2 * margin, width + 2 * margin

    def estimate(tile: int) -> float:
        return mem.peak_bytes(height, width, int(spec.in_channels), scale, tile)

    if whole_budget is not None and not spec.task.tiles_match_whole:
        budget = max(budget, whole_budget)
    return choose_tile(estimate, height, width, budget)


def check_kernel_size(model: Any, kernel: np.ndarray | None) -> None:
    """ValueError when ``kernel``'s shape is not the (k, k) the network was built for."""
    k = getattr(model, "blur_kernel_size", None)
    if kernel is None or k is None:
        return
    if tuple(np.shape(kernel)) != (k, k):
        raise ValueError(f"--kernel is {np.shape(kernel)[0]}x{np.shape(kernel)[1]}, this model takes {k}x{k} "
                         f"blur kernels: resample or crop it to {k}x{k}")
