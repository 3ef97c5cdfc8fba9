"""Learning-rate schedules as optax schedules (``step -> lr``), formulas in :mod:`fairy2i_jax.training.config`.

All are pure ``jnp`` functions of the optimizer step count ``s`` (the number of updates already applied), so
the first update uses ``s = 0`` and, with warmup, a learning rate of 0, like the official ``LambdaLR``.
"""

from __future__ import annotations

import math
import typing
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import jax.numpy as jnp

if TYPE_CHECKING:
    from fairy2i_jax.training.config import OptimizerSection

Schedule = Callable[[object], object]
ScheduleName = Literal["wsd", "cosine", "constant"]
SCHEDULES: tuple[str, ...] = typing.get_args(ScheduleName)


def warmup_factor(step, warmup_steps: int):
    """``min(1, s / warmup_steps)`` (1 when ``warmup_steps == 0``)."""
    if warmup_steps <= 0:
        return jnp.ones_like(jnp.asarray(step, jnp.float32))
    return jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)


def cosine_between(step, start: int, end: int, hi: float, lo: float):
    """``lo + (hi - lo) * (1 + cos(pi * p)) / 2`` with ``p = clip((s - start) / (end - start), 0, 1)``."""
    p = jnp.clip((jnp.asarray(step, jnp.float32) - start) / max(end - start, 1), 0.0, 1.0)
    return lo + (hi - lo) * 0.5 * (1.0 + jnp.cos(math.pi * p))


def wsd_factor(step, warmup_steps: int, stages: Sequence[tuple[int, int, float]]):
    """Warmup-stable-decay factor: warmup, 1.0, then per stage ``(start, end, f)`` a cosine from the previous
    factor to ``f`` over ``[start, end)`` and ``f`` after it (the official Fairy2i ``lr_lambda``)."""
    s = jnp.asarray(step, jnp.float32)
    factor = jnp.where(s < warmup_steps, warmup_factor(s, warmup_steps), 1.0)
    level = 1.0
    for start, end, target in stages:
        factor = jnp.where(s >= start, cosine_between(s, start, end, level, target), factor)
        level = target
    return factor


def cosine_factor(step, warmup_steps: int, total_steps: int, min_factor: float):
    """Warmup, then a cosine from 1 to ``min_factor`` at ``total_steps``."""
    s = jnp.asarray(step, jnp.float32)
    decay = cosine_between(s, warmup_steps, max(total_steps, warmup_steps + 1), 1.0, min_factor)
    return jnp.where(s < warmup_steps, warmup_factor(s, warmup_steps), decay)


def make_schedule(opt: OptimizerSection, total_steps: int) -> Schedule:
    """``step -> lr = opt.lr * factor(step)`` for ``opt.schedule`` (``wsd``, ``cosine`` or ``constant``)."""
    if opt.schedule == "wsd":
        stages = tuple(tuple(s) for s in opt.decay_stages)
        return lambda step: opt.lr * wsd_factor(step, opt.warmup_steps, stages)
    if opt.schedule == "cosine":
        return lambda step: opt.lr * cosine_factor(step, opt.warmup_steps, total_steps, opt.min_lr_factor)
    if opt.schedule == "constant":
        return lambda step: opt.lr * warmup_factor(step, opt.warmup_steps)
    raise ValueError(f"unknown schedule {opt.schedule!r}")
