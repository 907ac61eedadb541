"""What the registry knows about each network: how to build it, how to import its released
PyTorch weights, how to train it and how to evaluate it.

Adding a model means writing its module file (the network and its PyTorch key mapping) and
one :class:`ModelSpec` entry in :mod:`converse_jax.models.registry` (or a :class:`Variant` of a
registered model); its ``task`` (a :class:`~converse_jax.tasks.Task`) says how the network is
called, trained and tested, so a new Task is needed only for a new kind of restoration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

from converse_jax.tasks import Task


@dataclasses.dataclass(frozen=True)
class Release:
    """An officially released PyTorch checkpoint."""

    filename: str  # e.g. "converse_dncnn.pth"
    sha256: str
    url: str


@dataclasses.dataclass(frozen=True)
class TrainRecipe:
    """Default training settings of a model (overridable from the command line).

    ``source`` says which published practice the defaults follow (the paper publishes none).
    """

    patch_size: int  # HR/target patch side in pixels
    batch_size: int  # global batch
    steps: int
    lr: float
    lr_milestones: tuple[int, ...] = ()  # steps at which lr is halved
    loss: Literal["l1", "l2"] = "l1"
    sigma: tuple[float, float] = (25.0, 25.0)  # noise level range on the 0..255 scale
    blur_noise: tuple[float, float] = (0.0, 2.55)  # deblurring: noise range (0..255 scale)
    source: str = ""


@dataclasses.dataclass(frozen=True)
class EvalProtocol:
    """The paper's test protocol of a model."""

    dataset: str  # default dataset name
    color: Literal["gray", "rgb"]
    border: int  # pixels cropped per side before PSNR/SSIM
    metric: Literal["rgb", "y"]  # which PSNR the paper's table reports
    sigma: float = 0.0  # denoising noise level (0..255 scale)
    scale: int = 1  # SR factor
    modcrop: int = 1
    kernels: tuple[int, ...] = ()  # deblurring: indices of ../blur_kernels/kernel_{i}.npy
    blur_noise: float = 0.0  # deblurring noise sigma (0..255 scale)
    paper: dict[str, Any] = dataclasses.field(default_factory=dict)  # dataset -> number or per-kernel list


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registry entry; ``task.name`` is the task's name in JSON and messages."""

    name: str
    description: str
    task: Task  # how the network is called, trained, tested and scored
    in_channels: int
    out_channels: int
    scale: int
    build: Callable[..., Any]  # build(*, rngs, precision, param_dtype, **overrides) -> nnx.Module
    num_params: int | None  # the count the tests pin
    torch_key_to_path: Callable[[str], tuple] | None  # PyTorch state-dict key -> NNX state path
    release: Release | None
    recipe: TrainRecipe
    protocol: EvalProtocol


@dataclasses.dataclass(frozen=True)
class Variant:
    """A network registered with the task, channels, scale, recipe and test protocol of the
    registered model ``like`` (the paper's baselines): no released weights, no PyTorch keys."""

    name: str
    like: str  # the registered model it is compared with
    description: str
    build: Callable[..., Any]
    num_params: int
    paper: dict[str, Any]  # the paper's numbers for this network (protocol.paper)

    def spec(self, base: ModelSpec) -> ModelSpec:
        """This variant's registry entry, ``base`` being the entry of ``like``."""
        return dataclasses.replace(
            base, name=self.name, description=self.description, build=self.build, num_params=self.num_params,
            torch_key_to_path=None, release=None, protocol=dataclasses.replace(base.protocol, paper=self.paper))
