"""PyTorch baseline for the benchmark: Algorithm 1 of the paper in its published form.

Written from the paper's closed form (docs/operator.md) and the architectures of
docs/architectures.md, for timing only: NCHW tensors, complex ``torch.fft.fftn`` over the whole
(H·s, W·s) grid, the kernel spectrum built by zero-padding and rolling (p2o), the s×s
block average done by splitting into blocks and taking their mean, and the final division
by λ. Nothing here is meant to be fast or numerically careful; it is the yardstick.

Module and parameter names follow the released checkpoints' state-dict keys, so
:func:`load_released` fills a network with ``load_state_dict(strict=True)``.

Importing this module needs ``torch`` (the ``bench`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PADDING_MODES = ("circular", "reflect", "replicate", "constant")


# ----------------------------------------------------------------------------- operator

def p2o(kernel: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Spectrum of a (.., kh, kw) kernel placed at the top-left of ``shape`` and rolled so
    that its centre sits at index (0, 0)."""
    kh, kw = kernel.shape[-2:]
    padded = kernel.new_zeros(kernel.shape[:-2] + tuple(shape))
    padded[..., :kh, :kw] = kernel
    padded = torch.roll(padded, shifts=(-(kh // 2), -(kw // 2)), dims=(-2, -1))
    return torch.fft.fftn(padded, dim=(-2, -1))


def splits(a: torch.Tensor, s: int) -> torch.Tensor:
    """Cut the last two axes of ``a`` into an s×s grid of equal blocks, stacked on two new
    trailing axes: (..., H·s, W·s) -> (..., H, W, s, s)."""
    rows = torch.stack(torch.chunk(a, s, dim=-2), dim=-1)  # (..., H, W·s, s)
    return torch.stack(torch.chunk(rows, s, dim=-2), dim=-1)  # (..., H, W, s, s)


def converse2d(x: torch.Tensor, weight: torch.Tensor, lam: torch.Tensor, scale: int,
               padding: int, padding_mode: str) -> torch.Tensor:
    """Reverse convolution, the paper's closed form (complex FFTs, division by λ).

    ``x`` (B, C, H, W); ``weight`` (1 or B, C, kh, kw); ``lam`` broadcastable to (B, C, 1, 1).
    Returns (B, C, H·scale, W·scale).
    """
    s = scale
    if padding > 0:
        if padding_mode == "constant":
            x = F.pad(x, (padding,) * 4, mode="constant", value=0.0)
        else:
            x = F.pad(x, (padding,) * 4, mode=padding_mode)
    h, w = x.shape[-2:]
    x0 = F.interpolate(x, scale_factor=s, mode="nearest") if s > 1 else x
    fk = p2o(weight, (h * s, w * s))
    fkc = torch.conj(fk)
    fk2 = torch.abs(fk) ** 2
    y_up = x.new_zeros(x.shape[:-2] + (h * s, w * s))
    y_up[..., ::s, ::s] = x
    rhs = fkc * torch.fft.fftn(y_up, dim=(-2, -1)) + torch.fft.fftn(lam * x0, dim=(-2, -1))
    fbr = torch.mean(splits(fk * rhs, s), dim=(-1, -2))
    inv_w = torch.mean(splits(fk2, s), dim=(-1, -2))
    inv_wbr = fbr / (inv_w + lam)
    fcb_inv_wbr = fkc * inv_wbr.repeat(1, 1, s, s)
    out = torch.real(torch.fft.ifftn((rhs - fcb_inv_wbr) / lam, dim=(-2, -1)))
    if padding > 0:
        p = padding * s
        out = out[..., p:-p, p:-p]
    return out


class Converse2D(nn.Module):
    """Depthwise reverse convolution with a learned kernel per channel and λ = sigmoid(bias − 9) + eps."""

    def __init__(self, channels: int, kernel_size: int, scale: int = 1, padding: int = 2,
                 padding_mode: str = "circular", eps: float = 1e-5):
        super().__init__()
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.scale, self.padding, self.padding_mode, self.eps = scale, padding, padding_mode, eps
        draw = torch.randn(1, channels, kernel_size * kernel_size)
        self.weight = nn.Parameter(torch.softmax(draw, dim=-1).view(1, channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lam = torch.sigmoid(self.bias - 9.0) + self.eps
        return converse2d(x, self.weight, lam, self.scale, self.padding, self.padding_mode)


# ----------------------------------------------------------------------------- blocks

class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor (biased variance, affine)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class ConverseBlock(nn.Module):
    """x + B1(x), then x + B2(x) (docs/architectures.md); with ``alpha`` each branch is scaled per channel."""

    def __init__(self, channels: int, kernel_size: int, padding: int, padding_mode: str,
                 eps: float = 1e-5, alpha: bool = False):
        super().__init__()
        wide = 2 * channels
        self.conv1 = nn.Sequential(
            ChannelLayerNorm(channels), nn.Conv2d(channels, wide, 1), nn.GELU(),
            Converse2D(wide, kernel_size, 1, padding, padding_mode, eps), nn.GELU(),
            nn.Conv2d(wide, channels, 1))
        self.conv2 = nn.Sequential(
            ChannelLayerNorm(channels), nn.Conv2d(channels, wide, 1), nn.GELU(),
            nn.Conv2d(wide, channels, 1))
        self.has_alpha = alpha
        if alpha:
            self.alpha1 = nn.Parameter(torch.zeros(1, channels, 1, 1))
            self.alpha2 = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_alpha:
            x = x + self.alpha1 * self.conv1(x)
            return x + self.alpha2 * self.conv2(x)
        x = x + self.conv1(x)
        return x + self.conv2(x)


# ----------------------------------------------------------------------------- networks

class ConverseDnCNN(nn.Module):
    def __init__(self, in_channels: int = 1, features: int = 64, num_blocks: int = 20,
                 kernel_size: int = 7, padding: int = 6, padding_mode: str = "circular"):
        super().__init__()
        self.m_head = nn.Sequential(nn.Conv2d(in_channels, features, 1))
        self.m_body = nn.Sequential(*[ConverseBlock(features, kernel_size, padding, padding_mode)
                                      for _ in range(num_blocks)])
        self.m_tail = nn.Sequential(nn.Conv2d(features, in_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m_tail(self.m_body(self.m_head(x)))


class ConverseSRResNet(nn.Module):
    def __init__(self, in_channels: int = 3, out_channels: int = 3, features: int = 64,
                 num_blocks: int = 16, upscale: int = 4):
        super().__init__()
        if upscale != 4:
            raise ValueError("the released SRResNet is x4 only")
        blk = lambda: ConverseBlock(features, 5, 4, "replicate")  # noqa: E731
        self.conv_first = nn.Conv2d(in_channels, features, 1)
        self.conv_body = nn.Sequential(*[blk() for _ in range(num_blocks)])
        self.upconv1, self.upconv2, self.conv_hres = blk(), blk(), blk()
        self.up1 = Converse2D(features, 2, 2, 2, "replicate", 1e-3)
        self.up2 = Converse2D(features, 2, 2, 2, "replicate", 1e-3)
        self.conv_last = nn.Conv2d(features, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = F.gelu(self.conv_first(x))
        feat = self.conv_body(feat)
        feat = F.gelu(self.up1(self.upconv1(feat)))
        feat = F.gelu(self.up2(self.upconv2(feat)))
        out = self.conv_last(F.gelu(self.conv_hres(feat)))
        return out + F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)


class _Prior(nn.Module):
    def __init__(self, features: int, blocks: int, alpha: bool):
        super().__init__()
        self.m_body = nn.Sequential(*[ConverseBlock(features, 3, 2, "circular", alpha=alpha)
                                      for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m_body(x)


class ConverseNet(nn.Module):
    def __init__(self, num_iterations: int = 5, features: int = 64, num_blocks: int = 7, channels: int = 3):
        super().__init__()
        self.iterations = num_iterations
        self.conv1 = nn.Conv2d(channels, features, 1)
        self.p = _Prior(features, num_blocks, alpha=False)
        self.conv2 = nn.Conv2d(features, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for _ in range(self.iterations):
            x = self.p(x)
        return self.conv2(x)


class _KernelNet(nn.Module):
    def __init__(self, ksize: int = 7, hidden: int = 64, out_maps: int = 16):
        super().__init__()
        self.ksize, self.out_maps = ksize, out_maps
        self.fc1 = nn.Linear(ksize * ksize, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, out_maps * ksize * ksize)

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        b = k.shape[0]
        h = F.gelu(self.fc1(k.reshape(b, -1)))
        h = F.gelu(self.fc2(h))
        return self.fc3(h).view(b, self.out_maps, self.ksize, self.ksize)


class _DataStep(nn.Module):
    def __init__(self, features: int, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.alpha = nn.Parameter(torch.zeros(1, features, 1, 1))

    def forward(self, x: torch.Tensor, kernels: torch.Tensor, sf: int) -> torch.Tensor:
        lam = torch.sigmoid(self.alpha - 9.0) + self.eps
        return converse2d(x, kernels, lam, sf, 0, "circular")


class ConverseUSRNet(nn.Module):
    def __init__(self, num_iterations: int = 5, features: int = 64, num_blocks: int = 7, channels: int = 3):
        super().__init__()
        self.iterations = num_iterations
        self.kernelnet = _KernelNet()
        self.conv1 = nn.Conv2d(channels, features, 1)
        self.convs = nn.ModuleList([nn.Conv2d(16, features, 1) for _ in range(num_iterations)])
        self.d = _DataStep(features)
        self.p = _Prior(features, num_blocks, alpha=True)
        self.conv2 = nn.Conv2d(features, channels, 1)

    def forward(self, x: torch.Tensor, k: torch.Tensor, sf: int = 1) -> torch.Tensor:
        maps = self.kernelnet(k)
        x = self.conv1(x)
        for i in range(self.iterations):
            x = self.d(x, self.convs[i](maps), sf if i == 0 else 1)
            x = self.p(x)
        return self.conv2(x)


BUILDERS = {
    "dncnn": ConverseDnCNN,
    "srresnet": ConverseSRResNet,
    "conversenet": ConverseNet,
    "usrnet": ConverseUSRNet,
}

CHECKPOINTS = {
    "dncnn": "converse_dncnn.pth",
    "srresnet": "converse_srresnet.pth",
    "conversenet": "conversenet.pth",
    "usrnet": "converse_usrnet.pth",
}


def build(name: str, **overrides: int) -> nn.Module:
    """A freshly initialised baseline network (``dncnn``, ``srresnet``, ``conversenet``, ``usrnet``);
    ``overrides`` (``num_blocks``, ``num_iterations``) shrink it, as the library's constructors do."""
    if name not in BUILDERS:
        raise ValueError(f"unknown network {name!r}; choose one of {sorted(BUILDERS)}")
    return BUILDERS[name](**overrides)


def load_released(name: str, weights_dir: Path) -> nn.Module:
    """The baseline network ``name`` filled with its released checkpoint from ``weights_dir``."""
    net = build(name)
    path = Path(weights_dir) / CHECKPOINTS[name]
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval()
