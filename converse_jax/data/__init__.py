"""Training data for converse_jax: image sources, on-the-fly degradations, grain loaders.

- :func:`parse_source` — ``None``/``"embedded"`` (synthetic dead-leaves images, a stand-in
  for a real training set that needs no download), ``"folder:PATH"`` or ``"tfds:NAME[:SPLIT]"``;
- :func:`make_train_loader` — endless, seed-deterministic batches (index-based randomness,
  resumable at any step, optional worker processes, per-host shards);
- :func:`make_val_set` — a fixed validation set (held-out embedded images by default);
- :func:`dead_leaves` — the synthetic images.

The degradations themselves are the tasks' (:mod:`converse_jax.tasks`), built on
:mod:`converse_jax.degradations` (noise, blur, bicubic resize, random blur kernels).
"""

from converse_jax.data.pipeline import BatchIterator, make_sample, make_train_loader, make_val_set
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
    "BatchIterator",
    "EmbeddedSource",
    "FolderSource",
    "ImageSource",
    "TfdsSource",
    "dead_leaves",
    "make_sample",
    "make_train_loader",
    "make_val_set",
    "parse_source",
    "read_image_file",
    "to_channels",
]
