"""The baselines of the paper's tables and their registry entries.

Conv-/ConvT- variants keep a Converse network's skeleton and replace each Converse2D by a depthwise
convolution or a depthwise transposed convolution with the same parameter count (k²·C weights and C
biases). Choices that no public source fixes, and that we made:

- ``srresnet_conv``: the two ×2 Converse2D upsamplers become nearest-neighbour ×2 upsampling followed by
  a depthwise 3×3 convolution (replicate padding), the usual convolutional alternative to transposed
  convolution (640 parameters more than Converse-SRResNet). ``srresnet_convt`` upsamples with depthwise
  2×2 transposed convolutions of stride 2 (exactly Converse-SRResNet's count). Inside the blocks both use
  5×5 kernels with "same" size: replicate padding 2 (conv), zero padding 2 (transposed conv).
- ``usrnet_conv`` (Conv-USRNet is defined nowhere public): Converse-USRNet whose data step, instead of
  solving the least-squares problem with the per-sample kernels, applies them as a forward circular
  depthwise convolution (true convolution, centred as :func:`converse_jax.ops.p2o`) plus a per-channel bias
  (``data_alpha``, init 0, taking the place of Converse's λ parameter; same count, 307,987); for ``sf > 1``
  the features are first upsampled by nearest neighbour. The prior blocks stay reverse-convolution blocks,
  so the two networks differ only in the data step.
- ``msrresnet_converse_up`` follows the official repository's earlier ``Converse_MSRResNet``: GELU
  activations, 3×3 conv then Converse2D (k 2, scale 2, circular padding 2, eps 1e-5) per ×2 stage.

Initialisation (as the official baselines): truncated normal std 0.02 for conv and linear weights, zero
biases; BatchNorm scale 1, offset 0; Converse2D layers keep their own softmax initialisation.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from converse_jax.models.conversenet import ConverseNet
from converse_jax.models.dncnn import ConverseDnCNN
from converse_jax.models.spec import Variant
from converse_jax.models.srresnet import ConverseSRResNet, bilinear_upsample
from converse_jax.models.usrnet import ConverseUSRNet
from converse_jax.nn.blocks import BlockStack
from converse_jax.nn.conv import (
    DepthwiseConv,
    DepthwiseConvTranspose,
    ResizeConv,
    circular_conv_per_sample,
    conv2d,
    nearest_upsample,
    pixel_shuffle,
)
from converse_jax.nn.layers import Converse2D, gelu
from converse_jax.nn.precision import check_precision, compute_dtype, full_dtype

__all__ = ["DnCNN", "MSRResNet", "ConvUSRNet", "conv_data_step", "conv_dncnn", "convt_dncnn", "dncnn_k5",
           "conv_srresnet", "convt_srresnet", "conv_convnet"]


# ----------------------------------------------------------------------------------------------------
# DnCNN (Zhang et al. 2017)


class DnCNN(nnx.Module):
    """The original DnCNN: 3×3 conv + ReLU, ``num_blocks`` × (3×3 conv, BatchNorm, ReLU), 3×3 conv, and
    residual learning (the network predicts the noise: output = input - prediction).

    Defaults: 64 features, 15 middle layers (17 layers in all), biases on every conv: 557,057 parameters.
    BatchNorm: momentum 0.9 (running = 0.9·running + 0.1·batch), epsilon 1e-4.

    Modes: the model is built in **evaluation mode** (BatchNorm normalises with its running statistics), so
    ``create`` -> load weights -> evaluate is right. Training must call ``model.train()`` first (batch
    statistics, running averages updated — a ``BatchStat`` state the train step must carry) and validate
    with ``model.eval()`` or a view ``nnx.view(model, use_running_average=True)``.

    Its layers stay lists (``convs``, ``norms``), not a :class:`~converse_jax.nn.BlockStack`: every
    training forward pass updates the BatchNorms' running statistics, state the trainer carries per layer
    (``norms.{i}``) beside the parameters, and 15 small 3×3 layers gain little from a scan.
    """

    def __init__(self, in_channels: int = 1, features: int = 64, num_blocks: int = 15, *,
                 momentum: float = 0.9, epsilon: float = 1e-4, precision: str | None = None,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.precision = check_precision(precision)
        kw = dict(dtype=compute_dtype(self.precision), param_dtype=param_dtype, rngs=rngs)
        self.head = conv2d(in_channels, features, 3, **kw)
        self.convs = nnx.List([conv2d(features, features, 3, **kw) for _ in range(num_blocks)])
        self.norms = nnx.List([
            nnx.BatchNorm(features, use_running_average=True, momentum=momentum, epsilon=epsilon, **kw)
            for _ in range(num_blocks)])
        self.tail = conv2d(features, in_channels, 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.head(x))
        for conv, norm in zip(self.convs, self.norms, strict=False):
            h = jax.nn.relu(norm(conv(h)))
        return (x - self.tail(h)).astype(full_dtype(x))


def conv_dncnn(*, kernel_size: int = 5, padding_mode: str = "circular", **kwargs: Any) -> ConverseDnCNN:
    """Conv-DnCNN: Converse-DnCNN with each Converse2D replaced by a depthwise ``kernel_size`` convolution
    (circular padding ``kernel_size // 2``). 5×5: 734,913 parameters."""
    mixer = functools.partial(DepthwiseConv, kernel_size=kernel_size, padding_mode=padding_mode)
    return ConverseDnCNN(mixer=mixer, **kwargs)


def _same_size_convt(kernel_size: int) -> functools.partial:
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd for a size-preserving transposed convolution, got {kernel_size}")
    return functools.partial(DepthwiseConvTranspose, kernel_size=kernel_size, stride=1, padding=kernel_size // 2)


def convt_dncnn(*, kernel_size: int = 5, **kwargs: Any) -> ConverseDnCNN:
    """ConvT-DnCNN: Converse-DnCNN with each Converse2D replaced by a depthwise transposed convolution
    (stride 1, zero padding ``kernel_size // 2``). 5×5: 734,913 parameters."""
    return ConverseDnCNN(mixer=_same_size_convt(kernel_size), **kwargs)


def dncnn_k5(*, kernel_size: int = 5, padding: int = 4, **kwargs: Any) -> ConverseDnCNN:
    """Converse-DnCNN with the paper table's 5×5 kernels (circular padding 4): 734,913 parameters."""
    return ConverseDnCNN(kernel_size=kernel_size, padding=padding, **kwargs)


# ----------------------------------------------------------------------------------------------------
# SRResNet family


class _ResidualBlock(nnx.Module):
    """x + conv(ReLU(conv(x))), 3×3 convs with biases computing in ``dtype``; the sum in at least float32."""

    def __init__(self, features: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.conv1 = conv2d(features, features, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv2 = conv2d(features, features, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x.astype(full_dtype(x)) + self.conv2(jax.nn.relu(self.conv1(x)))


def _leaky_relu(x: jax.Array) -> jax.Array:
    return jax.nn.leaky_relu(x, negative_slope=0.1)


_ACTIVATIONS = {"lrelu": _leaky_relu, "gelu": gelu}


class MSRResNet(nnx.Module):
    """Modified SRResNet (no BatchNorm): 3×3 conv + act -> ``num_blocks`` residual blocks (conv-ReLU-conv)
    -> ×2 upsampling stages -> 3×3 conv + act -> 3×3 conv, plus the input upsampled bilinearly.

    ``upsampler="pixel_shuffle"`` (MSRResNet, act LeakyReLU 0.1): per ×2 stage a 3×3 conv C->4C, a pixel
    shuffle and the activation; 1,517,571 parameters at the defaults. ``upsampler="converse"`` (the
    variant of the official repository's earlier commit, act GELU): per stage a 3×3 conv C->C, a Converse2D
    (k 2, scale 2, circular padding 2, eps 1e-5) and the activation; 1,296,643 parameters.
    ``body`` is a :class:`~converse_jax.nn.BlockStack`; ``scan_blocks`` chooses its scan or unrolled loop.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, features: int = 64, num_blocks: int = 16,
                 upscale: int = 4, *, upsampler: Literal["pixel_shuffle", "converse"] = "pixel_shuffle",
                 activation: Literal["lrelu", "gelu"] | None = None, scan_blocks: bool = True,
                 precision: str | None = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if upscale not in (2, 4):
            raise ValueError(f"upscale must be 2 or 4, got {upscale}")
        if upsampler not in ("pixel_shuffle", "converse"):
            raise ValueError(f"upsampler must be 'pixel_shuffle' or 'converse', got {upsampler!r}")
        if activation is None:
            activation = "lrelu" if upsampler == "pixel_shuffle" else "gelu"
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}, got {activation!r}")
        self.precision = check_precision(precision)
        dtype = compute_dtype(self.precision)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.upscale = upscale
        self.activation = activation
        n_up = 2 if upscale == 4 else 1
        self.conv_first = conv2d(in_channels, features, 3, **kw)
        self.body = BlockStack(num_blocks, lambda r: _ResidualBlock(features, dtype=dtype, param_dtype=param_dtype,
                                                                    rngs=r), scan_blocks=scan_blocks, rngs=rngs)
        if upsampler == "pixel_shuffle":
            self.upconvs = nnx.List([conv2d(features, 4 * features, 3, **kw) for _ in range(n_up)])
            self.upsamplers = None
        else:
            self.upconvs = nnx.List([conv2d(features, features, 3, **kw) for _ in range(n_up)])
            self.upsamplers = nnx.List([
                Converse2D(features, 2, scale=2, padding=2, padding_mode="circular", eps=1e-5, **kw)
                for _ in range(n_up)])
        self.conv_hr = conv2d(features, features, 3, **kw)
        self.conv_last = conv2d(features, out_channels, 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        act = _ACTIVATIONS[self.activation]
        h = act(self.conv_first(x))
        h = self.body(h)
        for i, conv in enumerate(self.upconvs):
            h = conv(h)
            h = pixel_shuffle(h, 2) if self.upsamplers is None else self.upsamplers[i](h)
            h = act(h)
        h = self.conv_last(act(self.conv_hr(h)))
        return (h + bilinear_upsample(x, self.upscale)).astype(full_dtype(x))


def conv_srresnet(*, kernel_size: int = 5, padding_mode: str = "replicate", up_kernel_size: int = 3,
                  **kwargs: Any) -> ConverseSRResNet:
    """Conv-SRResNet: Converse-SRResNet with depthwise ``kernel_size`` convolutions in the blocks and
    nearest ×2 + depthwise ``up_kernel_size`` convolution upsamplers (699,712 parameters)."""
    mixer = functools.partial(DepthwiseConv, kernel_size=kernel_size, padding_mode=padding_mode)
    upsampler = functools.partial(ResizeConv, kernel_size=up_kernel_size, scale=2, padding_mode=padding_mode)
    return ConverseSRResNet(mixer=mixer, upsampler=upsampler, **kwargs)


def convt_srresnet(*, kernel_size: int = 5, **kwargs: Any) -> ConverseSRResNet:
    """ConvT-SRResNet: Converse-SRResNet with depthwise transposed convolutions in the blocks (stride 1) and
    as upsamplers (2×2, stride 2): 699,072 parameters."""
    upsampler = functools.partial(DepthwiseConvTranspose, kernel_size=2, stride=2, padding=0)
    return ConverseSRResNet(mixer=_same_size_convt(kernel_size), upsampler=upsampler, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Deblurring


def conv_convnet(*, kernel_size: int = 3, padding_mode: str = "circular", **kwargs: Any) -> ConverseNet:
    """ConvNet: ConverseNet with depthwise 3×3 circular convolutions: 243,267 parameters."""
    mixer = functools.partial(DepthwiseConv, kernel_size=kernel_size, padding_mode=padding_mode)
    return ConverseNet(mixer=mixer, **kwargs)


def conv_data_step(x: jax.Array, kernels: jax.Array, bias: jax.Array, sf: int) -> jax.Array:
    """Conv-USRNet's data step: nearest ×``sf`` upsampling, then the per-sample kernels (B, k, k, C) applied
    as a circular depthwise convolution, plus the per-channel ``bias``."""
    return circular_conv_per_sample(nearest_upsample(x, sf), kernels) + bias.astype(x.dtype)


class ConvUSRNet(ConverseUSRNet):
    """Conv-USRNet (our definition, see the module docstring): ``model(x, kernel, sf=1)`` as Converse-USRNet,
    with the data step a kernel-conditioned circular depthwise convolution whose per-channel bias is
    ``data_alpha``. 307,987 parameters at the defaults."""

    def __init__(self, *args: Any, **kwargs: Any):
        if "data_step" in kwargs:
            raise ValueError("ConvUSRNet fixes its data step (conv_data_step); use ConverseUSRNet for another one")
        super().__init__(*args, data_step=conv_data_step, **kwargs)

    def data_weight(self) -> jax.Array:
        """The conv data step's per-channel bias (``data_alpha`` used as is)."""
        return self.data_alpha[...]


# ----------------------------------------------------------------------------------------------------
# Registry entries (no released weights; training recipes and test protocols of the Converse originals).
# The registry imports this list; this module does not import the registry.

_DENOISE = "dncnn"
_SR = "srresnet"

VARIANTS: tuple[Variant, ...] = (
    Variant("dncnn_k5", _DENOISE, "Converse-DnCNN with 5x5 kernels, as in the paper's table", dncnn_k5, 734_913,
            {"set12": 30.70, "bsd68": 29.36}),
    Variant("dncnn_original", _DENOISE, "DnCNN baseline: 17 layers of 3x3 conv/BatchNorm/ReLU, residual learning",
            DnCNN, 557_057, {"set12": 30.43, "bsd68": 29.23}),
    Variant("dncnn_conv", _DENOISE, "Conv-DnCNN baseline: depthwise 5x5 circular conv instead of Converse2D",
            conv_dncnn, 734_913, {"set12": 30.64, "bsd68": 29.30}),
    Variant("dncnn_convt", _DENOISE, "ConvT-DnCNN baseline: depthwise 5x5 transposed conv instead of Converse2D",
            convt_dncnn, 734_913, {"set12": 30.61, "bsd68": 29.29}),
    Variant("msrresnet", _SR, "MSRResNet baseline (the table's SRResNet): 3x3 convs, pixel-shuffle x4",
            MSRResNet, 1_517_571, {"set5": 32.21, "set14": 28.60, "bsd100": 27.59, "urban100": 26.09}),
    Variant("msrresnet_converse_up", _SR, "MSRResNet body with 3x3 conv + Converse2D x2 upsampling (GELU)",
            functools.partial(MSRResNet, upsampler="converse"), 1_296_643, {}),
    Variant("srresnet_conv", _SR, "Conv-SRResNet baseline: depthwise 5x5 conv blocks, nearest x2 + depthwise 3x3 "
            "conv upsampling", conv_srresnet, 699_712,
            {"set5": 32.23, "set14": 28.73, "bsd100": 27.62, "urban100": 26.24}),
    Variant("srresnet_convt", _SR, "ConvT-SRResNet baseline: depthwise 5x5 transposed conv blocks, 2x2 stride-2 "
            "transposed conv upsampling", convt_srresnet, 699_072,
            {"set5": 32.09, "set14": 28.61, "bsd100": 27.56, "urban100": 25.89}),
    Variant("convnet", "conversenet", "ConvNet baseline (blind deblurring): depthwise 3x3 circular conv instead of "
            "Converse2D", conv_convnet, 243_267,
            {"bsd100": (25.26, 22.96, 27.16, 26.91, 23.98), "urban100": (22.27, 20.59, 23.43, 23.92, 21.12)}),
    Variant("usrnet_conv", "usrnet", "Conv-USRNet baseline (our definition): kernel-conditioned depthwise circular "
            "conv as the data step (model(x, kernel, sf))", ConvUSRNet, 307_987,
            {"bsd100": (32.18, 31.03, 37.80, 31.82, 34.33), "urban100": (31.48, 30.19, 36.80, 31.23, 33.63)}),
)
