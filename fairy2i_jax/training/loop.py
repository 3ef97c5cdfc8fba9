"""The training loop: prepare, fresh start or resume, steps, finish.

:func:`run` (what ``train.py`` calls) does, in order:

1. :func:`prepare`: mesh, model source, architecture, tokenizer, corpora; ``data.seq_len`` checked against the
   model's positions and an existing run's ``config.yaml`` checked for compatibility (it must match, except the
   keys of ``RESUMABLE_CHANGES``). Nothing is written before all of this has passed.
2. The run directory: ``config.yaml`` (fresh runs), ``checkpoints/``, the metrics logger.
3. :func:`resume` restores the latest checkpoint (state, data-iterator position, the frozen teacher) into the
   abstract converted model; :func:`fresh_start` loads the real model, optionally reports its fp perplexity,
   converts it (``quant.preset``), keeps the real model as the frozen teacher when ``distill.teacher: frozen``
   (:mod:`fairy2i_jax.training.teacher`), reports the PTQ perplexity, and starts from step 0.
4. :func:`train_steps` until ``train.steps``: the next global batch (each host reads its own rows and the global
   array is assembled with ``jax.make_array_from_process_local_data``), the jitted step, metrics (loss, lr, grad
   norm, tokens/s, MFU) every ``log_every`` steps, held-out loss every ``eval_every`` steps, a checkpoint every
   ``checkpoint_every`` steps. A non-finite loss or gradient stops the run with :class:`TrainingDiverged`
   (the update was skipped and nothing is saved, so the last good checkpoint stays the latest). SIGTERM /
   SIGINT: the current step finishes, a checkpoint is saved, :func:`run` returns normally.
5. :func:`finish`: the held-out loss, the QAT perplexity, the HF export (``export.format``, into
   ``export.dir`` or ``<run_dir>/hf``, see :mod:`fairy2i_jax.hf.export`), and where everything is.

Perplexities are also recorded in ``metrics.jsonl`` as ``{"event": "ppl", "name": fp | ptq | trained, ...}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import yaml

from fairy2i_jax import runs, sources
from fairy2i_jax.config import ConfigError, to_dict
from fairy2i_jax.data import TokenizedCorpus, train_dataset
from fairy2i_jax.errors import Fairy2iError
from fairy2i_jax.runs import RunCheckpoints
from fairy2i_jax.training import setup
from fairy2i_jax.training.config import TrainConfig, incompatible_changes
from fairy2i_jax.training.metrics import RunLogger, mfu
from fairy2i_jax.training.optim import make_optimizer
from fairy2i_jax.training.reports import HeldOutLoss, check_process_rows, global_batch, perplexity
from fairy2i_jax.training.state import (
    ParamLayout,
    TrainState,
    abstract_state,
    init_state,
    param_count,
    state_shardings,
)
from fairy2i_jax.training.step import batch_sharding, jit_train_step, make_train_step
from fairy2i_jax.training.teacher import Teacher, abstract_teacher, frozen_teacher, teacher_shardings


class TrainingDiverged(Fairy2iError, RuntimeError):
    """A step produced a non-finite loss or gradient (the message names the step and the param)."""


@dataclasses.dataclass
class RunResult:
    """What a finished (or interrupted) run reports."""

    run_dir: Path
    step: int
    interrupted: bool = False
    ppl: dict[str, float] = dataclasses.field(default_factory=dict)
    eval_loss: float | None = None
    export_dir: Path | None = None


class StopFlag:
    """SIGTERM / SIGINT set a flag (restored handlers on exit); the loop saves and stops at the next step."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        """True on every process once any process got a signal."""
        flag = self.signal is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
        return flag


@dataclasses.dataclass
class RunContext:
    """Everything a run uses, built by :func:`prepare` (inputs) and :func:`open_run` (the run directory)."""

    cfg: TrainConfig
    run_dir: Path
    mesh: Any
    source: sources.ModelSource
    tokenizer: Any
    train_corpus: TokenizedCorpus
    held_out: TokenizedCorpus | None
    test_docs: list[str]
    say: Callable[[str], None]
    checkpoints: RunCheckpoints | None = None
    logger: RunLogger | None = None


def check_run_config(run_dir: Path, cfg: TrainConfig) -> None:
    """ConfigError when ``run_dir`` holds a run with an incompatible config: its ``config.yaml`` or, the reference
    for what is resumed, the config saved in its latest checkpoint (which stands even if config.yaml is gone)."""
    current = to_dict(cfg)
    if (run_dir / runs.RUN_CONFIG).exists():
        changed = incompatible_changes(runs.read_run_config(run_dir), current)
        if changed:
            raise ConfigError(f"{run_dir} holds a run with a different config ({', '.join(changed)} differ); use "
                              "another train.run_dir, or the saved config.yaml's values to resume")
    if not (run_dir / runs.CHECKPOINTS).is_dir():
        return
    checkpoints = RunCheckpoints(run_dir / runs.CHECKPOINTS, async_save=False)
    try:
        latest = checkpoints.latest_step()
        saved = checkpoints.meta(latest).get("config") if latest is not None else None
    finally:
        checkpoints.close()
    if isinstance(saved, dict):
        changed = incompatible_changes(saved, current)
        if changed:
            raise ConfigError(f"{run_dir / runs.CHECKPOINTS / str(latest)} was saved by a run with a different "
                              f"config ({', '.join(changed)} differ); resume with that config or use another "
                              "train.run_dir")


def write_run_config(run_dir: Path, cfg: TrainConfig) -> None:
    """Write ``config.yaml`` of a fresh run (atomically: other hosts may read it while it is written)."""
    path = run_dir / runs.RUN_CONFIG
    if path.exists() or jax.process_index() != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)


def prepare(cfg: TrainConfig) -> RunContext:
    """Check and load every input of the run (module docstring, step 1); writes nothing."""
    run_dir = Path(cfg.train.run_dir).absolute()
    main = jax.process_index() == 0
    say = (lambda msg: print(msg, flush=True)) if main else (lambda msg: None)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"train.run_dir = {cfg.train.run_dir!r} exists and is not a directory")
    mesh = setup.build_mesh(cfg)
    check_run_config(run_dir, cfg)
    source = setup.model_source(cfg)
    check_export_target(cfg, run_dir, source)
    mc = setup.model_config(cfg)
    setup.check_seq_len(cfg, mc)
    tokenizer = sources.load_source_tokenizer(source)
    sources.check_tokenizer(tokenizer, mc, cfg.model.path)
    train_corpus, held_out = setup.load_corpora(cfg, tokenizer)
    setup.check_corpus_fits(cfg, train_corpus)
    if cfg.optimizer.lr == 0:
        say("warning: optimizer.lr = 0: the steps run but no weight changes")
    return RunContext(cfg, run_dir, mesh, source, tokenizer, train_corpus, held_out,
                      setup.test_documents(cfg, tokenizer), say)


def export_target(cfg: TrainConfig, run_dir: Path) -> Path:
    """Where the end-of-run export goes: ``export.dir``, default ``<run_dir>/hf``."""
    return Path(cfg.export.dir).absolute() if cfg.export.dir else run_dir / runs.DEFAULT_EXPORT


def export_protected(run_dir: Path, source: sources.ModelSource) -> list[Path]:
    """What the end-of-run export must never touch: the run's checkpoints and the model source."""
    return [run_dir / runs.CHECKPOINTS, *([source.path] if source.path is not None else [])]


def check_export_target(cfg: TrainConfig, run_dir: Path, source: sources.ModelSource) -> None:
    """The end-of-run export's target refused before training when it could lose data (it is checked again when
    the export is written); an earlier export there is replaced."""
    from fairy2i_jax.hf.export import check_out_dir, is_export_dir

    if cfg.export.format == "none":
        return
    out = export_target(cfg, run_dir)
    if out.parent == run_dir and not run_dir.exists():
        return  # the default target of a new run: created with it, nothing there to lose
    check_out_dir(out, overwrite=is_export_dir(out), protected=export_protected(run_dir, source))


def open_run(ctx: RunContext, start_step: int) -> None:
    """The logger of ``ctx``'s run directory (created with its ``config.yaml`` by :func:`run`)."""
    ctx.logger = RunLogger(ctx.run_dir, total_steps=ctx.cfg.train.steps, start_step=start_step,
                           enabled=jax.process_index() == 0, progress=ctx.cfg.train.progress)


def _report_ppl(ctx: RunContext, result: RunResult, name: str, model, label: str) -> None:
    """Measure, record (``result.ppl[name]``, a ``ppl`` event in metrics.jsonl) and print ``label: value``."""
    value = perplexity(model, ctx.tokenizer, ctx.test_docs, ctx.cfg, progress=ctx.cfg.train.progress)
    if value is None:
        return
    result.ppl[name] = value
    ctx.logger.record({"event": "ppl", "name": name, "step": result.step, "ppl": value,
                       "max_tokens": ctx.cfg.eval.ppl_max_tokens, "seq_len": ctx.cfg.eval.ppl_seq_len})
    ctx.say(f"{label}: {value:.3f}")


def _before_label(cfg: TrainConfig, name: str) -> str:
    return (f"perplexity before training ({name}, data.test, official protocol, <= {cfg.eval.ppl_max_tokens} "
            "tokens)")


@dataclasses.dataclass
class Trainer:
    """The static parts of training a model: its layout, optimizer, schedule and state shardings, and the frozen
    teacher's shardings (None unless ``distill.teacher: frozen``)."""

    layout: ParamLayout
    tx: Any
    schedule: Any
    shardings: TrainState
    teacher_shardings: Teacher | None = None
    _held_out: HeldOutLoss | None = None

    def held_out_loss(self, ctx: RunContext) -> HeldOutLoss | None:
        """The held-out loss of ``ctx`` (compiled once), None without a held-out corpus."""
        if self._held_out is None and ctx.held_out is not None:
            self._held_out = HeldOutLoss(ctx.held_out, ctx.cfg, self.layout, self.shardings, ctx.mesh)
        return self._held_out

    @classmethod
    def for_model(cls, model, cfg: TrainConfig, mesh) -> "Trainer":
        layout = ParamLayout(model)
        tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps, layout.opt_groups(cfg.optimizer.coordinates))
        return cls(layout, tx, schedule, state_shardings(layout, tx, cfg.optimizer.coordinates, mesh),
                   teacher_shardings(model, mesh) if cfg.distill.frozen else None)


def fresh_start(ctx: RunContext, result: RunResult) -> tuple[Trainer, TrainState, Teacher | None]:
    """The converted pretrained model as a fresh train state, after the fp / PTQ perplexity reports, and the
    frozen teacher (the real model as loaded; None unless ``distill.teacher: frozen``)."""
    cfg = ctx.cfg
    real = setup.load_real_model(cfg, ctx.mesh)
    if cfg.eval.ppl_before and cfg.quant.spec.quantized:
        _report_ppl(ctx, result, "fp", real, _before_label(cfg, "fp"))
    model = setup.convert_for_training(cfg, real)
    teacher = frozen_teacher(real, ctx.mesh) if cfg.distill.frozen else None
    del real
    if cfg.eval.ppl_before:
        _report_ppl(ctx, result, "ptq", model, _before_label(cfg, "ptq"))
    trainer = Trainer.for_model(model, cfg, ctx.mesh)
    state, _ = init_state(trainer.layout, model, trainer.tx, cfg.optimizer.coordinates, cfg.train.seed, ctx.mesh,
                          copy=False)
    return trainer, state, teacher


def checkpoint_tree(state: TrainState, teacher: Teacher | None) -> dict:
    """The ``state`` item of a checkpoint: the train state's dict, plus the frozen teacher under
    :data:`fairy2i_jax.runs.TEACHER` when there is one."""
    return {**state.as_dict(), **({runs.TEACHER: teacher.as_dict()} if teacher is not None else {})}


def resume(ctx: RunContext, latest: int) -> tuple[Trainer, TrainState, dict, Teacher | None]:
    """``(trainer, state, data-iterator state, frozen teacher or None)`` of checkpoint ``latest``, restored into
    the abstract model (the teacher's exact bits from the checkpoint, see :mod:`fairy2i_jax.training.teacher`)."""
    cfg = ctx.cfg
    model = setup.abstract_training_model(cfg)
    trainer = Trainer.for_model(model, cfg, ctx.mesh)
    target = abstract_state(trainer.layout, trainer.tx, cfg.optimizer.coordinates, trainer.shardings)
    teacher_target = abstract_teacher(model, ctx.mesh) if cfg.distill.frozen else None
    tree, data_state, _ = ctx.checkpoints.restore(latest, checkpoint_tree(target, teacher_target))
    teacher = Teacher.from_dict(tree.pop(runs.TEACHER)) if teacher_target is not None else None
    state = TrainState.from_dict(tree)
    ctx.logger.record({"event": "resume", "step": latest})
    ctx.say(f"resumed from {ctx.checkpoints.directory}/{latest} (step {int(state.step)})")
    return trainer, state, data_state, teacher


def _copy(state: Any) -> Any:
    """A detached copy of a JSON-able iterator state."""
    return json.loads(json.dumps(state))


def _step_metrics(m: dict, tps: float | None, n_params: int) -> dict:
    return {"loss": float(m["loss"]), "ce": float(m["ce"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
            "tokens": float(m["tokens"]), "tokens_per_s": tps,
            "mfu": None if tps is None else mfu(n_params, tps, jax.devices()[0].device_kind, jax.device_count())}


def train_steps(ctx: RunContext, trainer: Trainer, state: TrainState, data_state: dict | None,
                result: RunResult, teacher: Teacher | None = None) -> TrainState:
    """Steps from ``state.step`` to ``train.steps`` (module docstring, step 4; ``teacher``: the frozen teacher,
    saved with every checkpoint); ``result.step`` / ``result.interrupted`` record where it stopped."""
    cfg, d, checkpoints, logger = ctx.cfg, ctx.cfg.data, ctx.checkpoints, ctx.logger
    step, n_params = int(jax.device_get(state.step)), param_count(state.params)
    it = iter(train_dataset(ctx.train_corpus, seq_len=d.seq_len, global_batch=d.global_batch, seed=d.seed,
                            process_index=jax.process_index(), process_count=jax.process_count()))
    if data_state is not None:
        it.set_state(data_state)
    shape = (d.global_batch, d.seq_len)
    bsh = batch_sharding(ctx.mesh, shape)
    check_process_rows(bsh, shape)
    step_fn = jit_train_step(make_train_step(trainer.layout, trainer.tx, trainer.schedule,
                                             coordinates=cfg.optimizer.coordinates, grad_accum=cfg.train.grad_accum,
                                             distill=cfg.distill, mesh=ctx.mesh, seq=cfg.mesh.seq_axis),
                             trainer.shardings, ctx.mesh, shape, trainer.teacher_shardings)
    held_out = trainer.held_out_loss(ctx) if cfg.train.eval_every else None

    def save(at: int, cur_state: TrainState, cur_data) -> None:
        meta = {"step": at, "tokens_seen": float(at * d.global_batch * d.seq_len), "config": to_dict(cfg)}
        if checkpoints.save(at, checkpoint_tree(cur_state, teacher), cur_data, meta):
            logger.write(f"checkpoint {at} -> {checkpoints.directory / str(at)}")

    with StopFlag() as stop:
        consumed = _copy(it.get_state())  # iterator state after exactly `step` batches
        if step < cfg.train.steps:
            batch_np, after_fetch = next(it), _copy(it.get_state())
        t_last, tokens_since, first = time.perf_counter(), 0, True
        while step < cfg.train.steps:
            state, metrics = step_fn(state, global_batch(batch_np, bsh, shape), teacher)
            consumed = after_fetch
            if step + 1 < cfg.train.steps:  # fetch the next batch while the device works
                batch_np, after_fetch = next(it), _copy(it.get_state())
            m = jax.device_get(metrics)
            if not bool(m["finite"]):
                leaf = trainer.layout.paths[int(m["bad_leaf"])] if int(m["bad_leaf"]) >= 0 else "(the loss itself)"
                raise TrainingDiverged(
                    f"step {step + 1}: non-finite loss ({float(m['loss'])}) or gradient; first non-finite "
                    f"gradient: {leaf}. The update was skipped and not saved; the last good checkpoint is "
                    f"{checkpoints.latest_step()} in {checkpoints.directory}")
            step += 1
            tokens_since += d.global_batch * d.seq_len
            if first:  # the first step of a process includes compilation: not a throughput sample
                first, t_last, tokens_since = False, time.perf_counter(), 0
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                now = time.perf_counter()
                logger.log_step(step, _step_metrics(m, tokens_since / (now - t_last) if tokens_since else None,
                                                    n_params))
                t_last, tokens_since = now, 0
            logger.advance()
            if held_out is not None and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                logger.log_eval(step, {"loss": held_out(state.params)})
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                save(step, state, consumed)
            if stop.requested():
                save(step, state, consumed)
                checkpoints.wait()
                logger.write(f"stopped by signal at step {step}; checkpoint saved in {checkpoints.directory}")
                result.interrupted = True
                break
        if not result.interrupted:
            save(step, state, consumed)
            checkpoints.wait()
    logger.end_progress()
    result.step = step
    return state


def finish(ctx: RunContext, trainer: Trainer, state: TrainState, result: RunResult) -> None:
    """Held-out loss, perplexity after training, the export, and where everything is (module docstring, step 5)."""
    cfg = ctx.cfg
    if ctx.held_out is not None and cfg.train.eval_batches:
        result.eval_loss = trainer.held_out_loss(ctx)(state.params)
        ctx.say(f"held-out loss after {result.step} steps: {result.eval_loss:.4f}")
    model = trainer.layout.merge(state.params)
    _report_ppl(ctx, result, "trained", model, f"perplexity after training ({cfg.quant.preset}, data.test)")
    ctx.say(f"run directory: {ctx.run_dir} (config.yaml, metrics.jsonl, tensorboard/, checkpoints/{result.step})")
    result.export_dir = export_run(model, cfg, ctx.run_dir, ctx.source, ctx.say, ppl=result.ppl)


def run(cfg: TrainConfig) -> RunResult:
    """Train (or resume) one run (module docstring)."""
    ctx = prepare(cfg)
    result = RunResult(run_dir=ctx.run_dir, step=0)
    write_run_config(ctx.run_dir, cfg)
    ctx.checkpoints = RunCheckpoints(ctx.run_dir / runs.CHECKPOINTS, keep=cfg.train.keep_checkpoints)
    latest = ctx.checkpoints.latest_step()
    open_run(ctx, latest or 0)
    try:
        try:
            if latest is None:
                trainer, state, teacher = fresh_start(ctx, result)
                data_state = None
            else:
                trainer, state, data_state, teacher = resume(ctx, latest)
            state = train_steps(ctx, trainer, state, data_state, result, teacher)
        finally:
            ctx.checkpoints.close()
        if not result.interrupted:
            finish(ctx, trainer, state, result)
    finally:
        ctx.logger.close()
    return result


def export_run(model, cfg: TrainConfig, run_dir: Path, source: sources.ModelSource, say,
               ppl: dict[str, float] | None = None) -> Path | None:
    """Export the trained model as ``export.format`` into ``export.dir`` (default ``<run_dir>/hf``); an earlier
    export there is replaced, any other non-empty directory refused. None when off or multi-process (then
    ``python -m fairy2i_jax.export``)."""
    from fairy2i_jax.hf.export import export_model, is_export_dir

    e = cfg.export
    if e.format == "none":
        return None
    if jax.process_count() > 1:
        say(f"HF export skipped in a multi-process run: python -m fairy2i_jax.export --from {run_dir} --out DIR")
        return None
    out = export_target(cfg, run_dir)
    card = sources.card_info(sources.resolve(str(run_dir)), ppl=ppl)
    result = export_model(model, out, e.format, dtype=None if e.dtype == "default" else e.dtype,
                          tokenizer_from=sources.tokenizer_files(source), overwrite=is_export_dir(out),
                          protected=export_protected(run_dir, source), progress=cfg.train.progress, model_card=card)
    loads = ("transformers.AutoModelForCausalLM" if e.format != "packed" else
             "transformers.AutoModelForCausalLM(trust_remote_code=True) or fairy2i_jax.sources.load")
    say(f"HF export ({e.format}, {result.size.total_bytes / 1e6:.1f} MB): {result.path} (loads with {loads})")
    return result.path
