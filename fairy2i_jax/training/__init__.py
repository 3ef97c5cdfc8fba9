"""Training: config schema, optimizer in real or complex coordinates, train state and step, loop, metrics and
plots. Entry point: :func:`fairy2i_jax.training.loop.run` (``python train.py``). A run directory's layout and
checkpoints live in :mod:`fairy2i_jax.runs`; a trained model is read back with :func:`fairy2i_jax.sources.load`."""

from fairy2i_jax.runs import CheckpointCorruptError, RunCheckpoints
from fairy2i_jax.training.config import TrainConfig, load_train_config
from fairy2i_jax.training.loop import RunResult, TrainingDiverged, run
from fairy2i_jax.training.state import TrainState

__all__ = ["CheckpointCorruptError", "RunCheckpoints", "RunResult", "TrainConfig", "TrainState", "TrainingDiverged",
           "load_train_config", "run"]
