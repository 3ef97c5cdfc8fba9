"""lm-eval 0.4 adapter: any logits function + tokenizer as an `lm_eval.api.model.TemplateLM`, and the registered
`fairy2i` model that lm-eval's own CLI runs.

`LogitsLM(logits_fn, tokenizer, ...)` answers lm-eval's requests through any logits function (a jitted JAX model,
a torch oracle). `Fairy2iLM` (`@register_model("fairy2i")`) builds one from model arguments: `pretrained=SOURCE`
(any model source of `fairy2i_jax.sources`), `quant=` (`trained` = the model as loaded, `fp`, or a PTQ preset
such as `w2`), `numerics=`, `head_fp=`, `compute_dtype=`, `max_length=`, `encoding=`. lm-eval 0.4 has no plugin
entry point for models, so the registration happens on import: `fairy2i-lm-eval` (=
`python -m fairy2i_jax.evaluation.lm_eval_cli`) imports this module and then runs lm-eval's own CLI:

    fairy2i-lm-eval run --model fairy2i --model_args pretrained=DIR,quant=w2 --tasks arc_easy

Context / continuation encoding for `loglikelihood` (reference G.2), chosen with `encoding=`:

- `"official"` (default; the Fairy2i / 1bitLLM adaptor): context and continuation are both `.strip()`ped; the
  context is `[BOS] + encode(context, add_special_tokens=False)` (no BOS when the tokenizer has none; the
  official code calls `encode(context, add_special_tokens=True)`, identical for Llama tokenizers, which add
  only BOS), an empty context becomes `[EOS]`; the continuation is `encode(continuation,
  add_special_tokens=False)`, encoded on its own. A continuation " Paris" is thus scored as the tokens of
  "Paris" without its leading space (with a sentencepiece tokenizer: as a word start, "▁Paris").
- `"harness"` (lm-eval 0.4 `HFLM`: `TemplateLM._encode_pair`, inherited): nothing is stripped; trailing spaces of the
  context move to the front of the continuation; `whole = encode(context + continuation)` and
  `ctx = encode(context)` with the tokenizer's default special tokens, and the continuation is `whole[len(ctx):]`
  (so the continuation keeps its leading space and merges across the boundary as the tokenizer does);
  an empty context becomes `[BOS]` (EOS when there is no BOS) unless the continuation already starts with it.

Scoring (both): `whole = (ctx + cont)[-(max_length + 1):]`, the model reads `whole[:-1]` (left-truncated to
`max_length` tokens) and the result is `(sum_t log p(cont_t | ...), every cont_t is the argmax)`. Requests are
batched longest first and answered in their original order.

`loglikelihood_rolling`: the text is encoded without special tokens and cut with lm-eval's own
`get_rolling_token_windows(tokens, prefix_token=BOS (else EOS), max_seq_len=max_length, context_len=1)` and
`make_disjoint_window`; each token is predicted exactly once, the first from BOS alone.

`generate_until`: greedy decoding, batched over requests, stopping at EOS, at any `until` string (the output
is cut before it), or after `max_gen_toks` tokens. Sampling arguments are ignored. With `model=` (the NNX
model behind the logits function) it uses the KV cache (`fairy2i_jax.generate.greedy_ids`: one prefill, then
jitted decode steps, stop strings checked every `GEN_CHUNK` tokens), the prompt left-truncated to
`max_length - max_gen_toks` tokens (as lm-eval's `HFLM`); without it, it re-runs the full forward through the
logits function for every new token (O(n^2) work; any logits function, e.g. a torch oracle), the input
left-truncated to the last `max_length` tokens at every step. Both give the same text when nothing is truncated.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Sequence

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from fairy2i_jax.errors import Fairy2iError
from fairy2i_jax.evaluation.logits import LogitsFn, default_buckets, jax_logits_fn, pad_rows, score_sequences
from fairy2i_jax.hf.tokenizer import pad_token_id

ENCODINGS = ("official", "harness")
GEN_CHUNK = 16  # decode steps between stop-string checks on the KV-cache path


def _prefix_id(tokenizer) -> int:
    """The token an empty context starts from: BOS, else EOS."""
    bos = tokenizer.bos_token_id
    return int(bos if bos is not None else tokenizer.eos_token_id)


def encode_official(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Official Fairy2i encoding (module docstring): stripped, BOS + context, continuation on its own."""
    context, continuation = context.strip(), continuation.strip()
    if context == "":
        ctx = [int(tokenizer.eos_token_id)]
    else:
        head = [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]
        ctx = head + list(tokenizer.encode(context, add_special_tokens=False))
    return ctx, list(tokenizer.encode(continuation, add_special_tokens=False))


class LogitsLM(TemplateLM):
    """An lm-eval `TemplateLM` over a logits function (`fairy2i_jax.evaluation.logits`) and an HF-style tokenizer."""

    def __init__(self, logits_fn: LogitsFn, tokenizer, max_length: int = 2048, batch_size: int = 8,
                 encoding: str = "official", max_gen_toks: int = 256, progress: bool = True, model=None):
        super().__init__()
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")
        if max_length < 2 or batch_size < 1 or max_gen_toks < 1:
            raise ValueError(f"need max_length >= 2, batch_size >= 1, max_gen_toks >= 1; got "
                             f"{max_length}, {batch_size}, {max_gen_toks}")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token (needed for empty contexts and generation)")
        fn_max = getattr(logits_fn, "max_length", None)
        if fn_max is not None and fn_max < max_length:
            raise ValueError(f"the logits function takes at most {fn_max} tokens, less than max_length={max_length}")
        self.logits_fn, self.tokenizer, self.encoding = logits_fn, tokenizer, encoding
        self.max_length, self.batch_size, self.max_gen_toks = int(max_length), int(batch_size), int(max_gen_toks)
        self.progress, self.model = progress, model
        self.pad_id = pad_token_id(tokenizer)

    # ------------------------------------------------------------------ encoding and scoring
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        """What an empty context starts from: BOS, else EOS."""
        return _prefix_id(self.tokenizer)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids with the tokenizer's default special tokens, or as `add_special_tokens` says."""
        flags = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return list(self.tokenizer.encode(string, **flags))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) under this adapter's `encoding` (module docstring)."""
        if self.encoding == "official":
            return encode_official(self.tokenizer, context, continuation)
        if context == "":  # TemplateLM.loglikelihood's rule for an empty context
            cont = self.tok_encode(continuation, add_special_tokens=False)
            prefix = self.prefix_token_id
            return (cont[:1], cont[1:]) if cont and cont[0] == prefix else ([prefix], cont)
        return self._encode_pair(context, continuation)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """TemplateLM's scoring hook: `((context, continuation), ctx ids, cont ids)` -> `score_pairs`."""
        results = self.score_pairs([(ctx, cont) for _, ctx, cont in requests])
        for (args, _, _), result in zip(requests, results):
            if args is not None:
                self.cache_hook.add_partial("loglikelihood", args, result)
        return results

    def score_pairs(self, pairs: Sequence[tuple[list[int], list[int]]],
                    desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is greedy) for token-id pairs, in input order."""
        seqs, scored = [], []
        for ctx, cont in pairs:
            if len(cont) > self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit max_length={self.max_length}")
            if not ctx and not cont:
                raise ValueError("empty context and continuation: nothing to condition on")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            mask = np.zeros(len(whole) - 1, bool)
            mask[len(mask) - len(cont):] = True
            seqs.append(np.asarray(whole, np.int32))
            scored.append(mask)
        sums, greedy, _ = score_sequences(self.logits_fn, seqs, scored, self.batch_size, self.pad_id,
                                          self.progress, desc)
        return [(float(s), bool(g)) for s, g in zip(sums, greedy)]

    # ------------------------------------------------------------------ lm-eval API
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """`req.args = (context, continuation)` -> (log-likelihood of the continuation, is greedy)."""
        return self._loglikelihood_tokens([(req.args, *self.encode_pair(*req.args)) for req in requests])

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """Disjoint (context, prediction) windows of `text` that predict every token once (module docstring)."""
        tokens = list(self.tokenizer.encode(text, add_special_tokens=False))
        windows = get_rolling_token_windows(token_list=tokens, prefix_token=_prefix_id(self.tokenizer),
                                            max_seq_len=self.max_length, context_len=1)
        return [make_disjoint_window(w) for w in windows]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """`req.args = (text,)` -> total log-likelihood of the text, conditioned on BOS (EOS without BOS)."""
        owners, pairs = [], []
        for k, req in enumerate(requests):
            for window in self.rolling_windows(req.args[0]):
                owners.append(k)
                pairs.append(window)
        totals = np.zeros(len(requests))
        for k, (logp, _) in zip(owners, self.score_pairs(pairs, desc="loglikelihood_rolling")):
            totals[k] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(total))
        return [float(t) for t in totals]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """`req.args = (context, gen_kwargs)` -> greedy continuation text (module docstring)."""
        jobs = [(k, *self._generation_job(*req.args)) for k, req in enumerate(requests)]
        jobs.sort(key=lambda job: -len(job[1]))
        out: list[str] = [""] * len(requests)
        batches = [jobs[i: i + self.batch_size] for i in range(0, len(jobs), self.batch_size)]
        for batch in tqdm(batches, desc="generate_until", disable=not self.progress):
            greedy = self._greedy_batch if self.model is None else self._cached_batch
            texts = greedy([job[1] for job in batch], [job[2] for job in batch], [job[3] for job in batch])
            for job, text in zip(batch, texts):
                out[job[0]] = text
        return out

    # ------------------------------------------------------------------ generation helpers
    def _generation_job(self, context: str, gen_kwargs: dict[str, Any] | None) -> tuple[list[int], list[str], int]:
        """(prompt ids, stop strings, token budget) of one `generate_until` request."""
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        budget = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        if self.encoding == "official":
            head = [] if self.tokenizer.bos_token_id is None else [int(self.tokenizer.bos_token_id)]
            ids = head + list(self.tokenizer.encode(context, add_special_tokens=False))
        else:
            ids = list(self.tokenizer.encode(context))
        return ids, until, budget

    def _greedy_batch(self, prompts: list[list[int]], untils: list[list[str]], budgets: list[int]) -> list[str]:
        """Greedy decoding of several prompts at once, one full forward per new token."""
        eos = int(self.tokenizer.eos_token_id)
        generated: list[list[int]] = [[] for _ in prompts]
        active = [k for k in range(len(prompts)) if budgets[k] > 0]
        while active:
            inputs = [(prompts[k] + generated[k])[-self.max_length:] for k in active]
            ids, mask = pad_rows(inputs, self.pad_id)
            logits = np.asarray(self.logits_fn(ids, mask))
            still = []
            for row, k in enumerate(active):
                token = int(np.argmax(logits[row, len(inputs[row]) - 1]))
                if token == eos:
                    continue
                generated[k].append(token)
                text = self.tokenizer.decode(generated[k])
                if len(generated[k]) < budgets[k] and not any(s in text for s in untils[k]):
                    still.append(k)
            active = still
        return [_cut_at_stop(self.tokenizer.decode(g), u) for g, u in zip(generated, untils)]

    def _cached_batch(self, prompts: list[list[int]], untils: list[list[str]], budgets: list[int]) -> list[str]:
        """Greedy decoding of several prompts at once with the model's KV cache (module docstring)."""
        from fairy2i_jax.generate import greedy_ids

        eos = int(self.tokenizer.eos_token_id)
        run = [k for k, b in enumerate(budgets) if b > 0]  # a budget of 0 generates nothing
        if not run:
            return [""] * len(prompts)
        budgets = [min(budgets[k], self.max_length - 1) for k in run]
        inputs = [prompts[k][-(self.max_length - b):] for k, b in zip(run, budgets)]

        def stop(j: int, ids: list[int]) -> bool:
            return any(s and s in self.tokenizer.decode(ids) for s in untils[run[j]])

        new = greedy_ids(self.model, inputs, budgets, eos_id=eos, pad_id=self.pad_id, batch_size=self.batch_size,
                         chunk=GEN_CHUNK, stop=stop if any(untils) else None)
        out = [""] * len(prompts)
        for k, ids in zip(run, new):
            out[k] = _cut_at_stop(self.tokenizer.decode([t for t in ids if t != eos]), untils[k])
        return out


def _cut_at_stop(text: str, until: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            idx = text.find(stop)
            if idx >= 0:
                cut = min(cut, idx)
    return text[:cut]


class ModelArgsError(Fairy2iError, ValueError):
    """A ``--model_args`` entry of ``--model fairy2i`` that does not exist or does not fit."""


class ModelArgsError(Fairy2iError, ValueError):
    """A ``--model_args`` entry of ``--model fairy2i`` that does not exist or does not fit."""


@register_model("fairy2i")
class Fairy2iLM(LogitsLM):
    """lm-eval's ``--model fairy2i`` (module docstring): a model source, evaluated as ``quant``, behind a jitted
    logits function with the KV cache for generation. lm-eval also passes ``device`` / ``max_batch_size``, which do
    not apply (JAX places the model)."""

    def __init__(self, pretrained: str, quant: str = "trained", numerics: str = "bf16_exact", head_fp: bool = False,
                 compute_dtype: str = "float32", max_length: int = 2048, batch_size: int | str = 8,
                 encoding: str = "official", max_gen_toks: int = 256, device: Any = None,
                 max_batch_size: Any = None, **unknown):
        from fairy2i_jax import sources
        from fairy2i_jax.convert import evaluation_model

        if unknown:
            raise ModelArgsError(f"unknown fairy2i model_args {sorted(unknown)}; known: pretrained, quant, numerics, "
                                 "head_fp, compute_dtype, max_length, batch_size, encoding, max_gen_toks")
        loaded = sources.load(pretrained, param_dtype="float32", compute_dtype=compute_dtype)
        model = evaluation_model(loaded.model, quant, numerics=numerics, lm_head=not _flag(head_fp))
        batch = 8 if str(batch_size).startswith("auto") else int(batch_size)
        fn = jax_logits_fn(model, buckets=default_buckets(int(max_length), 64), batch_size=batch,
                           pad_id=pad_token_id(loaded.tokenizer))
        super().__init__(fn, loaded.tokenizer, max_length=int(max_length), batch_size=batch, encoding=encoding,
                         max_gen_toks=int(max_gen_toks), model=model)


def _flag(value: Any) -> bool:
    """A boolean model argument: ``True`` / ``"true"`` / ``"1"`` (lm-eval passes strings from the command line)."""
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


def resolve_tasks(names: Sequence[str], include_path: str | os.PathLike | Sequence[str] | None = None,
                  include_defaults: bool = True):
    """An `lm_eval.tasks.TaskManager` that knows every name in `names`, else one ValueError listing the unknown.

    `include_path`: directories (or YAML files) with local task configs; `include_defaults=False` skips indexing
    lm-eval's ~15k built-in tasks (about 10 s). A name may also be a path to a task YAML file.
    """
    from lm_eval.tasks import TaskManager

    if isinstance(names, str):
        names = [names]
    paths = [] if include_path is None else (
        [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path))
    missing_paths = [os.fspath(p) for p in paths if not os.path.exists(p)]
    if missing_paths:
        raise ValueError(f"lm-eval include_path does not exist: {missing_paths}")
    manager = TaskManager(include_path=[os.fspath(p) for p in paths] or None, include_defaults=include_defaults)
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known and not os.path.isfile(n)]
    if unknown:
        hints = {n: difflib.get_close_matches(n, manager.all_tasks, n=3) for n in unknown}
        hint = "; ".join(f"{n!r}: did you mean {h}?" for n, h in hints.items() if h)
        where = ("lm-eval's built-in tasks" if include_defaults else "no built-in tasks") + (
            f" and {[os.fspath(p) for p in paths]}" if paths else "")
        raise ValueError(f"unknown lm-eval task(s) {unknown} (searched {where})" + (f"; {hint}" if hint else ""))
    return manager


def evaluate_tasks(lm: TemplateLM, tasks: Sequence[str], include_path=None, include_defaults: bool = True,
                   num_fewshot: int | None = None, limit: int | float | None = None, **kwargs) -> dict:
    """`lm_eval.simple_evaluate` on `lm` for `tasks`, after `resolve_tasks` has checked the names."""
    import lm_eval

    manager = resolve_tasks(tasks, include_path, include_defaults)
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot,
                                   limit=limit, **kwargs)
