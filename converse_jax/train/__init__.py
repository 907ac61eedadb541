"""Training for converse_jax: data-parallel ``jax.jit`` steps over a device mesh, optax,
orbax checkpoints that survive a kill, validation and logging.

- :class:`TrainConfig`, :func:`config_from_spec` — settings (defaults from the model's recipe);
- :func:`train` — the whole run (resume, log, validate, checkpoint, stop on NaN or SIGINT);
- :func:`split_state`, :func:`full_state`, :func:`make_optimizer`, :func:`make_train_step` — the functional
  step on the model's state as pure dicts (``nnx.to_pure_dict`` form);
- :func:`make_data_mesh`, :func:`shard_batch`, :func:`replicate`, :func:`setup_distributed`;
- :class:`CheckpointStore`, :func:`export_params`, :func:`latest_checkpoint`.

Every training checkpoint ``<workdir>/checkpoints/<step>`` is also a converted-weights
checkpoint: ``converse_jax.load_pretrained(name, that_dir)`` loads it.
"""

from converse_jax.train.checkpointing import CheckpointStore, export_params, latest_checkpoint, prepare_workdir
from converse_jax.train.config import (
                                       TrainConfig,
                                       check_compatible,
                                       config_from_spec,
                                       parse_int_list,
                                       parse_model_kwargs,
                                       parse_range,
)
from converse_jax.train.errors import IncompatibleWorkdirError, NonFiniteLossError, TrainConfigError
from converse_jax.train.loop import TrainDataError, TrainResult, evaluate_command, make_grid, train
from converse_jax.train.parallel import (
                                       batch_sharding,
                                       check_batch_size,
                                       enable_compilation_cache,
                                       make_data_mesh,
                                       replicate,
                                       replicated,
                                       setup_distributed,
                                       shard_batch,
)
from converse_jax.train.step import (
                                       Optimizer,
                                       full_state,
                                       host_params,
                                       init_train_state,
                                       loss_value,
                                       lr_schedule,
                                       make_optimizer,
                                       make_predict,
                                       make_train_step,
                                       mode_view,
                                       split_state,
)

__all__ = [
    "CheckpointStore",
    "IncompatibleWorkdirError",
    "NonFiniteLossError",
    "Optimizer",
    "TrainConfig",
    "TrainConfigError",
    "TrainDataError",
    "TrainResult",
    "batch_sharding",
    "check_batch_size",
    "check_compatible",
    "config_from_spec",
    "enable_compilation_cache",
    "evaluate_command",
    "export_params",
    "full_state",
    "host_params",
    "init_train_state",
    "latest_checkpoint",
    "loss_value",
    "lr_schedule",
    "make_data_mesh",
    "make_grid",
    "make_optimizer",
    "make_predict",
    "make_train_step",
    "mode_view",
    "parse_int_list",
    "parse_model_kwargs",
    "parse_range",
    "prepare_workdir",
    "replicate",
    "replicated",
    "setup_distributed",
    "shard_batch",
    "split_state",
    "train",
]
