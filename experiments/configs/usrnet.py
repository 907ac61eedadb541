"""Converse-USRNet (non-blind deblurring) training defaults.

Same practice as ConverseNet (USRNet-style deblurring, docs/training.md, the registry recipe): 128 px
patches, random 7x7 Gaussian or motion kernels given to the network with each image, noise σ
uniform in [0, 2.55], global batch 16, Adam 1e-4 halved at 200k, 300k and 400k of 500k steps, L1.
"""

from converse_jax.train import TrainConfig, config_from_spec


def get_config() -> TrainConfig:
    """The default configuration of ``python -m experiments.train --model=usrnet``."""
    return config_from_spec("usrnet", eval_every=5000, save_every=5000, log_every=10)
