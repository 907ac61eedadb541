"""Training batches and fixed validation sets, with each task's degradation made on the fly.

Randomness is *index-based*: sample ``g`` of the (global) sample stream draws everything it
needs — which image, where to crop, which of the 8 flips/rotations, noise level, blur kernel,
noise — from ``numpy.random.default_rng([seed, 0, g])``. Training batch ``i`` therefore depends
only on ``(seed, i)``, whatever the number of worker processes, and a run restarted with
``start_step=k`` sees exactly the batches an uninterrupted run would have seen from step ``k``.

Multi-host: batch ``i`` of the *global* stream holds samples ``i*B*S .. (i+1)*B*S - 1`` where
``B`` is the per-host ``batch_size`` and ``S`` the ``shard_count``; host ``shard_index`` yields
the ``B`` consecutive samples starting at ``i*B*S + shard_index*B``. Concatenating the hosts'
batches in shard order gives the batch a single host with ``batch_size = B*S`` would see.

Degradations (the targets are clean patches, all float32 in [0, 1], channels-last):

- ``denoise``: additive white Gaussian noise, σ uniform in ``sigma`` (0..255 scale), not clipped;
- ``sr``: MATLAB-style bicubic downscale by ``1/scale`` (:func:`converse_jax.degradations.imresize`)
  of the ``patch_size`` target; input is ``patch_size // scale``, kept in float, not clipped;
- ``deblur`` / ``deblur_nonblind``: circular convolution with a random 7×7 kernel (anisotropic
  Gaussian or motion, half each) plus white noise with σ uniform in ``blur_noise`` (0..255);
  ``deblur_nonblind`` batches also carry the ``kernel`` (for Converse-USRNet).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any, Iterator, Sequence

import numpy as np
from scipy import ndimage

from converse_jax.data.kernels import random_kernel
from converse_jax.data.sources import EmbeddedSource, FolderSource, ImageSource, parse_source

__all__ = ["TASKS", "BatchIterator", "make_train_loader", "make_val_set", "make_sample", "circular_blur"]

TASKS = ("denoise", "sr", "deblur", "deblur_nonblind")
KERNEL_SIZE = 7

_TRAIN_STREAM = 0
_VAL_STREAM = 1
_PERMUTE_STREAM = 2
# Sources up to this size are visited epoch by epoch (a fresh permutation each epoch); larger
# ones (the embedded source is practically infinite) are sampled uniformly with replacement.
_MAX_PERMUTED = 1 << 22


def circular_blur(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve each channel of ``img`` (H, W, C) with ``kernel`` (k, k), circular boundary."""
    out = ndimage.convolve(np.asarray(img, np.float64), np.asarray(kernel, np.float64)[..., None], mode="wrap")
    return out.astype(np.float32)


def _range(name: str, value: float | Sequence[float]) -> tuple[float, float]:
    if isinstance(value, (int, float, np.integer, np.floating)):
        lo = hi = float(value)
    else:
        try:
            lo, hi = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number or a (low, high) pair, got {value!r}") from None
    if not (0.0 <= lo <= hi) or not np.isfinite(hi):
        raise ValueError(f"{name} must satisfy 0 <= low <= high (0..255 scale), got {value!r}")
    return lo, hi


@dataclasses.dataclass(frozen=True)
class _Degrade:
    """The per-task degradation settings, validated."""

    task: str
    channels: int
    sigma: tuple[float, float]
    blur_noise: tuple[float, float]
    scale: int

    @classmethod
    def make(cls, task: str, channels: int, sigma: Any, blur_noise: Any, scale: int) -> "_Degrade":
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        if not isinstance(scale, (int, np.integer)) or scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale!r}")
        return cls(task, int(channels), _range("sigma", sigma), _range("blur_noise", blur_noise), int(scale))

    def apply(self, target: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"target": target}
        if self.task == "denoise":
            s = rng.uniform(*self.sigma) / 255.0
            out["input"] = (target + rng.normal(0.0, s, target.shape)).astype(np.float32)
        elif self.task == "sr":
            from converse_jax.degradations import imresize

            lr = imresize(target, 1.0 / self.scale)
            h, w = target.shape[0] // self.scale, target.shape[1] // self.scale
            out["input"] = np.ascontiguousarray(lr[:h, :w], dtype=np.float32)
        else:
            kernel = random_kernel(rng, KERNEL_SIZE)
            s = rng.uniform(*self.blur_noise) / 255.0
            blurred = circular_blur(target, kernel)
            out["input"] = (blurred + rng.normal(0.0, s, target.shape)).astype(np.float32)
            if self.task == "deblur_nonblind":
                out["kernel"] = kernel
        return out


def _augment(img: np.ndarray, mode: int) -> np.ndarray:
    """One of the 8 flips/rotations by multiples of 90° (the dihedral group)."""
    if mode >= 4:
        img = img[:, ::-1]
    return np.ascontiguousarray(np.rot90(img, mode % 4))


@functools.lru_cache(maxsize=2)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, _PERMUTE_STREAM, epoch]).permutation(n)


@dataclasses.dataclass(frozen=True)
class _SampleMaker:
    """Builds training sample ``g`` from ``(seed, g)`` alone; picklable for worker processes."""

    source: Any
    degrade: _Degrade
    patch_size: int
    seed: int

    def image_index(self, g: int, rng: np.random.Generator) -> int:
        n = len(self.source)
        if n > _MAX_PERMUTED:
            return int(rng.integers(n))
        return int(_epoch_permutation(self.seed, g // n, n)[g % n])

    def __call__(self, g: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, _TRAIN_STREAM, g])
        index = self.image_index(g, rng)
        img = self.source.load(index, self.degrade.channels)
        p = self.patch_size
        h, w = img.shape[:2]
        if h < p or w < p:
            raise ValueError(
                f"{self.source.describe(index)} is {h}x{w}, smaller than the {p}-pixel training patch; "
                "use a smaller patch size or remove the image"
            )
        y, x = int(rng.integers(h - p + 1)), int(rng.integers(w - p + 1))
        patch = _augment(img[y : y + p, x : x + p], int(rng.integers(8)))
        return self.degrade.apply(patch, rng)


@dataclasses.dataclass(frozen=True)
class _BatchMaker:
    """Builds this host's share of global batch ``i``."""

    sample: _SampleMaker
    batch_size: int
    shard_index: int
    shard_count: int

    def __call__(self, i: int) -> dict[str, np.ndarray]:
        first = (int(i) * self.shard_count + self.shard_index) * self.batch_size
        samples = [self.sample(first + j) for j in range(self.batch_size)]
        return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """An endless iterator of training batches; ``step`` is the index of the next batch.

    Close it (or use it as a context manager) to stop the worker processes.
    """

    def __init__(self, it: Any, start_step: int) -> None:
        self._it = it
        self.step = start_step

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self.step += 1
        # Plain arrays: worker batches arrive in shared memory, which this releases at once.
        return {k: np.array(v) for k, v in batch.items()}

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "BatchIterator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _absl_flags_ready() -> None:
    """Let grain's worker processes read their absl flags in a program that never parsed any.

    grain 0.2.x reads an absl flag when it starts workers (and JAX being importable makes it
    do so), which fails with ``UnparsedFlagAccessError`` unless the flags were parsed (google/
    grain#1355, fixed upstream by using the default). Marking them parsed keeps every default.
    """
    try:
        from absl import flags
    except ImportError:
        return
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def make_train_loader(
    task: str,
    source: "str | ImageSource | None",
    *,
    patch_size: int,
    batch_size: int,
    seed: int,
    sigma: float | Sequence[float] = (25.0, 25.0),
    blur_noise: float | Sequence[float] = (0.0, 2.55),
    scale: int = 4,
    channels: int = 3,
    num_workers: int = 0,
    start_step: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
) -> BatchIterator:
    """An endless iterator of training batches (dicts of numpy arrays), built with grain.

    Keys: ``"input"`` ``(B, h, w, C)`` and ``"target"`` ``(B, H, W, C)`` float32, plus
    ``"kernel"`` ``(B, 7, 7)`` float32 (sums to 1) for ``deblur_nonblind``. ``H = W =
    patch_size``; for ``sr`` the input is ``patch_size // scale`` (``patch_size`` must be a
    multiple of ``scale``), otherwise the input has the target's size.

    ``source`` is a spec for :func:`parse_source` or a source object. ``batch_size`` is the
    per-host batch: with ``shard_count`` hosts the global batch is ``batch_size *
    shard_count`` and host ``shard_index`` yields its slice of it. Batch ``i`` depends only on
    ``(seed, i)``: the first batch yielded is batch ``start_step``, with or without worker
    processes (``num_workers`` > 0 uses grain's ``mp_prefetch``).
    """
    degrade = _Degrade.make(task, channels, sigma, blur_noise, scale)
    patch_size = _check_int("patch_size", patch_size, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    seed = _check_int("seed", seed, 0)
    num_workers = _check_int("num_workers", num_workers, 0)
    start_step = _check_int("start_step", start_step, 0)
    shard_count = _check_int("shard_count", shard_count, 1)
    shard_index = _check_int("shard_index", shard_index, 0)
    if shard_index >= shard_count:
        raise ValueError(f"shard_index must be < shard_count ({shard_count}), got {shard_index}")
    if task == "sr" and patch_size % degrade.scale:
        raise ValueError(f"for sr the patch size ({patch_size}) must be a multiple of the scale ({degrade.scale})")
    src = parse_source(source)
    if isinstance(src, EmbeddedSource):
        src = dataclasses.replace(src, size=patch_size)
    elif isinstance(src, FolderSource):
        for f, (h, w) in zip(src.files, src.sizes):
            if h < patch_size or w < patch_size:
                raise ValueError(
                    f"image file {f} is {h}x{w}, smaller than the {patch_size}-pixel training patch; "
                    "use a smaller patch size or remove the image"
                )

    import grain

    maker = _BatchMaker(_SampleMaker(src, degrade, patch_size, seed), batch_size, shard_index, shard_count)
    ds = grain.MapDataset.range(start_step, sys.maxsize).map(maker)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    if num_workers > 0:
        _absl_flags_ready()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2))
    return BatchIterator(iter(it_ds), start_step)


def make_sample(
    task: str,
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    sigma: float | Sequence[float] = (25.0, 25.0),
    blur_noise: float | Sequence[float] = (0.0, 2.55),
    scale: int = 4,
) -> dict[str, np.ndarray]:
    """Degrade one clean float32 image ``(H, W, C)`` for ``task`` (no crop, no augmentation)."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3:
        raise ValueError(f"expected an (H, W, C) image, got shape {img.shape}")
    degrade = _Degrade.make(task, img.shape[-1], sigma, blur_noise, scale)
    if task == "sr" and (img.shape[0] % scale or img.shape[1] % scale):
        raise ValueError(f"for sr the image size {img.shape[:2]} must be a multiple of the scale ({scale})")
    return degrade.apply(img, rng)


def make_val_set(
    task: str,
    source: "str | ImageSource | None" = None,
    *,
    count: int = 8,
    size: int = 96,
    seed: int = 0,
    sigma: float | Sequence[float] = (25.0, 25.0),
    blur_noise: float | Sequence[float] = (0.0, 2.55),
    scale: int = 4,
    channels: int = 3,
) -> list[dict[str, np.ndarray]]:
    """A fixed validation set: a list of unbatched dicts with the training batches' keys.

    By default (``source`` None or ``"embedded"``) the images are ``count`` held-out embedded
    dead-leaves images of side ``size`` (their seeds are never used for training). For a
    folder or TFDS source the first ``count`` images (sorted order) are centre-cropped to
    ``size`` (less if an image is smaller), rounded down to a multiple of ``scale`` for ``sr``.
    Degradation parameters (noise level, kernel, noise) are drawn from ``(seed, image index)``,
    so the same call always returns the same arrays.
    """
    degrade = _Degrade.make(task, channels, sigma, blur_noise, scale)
    count = _check_int("count", count, 1)
    size = _check_int("size", size, 1)
    seed = _check_int("seed", seed, 0)
    mult = degrade.scale if task == "sr" else 1
    if size < mult:
        raise ValueError(f"validation size ({size}) must be at least the scale ({mult})")
    src = parse_source(source)
    if isinstance(src, EmbeddedSource):
        src = EmbeddedSource(split="val", size=size)
    out = []
    for k in range(min(count, len(src))):
        img = src.load(k, channels)
        h, w = img.shape[:2]
        side = min(size, h, w)
        side -= side % mult
        if side < 1:
            raise ValueError(f"{src.describe(k)} ({h}x{w}) is too small for validation at scale {mult}")
        y, x = (h - side) // 2, (w - side) // 2
        target = np.ascontiguousarray(img[y : y + side, x : x + side])
        out.append(degrade.apply(target, np.random.default_rng([seed, _VAL_STREAM, k])))
    return out
