"""Shared pieces of the training tests: a one-step harness over the building blocks of fairy2i_jax.training,
converted tiny models, and ``train.py`` run as a subprocess."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fairy2i_jax import convert, load_pretrained
from fairy2i_jax.sharding import make_mesh
from fairy2i_jax.training.config import DistillSection, OptimizerSection
from fairy2i_jax.training.optim import make_optimizer
from fairy2i_jax.training.state import ParamLayout, init_state
from fairy2i_jax.training.step import jit_train_step, make_train_step
from fairy2i_jax.training.teacher import frozen_teacher, teacher_shardings


def optimizer(name="sgd", lr=0.1, coordinates="real", **kw) -> OptimizerSection:
    """An optimizer section with no schedule (constant lr, no warmup) and no clipping unless given."""
    base = dict(name=name, lr=lr, coordinates=coordinates, schedule="constant", warmup_steps=0, decay_stages=(),
                clip_norm=0.0)
    return OptimizerSection(**{**base, **kw})


@dataclasses.dataclass
class Harness:
    """A jitted train step of ``model`` on ``mesh`` with its initial state (and frozen teacher, if any)."""

    layout: ParamLayout
    state: object  # TrainState
    step: object
    mesh: object
    teacher: object = None  # Teacher

    def run(self, batch: dict[str, np.ndarray]):
        self.state, metrics = self.step(self.state, {k: jnp.asarray(v) for k, v in batch.items()}, self.teacher)
        return jax.device_get(metrics)


def harness(model, opt: OptimizerSection, batch_shape, *, mesh_shape=(1, 1, 1), grad_accum=1,
            distill: DistillSection = DistillSection(), seed=0, teacher_model=None) -> Harness:
    """With ``distill.teacher=frozen`` the teacher is :func:`frozen_teacher` of ``teacher_model`` (default:
    ``model`` itself, i.e. the converted model at step 0)."""
    mesh = make_mesh(*mesh_shape)
    layout = ParamLayout(model)
    tx, schedule = make_optimizer(opt, 100, layout.opt_groups(opt.coordinates))
    state, shardings = init_state(layout, model, tx, opt.coordinates, seed, mesh)
    fn = make_train_step(layout, tx, schedule, coordinates=opt.coordinates, grad_accum=grad_accum,
                         distill=distill, mesh=mesh)
    teacher = t_shardings = None
    if distill.frozen:
        teacher_model = model if teacher_model is None else teacher_model
        teacher, t_shardings = frozen_teacher(teacher_model, mesh), teacher_shardings(teacher_model, mesh)
    return Harness(layout, state, jit_train_step(fn, shardings, mesh, batch_shape, t_shardings), mesh, teacher)


@functools.lru_cache(maxsize=None)
def converted(family: str, preset: str = "w2", scan_layers: bool = False):
    """The fp32 tiny checkpoint of ``family`` (model_helpers) loaded and converted to ``preset``, built once per
    process: the train steps copy the params they update (``init_state``), so tests can share it."""
    from model_helpers import checkpoint  # torch and transformers, only for the tests that use them

    real = load_pretrained(checkpoint(family), compute_dtype=jnp.float32, scan_layers=scan_layers)
    return convert(real, preset)


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


# -- train.py as a subprocess (the loop tests and the session's reference run, conftest.py) --------------------

ROOT = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = ROOT / "configs" / "debug.yaml"
REFERENCE_STEPS = 16
# the reference run of the debug config: global batch 64 x 128 tokens makes a step slow enough (~0.2 s) to be
# interrupted; checkpoints every 2 steps, the last 3 kept
REFERENCE_ARGS = [f"train.steps={REFERENCE_STEPS}", "train.checkpoint_every=2", "train.keep_checkpoints=3",
                  "data.global_batch=64", "data.seq_len=128", "train.grad_accum=2", "train.eval_batches=0",
                  "data.eval=[]"]


def train_env(devices: int = 1, cache: Path | None = None) -> dict:
    """The environment of a ``train.py`` subprocess: ``devices`` CPU devices, optionally a JAX persistent
    compilation cache shared by the subprocesses (same executables, so the same bits)."""
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2")
    return env


def train_cmd(run_dir: Path, *args: str) -> list[str]:
    """``python train.py --config configs/debug.yaml train.run_dir=<run_dir> <args>``."""
    return [sys.executable, str(ROOT / "train.py"), "--config", str(DEBUG_CONFIG), f"train.run_dir={run_dir}", *args]


def reference_cmd(run_dir: Path, extra=()) -> list[str]:
    """The reference run's command (:data:`REFERENCE_ARGS`) in ``run_dir``, plus ``extra`` overrides."""
    return train_cmd(run_dir, *REFERENCE_ARGS, *extra)


def finish_reference(run_dir: Path, cache: Path) -> str:
    """Run (or resume) the reference run in ``run_dir`` to its end; its stdout."""
    proc = subprocess.run(reference_cmd(run_dir), cwd=ROOT, env=train_env(cache=cache), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def logged_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a step logged twice (before and after a restart) must agree exactly."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "loss" not in entry or "event" in entry:
            continue
        step = entry["step"]
        assert out.get(step, entry["loss"]) == entry["loss"], f"step {step} logged with two different losses"
        out[step] = entry["loss"]
    return out
