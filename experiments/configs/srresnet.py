"""Converse-SRResNet (x4 super-resolution) training defaults.

The paper publishes no recipe; these follow the SRResNet/KAIR practice described in docs/training.md, as recorded
in the model's registry recipe: 96 px HR patches with MATLAB-bicubic x4 inputs, global batch 16,
Adam 2e-4 halved at 250k, 500k and 750k of 1M steps, L1 loss. The default data is the embedded
synthetic source; the practice is DIV2K/Flickr2K (``--data=folder:PATH`` or ``--data=tfds:div2k``).
"""

from converse_jax.train import TrainConfig, config_from_spec


def get_config() -> TrainConfig:
    """The default configuration of ``python -m experiments.train --model=srresnet``."""
    return config_from_spec("srresnet", eval_every=5000, save_every=5000, log_every=10)
