"""Train state (+EMA), optimizer, data-parallel train step, Orbax checkpoints, and the one
training loop (:func:`fit`: a :class:`TrainTask` under :class:`TrainerSettings`).

Meshes and shardings (``make_mesh``, ``shard_batch``, ``fsdp_sharding``, ...) are in
:mod:`jaxdiff.sharding`."""

from jaxdiff.training.checkpoint import (CheckpointError, Checkpointer,
                                         IncompatibleCheckpointError, abstract_target,
                                         param_shapes, tree_structure)
from jaxdiff.training.loop import NonFiniteLossError, StopOnSignal, train_loop
from jaxdiff.training.placement import (Start, abstract_train_state, gather_replicated,
                                        new_train_state, place_frozen, restore_or_init,
                                        state_sharding)
from jaxdiff.training.run_log import RunLog, truncate_jsonl
from jaxdiff.training.state import (OptimizerConfig, TrainState, create_train_state, ema_decay_at,
                                    ema_update, make_lr_schedule, make_optimizer)
from jaxdiff.training.step import make_train_step
from jaxdiff.training.trainer import Periodic, TrainerSettings, TrainTask, fit
from jaxdiff.training.writers import JsonlWriter, MetricWriter, MultiWriter, TensorBoardWriter

__all__ = ["Checkpointer", "CheckpointError", "IncompatibleCheckpointError", "param_shapes",
           "tree_structure", "NonFiniteLossError",
           "StopOnSignal", "train_loop", "OptimizerConfig", "TrainState", "create_train_state",
           "ema_decay_at", "ema_update", "make_lr_schedule", "make_optimizer", "make_train_step",
           "MetricWriter", "JsonlWriter", "TensorBoardWriter",
           "MultiWriter", "abstract_target", "fit", "TrainerSettings", "TrainTask", "Periodic",
           "RunLog", "truncate_jsonl", "Start", "new_train_state", "abstract_train_state",
           "state_sharding", "gather_replicated", "place_frozen", "restore_or_init"]
