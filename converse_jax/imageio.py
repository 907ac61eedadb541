"""Reading and writing 8-bit images (gray or RGB) and blur kernels, with one-line errors.

Images are returned as uint8 arrays (H, W, C) with C = 1 (gray) or 3 (RGB). Files are
written atomically (temporary file in the same folder, then rename), so a failure never
leaves a half-written image in place of a user's file. This module sits above
:mod:`converse_jax.degradations` (quantisation, kernel normalisation), which never imports it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from converse_jax.degradations import normalize_kernel, to_uint8

__all__ = ["IMAGE_EXTENSIONS", "ImageError", "list_images", "read_image", "read_kernel", "write_image"]

PathLike = str | os.PathLike
Color = Literal["gray", "rgb", "any"]

IMAGE_EXTENSIONS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm")


class ImageError(ValueError):
    """An image could not be read or written; the message says which file and what to do."""


def _is_gray_rgb(arr: np.ndarray) -> bool:
    return bool(np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]))


def _decode(path: Path) -> np.ndarray:
    """Decode a file into a uint8 (H, W, 1) or (H, W, 3) array, refusing what is not 8-bit."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "1":
                im = im.convert("L")
            elif mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode == "PA":
                im = im.convert("RGBA")
            mode = im.mode
            if mode in ("LA", "RGBA"):
                alpha = np.asarray(im.getchannel("A"))
                if alpha.min() < 255:
                    raise ImageError(f"{path}: image has transparency (mode {mode}); flatten it onto a "
                                     "background and save it as 8-bit gray or RGB")
                im = im.convert("L" if mode == "LA" else "RGB")
                mode = im.mode
            if mode not in ("L", "RGB"):
                raise ImageError(f"{path}: unsupported image mode {mode} (only 8-bit gray or RGB images "
                                 "are supported); convert it to 8-bit gray or RGB first")
            arr = np.asarray(im, dtype=np.uint8)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file that Pillow can read (PNG, BMP, JPEG, TIFF, ...)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: cannot decode image ({exc}); the file may be truncated or corrupt") from None
    if arr.ndim == 2:
        arr = arr[..., None]
    return arr


def read_image(path: PathLike, color: Color = "any") -> np.ndarray:
    """Read an 8-bit image as uint8 (H, W, C).

    ``color``: ``"gray"`` -> (H, W, 1); a colour file is refused unless its three channels
    are equal. ``"rgb"`` -> (H, W, 3); a gray file becomes three equal channels (as the
    reference reads gray files for RGB models). ``"any"`` -> the file's own channels (1 or 3).
    Raises :class:`ImageError` (a ValueError) with a one-line message.
    """
    path = Path(path)
    if color not in ("gray", "rgb", "any"):
        raise ValueError(f"color must be 'gray', 'rgb' or 'any', got {color!r}")
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    arr = _decode(path)
    if color == "rgb" and arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif color == "gray" and arr.shape[-1] == 3:
        if not _is_gray_rgb(arr):
            raise ImageError(f"{path}: is a colour image but a grayscale one is needed; "
                             "use a grayscale test set or convert the image to gray")
        arr = arr[..., :1]
    return np.ascontiguousarray(arr)


def _file_mode(path: Path) -> int:
    """Permissions for a new file: those of the file it replaces, else 0o666 less the umask."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def write_image(path: PathLike, img: np.ndarray) -> Path:
    """Write a uint8 (H, W), (H, W, 1) or (H, W, 3) image atomically; format from the suffix.

    Float images in [0, 1] are quantised (clip, x255, round). Returns the path written.
    """
    path = Path(path)
    arr = np.asarray(img)
    if np.issubdtype(arr.dtype, np.floating):
        arr = to_uint8(arr)
    if arr.dtype != np.uint8:
        raise ImageError(f"{path}: can only write uint8 or float [0, 1] images, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)):
        raise ImageError(f"{path}: can only write gray or RGB images, got shape {arr.shape}")
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ImageError(f"{path}: unknown image file extension {path.suffix!r}; use .png")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ImageError(f"{path}: folder {folder} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            Image.fromarray(arr).save(fh, format=fmt)
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, (OSError, ValueError)):
            raise ImageError(f"{path}: cannot write image ({exc})") from None
        raise
    return path


def list_images(folder: PathLike, extensions: tuple[str, ...] | None = None) -> list[Path]:
    """Image files directly in ``folder`` (by extension), sorted by name.

    Raises :class:`ImageError` if the folder does not exist, is not a folder, or holds no image.
    """
    folder = Path(folder)
    exts = tuple(e.lower() for e in (extensions or IMAGE_EXTENSIONS))
    if not folder.exists():
        raise ImageError(f"{folder}: directory not found; check the path")
    if not folder.is_dir():
        raise ImageError(f"{folder}: is not a directory")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."))
    if not files:
        raise ImageError(f"{folder}: no image files ({', '.join(exts)}) found in this directory")
    return files


def read_kernel(path: PathLike) -> np.ndarray:
    """Read a blur kernel from a ``.npy`` file or a grayscale image; float64, normalised to sum 1.

    Raises ValueError (:class:`ImageError` for an unreadable image) naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"kernel file {path} does not exist")
    if path.suffix.lower() == ".npy":
        try:
            k = np.load(path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - reported as one line
            raise ValueError(f"cannot read kernel {path} as a .npy array ({exc})") from None
    else:
        k = read_image(path, color="gray")[..., 0].astype(np.float64)
    try:
        return normalize_kernel(k)
    except ValueError as exc:
        raise ValueError(f"kernel {path}: {exc}") from None
