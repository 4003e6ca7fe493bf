"""Train state (+EMA), optimizer, data-parallel train step, Orbax checkpoints, training loop."""

from jaxdiff.training.checkpoint import (CheckpointError, Checkpointer,
                                         IncompatibleCheckpointError, abstract_target,
                                         param_shapes, tree_structure)
from jaxdiff.training.loop import NonFiniteLossError, StopOnSignal, train_loop
from jaxdiff.training.state import (OptimizerConfig, TrainState, create_train_state, ema_decay_at,
                                    ema_update, make_lr_schedule, make_optimizer)
from jaxdiff.training.step import (DATA_AXIS, FSDP_AXIS, batch_sharding, check_batch_divisible,
                                   fsdp_sharding, make_mesh, make_train_step, place, replicate,
                                   replicated_sharding, shard_batch)
from jaxdiff.training.writers import JsonlWriter, MetricWriter, MultiWriter, TensorBoardWriter

__all__ = ["Checkpointer", "CheckpointError", "IncompatibleCheckpointError", "param_shapes",
           "tree_structure", "NonFiniteLossError",
           "StopOnSignal", "train_loop", "OptimizerConfig", "TrainState", "create_train_state",
           "ema_decay_at", "ema_update", "make_lr_schedule", "make_optimizer", "DATA_AXIS",
           "batch_sharding", "check_batch_divisible", "make_mesh", "make_train_step", "replicate",
           "replicated_sharding", "shard_batch", "FSDP_AXIS", "fsdp_sharding", "place",
           "MetricWriter", "JsonlWriter", "TensorBoardWriter",
           "MultiWriter", "abstract_target"]
