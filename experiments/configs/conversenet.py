"""ConverseNet (blind deblurring) training defaults.

The paper publishes no recipe; these follow the USRNet-style deblurring practice described in docs/training.md, as
recorded in the model's registry recipe: 128 px patches blurred by random 7x7 Gaussian or motion
kernels (circular) plus noise with σ uniform in [0, 2.55], global batch 16, Adam 1e-4 halved at
200k, 300k and 400k of 500k steps, L1 loss. The default data is the embedded synthetic source; the
practice is DIV2K/Flickr2K/WED (``--data=folder:PATH``).
"""

from converse_jax.train import TrainConfig, config_from_spec


def get_config() -> TrainConfig:
    """The default configuration of ``python -m experiments.train --model=conversenet``."""
    return config_from_spec("conversenet", eval_every=5000, save_every=5000, log_every=10)
