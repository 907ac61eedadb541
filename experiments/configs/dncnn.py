"""Converse-DnCNN (grayscale denoising, σ 25) training defaults.

The paper publishes no recipe; these follow the DnCNN/KAIR practice described in docs/training.md, as recorded in
the model's registry recipe: Train400-style gray patches (64 px, because the 7x7 Converse2D pads by
6 pixels per side), global batch 16, Adam 1e-4 halved at 100k and 150k of 200k steps, L1 loss,
σ = 25. The default data is the embedded synthetic source (no download); pass
``--data=folder:PATH/Train400`` to train on the classic set.
"""

from converse_jax.train import TrainConfig, config_from_spec


def get_config() -> TrainConfig:
    """The default configuration of ``python -m experiments.train --model=dncnn``."""
    return config_from_spec("dncnn", eval_every=2000, save_every=2000, log_every=10)
