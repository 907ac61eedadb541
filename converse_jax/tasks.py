"""The kinds of restoration: how each one degrades images, calls a network and scores it.

One :class:`Task` object per kind: :data:`DENOISE` (Gaussian denoising), :data:`SR` (x``s``
super-resolution, ``s`` from the model's scale or the protocol), :data:`DEBLUR` (blind
deblurring) and :data:`DEBLUR_NONBLIND` (non-blind deblurring: the network also gets the kernel).
A task owns

- the training degradation (:meth:`Task.train_sample`): a clean float patch -> the batch entry
  ``{"input", "target"[, "kernel"]}``, noise level and blur kernel drawn from the configured
  ranges (:class:`Degradation`);
- the paper's test protocol (:meth:`Task.protocol_pair`): a uint8 ground truth -> (cropped
  ground truth, network input), with the reference's exact arithmetic;
- the network call (:meth:`Task.forward`; :func:`jit_forward` compiles it);
- the score of an output (:meth:`Task.score`): PSNR/SSIM on uint8 values after the protocol's
  border crop, plus the Y channel for RGB images;
- the few facts other modules ask (:attr:`Task.takes_kernel`, :attr:`Task.uses_kernels`, ...).

Model registry entries hold the task object (``spec.task``); ``task.name`` is its stable name
for JSON files and messages, and the only place task names are spelled is this module. A
network with a new call signature needs a new Task only if its kind of restoration is new.

Layering: this module sits at the bottom with degradations, metrics and imageio; it never
imports models, nn, data, train or evaluation (the registry imports it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from converse_jax import degradations as D
from converse_jax import metrics as M

__all__ = [
    "DEBLUR",
    "DEBLUR_NONBLIND",
    "DENOISE",
    "KERNEL_SIZE",
    "SR",
    "TASKS",
    "BlindDeblurring",
    "Degradation",
    "Denoising",
    "NonBlindDeblurring",
    "SuperResolution",
    "Task",
    "get_task",
    "jit_forward",
]

KERNEL_SIZE = 7  # side of the random training blur kernels (the paper's test kernels are larger)

Batch = Mapping[str, Any]
Level = str | float | Sequence[float]


@dataclasses.dataclass(frozen=True)
class Degradation:
    """Validated settings of the training degradations.

    ``sigma``: denoising noise range; ``blur_noise``: noise range added after the blur (both
    on the 0..255 scale, drawn uniformly per sample); ``scale``: the SR factor.
    """

    sigma: tuple[float, float] = (25.0, 25.0)
    blur_noise: tuple[float, float] = (0.0, 2.55)
    scale: int = 1
    kernel_size: int = KERNEL_SIZE

    @classmethod
    def make(cls, sigma: Level = (25.0, 25.0), blur_noise: Level = (0.0, 2.55), scale: int = 1) -> Degradation:
        """Settings from user values: levels as for :func:`~converse_jax.degradations.parse_level_range`."""
        if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale!r}")
        return cls(D.parse_level_range(sigma, "sigma"), D.parse_level_range(blur_noise, "blur_noise"), int(scale))


def _check_ground_truth(hr: np.ndarray) -> np.ndarray:
    hr = np.asarray(hr)
    if hr.dtype != np.uint8 or hr.ndim != 3:
        raise ValueError(f"a test ground truth must be a uint8 (H, W, C) image, got {hr.dtype} {hr.shape}")
    return hr


class Task:
    """A kind of restoration. Subclasses define the degradations; the defaults below fit a
    network called on the image alone and scored like the paper's tables."""

    name: str = ""  # stable identifier (JSON, messages)
    label: str = ""  # printable, e.g. "non-blind deblurring"
    takes_kernel: bool = False  # the network is called as model(x, kernel, sf=sf)
    uses_kernels: bool = False  # the protocol runs once per blur kernel of protocol.kernels (--kernel)
    uses_sigma: bool = False  # the protocol's noise level is protocol.sigma (--sigma)
    # Tiled restoration (converse_jax.tiling): input pixels per side of a tile that the network
    # sees but whose output is dropped, so that the tile's own (circular) border is that far from
    # every pixel kept; how far it must be depends on how far the network's solver reaches
    # (docs/restore.md has the measurements behind each task's value).
    tile_context: int = 16
    # What a tile at the image border sees beyond it (converse_jax.tiling.BORDERS): "clamp", the
    # network's own padding as for the whole image; "wrap", the opposite border (circular FFT solves);
    # "seam", the opposite border with the image's wrap-around on the tile's edge, as on the whole image's.
    tile_border: str = "clamp"
    # Restoring a photo (experiments.restore, not the test protocols, which blur circularly): input
    # pixels added around it (degradations.pad_tapered, with the given blur kernel) and cropped from the
    # output, for a network whose solver wraps around the whole image; 0: none (docs/restore.md).
    photo_margin: int = 0
    # Tiles (converse_jax.tiling): blend each tile's context into the tile's blur by the kernel
    # (degradations.taper_edges), for a network whose solver wraps around its input.
    tile_taper: bool = False
    # Whether small tiles (the default tile budget) reproduce the whole image within 0.02 dB. Where they
    # do not (the deblurring networks need contexts of 96-256 px: docs/restore.md), the default memory
    # budget lets the whole image, and then the largest tile, use more memory
    # (evaluation.memory_budget(whole_image=True)): fewer, larger tiles keep the full context.
    tiles_match_whole: bool = True

    def size_multiple(self, scale: int) -> int:
        """Training patches and validation crops must be multiples of this (``scale`` for SR)."""
        return 1

    def train_sample(self, target: np.ndarray, rng: np.random.Generator,
                     settings: Degradation) -> dict[str, np.ndarray]:
        """``{"input", "target"[, "kernel"]}`` for a clean float32 patch (H, W, C) in [0, 1]."""
        raise NotImplementedError

    def protocol_pair(self, hr: np.ndarray, protocol: Any, kernel: np.ndarray | None = None,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(ground truth uint8 after modcrop, network input float32) for one test image, as the
        reference's test script makes it (noise seeded with ``seed`` per image)."""
        raise NotImplementedError

    def forward(self, model: Callable[..., Any], batch: Batch, sf: int = 1) -> Any:
        """The network's output on ``batch["input"]`` (B, H, W, C).

        ``sf`` is the scale factor of networks that take one (non-blind deblurring); the others
        have a fixed scale, so anything but 1 is an error.
        """
        if sf != 1:
            raise ValueError(f"sf applies to non-blind models only; {self.label} networks have a fixed scale")
        return model(batch["input"])

    def score(self, restored: np.ndarray, gt: np.ndarray, protocol: Any) -> dict[str, float]:
        """``{"psnr", "ssim"}`` of uint8 images after cropping ``protocol.border`` pixels per side,
        plus ``{"psnr_y", "ssim_y"}`` for RGB protocols (the SR tables report the Y channel)."""
        return M.image_metrics(restored, gt, border=int(protocol.border), y_channel=protocol.color == "rgb")

    def protocol_label(self, protocol: Any) -> str:
        """The protocol's setting for a table heading (``"sigma 25"``, ``"x4"``), or ``""``."""
        return ""

    def recipe_noise(self, recipe: Any) -> str:
        """What a training recipe's noise settings mean for this task, for --help (or ``""``)."""
        return ""

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    def __str__(self) -> str:
        return self.name

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.name == self.name  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.name))

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return get_task, (self.name,)  # unpickles (e.g. in a data worker) to the registered object


class Denoising(Task):
    """Additive white Gaussian noise, not clipped."""

    name, label = "denoise", "denoising"
    uses_sigma = True

    def train_sample(self, target: np.ndarray, rng: np.random.Generator,
                     settings: Degradation) -> dict[str, np.ndarray]:
        return {"target": target, "input": D.add_noise(target, rng.uniform(*settings.sigma), rng)}

    def protocol_pair(self, hr: np.ndarray, protocol: Any, kernel: np.ndarray | None = None,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        gt = D.modcrop(_check_ground_truth(hr), max(1, protocol.modcrop))
        return gt, D.add_noise(D.to_float(gt), protocol.sigma, rng=seed)

    def protocol_label(self, protocol: Any) -> str:
        return f"sigma {protocol.sigma:g}"

    def recipe_noise(self, recipe: Any) -> str:
        return f"sigma {recipe.sigma[0]:g}" + (f"-{recipe.sigma[1]:g}" if recipe.sigma[1] != recipe.sigma[0] else "")


class SuperResolution(Task):
    """x``s`` super-resolution of a MATLAB-bicubic downscale (kept in float, not clipped)."""

    name, label = "sr", "super-resolution"
    tile_context = 8  # input pixels: x4 the output pixels

    def size_multiple(self, scale: int) -> int:
        return int(scale)

    def train_sample(self, target: np.ndarray, rng: np.random.Generator,
                     settings: Degradation) -> dict[str, np.ndarray]:
        s = settings.scale
        lr = D.imresize(target, 1.0 / s)
        h, w = target.shape[0] // s, target.shape[1] // s
        return {"target": target, "input": np.ascontiguousarray(lr[:h, :w], dtype=np.float32)}

    def protocol_pair(self, hr: np.ndarray, protocol: Any, kernel: np.ndarray | None = None,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        scale = int(protocol.scale)
        crop = max(1, protocol.modcrop)
        if crop % scale:
            crop = crop * scale // math.gcd(crop, scale)
        gt = D.modcrop(_check_ground_truth(hr), crop)
        return gt, D.imresize(D.to_float(gt), 1.0 / scale)

    def protocol_label(self, protocol: Any) -> str:
        return f"x{protocol.scale}"


class BlindDeblurring(Task):
    """Circular blur plus a little noise; the network sees only the blurred image.

    Training kernels are random 7x7 anisotropic Gaussians or motion blurs (half each); the
    protocol uses the paper's kernels and blurs the uint8 ground truth (kept uint8).
    """

    name, label = "deblur", "blind deblurring"
    uses_kernels = True
    # ConverseNet's 35 chained FFT deconvolutions reach far: on a 1024² photo a region restored with
    # 128 / 192 / 256 / 320 px of context agrees with the whole image to 53 / 60 / 74 / 88 dB (docs/restore.md)
    tile_context = 256
    tile_border = "seam"  # its layers pad circularly and crop: the whole image's border is a seam
    tiles_match_whole = False  # the full context needs tiles of 1024 px or more

    def train_sample(self, target: np.ndarray, rng: np.random.Generator,
                     settings: Degradation) -> dict[str, np.ndarray]:
        kernel = D.random_kernel(rng, settings.kernel_size)
        level = rng.uniform(*settings.blur_noise)
        out = {"target": target, "input": D.add_noise(D.blur(target, kernel), level, rng)}
        if self.takes_kernel:
            out["kernel"] = kernel
        return out

    def protocol_pair(self, hr: np.ndarray, protocol: Any, kernel: np.ndarray | None = None,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        if kernel is None:
            raise ValueError(f"the {self.label} protocol needs a blur kernel")
        gt = D.modcrop(_check_ground_truth(hr), max(1, protocol.modcrop))
        return gt, D.add_noise(D.to_float(D.blur(gt, kernel)), protocol.blur_noise, rng=seed)

    def recipe_noise(self, recipe: Any) -> str:
        return f"blur noise {recipe.blur_noise[0]:g}-{recipe.blur_noise[1]:g}"


class NonBlindDeblurring(BlindDeblurring):
    """Blind deblurring's degradations, with the kernel given to the network (and in batches)."""

    name, label = "deblur_nonblind", "non-blind deblurring"
    takes_kernel = True
    tile_context = 96  # five kernel-driven FFT solves reach further still (docs/restore.md)
    tile_border = "wrap"  # its data step solves over the image itself, unpadded; its tiles are tapered
    photo_margin = 16  # its data step wraps the whole image (padding 0): a photo's edges would ring
    tile_taper = True  # and so would a tile's

    def forward(self, model: Callable[..., Any], batch: Batch, sf: int = 1) -> Any:
        return model(batch["input"], batch["kernel"], sf=sf)


DENOISE = Denoising()
SR = SuperResolution()
DEBLUR = BlindDeblurring()
DEBLUR_NONBLIND = NonBlindDeblurring()
TASKS: tuple[Task, ...] = (DENOISE, SR, DEBLUR, DEBLUR_NONBLIND)
_BY_NAME = {t.name: t for t in TASKS}


def get_task(task: Task | str) -> Task:
    """The task object of ``task`` (a Task, returned as is, or its name)."""
    if isinstance(task, Task):
        return task
    try:
        return _BY_NAME[task]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(_BY_NAME)}") from None


def jit_forward(task: Task, model: nnx.Module | nnx.GraphDef) -> Callable[..., jax.Array]:
    """``fn(state, batch, sf=1)``: ``task.forward`` of the network rebuilt from ``state``, under ``jax.jit``.

    ``model`` is a network (only its graph definition is kept) or its ``nnx.GraphDef``.
    ``state`` is what ``nnx.merge`` takes after the graph: one ``nnx.State`` or a tuple of them
    (e.g. ``(params, rest)`` as ``nnx.split(model, nnx.Param, ...)`` returns). The weights are
    an argument, so one compiled function serves a network whose weights change (a training
    loop); it compiles once per batch shapes and ``sf``.
    """
    graphdef = model if isinstance(model, nnx.GraphDef) else nnx.graphdef(model)

    def run(state: Any, batch: Batch, sf: int = 1) -> jax.Array:
        states = state if isinstance(state, tuple) else (state,)
        return task.forward(nnx.merge(graphdef, *states), batch, sf=sf)

    return jax.jit(run, static_argnames=("sf",))
