"""The networks of the paper and their registry."""

from converse_jax.models.conversenet import ConverseNet
from converse_jax.models.dncnn import ConverseDnCNN
from converse_jax.models.registry import count_params, create, get_spec, list_models, register
from converse_jax.models.spec import EvalProtocol, ModelSpec, Release, TrainRecipe, Variant
from converse_jax.models.srresnet import ConverseSRResNet
from converse_jax.models.usrnet import ConverseUSRNet, KernelNet

__all__ = ["ConverseDnCNN", "ConverseNet", "ConverseSRResNet", "ConverseUSRNet", "EvalProtocol", "KernelNet",
           "ModelSpec", "Release", "TrainRecipe", "Variant", "count_params", "create", "get_spec", "list_models",
           "register"]
