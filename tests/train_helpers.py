"""Shared pieces of the training tests: one-step harness over the building blocks of fairy2i_jax.training."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fairy2i_jax.sharding import make_mesh
from fairy2i_jax.training.config import DistillSection, OptimizerSection
from fairy2i_jax.training.optim import make_optimizer
from fairy2i_jax.training.state import ParamLayout, init_state
from fairy2i_jax.training.step import jit_train_step, make_train_step


def optimizer(name="sgd", lr=0.1, coordinates="real", **kw) -> OptimizerSection:
    """An optimizer section with no schedule (constant lr, no warmup) and no clipping unless given."""
    base = dict(name=name, lr=lr, coordinates=coordinates, schedule="constant", warmup_steps=0, decay_stages=(),
                clip_norm=0.0)
    return OptimizerSection(**{**base, **kw})


@dataclasses.dataclass
class Harness:
    """A jitted train step of ``model`` on ``mesh`` with its initial state."""

    layout: ParamLayout
    state: object  # TrainState
    step: object
    mesh: object

    def run(self, batch: dict[str, np.ndarray]):
        self.state, metrics = self.step(self.state, {k: jnp.asarray(v) for k, v in batch.items()})
        return jax.device_get(metrics)


def harness(model, opt: OptimizerSection, batch_shape, *, mesh_shape=(1, 1, 1), grad_accum=1,
            distill: DistillSection = DistillSection(), seed=0) -> Harness:
    mesh = make_mesh(*mesh_shape)
    layout = ParamLayout(model)
    tx, schedule = make_optimizer(opt, 100)
    state, shardings = init_state(layout, model, tx, opt.coordinates, seed, mesh)
    fn = make_train_step(layout, tx, schedule, coordinates=opt.coordinates, grad_accum=grad_accum,
                         distill=distill, mesh=mesh)
    return Harness(layout, state, jit_train_step(fn, shardings, mesh, batch_shape), mesh)


def random_batch(batch: int, length: int, vocab: int, seed: int = 0, ignore_every: int = 5):
    """``{input_ids, labels}`` with some labels -100 (every ``ignore_every``-th position after the first)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, length)).astype(np.int32)
    labels = ids.copy()
    labels[:, 1::ignore_every] = -100
    return {"input_ids": ids, "labels": labels}


def host(tree):
    """A pytree fetched to numpy."""
    return jax.tree.map(np.asarray, jax.device_get(tree))
