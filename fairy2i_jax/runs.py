"""A training run directory on disk: its layout, its orbax checkpoints, and reading a trained model's params back.

Layout of ``run_dir`` (the one home of these names)::

    config.yaml          the resolved config of the run (written once; a resumed run must match it)
    checkpoints/<step>/  orbax items: ``state`` (params, optimizer state, step, rng, and ``teacher`` with a
                         frozen distillation teacher: StandardSave),
                         ``data`` (the grain iterator state, JSON, identical on every host) and
                         ``meta`` (step, tokens seen, the resolved config: JSON)
    metrics.jsonl, tensorboard/   see :mod:`fairy2i_jax.training.metrics`
    hf/                  the export written at the end of the run (default ``export.dir``)

The training loop writes it (:mod:`fairy2i_jax.training`); :mod:`fairy2i_jax.sources` reads a trained model back
with :meth:`RunCheckpoints.restore_params`, a partial restore of ``state["params"]`` alone (no optimizer moments
are read, so it needs neither the optimizer nor three times the model's memory).

Saves are asynchronous (``enable_async_checkpointing``), keep the newest ``keep`` steps, never overwrite an
existing step, and an interrupted save (process killed) leaves only an orbax temporary directory that is never
taken for a checkpoint. A checkpoint that cannot be read raises :class:`CheckpointCorruptError` naming the step
and the directory; nothing is deleted. Every restored leaf is checked against the expected shape and dtype.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml

from fairy2i_jax.errors import Fairy2iError
from fairy2i_jax.jsonl import iter_jsonl

logger = logging.getLogger(__name__)

Tree = Any
RUN_CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
DEFAULT_EXPORT = "hf"
RUN_OWNED = (RUN_CONFIG, CHECKPOINTS, METRICS, TENSORBOARD)  # what an export must never replace in a run dir
STATE_ITEM, PARAMS, TEACHER = "state", "params", "teacher"


class CheckpointCorruptError(Fairy2iError, RuntimeError):
    """A checkpoint exists but cannot be read or does not match the model (nothing was deleted)."""


class CheckpointWriteError(Fairy2iError, OSError):
    """A checkpoint that could not be written (full disk, permissions); earlier checkpoints are untouched."""


@contextlib.contextmanager
def _write_errors(directory: Path, step: int | None):
    """Turn a failed checkpoint write into one line: an OSError, or what orbax and tensorstore raise for one from
    their async threads (e.g. ``ValueError: OUT_OF_RANGE ... File too large [os_error_code='27']``)."""
    try:
        yield
    except Fairy2iError:
        raise
    except Exception as e:
        which = f"checkpoint {step}" if step is not None else "a checkpoint"
        first = (str(e).strip().splitlines() or [""])[0]
        reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {first}"
        if len(reason) > 300:  # tensorstore's messages end with the OS error ("File too large [os_error_code=27]")
            reason = f"{reason[:120]} ... {reason[-160:]}"
        raise CheckpointWriteError(f"{which} could not be written to {directory}: {reason}. Earlier "
                                   "checkpoints are untouched.") from e


class RunDirError(Fairy2iError, ValueError):
    """A path that is not a usable run directory (no config, garbled config, no such checkpoint)."""


def is_run_dir(path: str | os.PathLike) -> bool:
    """True for a ``train.py`` run directory: ``config.yaml`` and no ``config.json`` (an HF directory)."""
    path = Path(path)
    return path.is_dir() and (path / RUN_CONFIG).is_file() and not (path / "config.json").is_file()


def read_run_config(run_dir: str | os.PathLike) -> dict:
    """The mapping in ``<run_dir>/config.yaml``; :class:`RunDirError` naming the file when it is missing or garbled."""
    path = Path(run_dir) / RUN_CONFIG
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise RunDirError(f"{path}: cannot read the run's config ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise RunDirError(f"{path}: the run's config is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: the run's config must be a mapping, got {type(data).__name__}")
    return data


class RunCheckpoints:
    """Orbax ``CheckpointManager`` over ``<run_dir>/checkpoints`` with the items described in the module docstring."""

    def __init__(self, directory: str | Path, keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options,
                                                 item_names=("state", "data", "meta"))
        except Exception as e:  # orbax reads step metadata at start-up
            raise CheckpointCorruptError(f"cannot open the checkpoint directory {self.directory}: "
                                         f"{type(e).__name__}: {e}. Nothing was deleted.") from e

    def steps(self) -> list[int]:
        """Completed checkpoint steps, ascending."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Tree, data_state: dict, meta: dict) -> bool:
        """Start an (async) save of ``step``; False (and no write) when that step is already saved.
        :class:`CheckpointWriteError` when the save cannot be written (a full disk, permissions)."""
        if step in self.steps():
            logger.info("checkpoint %d already exists in %s: not overwritten", step, self.directory)
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))
        with _write_errors(self.directory, step):
            return bool(self.manager.save(step, args=args, force=True))

    def wait(self) -> None:
        """Block until pending async saves are committed (:class:`CheckpointWriteError` when one failed)."""
        with _write_errors(self.directory, None):
            self.manager.wait_until_finished()

    def restore(self, step: int, target: Tree) -> tuple[Tree, dict, dict]:
        """``(state, data_state, meta)`` of ``step`` restored into ``target`` (ShapeDtypeStructs with
        shardings); :class:`CheckpointCorruptError` when unreadable or mismatching."""
        where = f"checkpoint step {step} in {self.directory}"
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointCorruptError(
                f"{where} cannot be read ({type(e).__name__}: {_first_line(e)}). Nothing was deleted: move that "
                f"step directory away to resume from an earlier checkpoint ({self.steps()[:-1] or 'none'}), or "
                "use another train.run_dir to start afresh.") from e
        check_restored(restored["state"], target, where)
        if not isinstance(restored["data"], dict) or not isinstance(restored["meta"], dict):
            raise CheckpointCorruptError(f"{where}: the data or meta item is not a JSON object. Nothing was deleted.")
        return restored["state"], restored["data"], restored["meta"]

    def meta(self, step: int) -> dict:
        """The ``meta`` item of checkpoint ``step`` (step, tokens seen, the run's resolved config), nothing else
        read; :class:`CheckpointCorruptError` when it cannot be read."""
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointCorruptError(f"checkpoint step {step} in {self.directory}: its meta item cannot be read "
                                         f"({type(e).__name__}: {_first_line(e)}). Nothing was deleted.") from e
        meta = restored["meta"]
        if not isinstance(meta, dict):
            raise CheckpointCorruptError(f"checkpoint step {step} in {self.directory}: the meta item is not a JSON "
                                         "object. Nothing was deleted.")
        return meta

    def restore_params(self, step: int, target: Tree) -> Tree:
        """``state["params"]`` of checkpoint ``step`` restored into ``target`` (ShapeDtypeStructs with shardings),
        nothing else read; :class:`CheckpointCorruptError` when unreadable or mismatching."""
        where = f"checkpoint step {step} in {self.directory}"
        item = {PARAMS: target}
        restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), item)
        if step not in self.steps():
            raise CheckpointCorruptError(f"{where}: no such checkpoint (available: {self.steps()})")
        try:  # a standalone checkpointer: the manager's registry ties the item to StandardRestore
            restored = ocp.PyTreeCheckpointer().restore(self.directory / str(step) / STATE_ITEM, args=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True))
        except Exception as e:
            raise CheckpointCorruptError(f"{where} cannot be read ({type(e).__name__}: {_first_line(e)}). "
                                         "Nothing was deleted.") from e
        check_restored(restored, item, where)
        return restored[PARAMS]

    def close(self) -> None:
        with _write_errors(self.directory, None):
            self.manager.wait_until_finished()
            self.manager.close()


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:500] if text else ""


def check_restored(restored: Tree, target: Tree, where: str) -> None:
    """Every leaf present, with the expected shape and dtype (orbax can return partial trees silently)."""
    got = dict(_flat(restored))
    problems = []
    for path, want in _flat(target):
        leaf = got.get(path)
        if leaf is None:
            problems.append(f"{path}: missing")
        elif tuple(leaf.shape) != tuple(want.shape) or np.dtype(leaf.dtype) != np.dtype(want.dtype):
            problems.append(f"{path}: {leaf.dtype}{list(leaf.shape)}, expected {want.dtype}{list(want.shape)}")
        elif not isinstance(leaf, jax.Array):
            problems.append(f"{path}: not materialised ({type(leaf).__name__})")
    if problems:
        raise CheckpointCorruptError(f"{where} does not match the model: " + "; ".join(problems[:10])
                                     + (f" (+{len(problems) - 10} more)" if len(problems) > 10 else "")
                                     + ". Nothing was deleted.")


def _flat(tree: Tree) -> list[tuple[str, Any]]:
    return [(jax.tree_util.keystr(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON objects of ``<run_dir>/metrics.jsonl`` in order, a line torn by a killed run left out; [] without
    the file."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [entry for _, entry in iter_jsonl(path, skip_invalid=True) if isinstance(entry, dict)]


def _latest_checkpoint(run_dir: Path) -> int | None:
    steps = [int(p.name) for p in (run_dir / CHECKPOINTS).glob("*") if p.name.isdigit()]
    return max(steps) if steps else None


def run_summary(run_dir: str | Path, ppl: float | Mapping[str, float] | None = None,
                step: int | None = None) -> dict[str, Any]:
    """The training summary of a ``train.py`` run directory (for model cards), as plain data::

        {"run_dir", "model", "preset", "steps", "planned_steps", "tokens", "seq_len", "global_batch", "data",
         "lr", "schedule", "final_lr", "final_loss", "eval_loss", "ppl": {label: value} or None}

    ``steps``: ``step`` (the exported checkpoint) if given, else the last step logged, else the latest checkpoint;
    ``final_loss`` / ``final_lr``: logged at that step; ``tokens = steps * global_batch * seq_len``; ``lr``: the
    configured peak; ``ppl``: the ``{"event": "ppl", "name", "ppl"}`` lines the training loop records (the last per
    name), overridden by the ``ppl`` argument (a number is named ``trained``). :class:`RunDirError` without a
    readable ``config.yaml``."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    model, quant = cfg.get("model") or {}, cfg.get("quant") or {}
    data, opt, train = cfg.get("data") or {}, cfg.get("optimizer") or {}, cfg.get("train") or {}
    metrics = read_metrics(run_dir)
    steps = [m for m in metrics if "event" not in m and isinstance(m.get("step"), int)]
    if step is not None:
        steps = [m for m in steps if m["step"] <= step]
    last = max(steps, key=lambda m: m["step"]) if steps else {}
    evals = [m for m in metrics if m.get("event") == "eval" and "loss" in m
             and (step is None or m.get("step", 0) <= step)]
    ppls = {str(m.get("name") or m.get("label") or "trained"): float(m["ppl"])
            for m in metrics if m.get("event") == "ppl" and isinstance(m.get("ppl"), (int, float))}
    if ppl is not None:
        ppls.update({"trained": float(ppl)} if isinstance(ppl, (int, float)) else {k: float(v) for k, v in ppl.items()})
    n_steps = step if step is not None else last.get("step", _latest_checkpoint(run_dir))
    seq_len, batch = data.get("seq_len"), data.get("global_batch")
    train_data = data.get("train")
    return {
        "run_dir": str(run_dir), "model": model.get("path"), "preset": quant.get("preset"),
        "steps": n_steps, "planned_steps": train.get("steps"),
        "tokens": n_steps * batch * seq_len if None not in (n_steps, batch, seq_len) else None,
        "seq_len": seq_len, "global_batch": batch,
        "data": [train_data] if isinstance(train_data, str) else list(train_data or []),
        "lr": opt.get("lr"), "schedule": opt.get("schedule"), "final_lr": last.get("lr"),
        "final_loss": last.get("loss"), "eval_loss": evals[-1]["loss"] if evals else None,
        "ppl": ppls or None,
    }
