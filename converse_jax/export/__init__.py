"""Deployable artifacts of the networks: serialized ``jax.export`` (StableHLO) modules and ONNX graphs.

An artifact is the network's forward pass (always through its task's ``forward``, so non-blind
models take their kernel input) with the weights baked in as constants, for one spatial size: the
FFT sizes of every Converse2D layer depend on it. The batch axis is symbolic where the format allows.
Next to each artifact a JSON file says what it computes (see :func:`describe`); docs/deploy.md shows
how to run one without converse_jax.
"""

from converse_jax.export.stablehlo import (
    ExportSpec,
    describe,
    export_stablehlo,
    params_sha256,
    run_stablehlo,
    write_artifact,
)

__all__ = ["ExportSpec", "describe", "export_stablehlo", "params_sha256", "run_stablehlo", "write_artifact"]
