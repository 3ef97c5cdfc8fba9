"""The training loop: setup or resume, steps, held-out loss, checkpoints, signals, perplexity reports.

:func:`run` (what ``train.py`` calls) does, in order:

1. Mesh, tokenizer, corpora; ``data.seq_len`` checked against the model's positions.
2. If ``<run_dir>/checkpoints`` has a checkpoint: restore the latest (state, data-iterator position) into the
   abstract converted model (the saved ``config.yaml`` must match, except the keys of
   ``RESUMABLE_CHANGES``). Otherwise: load the real model, optionally report its fp perplexity, convert it
   (``quant.preset``) and report the PTQ perplexity, and start from step 0.
3. Steps until ``train.steps``: the next global batch (each host reads its own rows and the global array is
   assembled with ``jax.make_array_from_process_local_data``), the jitted step, metrics (loss, lr, grad norm,
   tokens/s, MFU) every ``log_every`` steps, held-out loss every ``eval_every`` steps, a checkpoint every
   ``checkpoint_every`` steps. A non-finite loss or gradient stops the run with :class:`TrainingDiverged`
   (the update was skipped and nothing is saved, so the last good checkpoint stays the latest).
4. SIGTERM / SIGINT: the current step finishes, a checkpoint is saved, :func:`run` returns normally.
5. At the end: a checkpoint, the held-out loss, the QAT perplexity, the HF export (``export.format``, into
   ``export.dir`` or ``<run_dir>/hf``, see :mod:`fairy2i_jax.hf.export`), and where everything is.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

from fairy2i_jax.config import ConfigError, to_dict
from fairy2i_jax.data import eval_dataset, train_dataset
from fairy2i_jax.training import setup
from fairy2i_jax.training.checkpoint import RunCheckpoints
from fairy2i_jax.training.config import TrainConfig, incompatible_changes
from fairy2i_jax.training.metrics import RunLogger, mfu
from fairy2i_jax.training.optim import make_optimizer
from fairy2i_jax.training.state import ParamLayout, abstract_state, init_state, param_count, state_shardings
from fairy2i_jax.training.step import batch_sharding, jit_train_step, make_eval_fns, make_train_step


class TrainingDiverged(RuntimeError):
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


def _global_batch(local: dict[str, np.ndarray], sharding, global_shape) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), global_shape) for k, v in local.items()}


def write_run_config(run_dir: Path, cfg: TrainConfig) -> None:
    """Write ``config.yaml`` (fresh run) or check the saved one is compatible (resumed run)."""
    path = run_dir / "config.yaml"
    current = to_dict(cfg)
    if path.exists():
        saved = yaml.safe_load(path.read_text()) or {}
        changed = incompatible_changes(saved, current)
        if changed:
            raise ConfigError(f"{run_dir} holds a run with a different config ({', '.join(changed)} differ); use "
                              "another train.run_dir, or the saved config.yaml's values to resume")
        return
    if jax.process_index() == 0:  # atomic: other hosts may read it while it is written
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(current, sort_keys=False))
        os.replace(tmp, path)


def perplexity(model, tokenizer, documents: list[str], cfg: TrainConfig) -> float | None:
    """Official packed perplexity (corrected: per scored token) on the first ``eval.ppl_max_tokens`` tokens
    of the test documents; None when disabled or multi-process."""
    from fairy2i_jax.evaluation.logits import jax_logits_fn
    from fairy2i_jax.evaluation.perplexity import evaluate_perplexity, official_packed_chunks

    e = cfg.eval
    if e.ppl_max_tokens == 0 or not documents:
        return None
    if jax.process_count() > 1:
        if jax.process_index() == 0:
            print("perplexity report skipped: multi-process run (use eval.py on the run directory)", flush=True)
        return None
    chunks = official_packed_chunks(documents, tokenizer, e.ppl_seq_len, source="data.test")
    kept, total = [], 0
    for chunk in chunks:
        if total >= e.ppl_max_tokens:
            break
        kept.append(chunk)
        total += len(chunk)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    fn = jax_logits_fn(model, buckets=(e.ppl_seq_len,), batch_size=e.ppl_batch, pad_id=int(pad))
    result = evaluate_perplexity(fn, kept, batch_size=e.ppl_batch, protocol="official",
                                 eos_id=tokenizer.eos_token_id, pad_id=int(pad), progress=False, source="data.test")
    return result.ppl


class Evaluator:
    """Held-out loss: mean CE over the first ``train.eval_batches`` batches of the held-out corpus."""

    def __init__(self, corpus, cfg: TrainConfig, layout, shardings, mesh):
        n = jax.process_count()
        self.batch = max(cfg.data.global_batch // cfg.train.grad_accum // n, 1) * n
        self.corpus, self.cfg, self.mesh = corpus, cfg, mesh
        shape = (self.batch, cfg.data.seq_len)
        self.sharding = batch_sharding(mesh, shape)
        self.shape = shape
        self.weights_fn, self.eval_fn = make_eval_fns(layout, shardings, mesh, shape)

    def __call__(self, params) -> float:
        ds = eval_dataset(self.corpus, seq_len=self.cfg.data.seq_len, global_batch=self.batch,
                          process_index=jax.process_index(), process_count=jax.process_count())
        weights = self.weights_fn(params)
        nll = count = 0.0
        for i, local in enumerate(ds):
            if i >= self.cfg.train.eval_batches:
                break
            s, c = self.eval_fn(params, weights, _global_batch(local, self.sharding, self.shape))
            nll, count = nll + float(s), count + float(c)
        return nll / max(count, 1.0)


def _initial_state(cfg, mesh, checkpoints, latest, tokenizer, test_docs, result: RunResult, say):
    """``(layout, tx, schedule, shardings, state, data_state)``: a fresh state from the converted pretrained
    model (with the fp / PTQ perplexity reports), or the ``latest`` checkpoint restored into the abstract model."""
    coords = cfg.optimizer.coordinates
    if latest is None:
        real = setup.load_real_model(cfg, mesh)
        if cfg.eval.ppl_before and cfg.quant.preset not in ("fp", "none"):
            result.ppl["fp"] = perplexity(real, tokenizer, test_docs, cfg)
        model = setup.convert_for_training(cfg, real)
        del real
        if cfg.eval.ppl_before:
            result.ppl["ptq"] = perplexity(model, tokenizer, test_docs, cfg)
        for name, value in result.ppl.items():
            if value is not None:
                say(f"perplexity before training ({name}, data.test, official protocol, "
                    f"<= {cfg.eval.ppl_max_tokens} tokens): {value:.3f}")
    else:
        model = setup.abstract_training_model(cfg)
    layout = ParamLayout(model)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    shardings = state_shardings(layout, tx, coords, mesh)
    if latest is None:
        state, _ = init_state(layout, model, tx, coords, cfg.train.seed, mesh, copy=False)
        return layout, tx, schedule, shardings, state, None
    state, data_state, _ = checkpoints.restore(latest, abstract_state(layout, tx, coords, shardings))
    say(f"resumed from {checkpoints.directory}/{latest} (step {int(state['step'])})")
    return layout, tx, schedule, shardings, state, data_state


def run(cfg: TrainConfig) -> RunResult:
    """Train (or resume) one run (module docstring)."""
    run_dir = Path(cfg.train.run_dir).absolute()
    main = jax.process_index() == 0
    say = (lambda msg: print(msg, flush=True)) if main else (lambda msg: None)
    mesh = setup.build_mesh(cfg)
    write_run_config(run_dir, cfg)
    checkpoints = RunCheckpoints(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
    latest = checkpoints.latest_step()
    setup.check_seq_len(cfg, setup.model_config(cfg))
    tokenizer = setup.load_tokenizer_for(cfg)
    train_corpus, held_out = setup.load_corpora(cfg, tokenizer)
    test_docs = setup.test_documents(cfg)
    result = RunResult(run_dir=run_dir, step=0)

    layout, tx, schedule, shardings, state, data_state = _initial_state(
        cfg, mesh, checkpoints, latest, tokenizer, test_docs, result, say)
    step = int(jax.device_get(state["step"]))
    n_params = param_count(state["params"])

    d = cfg.data
    ds = train_dataset(train_corpus, seq_len=d.seq_len, global_batch=d.global_batch, seed=d.seed,
                       process_index=jax.process_index(), process_count=jax.process_count())
    it = iter(ds)
    if data_state is not None:
        it.set_state(data_state)
    shape = (d.global_batch, d.seq_len)
    bsh = batch_sharding(mesh, shape)
    step_fn = jit_train_step(make_train_step(layout, tx, schedule, coordinates=cfg.optimizer.coordinates,
                                             grad_accum=cfg.train.grad_accum,
                                             distill=cfg.distill, mesh=mesh), shardings, mesh, shape)
    evaluator = Evaluator(held_out, cfg, layout, shardings, mesh) if held_out is not None else None
    logger = RunLogger(run_dir, total_steps=cfg.train.steps, start_step=step, enabled=main,
                       progress=cfg.train.progress)
    if latest is not None:
        logger.record({"event": "resume", "step": step})
    device_kind, n_dev = jax.devices()[0].device_kind, jax.device_count()
    leaf_paths = layout.leaf_paths()

    def meta(at: int, tokens: float) -> dict:
        return {"step": at, "tokens_seen": tokens, "config": to_dict(cfg)}

    def save(at: int, cur_state, cur_data) -> None:
        if checkpoints.save(at, cur_state, cur_data, meta(at, float(at * d.global_batch * d.seq_len))):
            logger.write(f"checkpoint {at} -> {checkpoints.directory / str(at)}")

    try:
        with StopFlag() as stop:
            consumed = _copy(it.get_state())  # iterator state after exactly `step` batches
            if step < cfg.train.steps:
                batch_np = next(it)
                after_fetch = _copy(it.get_state())
            t_last, tokens_since, first = time.perf_counter(), 0, True
            while step < cfg.train.steps:
                state, metrics = step_fn(state, _global_batch(batch_np, bsh, shape))
                consumed = after_fetch
                if step + 1 < cfg.train.steps:  # fetch the next batch while the device works
                    batch_np = next(it)
                    after_fetch = _copy(it.get_state())
                m = jax.device_get(metrics)
                if not bool(m["finite"]):
                    leaf = leaf_paths[int(m["bad_leaf"])] if int(m["bad_leaf"]) >= 0 else "(the loss itself)"
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
                    tps = tokens_since / (now - t_last) if tokens_since else None
                    t_last, tokens_since = now, 0
                    logger.log_step(step, {"loss": float(m["loss"]), "ce": float(m["ce"]), "lr": float(m["lr"]),
                                           "grad_norm": float(m["grad_norm"]), "tokens": float(m["tokens"]),
                                           "tokens_per_s": tps,
                                           "mfu": None if tps is None else mfu(n_params, tps, device_kind, n_dev)})
                logger.advance()
                if evaluator and cfg.train.eval_every and step % cfg.train.eval_every == 0 \
                        and step < cfg.train.steps:
                    logger.log_eval(step, {"loss": evaluator(state["params"])})
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
    finally:
        checkpoints.close()
        logger.close()
    result.step = step
    if result.interrupted:
        return result
    if evaluator is not None and cfg.train.eval_batches:
        result.eval_loss = evaluator(state["params"])
        say(f"held-out loss after {step} steps: {result.eval_loss:.4f}")
    qat = perplexity(layout.merge(state["params"]), tokenizer, test_docs, cfg)
    if qat is not None:
        result.ppl["trained"] = qat
        say(f"perplexity after training ({cfg.quant.preset}, data.test): {qat:.3f}")
    say(f"run directory: {run_dir} (config.yaml, metrics.jsonl, tensorboard/, checkpoints/{step})")
    result.export_dir = export_run(layout.merge(state["params"]), cfg, run_dir, say)
    return result


def export_run(model, cfg: TrainConfig, run_dir: Path, say) -> Path | None:
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
    out = Path(e.dir).absolute() if e.dir else run_dir / "hf"
    source = None if cfg.model.path == setup.TINY_RANDOM else setup.resolve_model_path(cfg.model.path)
    result = export_model(model, out, e.format, dtype=None if e.dtype == "default" else e.dtype,
                          tokenizer_from=source, overwrite=is_export_dir(out), protected=[run_dir / "checkpoints"],
                          progress=cfg.train.progress)
    loads = "transformers.AutoModelForCausalLM" if e.format != "packed" else "fairy2i_jax.load_pretrained"
    say(f"HF export ({e.format}, {result.size.total_bytes / 1e6:.1f} MB): {result.path} (loads with {loads})")
    return result.path


def _copy(state: Any) -> Any:
    """A detached copy of a JSON-able iterator state."""
    import json

    return json.loads(json.dumps(state))


def load_run(run_dir: str | Path, step: int | None = None):
    """``(model, tokenizer, config)`` from a run directory: the converted model with the params of checkpoint
    ``step`` (default: the latest), for evaluation. Raises ValueError when the directory holds no checkpoint."""
    from fairy2i_jax.config import load_config

    run_dir = Path(run_dir)
    cfg = load_config(TrainConfig, run_dir / "config.yaml")
    mesh = setup.build_mesh(cfg)
    checkpoints = RunCheckpoints(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
    try:
        step = checkpoints.latest_step() if step is None else step
        if step is None or step not in checkpoints.steps():
            raise ValueError(f"{run_dir}: no checkpoint {'at all' if step is None else step} "
                             f"(available: {checkpoints.steps()})")
        layout = ParamLayout(setup.abstract_training_model(cfg))
        tx, _ = make_optimizer(cfg.optimizer, cfg.train.steps)
        shardings = state_shardings(layout, tx, cfg.optimizer.coordinates, mesh)
        state, _, _ = checkpoints.restore(step, abstract_state(layout, tx, cfg.optimizer.coordinates, shardings))
    finally:
        checkpoints.close()
    return layout.merge(state["params"]), setup.load_tokenizer_for(cfg), cfg
