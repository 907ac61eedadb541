"""Training data for converse_jax: image sources, on-the-fly degradations, grain loaders.

- :func:`parse_source` — ``None``/``"embedded"`` (synthetic dead-leaves images, a stand-in
  for a real training set that needs no download), ``"folder:PATH"`` or ``"tfds:NAME[:SPLIT]"``;
- :func:`make_train_loader` — endless, seed-deterministic batches (index-based randomness,
  resumable at any step, optional worker processes, per-host shards);
- :func:`make_val_set` — a fixed validation set (held-out embedded images by default);
- :func:`dead_leaves`, :func:`random_gaussian_kernel`, :func:`random_motion_kernel`.
"""

from converse_jax.data.kernels import random_gaussian_kernel, random_kernel, random_motion_kernel
from converse_jax.data.pipeline import (
    TASKS,
    BatchIterator,
    circular_blur,
    make_sample,
    make_train_loader,
    make_val_set,
)
from converse_jax.data.sources import (
    EmbeddedSource,
    FolderSource,
    ImageSource,
    TfdsSource,
    parse_source,
    read_image_file,
    to_channels,
)
from converse_jax.data.synthetic import dead_leaves

__all__ = [
    "TASKS",
    "BatchIterator",
    "EmbeddedSource",
    "FolderSource",
    "ImageSource",
    "TfdsSource",
    "circular_blur",
    "dead_leaves",
    "make_sample",
    "make_train_loader",
    "make_val_set",
    "parse_source",
    "random_gaussian_kernel",
    "random_kernel",
    "random_motion_kernel",
    "read_image_file",
    "to_channels",
]
