"""Converse-USRNet: non-blind deblurring conditioned on the blur kernel."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from converse_jax.nn import BlockStack, ConverseBlock, block_key_to_path, gelu, linear_key_to_path, pointwise
from converse_jax.nn.precision import check_precision, compute_dtype, full_dtype
from converse_jax.ops import converse2d, converse2d_channels_first, lambda_from_bias

KERNEL_SIZE = 7
KERNEL_FEATURES = 16
DATA_EPS = 1e-3


class KernelNet(nnx.Module):
    """MLP on the flattened blur kernel: k² -> 64 -> 64 -> 16·k² (GELU), reshaped to (B, k, k, 16)."""

    def __init__(self, kernel_size: int = KERNEL_SIZE, *, dtype: Any = None, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.kernel_size = kernel_size
        self.fc1 = pointwise(kernel_size**2, 64, **kw)
        self.fc2 = pointwise(64, 64, **kw)
        self.fc3 = pointwise(64, KERNEL_FEATURES * kernel_size**2, **kw)

    def __call__(self, kernel: jax.Array) -> jax.Array:
        b = kernel.shape[0]
        h = gelu(self.fc1(kernel.reshape(b, -1)))
        h = self.fc3(gelu(self.fc2(h)))
        # The official code views the output as (B, 16, k, k) (channels first); we return channels last.
        return h.reshape(b, KERNEL_FEATURES, self.kernel_size, self.kernel_size).transpose(0, 2, 3, 1)


def data_step(x: jax.Array, kernels: jax.Array, lam: jax.Array, sf: int) -> jax.Array:
    """USRNet's data module: the Converse2D solver with per-sample kernels (B, k, k, C), no padding; in at
    least float32 (bfloat16 ``x`` and kernels are cast up: XLA's FFTs take no bfloat16)."""
    dtype = full_dtype(x)
    return converse2d(x.astype(dtype), kernels.astype(dtype), lam, scale=sf, padding=0)


def _data_step_channels_first(step: Any, x: jax.Array, kernels: jax.Array, lam: jax.Array, sf: int) -> jax.Array:
    """``step`` (channels-last, like :func:`data_step`) on channels-first ``x`` (B, C, H, W)."""
    if step is data_step:
        dtype = full_dtype(x)
        return converse2d_channels_first(x.astype(dtype), jnp.moveaxis(kernels, -1, 1).astype(dtype), lam,
                                         scale=sf, padding=0)
    return jnp.moveaxis(step(jnp.moveaxis(x, 1, -1), kernels, lam, sf), -1, 1)


class ConverseUSRNet(nnx.Module):
    """``model(x, kernel, sf=1)``: x (B, H, W, 3), kernel (B, 7, 7) -> (B, H·sf, W·sf, 3).

    KernelNet turns the blur kernel into 16 feature kernels; per iteration a 1x1 conv (16->64) makes 64
    per-sample kernels for the data step (the same closed-form solver as Converse2D, λ = sigmoid(α - 9) +
    1e-3), followed by a prior of alpha blocks shared across iterations. Released: 307,987 parameters.
    ``prior`` is a :class:`~converse_jax.nn.BlockStack`; ``scan_blocks`` chooses its scan or unrolled loop.
    ``precision``: ``"float32"`` or ``"bf16"`` (None: the default, :mod:`converse_jax.nn.precision`). The
    data step, and KernelNet and the kernel convolutions that make its kernels, run in float32 either
    way: bfloat16-rounded kernels cost the solver accuracy, and these layers work on 7x7 maps only. So
    does ``conv2``, the last 1x1 convolution (64 -> 3 channels), whose output is the restored image:
    rounded to bfloat16 (8 significant bits, a step of 1/256 near 1, as coarse as the 8-bit images
    the network is scored on) it cost most of bf16's loss against float32 (docs/precision.md).
    """

    def __init__(self, in_channels: int = 3, features: int = 64, num_blocks: int = 7, num_iterations: int = 5,
                 kernel_size: int = 3, padding: int = 2, padding_mode: str = "circular",
                 blur_kernel_size: int = KERNEL_SIZE, *, mixer=None, data_step=data_step,
                 scan_blocks: bool = True, precision: str | None = None, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        self.precision = check_precision(precision)
        dtype = compute_dtype(self.precision)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.features = features
        self.blur_kernel_size = blur_kernel_size
        self.data_step = data_step
        self.data_alpha = nnx.Param(jnp.zeros((features,), param_dtype))
        self.prior = BlockStack(num_blocks, lambda r: ConverseBlock(
            features, kernel_size, padding=padding, padding_mode=padding_mode, alpha=True, mixer=mixer,
            dtype=dtype, param_dtype=param_dtype, rngs=r), scan_blocks=scan_blocks, rngs=rngs)
        f32_kw = dict(param_dtype=param_dtype, rngs=rngs)  # the float32 parts (see the class docstring)
        self.conv1 = pointwise(in_channels, features, **kw)
        self.conv2 = pointwise(features, in_channels, **f32_kw)  # writes the image: not rounded to bfloat16
        self.kernelnet = KernelNet(blur_kernel_size, **f32_kw)  # the data step's kernels
        self.kernel_convs = nnx.List([pointwise(KERNEL_FEATURES, features, **f32_kw)
                                      for _ in range(num_iterations)])

    def data_weight(self) -> jax.Array:
        """The per-channel third argument of ``data_step``: λ = sigmoid(α - 9) + 1e-3 from ``data_alpha``."""
        return lambda_from_bias(self.data_alpha[...], DATA_EPS)

    def __call__(self, x: jax.Array, kernel: jax.Array, sf: int = 1) -> jax.Array:
        kernel = jnp.asarray(kernel)
        k = self.blur_kernel_size
        if kernel.ndim != 3 or kernel.shape[1:] != (k, k) or kernel.shape[0] != x.shape[0]:
            raise ValueError(f"kernel must have shape (B, {k}, {k}) with B = {x.shape[0]} (one blur kernel per "
                             f"image); got {kernel.shape}")
        feats = self.kernelnet(kernel.astype(x.dtype))
        lam = self.data_weight()
        h = self.conv1.channels_first(jnp.moveaxis(x, -1, 1))  # channels-first inside
        for i, conv in enumerate(self.kernel_convs):
            h = _data_step_channels_first(self.data_step, h, conv(feats), lam, sf if i == 0 else 1)
            h = self.prior.channels_first(h)
        return jnp.moveaxis(self.conv2.channels_first(h), 1, -1).astype(full_dtype(x))


def torch_key_to_path(key: str) -> tuple:
    """Official ``USRNet`` (Converse) state-dict key -> NNX path (per block: ``prior.{i}...``, see
    :mod:`converse_jax.weights.convert`)."""
    parts = key.split(".")
    if parts == ["d", "alpha"]:
        return ("data_alpha",)
    if parts[0] in ("conv1", "conv2") and len(parts) == 2:
        return linear_key_to_path((parts[0],), parts[1], key)
    if parts[0] == "kernelnet" and len(parts) == 3 and parts[1] in ("fc1", "fc2", "fc3"):
        return linear_key_to_path(("kernelnet", parts[1]), parts[2], key)
    if parts[0] == "convs" and len(parts) == 3 and parts[1].isdigit():
        return linear_key_to_path(("kernel_convs", int(parts[1])), parts[2], key)
    if parts[:2] == ["p", "m_body"] and len(parts) >= 4 and parts[2].isdigit():
        return ("prior", int(parts[2])) + block_key_to_path(parts[3:], key)
    raise KeyError(f"unexpected PyTorch key {key!r}")
