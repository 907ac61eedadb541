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

The degradations belong to the task (:meth:`converse_jax.tasks.Task.train_sample`: noise for
denoising, bicubic downscale for SR, random blur plus noise for deblurring, with the kernel in
the batch for non-blind deblurring); the flips/rotations are
:func:`converse_jax.degradations.dihedral`. Targets are clean patches, all float32 in [0, 1],
channels-last. ``task`` arguments take a :class:`~converse_jax.tasks.Task` or its name.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags  # a dependency of grain

from converse_jax import degradations as D
from converse_jax.data.sources import EmbeddedSource, FolderSource, ImageSource, parse_source
from converse_jax.tasks import Degradation, Task, get_task

__all__ = ["BatchIterator", "make_train_loader", "make_val_set", "make_sample"]

TaskLike = Task | str

_TRAIN_STREAM = 0
_VAL_STREAM = 1
_PERMUTE_STREAM = 2
# Sources up to this size are visited epoch by epoch (a fresh permutation each epoch); larger
# ones (the embedded source is practically infinite) are sampled uniformly with replacement.
_MAX_PERMUTED = 1 << 22


def _check_channels(channels: Any) -> int:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    return int(channels)


def _check_multiple(task: Task, what: str, size: int, scale: int) -> None:
    mult = task.size_multiple(scale)
    if size % mult:
        raise ValueError(f"for {task.label} the {what} ({size}) must be a multiple of the scale ({mult})")


@functools.lru_cache(maxsize=2)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, _PERMUTE_STREAM, epoch]).permutation(n)


@dataclasses.dataclass(frozen=True)
class _SampleMaker:
    """Builds training sample ``g`` from ``(seed, g)`` alone; picklable for worker processes."""

    source: Any
    task: Task
    settings: Degradation
    channels: int
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
        img = self.source.load(index, self.channels)
        p = self.patch_size
        h, w = img.shape[:2]
        if h < p or w < p:
            raise ValueError(
                f"{self.source.describe(index)} is {h}x{w}, smaller than the {p}-pixel training patch; "
                "use a smaller patch size or remove the image"
            )
        y, x = int(rng.integers(h - p + 1)), int(rng.integers(w - p + 1))
        patch = np.ascontiguousarray(D.dihedral(img[y : y + p, x : x + p], int(rng.integers(8))))
        return self.task.train_sample(patch, rng, self.settings)


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

    def __iter__(self) -> BatchIterator:
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

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _absl_flags_ready() -> None:
    """Let grain's worker processes read their absl flags in a program that never parsed any.

    grain 0.2.x reads an absl flag when it starts workers (and JAX being importable makes it
    do so), which fails with ``UnparsedFlagAccessError`` unless the flags were parsed (google/
    grain#1355, fixed upstream by using the default). Marking them parsed keeps every default.
    """
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def make_train_loader(
    task: TaskLike,
    source: str | ImageSource | None,
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
    ``"kernel"`` ``(B, 7, 7)`` float32 (sums to 1) for tasks whose network takes the kernel
    (``task.takes_kernel``). ``H = W = patch_size``; for super-resolution the input is
    ``patch_size // scale`` (``patch_size`` must be a multiple of ``scale``), otherwise the input
    has the target's size.

    ``source`` is a spec for :func:`parse_source` or a source object. ``batch_size`` is the
    per-host batch: with ``shard_count`` hosts the global batch is ``batch_size *
    shard_count`` and host ``shard_index`` yields its slice of it. Batch ``i`` depends only on
    ``(seed, i)``: the first batch yielded is batch ``start_step``, with or without worker
    processes (``num_workers`` > 0 uses grain's ``mp_prefetch``).
    """
    task, channels = get_task(task), _check_channels(channels)
    settings = Degradation.make(sigma, blur_noise, scale)
    patch_size = _check_int("patch_size", patch_size, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    seed = _check_int("seed", seed, 0)
    num_workers = _check_int("num_workers", num_workers, 0)
    start_step = _check_int("start_step", start_step, 0)
    shard_count = _check_int("shard_count", shard_count, 1)
    shard_index = _check_int("shard_index", shard_index, 0)
    if shard_index >= shard_count:
        raise ValueError(f"shard_index must be < shard_count ({shard_count}), got {shard_index}")
    _check_multiple(task, "patch size", patch_size, settings.scale)
    src = parse_source(source)
    if isinstance(src, EmbeddedSource):
        src = dataclasses.replace(src, size=patch_size)
    elif isinstance(src, FolderSource):
        for f, (h, w) in zip(src.files, src.sizes, strict=False):
            if h < patch_size or w < patch_size:
                raise ValueError(
                    f"image file {f} is {h}x{w}, smaller than the {patch_size}-pixel training patch; "
                    "use a smaller patch size or remove the image"
                )
    sample = _SampleMaker(src, task, settings, channels, patch_size, seed)
    maker = _BatchMaker(sample, batch_size, shard_index, shard_count)
    ds = grain.MapDataset.range(start_step, sys.maxsize).map(maker)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    if num_workers > 0:
        _absl_flags_ready()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2))
    return BatchIterator(iter(it_ds), start_step)


def make_sample(
    task: TaskLike,
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
    task, _ = get_task(task), _check_channels(img.shape[-1])
    settings = Degradation.make(sigma, blur_noise, scale)
    for side in img.shape[:2]:
        _check_multiple(task, "image size", side, settings.scale)
    return task.train_sample(img, rng, settings)


def make_val_set(
    task: TaskLike,
    source: str | ImageSource | None = None,
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
    ``size`` (less if an image is smaller), rounded down to a multiple of ``scale`` for SR.
    Degradation parameters (noise level, kernel, noise) are drawn from ``(seed, image index)``,
    so the same call always returns the same arrays.
    """
    task, channels = get_task(task), _check_channels(channels)
    settings = Degradation.make(sigma, blur_noise, scale)
    count = _check_int("count", count, 1)
    size = _check_int("size", size, 1)
    seed = _check_int("seed", seed, 0)
    mult = task.size_multiple(settings.scale)
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
        out.append(task.train_sample(target, np.random.default_rng([seed, _VAL_STREAM, k]), settings))
    return out
