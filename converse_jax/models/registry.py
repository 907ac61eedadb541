"""Model registry: one :class:`ModelSpec` entry per network name.

``create(name, rngs=...)`` builds a model, ``get_spec(name)`` returns everything else the project knows
about it (task, PyTorch key mapping, released checkpoint, training recipe, evaluation protocol). The
registry imports the model modules (the baselines' entries are :class:`Variant` values listed in
:mod:`converse_jax.models.baselines`); no model module imports the registry.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from converse_jax import tasks
from converse_jax.models import baselines, conversenet, dncnn, srresnet, usrnet
from converse_jax.models.spec import EvalProtocol, ModelSpec, Release, TrainRecipe
from converse_jax.nn.precision import check_precision

# the official repository keeps its released weights in model_zoo/
_RELEASE_URL = "https://github.com/cszn/ConverseNet/raw/main/model_zoo/{}"


def _release(filename: str, sha256: str) -> Release:
    return Release(filename=filename, sha256=sha256, url=_RELEASE_URL.format(filename))


_DEBLUR_PAPER = {  # the paper's deblurring table (BSD100, Urban100), kernels 1-5
    "conversenet": {"bsd100": (27.69, 24.43, 31.28, 27.64, 27.31), "urban100": (24.24, 21.52, 23.16, 24.56, 22.56)},
    "usrnet": {"bsd100": (32.46, 31.20, 38.40, 32.21, 34.62), "urban100": (31.96, 30.59, 37.48, 31.95, 33.99)},
}

_DEBLUR_RECIPE = TrainRecipe(
    patch_size=128, batch_size=16, steps=500_000, lr=1e-4, lr_milestones=(200_000, 300_000, 400_000), loss="l1",
    blur_noise=(0.0, 2.55),
    source="USRNet-style deblurring practice (docs/training.md): random Gaussian and motion 7x7 kernels plus small "
           "noise, 128 px patches, Adam 1e-4, L1, step decay; the paper's own recipe is unpublished")

_DEBLUR_PROTOCOL = dict(dataset="set5", color="rgb", border=1, metric="rgb", modcrop=8, kernels=(1, 2, 3, 4, 5),
                        blur_noise=2.55)

_SPECS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a model to the registry (its name must be new)."""
    if spec.name in _SPECS:
        raise ValueError(f"model {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    return spec


register(ModelSpec(
    name="dncnn", description="Converse-DnCNN, grayscale denoising (released: 7x7 kernels)",
    task=tasks.DENOISE, in_channels=1, out_channels=1, scale=1,
    build=dncnn.ConverseDnCNN, num_params=796_353, torch_key_to_path=dncnn.torch_key_to_path,
    release=_release("converse_dncnn.pth", "3b86c7f6e41a014448f923bc331232e1f45e2eae350dd7f9e18440803d283e89"),
    recipe=TrainRecipe(
        patch_size=64, batch_size=16, steps=200_000, lr=1e-4, lr_milestones=(100_000, 150_000), loss="l1",
        sigma=(25.0, 25.0),
        source="DnCNN/KAIR practice (docs/training.md): Train400 patches, Adam 1e-4 halved in steps, L1; 64 px "
               "patches because the 7x7 Converse2D pads by 6 on each side"),
    protocol=EvalProtocol(dataset="set12", color="gray", border=0, metric="rgb", sigma=25.0,
                          paper={"set12": 30.70, "bsd68": 29.36}),
))

register(ModelSpec(
    name="srresnet", description="Converse-SRResNet, x4 super-resolution",
    task=tasks.SR, in_channels=3, out_channels=3, scale=4,
    build=srresnet.ConverseSRResNet, num_params=699_072, torch_key_to_path=srresnet.torch_key_to_path,
    release=_release("converse_srresnet.pth", "ed75a697f1ebb9f9ad6a53b7875bb76098f23b48d87bf6f0b0dd8cde6df81d2f"),
    recipe=TrainRecipe(
        patch_size=96, batch_size=16, steps=1_000_000, lr=2e-4,
        lr_milestones=(250_000, 500_000, 750_000), loss="l1",
        source="SRResNet/KAIR practice (docs/training.md): 96 px HR patches, bicubic x4, Adam 2e-4, L1, step decay"),
    protocol=EvalProtocol(dataset="set5", color="rgb", border=4, metric="y", scale=4, modcrop=4,
                          paper={"set5": 32.25, "set14": 28.72, "bsd100": 27.62, "urban100": 26.24}),
))

register(ModelSpec(
    name="conversenet", description="ConverseNet, blind deblurring",
    task=tasks.DEBLUR, in_channels=3, out_channels=3, scale=1,
    build=conversenet.ConverseNet, num_params=243_267, torch_key_to_path=conversenet.torch_key_to_path,
    release=_release("conversenet.pth", "603cbb29075178410db9ab6166b247d2ddff32f349c59a7e1763c46feca270bd"),
    recipe=_DEBLUR_RECIPE,
    protocol=EvalProtocol(**_DEBLUR_PROTOCOL, paper=_DEBLUR_PAPER["conversenet"]),
))

register(ModelSpec(
    name="usrnet", description="Converse-USRNet, non-blind deblurring (model(x, kernel, sf))",
    task=tasks.DEBLUR_NONBLIND, in_channels=3, out_channels=3, scale=1,
    build=usrnet.ConverseUSRNet, num_params=307_987, torch_key_to_path=usrnet.torch_key_to_path,
    release=_release("converse_usrnet.pth", "729529b8bc8cbda152d6b60734b01032b49c20fcb8b6da2fb33141d9c3378d82"),
    recipe=_DEBLUR_RECIPE,
    protocol=EvalProtocol(**_DEBLUR_PROTOCOL, paper=_DEBLUR_PAPER["usrnet"]),
))


def _register_variants() -> None:
    """The baselines, each registered like the model it is compared with."""
    for variant in baselines.VARIANTS:
        register(variant.spec(_SPECS[variant.like]))


_register_variants()


def list_models() -> list[str]:
    """Names of the registered models."""
    return sorted(_SPECS)


def get_spec(name: str) -> ModelSpec:
    """The registry entry of ``name``; an unknown name is a ValueError listing the known ones."""
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def create(name: str, *, rngs: nnx.Rngs | int = 0, precision: str | None = None, param_dtype: Any = jnp.float32,
           **overrides: Any) -> nnx.Module:
    """Build the model ``name`` with fresh parameters (``overrides`` go to its constructor).

    ``precision``: ``"float32"`` or ``"bf16"`` (mixed precision: bfloat16 compute, float32 parameters and
    solver); None takes the default precision (:func:`converse_jax.nn.precision.get_default_precision`).
    """
    spec = get_spec(name)
    precision = check_precision(precision)
    if isinstance(rngs, int):
        rngs = nnx.Rngs(rngs)
    return spec.build(precision=precision, param_dtype=param_dtype, rngs=rngs, **overrides)


def count_params(model: nnx.Module) -> int:
    """Number of scalar parameters of a model."""
    state = nnx.state(model, nnx.Param)
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(state))
