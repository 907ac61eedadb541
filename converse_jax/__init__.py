"""converse_jax: Reverse Convolution (Converse2D) and its image-restoration networks in JAX/Flax NNX."""

__version__ = "0.1.0"


def __getattr__(name):
    # Imported lazily so that ``import converse_jax`` stays light.
    if name == "load_pretrained":
        from converse_jax.weights import load_pretrained
        return load_pretrained
    raise AttributeError(f"module 'converse_jax' has no attribute {name!r}")


__all__ = ["__version__", "load_pretrained"]
