"""Where training and validation images come from.

A *source* is a random-access collection of images: ``len(source)`` and
``source.load(index, channels)`` -> float32 ``(H, W, channels)`` array in [0, 1]. Three kinds:

- :class:`EmbeddedSource` — procedurally generated dead-leaves images (no download; a stand-in
  for a real training set). Its ``"train"`` and ``"val"`` splits use disjoint seeds.
- :class:`FolderSource` — every PNG/JPEG/BMP/TIFF/WebP file under a folder, recursively.
- :class:`TfdsSource` — a prepared TensorFlow-Datasets data set read through
  ``tfds.data_source`` (random access, no TensorFlow needed; nothing is downloaded).

:func:`parse_source` turns a command-line spec into one of these. Sources are picklable so they
can travel to grain's worker processes.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from converse_jax.data.synthetic import dead_leaves

__all__ = [
    "EmbeddedSource",
    "FolderSource",
    "ImageSource",
    "TfdsSource",
    "IMAGE_EXTENSIONS",
    "SOURCE_FORMS",
    "parse_source",
    "read_image_file",
    "to_channels",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SOURCE_FORMS = "'embedded' (or no --data), 'folder:PATH' or 'tfds:NAME[:SPLIT]'"

# Seeds of embedded images: training images use [0, _EMBEDDED_COUNT), validation images the
# range just above it, so the held-out set never appears in training.
_EMBEDDED_COUNT = 2**40


@runtime_checkable
class ImageSource(Protocol):
    """A random-access collection of images."""

    def __len__(self) -> int: ...

    def load(self, index: int, channels: int) -> np.ndarray:
        """Image ``index`` as float32 ``(H, W, channels)`` in [0, 1]."""
        ...

    def describe(self, index: int) -> str:
        """A human-readable name of image ``index`` (for error messages)."""
        ...


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """Convert an ``(H, W)``/``(H, W, C)`` uint8 or float image to ``channels`` (1 or 3), float32.

    Grey -> RGB repeats the plane; RGB -> grey uses the ITU-R 601 luma weights (as PIL's
    ``convert('L')``); an alpha channel is dropped. uint8 input is divided by 255, uint16 by 65535.
    """
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"expected an (H, W) or (H, W, C) image with C in 1..4, got shape {img.shape}")
    if img.dtype == np.uint8:
        x = img.astype(np.float32) / np.float32(255.0)
    elif img.dtype == np.uint16:
        x = img.astype(np.float32) / np.float32(65535.0)
    elif np.issubdtype(img.dtype, np.floating):
        x = img.astype(np.float32)
    else:
        raise ValueError(f"unsupported image dtype {img.dtype} (expected uint8, uint16 or float)")
    c = x.shape[-1]
    if c in (2, 4):  # drop alpha
        x = x[..., : c - 1]
        c -= 1
    if channels == c:
        return np.ascontiguousarray(x)
    if channels == 3 and c == 1:
        return np.repeat(x, 3, axis=-1)
    if channels == 1 and c == 3:
        y = x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114
        if img.dtype == np.uint8:  # stay on the 8-bit grid, as a converted file would
            y = np.round(y * 255.0) / 255.0
        return y[..., None].astype(np.float32)
    raise ValueError(f"channels must be 1 or 3, got {channels!r}")


# ----------------------------------------------------------------------------------------
# Embedded dead-leaves images


@dataclasses.dataclass(frozen=True)
class EmbeddedSource:
    """Procedurally generated dead-leaves images (see :mod:`converse_jax.data.synthetic`).

    A stand-in for a real training set that needs no download. Image ``i`` of split ``split``
    is ``dead_leaves(size, seed)`` with a seed unique to ``(split, i)``; the ``"val"`` split is
    held out (its seeds are never used by ``"train"``). The training loader generates images at
    exactly the patch size (``size`` is replaced), so every training patch is a fresh image.
    """

    split: str = "train"
    size: int = 128

    def __post_init__(self) -> None:
        if self.split not in ("train", "val"):
            raise ValueError(f"embedded split must be 'train' or 'val', got {self.split!r}")
        if int(self.size) < 1:
            raise ValueError(f"embedded image size must be positive, got {self.size!r}")

    def __len__(self) -> int:
        return _EMBEDDED_COUNT

    def _seed(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < _EMBEDDED_COUNT:
            raise IndexError(f"embedded image index {index} out of range")
        return index if self.split == "train" else _EMBEDDED_COUNT + index

    def load(self, index: int, channels: int) -> np.ndarray:
        return dead_leaves(int(self.size), self._seed(index), channels)

    def describe(self, index: int) -> str:
        return f"embedded dead-leaves image {self.split}[{index}]"

    def __str__(self) -> str:
        return "embedded dead-leaves images (synthetic stand-in for a training set)"


# ----------------------------------------------------------------------------------------
# Image folders


def read_image_file(path: str | os.PathLike[str], channels: int) -> np.ndarray:
    """Read a PNG/JPEG/BMP/TIFF/WebP file as float32 ``(H, W, channels)`` in [0, 1].

    Raises ValueError naming the file if it cannot be decoded.
    """
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("L", "RGB"):
                arr = np.asarray(im)
            elif mode.startswith("I;16"):
                arr = np.asarray(im).astype(np.uint16)
            elif mode in ("LA", "1"):
                arr = np.asarray(im.convert("L"))
            elif mode in ("I", "F"):
                raise ValueError(f"{mode!r}-mode (32-bit) images are not supported; save it as 8- or 16-bit")
            else:
                arr = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image file {path}: {exc}") from None
    return to_channels(arr, channels)


class FolderSource:
    """Every image file (PNG/JPEG/BMP/TIFF/WebP) under ``root``, recursively, in sorted order.

    Construction lists the folder and reads each file's header, so an empty folder or a file
    that is not a readable image fails at once with a message naming it. ``sizes[i]`` is the
    ``(H, W)`` of ``files[i]``.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        path = Path(root).expanduser()
        if not path.exists():
            raise ValueError(f"image folder {path} does not exist")
        if not path.is_dir():
            raise ValueError(f"{path} is not a folder (expected folder:PATH with image files inside)")
        files = sorted(
            str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {path}")
        sizes = []
        for f in files:
            try:
                with Image.open(f) as im:
                    w, h = im.size
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                raise ValueError(f"cannot read image file {f}: {exc}") from None
            sizes.append((int(h), int(w)))
        self.root = str(path)
        self.files: tuple[str, ...] = tuple(files)
        self.sizes: tuple[tuple[int, int], ...] = tuple(sizes)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int, channels: int) -> np.ndarray:
        return read_image_file(self.files[int(index)], channels)

    def describe(self, index: int) -> str:
        return f"image file {self.files[int(index)]}"

    def __repr__(self) -> str:
        return f"FolderSource({self.root!r})"

    def __str__(self) -> str:
        return f"{len(self.files)} image files under {self.root}"


# ----------------------------------------------------------------------------------------
# TensorFlow Datasets

_VERSION = r"\d+(?:\.\d+){0,2}"
_TFDS_SPEC = re.compile(rf"^(?P<name>[^:\[\]]+?(?::{_VERSION})?)(?::(?P<split>.+))?$")
_IMAGE_KEYS = ("image", "hr", "high_resolution", "img")


class TfdsSource:
    """A prepared TFDS data set, read with ``tfds.data_source`` (random access, no TensorFlow).

    The image feature is ``image`` (or ``hr``, as in ``div2k``; otherwise the first
    image-shaped feature). Nothing is downloaded: prepare the data set first
    (``tfds build NAME``) and point ``TFDS_DATA_DIR`` (or ``data_dir``) at it.
    """

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None) -> None:
        self.name = name
        self.split = split
        self.data_dir = data_dir
        self._ds: Any = None
        ds = self._open()
        try:
            n = len(ds)
        except Exception as exc:  # noqa: BLE001 - reported as one line
            raise ValueError(f"tfds:{name}:{split}: cannot read the data set ({exc})") from None
        if n == 0:
            raise ValueError(f"tfds:{name}:{split} is empty")
        self._len = int(n)
        self.key = self._find_key(self._record(0))

    def _open(self) -> Any:
        if self._ds is None:
            try:  # an optional dependency (the "tfds" extra), imported only when used
                import tensorflow_datasets as tfds
            except ImportError:
                raise ValueError(
                    "tfds: sources need tensorflow-datasets: pip install 'converse_jax[tfds]'"
                ) from None
            try:
                self._ds = tfds.data_source(
                    self.name, split=self.split, data_dir=self.data_dir, download=False
                )
            except Exception as exc:  # noqa: BLE001 - tfds raises many kinds
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ValueError(
                    f"tfds:{self.name}:{self.split} cannot be opened ({msg}); prepare it first "
                    f"(tfds build {self.name.split(':')[0]}) and set TFDS_DATA_DIR if it is not in "
                    "~/tensorflow_datasets"
                ) from None
        return self._ds

    def _record(self, index: int) -> Any:
        ds = self._open()
        try:
            return ds[int(index)]
        except Exception as exc:  # noqa: BLE001 - reported as one line naming the record
            raise ValueError(f"{self.describe(index)} cannot be read ({exc})") from None

    def _find_key(self, record: Any) -> str | None:
        if not isinstance(record, dict):
            arr = np.asarray(record)
            if arr.ndim in (2, 3):
                return None
            raise ValueError(f"tfds:{self.name}:{self.split} records are not images (got {type(record)})")
        for k in _IMAGE_KEYS:
            if k in record:
                return k
        for k, v in record.items():
            arr = np.asarray(v)
            if arr.ndim in (2, 3) and arr.dtype in (np.uint8, np.uint16) and min(arr.shape[:2]) > 4:
                return k
        raise ValueError(
            f"tfds:{self.name}:{self.split} has no image feature (features: {sorted(record)})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_ds"] = None  # reopened lazily in each worker process
        return state

    def __len__(self) -> int:
        return self._len

    def load(self, index: int, channels: int) -> np.ndarray:
        rec = self._record(index)
        arr = rec if self.key is None else rec[self.key]
        try:
            return to_channels(np.asarray(arr), channels)
        except ValueError as exc:
            raise ValueError(f"{self.describe(index)}: {exc}") from None

    def describe(self, index: int) -> str:
        return f"tfds:{self.name}:{self.split} record {index}"

    def __repr__(self) -> str:
        return f"TfdsSource(name={self.name!r}, split={self.split!r}, data_dir={self.data_dir!r})"

    def __str__(self) -> str:
        return f"tfds:{self.name}:{self.split} ({self._len} images)"


# ----------------------------------------------------------------------------------------


def parse_source(spec: str | ImageSource | None) -> ImageSource:
    """Turn a data spec into a source.

    ``None`` or ``"embedded"``: the embedded dead-leaves images; ``"folder:PATH"``: image files
    under PATH (recursive); ``"tfds:NAME[:SPLIT]"``: a prepared TFDS data set (``NAME`` may
    carry a config and version, e.g. ``div2k/bicubic_x4:2.0.0:validation``; SPLIT defaults to
    ``train`` and may be a slice such as ``train[:90%]``). A source object is returned as is.
    Anything else raises ValueError listing the accepted forms.
    """
    if spec is None:
        return EmbeddedSource()
    if not isinstance(spec, str):
        if isinstance(spec, ImageSource):
            return spec
        raise ValueError(f"data source must be {SOURCE_FORMS}; got {spec!r}")
    text = spec.strip()
    if text.lower() == "embedded":
        return EmbeddedSource()
    kind, sep, rest = text.partition(":")
    if sep and kind.lower() == "folder" and rest:
        return FolderSource(rest)
    if sep and kind.lower() == "tfds" and rest:
        m = _TFDS_SPEC.match(rest)
        if not m:
            raise ValueError(f"cannot parse tfds spec {spec!r}: expected tfds:NAME[:SPLIT]")
        return TfdsSource(m.group("name"), m.group("split") or "train")
    raise ValueError(f"unknown data source {spec!r}: expected {SOURCE_FORMS}")
