"""What a run measures besides the training loss: the perplexity report on ``data.test`` and the held-out loss."""

from __future__ import annotations

import jax
import numpy as np

from fairy2i_jax.data import eval_dataset
from fairy2i_jax.errors import Fairy2iError
from fairy2i_jax.hf.tokenizer import pad_token_id
from fairy2i_jax.training.config import TrainConfig
from fairy2i_jax.training.step import batch_sharding, make_eval_fns


def global_batch(local: dict[str, np.ndarray], sharding, global_shape) -> dict[str, jax.Array]:
    """The global ``jax.Array`` batch from this host's rows (``jax.make_array_from_process_local_data``)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), global_shape) for k, v in local.items()}


def check_process_rows(sharding, global_shape) -> None:
    """:class:`~fairy2i_jax.errors.Fairy2iError` unless this process's devices hold rows ``h*L .. (h+1)*L - 1`` of
    a global batch (``L`` = rows per host), the rows :mod:`fairy2i_jax.data.pipeline` gives host ``h``: true on
    meshes built from ``jax.devices()`` (process-major)."""
    n, h = jax.process_count(), jax.process_index()
    rows = sorted({r for idx in sharding.addressable_devices_indices_map(tuple(global_shape)).values()
                   for r in range(*idx[0].indices(global_shape[0]))})
    per = global_shape[0] // n
    if rows != list(range(h * per, (h + 1) * per)):
        raise Fairy2iError(f"process {h} of {n}: the mesh puts this process's devices at global batch rows "
                           f"{rows[:3]}..{rows[-3:]}, but its data are rows {h * per}..{(h + 1) * per - 1}; build the "
                           "mesh from jax.devices() in order (process-major)")


def perplexity(model, tokenizer, documents: list, cfg: TrainConfig, progress: bool = False) -> float | None:
    """Official packed perplexity (corrected: per scored token) on the first ``eval.ppl_max_tokens`` tokens
    of the test documents (whole chunks until the cap is reached); None when disabled or multi-process."""
    from fairy2i_jax.evaluation.logits import jax_logits_fn
    from fairy2i_jax.evaluation.perplexity import evaluate_perplexity, official_packed_chunks

    e = cfg.eval
    if e.ppl_max_tokens == 0 or not documents:
        return None
    if jax.process_count() > 1:
        if jax.process_index() == 0:
            print("perplexity report skipped: multi-process run (use eval.py on the run directory)", flush=True)
        return None
    kept, total = [], 0
    for chunk in official_packed_chunks(documents, tokenizer, e.ppl_seq_len, source="data.test"):
        if total >= e.ppl_max_tokens:
            break
        kept.append(chunk)
        total += len(chunk)
    pad = pad_token_id(tokenizer)
    fn = jax_logits_fn(model, buckets=(e.ppl_seq_len,), batch_size=e.ppl_batch, pad_id=pad)
    result = evaluate_perplexity(fn, kept, batch_size=e.ppl_batch, protocol="official",
                                 eos_id=tokenizer.eos_token_id, pad_id=pad, progress=progress, source="data.test")
    return result.ppl


class HeldOutLoss:
    """Held-out loss: mean CE over the first ``train.eval_batches`` batches of the held-out corpus, with the
    weights quantized once per evaluation."""

    def __init__(self, corpus, cfg: TrainConfig, layout, shardings, mesh):
        n = jax.process_count()
        self.batch = max(cfg.data.global_batch // cfg.train.grad_accum // n, 1) * n
        self.corpus, self.cfg = corpus, cfg
        self.shape = (self.batch, cfg.data.seq_len)
        self.sharding = batch_sharding(mesh, self.shape)
        check_process_rows(self.sharding, self.shape)
        self.weights_fn, self.eval_fn = make_eval_fns(layout, shardings, mesh, self.shape, seq=cfg.mesh.seq_axis)

    def __call__(self, params) -> float:
        ds = eval_dataset(self.corpus, seq_len=self.cfg.data.seq_len, global_batch=self.batch,
                          process_index=jax.process_index(), process_count=jax.process_count())
        weights = self.weights_fn(params)
        nll = count = 0.0
        for i, local in enumerate(ds):
            if i >= self.cfg.train.eval_batches:
                break
            s, c = self.eval_fn(params, weights, global_batch(local, self.sharding, self.shape))
            nll, count = nll + float(s), count + float(c)
        return nll / max(count, 1.0)
