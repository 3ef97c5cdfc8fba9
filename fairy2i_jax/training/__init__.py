"""Training: config schema, optimizer in real or complex coordinates, train state and step, loop, checkpoints,
metrics (issue [C]). Entry point: :func:`fairy2i_jax.training.loop.run` (``python train.py``)."""

from fairy2i_jax.training.checkpoint import CheckpointCorruptError, RunCheckpoints
from fairy2i_jax.training.config import TrainConfig, load_train_config
from fairy2i_jax.training.loop import RunResult, TrainingDiverged, load_run, run

__all__ = ["CheckpointCorruptError", "RunCheckpoints", "RunResult", "TrainConfig", "TrainingDiverged",
           "load_run", "load_train_config", "run"]
