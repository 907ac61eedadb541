import pytest

from converse_jax.assets import asset, assets_dir


def require_asset(*parts):
    """Return the path of a shared asset, or skip the test saying what is missing."""
    path = asset(*parts)
    if not path.exists():
        pytest.skip(f"asset {path} not found: set CONVERSE_ASSETS to the shared folder "
                    f"(default {assets_dir()}) to run this test")
    return path


@pytest.fixture
def x64():
    """Run a test with float64 enabled, restoring the previous setting afterwards."""
    import jax

    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)
