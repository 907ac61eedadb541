"""Tiled restoration: images of any size in bounded memory, with one compilation per tile shape.

The input is split into overlapping tiles of one fixed shape ``(tile, tile)`` (input pixels);
the last row and column of tiles are shifted inward so that they end on the image border, never
padded, so every tile has the same shape and the network compiles once whatever the image size
(an image no larger than a tile in one direction keeps its full length there). Tiles are run in
batches of ``batch`` (sharded over the local devices when there are several), each tile's
output is weighted and added into one preallocated output of ``scale`` times the input size
(x4 for x4 super-resolution, ``sf`` for non-blind networks asked to upscale).

Why tiles differ from the whole image at all: the networks pad circularly (and Converse2D
solves its deconvolution with FFTs, which treat an image as periodic), so the whole image
wraps around its own border; a tile wraps around a border that is not there in the photo,
and its outer pixels are wrong by an amount that decays with the distance from the tile edge,
slowly for the deblurring networks. Each tile therefore carries a *context* of
``task.tile_context`` pixels per side whose output is dropped (only the tile's core is kept).
At the image border (``task.tile_border``): ``"wrap"`` pads the image circularly by the context
first, so that a border tile sees the opposite border as a whole-image FFT solve does;
``"seam"`` does the same and also rolls each border tile so that the image's own wrap-around
falls on the tile's edge, where the whole image's layers meet their circular padding (ConverseNet:
its layers pad circularly and crop again, so the whole image is not exactly periodic at its border);
``"clamp"`` ends tiles on the image border, where the network pads as it pads the whole image
(networks whose border padding is local). Cores are joined by
``blend="crop"`` (the default: each output pixel from the tile whose centre is nearest) or
``blend="window"`` (a ramp over the cores' overlap). The weights are separable and normalised
per row and column, so they sum to one at every output pixel. docs/restore.md has the
measurements behind each task's context.

Layering: at the evaluation layer; imports tasks, degradations and JAX only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from converse_jax import degradations as D
from converse_jax.nn import inference_view
from converse_jax.tasks import Task, jit_forward

__all__ = [
    "BLENDS",
    "BORDERS",
    "MemoryModel",
    "TilePlan",
    "TiledRestorer",
    "blend_weights",
    "choose_tile",
    "compiled_bytes",
    "fit_memory_model",
    "inference_forward",
    "is_out_of_memory",
    "axis_context",
    "plan_tiles",
    "tile_starts",
]

BLENDS = ("window", "crop")
BORDERS = ("wrap", "seam", "clamp")  # what a tile at the image border sees beyond it (TiledRestorer)
MIN_TILE = 16  # smaller tiles are mostly border


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` with at least ``overlap`` shared.

    The stride is ``tile - overlap``; the last tile is shifted inward to end at ``length``
    (never padded). A length no larger than the tile gives the single start 0.
    """
    if tile >= length:
        return [0]
    stride = tile - overlap
    if stride < 1:
        raise ValueError(f"tile overlap {overlap} must be smaller than the tile ({tile})")
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def blend_weights(starts: list[int], tile: int, length: int, overlap: int, scale: int,
                  blend: str = "window") -> np.ndarray:
    """Per-tile weights along one axis, (len(starts), tile * scale), summing to 1 at every output pixel.

    ``window``: a linear ramp over ``overlap * scale`` output pixels at each tile edge (never
    exactly zero, so a pixel covered by one tile keeps it); ``crop``: 1 where the tile is the
    one whose centre is nearest, else 0 (ties to the earlier tile).
    """
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {', '.join(BLENDS)}, got {blend!r}")
    t = min(tile, length) * scale
    pos = np.arange(t, dtype=np.float64) + 0.5
    n = len(starts)
    w = np.zeros((n, t), np.float64)
    if blend == "window":
        ramp = max(1.0, float(overlap * scale))
        base = np.minimum(1.0, np.minimum(pos, t - pos) / ramp)
        w[:] = np.maximum(base, 1e-3)
    else:
        centres = (np.asarray(starts, np.float64) * scale + t / 2.0)
        for i, s in enumerate(starts):
            g = s * scale + pos  # global output coordinate of each pixel
            dist = np.abs(g[None, :] - centres[:, None])
            w[i] = (np.argmin(dist, axis=0) == i).astype(np.float64)
    total = np.zeros(length * scale, np.float64)
    for i, s in enumerate(starts):
        total[s * scale:s * scale + t] += w[i]
    for i, s in enumerate(starts):
        w[i] /= total[s * scale:s * scale + t]
    return w.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one image go.

    ``rows``/``cols``: start rows/columns of the tiles' cores (input pixels of the image);
    ``tile_h``/``tile_w``: the network's input shape; ``context_y``/``context_x``: pixels on each
    side of a core that the network sees but whose output is dropped (taken from the image
    padded circularly, see :class:`TiledRestorer`); a core is the tile less twice its context.
    ``overlap_y``/``overlap_x``: pixels neighbouring cores share.
    """

    height: int
    width: int
    tile_h: int
    tile_w: int
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    context_y: int = 0
    context_x: int = 0
    overlap_y: int = 0
    overlap_x: int = 0

    @property
    def count(self) -> int:
        return len(self.rows) * len(self.cols)

    @property
    def core_h(self) -> int:
        return self.tile_h - 2 * self.context_y

    @property
    def core_w(self) -> int:
        return self.tile_w - 2 * self.context_x

    def offsets(self) -> list[tuple[int, int, int, int]]:
        """(row index, column index, y0, x0) of every tile's core, row by row."""
        return [(i, j, y, x) for i, y in enumerate(self.rows) for j, x in enumerate(self.cols)]


def axis_context(length: int, tile: int, context: int) -> int:
    """Context pixels per side along an axis of ``length`` for tiles of ``tile`` pixels.

    0 when one tile spans the axis (the network then wraps around the image's own border, as the
    whole image does); else ``context``, at most a quarter of the tile so that a core keeps at
    least half of it (smaller tiles get less context and agree less with the whole image).
    """
    return 0 if tile >= length else _capped_context(tile, context)


def _capped_context(tile: int, context: int) -> int:
    """``context``, at most a quarter of ``tile`` (a core keeps at least half of its tile)."""
    return max(0, min(int(context), tile // 4))


def plan_tiles(height: int, width: int, tile: int, overlap: int, context: int = 0) -> TilePlan:
    """The tiles of a ``height`` x ``width`` input for tiles of ``tile`` pixels sharing ``overlap``,
    each with ``context`` pixels per side (:func:`axis_context`) dropped from its output.

    Neighbouring tiles share ``max(overlap, 2 * context)`` pixels: their cores share what the
    context leaves of ``overlap``, ``max(0, overlap - 2 * context)``.
    """
    if tile < MIN_TILE:
        raise ValueError(f"--tile must be 0 (whole image) or at least {MIN_TILE} pixels, got {tile}")
    if overlap < 0 or 2 * overlap >= tile:
        raise ValueError(f"--tile-overlap must be >= 0 and less than half the tile ({tile}), got {overlap}")
    if context < 0:
        raise ValueError(f"tile context must be >= 0 pixels, got {context}")
    cy, cx = axis_context(height, tile, context), axis_context(width, tile, context)
    oy, ox = max(0, overlap - 2 * cy), max(0, overlap - 2 * cx)
    th, tw = min(tile, height), min(tile, width)
    return TilePlan(height, width, th, tw, tuple(tile_starts(height, th - 2 * cy, oy)),
                    tuple(tile_starts(width, tw - 2 * cx, ox)), cy, cx, oy, ox)


def _seam_shifts(p: TilePlan, y: int, x: int) -> tuple[int, int]:
    """Rows and columns from the top-left corner of the tile at ``(y, x)`` of the context-padded image
    to the image's own wrap-around (its first row, column) where that lies inside the tile, else 0."""

    def inside(start: int, size: int, context: int, length: int) -> int:
        return next((seam - start for seam in (context, context + length) if start < seam < start + size), 0)

    return inside(y, p.tile_h, p.context_y, p.height), inside(x, p.tile_w, p.context_x, p.width)


def _roll_each(batch: np.ndarray, shifts: list[tuple[int, int]], factor: int) -> np.ndarray:
    """Each image of ``batch`` rolled by its ``shifts`` times ``factor`` along rows and columns."""
    if not any(sy or sx for sy, sx in shifts):
        return batch
    return np.stack([np.roll(b, (sy * factor, sx * factor), axis=(0, 1))
                     for b, (sy, sx) in zip(batch, shifts, strict=True)])


def _dihedral_batch(x: np.ndarray, mode: int) -> np.ndarray:
    """:func:`~converse_jax.degradations.dihedral` on axes 1, 2 of a batch (B, H, W, ...)."""
    if mode >= 4:
        x = np.flip(x, axis=2)
    return np.rot90(x, mode % 4, axes=(1, 2))


def _dihedral_batch_inverse(x: np.ndarray, mode: int) -> np.ndarray:
    x = np.rot90(x, -(mode % 4), axes=(1, 2))
    return np.flip(x, axis=2) if mode >= 4 else x


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is XLA (or the OS) running out of memory."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


class TiledRestorer:
    """A model's forward pass over tiles: ``restorer(x, kernel=None, sf=1, x8=False)`` like
    :class:`~converse_jax.evaluation.Restorer`, on an image of any size.

    ``task``: the model's ``spec.task`` (how the network is called); ``scale``: the network's
    own output scale (``spec.scale``; ``sf`` multiplies it for non-blind networks).
    ``tile``/``overlap`` in input pixels; ``batch`` tiles per call (rounded up to a multiple of
    the local device count, over which each batch is sharded; a short last batch repeats its
    last tile so the shape never changes). ``on_tile(done, total)`` is called after each batch.

    ``context`` (default: the task's ``tile_context``): input pixels on each side of a tile that
    the network sees but whose output is dropped, so that the tile's own wrap-around stays that
    far from every pixel kept. ``border`` (default: the task's ``tile_border``) says what a tile
    at the image border sees beyond it: ``"wrap"``, the image is padded circularly by the context
    first, so such a tile sees the opposite border as a whole-image FFT solve does; ``"seam"``, the
    same, and a tile that holds the image's wrap-around (its first row or column) is rolled so that it
    lies on the tile's own edge, as on the whole image's, and its output rolled back; ``"clamp"``,
    tiles end on the image border (the network pads it as it pads the whole image) and the
    context only widens the overlap to ``max(overlap, 2 * context)``.

    ``taper`` (default: the task's ``tile_taper``; only with a blur kernel): each tile's context is blended
    towards the tile blurred by the kernel (:func:`~converse_jax.degradations.taper_edges`), so that a
    network whose solver wraps around its input meets no jump at the tile's edge; the cores are unchanged.
    """

    def __init__(self, model: Any, task: Task, *, scale: int = 1, tile: int = 256, overlap: int = 16,
                 context: int | None = None, border: str | None = None, batch: int = 1, blend: str = "crop",
                 on_tile: Callable[[int, int], None] | None = None, taper: bool | None = None) -> None:
        if blend not in BLENDS:
            raise ValueError(f"blend must be one of {', '.join(BLENDS)}, got {blend!r}")
        context = int(task.tile_context if context is None else context)
        border = task.tile_border if border is None else border
        if border not in BORDERS:
            raise ValueError(f"border must be one of {', '.join(BORDERS)}, got {border!r}")
        plan_tiles(tile, tile, tile, overlap, context)  # validates tile, overlap and context
        self.model, self.task, self.scale = model, task, int(scale)
        self.tile, self.overlap, self.context, self.border = int(tile), int(overlap), context, border
        self.blend, self.on_tile = blend, on_tile
        self.taper = bool(task.tile_taper if taper is None else taper)
        devices = jax.local_devices()
        self.batch = max(1, math.ceil(max(1, int(batch)) / len(devices)) * len(devices))
        self._sharding = None
        if len(devices) > 1:
            mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
            self._sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
        self._forward = inference_forward(task, model)

    def _run_batch(self, tiles: np.ndarray, kernel: np.ndarray | None, sf: int, x8: bool) -> np.ndarray:
        state = nnx.state(self.model)
        acc = None
        for mode in range(8 if x8 else 1):
            x = np.ascontiguousarray(_dihedral_batch(tiles, mode))
            batch: dict[str, Any] = {"input": x}
            if self.task.takes_kernel:
                k = np.broadcast_to(kernel, (len(tiles),) + kernel.shape)
                batch["kernel"] = np.ascontiguousarray(_dihedral_batch(k, mode), dtype=np.float32)
            if self._sharding is not None:
                batch = jax.device_put(batch, self._sharding)
            out = _dihedral_batch_inverse(np.asarray(self._forward(state, batch, sf=int(sf))), mode)
            acc = out.astype(np.float32) if acc is None else acc + out
        return acc / np.float32(8.0) if x8 else acc

    def __call__(self, x: np.ndarray, kernel: np.ndarray | None = None, sf: int = 1,
                 x8: bool = False) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 3:
            raise ValueError(f"TiledRestorer expects an (H, W, C) image, got shape {x.shape}")
        if self.task.takes_kernel and kernel is None:
            raise ValueError(f"this {self.task.label} model needs a blur kernel")
        if not self.task.takes_kernel and kernel is not None:
            raise ValueError(f"this {self.task.label} model does not take a blur kernel")
        h, w, _ = x.shape
        if self.border != "clamp":
            p = plan_tiles(h, w, self.tile, self.overlap, self.context)
        else:  # tiles end on the image border: the context is a larger overlap of whole tiles
            shared = min(max(self.overlap, 2 * _capped_context(self.tile, self.context)), (self.tile - 1) // 2)
            p = plan_tiles(h, w, self.tile, shared, 0)
        s = self.scale * int(sf)
        wy = blend_weights(list(p.rows), p.core_h, h, p.overlap_y, s, self.blend)
        wx = blend_weights(list(p.cols), p.core_w, w, p.overlap_x, s, self.blend)
        if p.context_y or p.context_x:  # np.pad's "wrap" repeats the image when the context exceeds it
            x = np.pad(x, ((p.context_y, p.context_y), (p.context_x, p.context_x), (0, 0)), mode="wrap")
        return self._assemble(x, p, wy, wx, s, kernel, sf, x8)

    def _assemble(self, x: np.ndarray, p: TilePlan, wy: np.ndarray, wx: np.ndarray, s: int,
                  kernel: np.ndarray | None, sf: int, x8: bool) -> np.ndarray:
        """Run the tiles of plan ``p`` over ``x`` (the image padded by the plan's context) in
        batches and add their weighted cores into one output array."""
        offsets = p.offsets()
        out: np.ndarray | None = None
        ch, cw = p.core_h * s, p.core_w * s
        cy, cx = p.context_y * s, p.context_x * s
        for b0 in range(0, len(offsets), self.batch):
            chunk = offsets[b0:b0 + self.batch]
            idx = chunk + [chunk[-1]] * (self.batch - len(chunk))  # one batch shape throughout
            tiles = np.stack([x[y:y + p.tile_h, c:c + p.tile_w] for _, _, y, c in idx])
            if self.taper and kernel is not None and (p.context_y or p.context_x):
                tiles = np.stack([D.taper_edges(t, (p.context_y, p.context_x), kernel) for t in tiles])
            shifts = [_seam_shifts(p, y, c) if self.border == "seam" else (0, 0) for _, _, y, c in idx]
            res = self._run_batch(_roll_each(tiles, shifts, -1), kernel, sf, x8)
            res = _roll_each(res, shifts, s)[:, cy:cy + ch, cx:cx + cw]
            if out is None:
                out = np.zeros((p.height * s, p.width * s, res.shape[-1]), np.float32)
            for k, (i, j, y, c) in enumerate(chunk):
                weight = wy[i][:, None, None] * wx[j][None, :, None]
                out[y * s:y * s + ch, c * s:c * s + cw] += res[k] * weight
            if self.on_tile is not None:
                self.on_tile(min(b0 + self.batch, len(offsets)), len(offsets))
        assert out is not None
        return out


def choose_tile(estimate: Callable[[int], float], height: int, width: int, budget: float,
                candidates: tuple[int, ...] = (4096, 3072, 2048, 1536, 1024, 768, 512, 384, 256, 192, 128, 96, 64,
                                               48, 32)) -> int:
    """0 (the whole image) when ``estimate(0)`` bytes fit ``budget``, else the largest candidate tile
    whose ``estimate(tile)`` fits it (the smallest candidate if none does). Memory comes first: a tile
    below four times the task's context gets less context (:func:`axis_context`)."""
    if estimate(0) <= budget:
        return 0
    for t in candidates:
        if t < max(height, width) and estimate(t) <= budget:
            return t
    return candidates[-1]


@dataclasses.dataclass(frozen=True)
class MemoryModel:
    """Peak device bytes of one network call as ``fixed + per_pixel * batch * height * width``.

    Fitted by :func:`fit_memory_model` from XLA's compiled memory analysis (arguments, output
    and temporaries) of two small compilations: the network's working set grows linearly with
    the pixels of the batch, and the fixed part is mostly the weights.
    """

    fixed: float
    per_pixel: float
    context: int = 0  # the task's tile context: a tiled image is padded by it on the host

    def call_bytes(self, pixels: int) -> float:
        return self.fixed + self.per_pixel * pixels

    def peak_bytes(self, height: int, width: int, channels: int, scale: int, tile: int = 0, batch: int = 1,
                   host_copies: int = 2) -> float:
        """Peak bytes to restore a ``height`` x ``width`` image whole (``tile=0``) or in tiles:
        one network call plus the host's float32 input and ``host_copies`` output-sized arrays."""
        pixels = height * width if tile <= 0 else batch * min(tile, height) * min(tile, width)
        host = 4 * channels * height * width * (1 + host_copies * scale * scale)
        if tile > 0:  # the input padded by the context (axis_context) on each side
            cy, cx = axis_context(height, tile, self.context), axis_context(width, tile, self.context)
            host += 4 * channels * ((height + 2 * cy) * (width + 2 * cx) - height * width)
        return self.call_bytes(pixels) + host


def inference_forward(task: Task, model: Any) -> Any:
    """What the restorers run: :func:`~converse_jax.tasks.jit_forward` of ``model``'s inference view
    (:func:`converse_jax.nn.inference_view`: each block's hidden channels in groups, half the memory),
    called with ``nnx.state(model)``."""
    return jit_forward(task, inference_view(model))


def compiled_bytes(model: Any, task: Task, shape: tuple[int, int, int, int], kernel_size: int | None = None,
                   sf: int = 1) -> int:
    """Bytes XLA reserves for one call of ``task.forward`` on a batch of ``shape`` (B, H, W, C):
    arguments, output and temporaries of the compiled function (compiled, not run)."""
    batch: dict[str, Any] = {"input": jax.ShapeDtypeStruct(shape, np.float32)}
    if task.takes_kernel:
        batch["kernel"] = jax.ShapeDtypeStruct((shape[0], kernel_size, kernel_size), np.float32)
    stats = inference_forward(task, model).lower(nnx.state(model), batch, sf=int(sf)).compile().memory_analysis()
    if stats is None:
        raise RuntimeError("this JAX backend reports no compiled memory analysis")
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes)


def fit_memory_model(model: Any, task: Task, channels: int, kernel_size: int | None = None, sf: int = 1,
                     sizes: tuple[int, int] = (64, 128)) -> MemoryModel:
    """:class:`MemoryModel` from :func:`compiled_bytes` at two square sizes (input pixels)."""
    a, b = sizes
    ba = compiled_bytes(model, task, (1, a, a, channels), kernel_size, sf)
    bb = compiled_bytes(model, task, (1, b, b, channels), kernel_size, sf)
    per_pixel = max(0.0, (bb - ba) / float(b * b - a * a))
    context = int(task.tile_context) if task.tile_border != "clamp" else 0
    return MemoryModel(max(0.0, ba - per_pixel * a * a), per_pixel, context)
