"""Greedy generation with the model's static KV cache: one jitted prefill, then a jitted `lax.while_loop` decode.

`generate(model, tokenizer, max_new_tokens, prompt="...")` returns the continuation text;
`generate(model, ids, max_new_tokens)` (one id list, or a list of them) returns the new token ids. Both run
`greedy_ids`:

1. Prompts are left-padded to a shape bucket P (a power of two >= 16) and batched; the cache has
   `P + N` slots, N = the token budget rounded up to a power of two, so XLA compiles once per (batch, P, N).
   Padding slots are invalid keys and the positions of real tokens start at 0 (`CausalLM` derives them from
   the attention mask), so a padded row decodes exactly as it would alone.
2. Prefill: one forward over the whole prompt fills the cache; the argmax at the last slot is token 1.
3. Decode: a `lax.while_loop` feeds the last token back, one slot per step, until every row is done (EOS
   emitted, or its budget used) or `chunk` steps have run. With a `stop` callback the loop runs in chunks of
   `chunk` steps and `stop(row, ids)` is asked on the host between chunks (e.g. for stop strings).

The effective weights (`CausalLM.effective_weights`) are computed once per call and passed to every forward,
so a QAT model is quantized once, not once per token. Tokens after a row's EOS are never returned; the EOS
itself is (as transformers' `generate` does); `generate` with a tokenizer decodes without special tokens.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fairy2i_jax.hf.tokenizer import pad_token_id

MIN_BUCKET = 16


def _bucket(n: int) -> int:
    """The smallest power of two >= max(n, MIN_BUCKET)."""
    size = MIN_BUCKET
    while size < n:
        size *= 2
    return size


@functools.partial(jax.jit, static_argnums=0)
def _prefill(graphdef, state, weights, ids, mask, cache):
    """Forward over the left-padded prompts -> (greedy next token int32[B], filled cache)."""
    logits, cache = nnx.merge(graphdef, state)(ids, attention_mask=mask, cache=cache, weights=weights)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnums=(0, 1))
def _decode(graphdef, chunk, state, weights, cache, token, done, count, budget, eos_ids, pad_id):
    """Up to `chunk` greedy steps. `token [B]`: last emitted token; `count [B]`: tokens emitted so far;
    a row is done after EOS or when `count == budget`. Returns (tokens int32[B, chunk] (pad after done), steps
    run, cache, last token, done, count)."""
    model = nnx.merge(graphdef, state)
    batch = token.shape[0]
    out = jnp.full((batch, chunk), pad_id, jnp.int32)
    ones = jnp.ones((batch, 1), jnp.int32)

    def cond(carry):
        step, _, _, done, _, _ = carry
        return (step < chunk) & ~jnp.all(done)

    def body(carry):
        step, cache, token, done, count, out = carry
        logits, cache = model(token[:, None], attention_mask=ones, cache=cache, weights=weights)
        nxt = jnp.where(done, pad_id, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32))
        out = out.at[:, step].set(nxt)
        count = count + (~done).astype(jnp.int32)
        done = done | jnp.isin(nxt, eos_ids) | (count >= budget)
        return step + 1, cache, nxt, done, count, out

    step, cache, token, done, count, out = jax.lax.while_loop(
        cond, body, (jnp.zeros((), jnp.int32), cache, token, done, count, out))
    return out, step, cache, token, done, count


def _eos_array(eos_id) -> np.ndarray:
    """EOS ids as an int32 array (`None` -> [-1], which no token equals)."""
    if eos_id is None:
        return np.array([-1], np.int32)
    return np.atleast_1d(np.asarray(eos_id, np.int32))


def _left_pad(prompts: Sequence[Sequence[int]], rows: int, length: int, pad_id: int):
    """(ids int32[rows, length], mask int32[rows, length]) with each prompt right-aligned; extra rows are a
    single pad token (filler for a fixed batch size)."""
    ids = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    for r in range(rows):
        p = list(prompts[r]) if r < len(prompts) else [pad_id]
        ids[r, length - len(p):], mask[r, length - len(p):] = p, 1
    return ids, mask


def _run_batch(graphdef, state, weights, model, prompts, budgets, rows, eos, pad_id, chunk, stop):
    """Greedy decode of one batch (at most `rows` prompts, padded to `rows`) -> new ids per prompt."""
    length, n_new = _bucket(max(len(p) for p in prompts)), _bucket(max(budgets))
    ids, mask = _left_pad(prompts, rows, length, pad_id)
    budget = np.array(list(budgets) + [1] * (rows - len(prompts)), np.int32)
    cache = model.init_cache(rows, length + n_new)
    token, cache = _prefill(graphdef, state, weights, ids, mask, cache)
    token = np.asarray(token)
    done = np.isin(token, eos) | (budget <= 1)
    done[len(prompts):] = True
    new = [[int(token[r])] for r in range(len(prompts))]
    count, chunk = np.ones(rows, np.int32), min(chunk or n_new, n_new)
    while not done.all():
        before = count
        out, _, cache, token, done, count = _decode(graphdef, chunk, state, weights, cache, token, done,
                                                    count, budget, eos, np.int32(pad_id))
        out, done, count = np.asarray(out), np.array(done), np.asarray(count)
        for r in range(len(prompts)):  # a row emits its tokens first, then pads once done
            new[r].extend(int(t) for t in out[r, : count[r] - before[r]])
            if stop is not None and not done[r] and stop(r, new[r]):
                done[r] = True
    return [_cut_after_eos(n, eos) for n in new]


def _cut_after_eos(ids: list[int], eos: np.ndarray) -> list[int]:
    """`ids` up to and including the first EOS."""
    for k, t in enumerate(ids):
        if t in eos:
            return ids[: k + 1]
    return ids


def greedy_ids(model, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
               eos_id: int | Sequence[int] | None = None, pad_id: int = 0, batch_size: int | None = None,
               chunk: int | None = None, stop: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
    """Greedy continuations (new token ids, EOS included when emitted) of id prompts (module docstring).

    `max_new_tokens`: one budget or one per prompt; `eos_id`: id(s) that end a row (default: the model
    config's); `batch_size`: prompts per compiled batch (default all; the last batch is padded to it);
    `chunk`: decode steps per device call (default: the whole budget); `stop(index, new_ids)`: host check
    between chunks, True ends that prompt (its ids so far are returned).
    """
    prompts = [list(map(int, p)) for p in prompts]
    budgets = [int(max_new_tokens)] * len(prompts) if np.ndim(max_new_tokens) == 0 else list(max_new_tokens)
    if len(budgets) != len(prompts):
        raise ValueError(f"{len(budgets)} budgets for {len(prompts)} prompts")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    if any(b < 1 for b in budgets):
        raise ValueError(f"max_new_tokens must be >= 1, got {min(budgets)}")
    eos = _eos_array(model.config.eos_token_id if eos_id is None else eos_id)
    graphdef, state = nnx.split(model)
    weights = model.effective_weights()
    rows = batch_size or len(prompts)
    out: list[list[int]] = []
    for start in range(0, len(prompts), rows):
        part = slice(start, start + rows)
        stop_part = None if stop is None else (lambda r, ids, s=start: stop(s + r, ids))
        out.extend(_run_batch(graphdef, state, weights, model, prompts[part], budgets[part], rows, eos,
                              pad_id, chunk, stop_part))
    return out


def generate(model, tokenizer_or_ids, max_new_tokens: int = 32, *, prompt: str | Sequence[str] | None = None,
             eos_id: int | Sequence[int] | None = None, **kwargs):
    """Greedy generation (module docstring).

    With a tokenizer: `prompt` (a string or a list) is encoded as the tokenizer does by default (BOS if it
    adds one) and the continuation text(s) come back, decoded without special tokens. With ids (one sequence
    or a list of sequences): the new ids come back in the same nesting. `eos_id` defaults to the tokenizer's
    EOS, else the model config's. Other keyword arguments go to `greedy_ids`.
    """
    if hasattr(tokenizer_or_ids, "decode"):
        tok = tokenizer_or_ids
        if prompt is None:
            raise ValueError("generate with a tokenizer needs prompt= (a string or a list of strings)")
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        eos = eos_id if eos_id is not None else tok.eos_token_id
        kwargs.setdefault("pad_id", pad_token_id(tok))
        ids = [tok(t)["input_ids"] for t in texts]
        new = greedy_ids(model, ids, max_new_tokens, eos_id=eos, **kwargs)
        out = [tok.decode(n, skip_special_tokens=True) for n in new]
        return out[0] if isinstance(prompt, str) else out
    if prompt is not None:
        raise ValueError("prompt= is for a tokenizer; pass the ids as the second argument")
    seqs = tokenizer_or_ids
    single = len(seqs) > 0 and np.ndim(seqs[0]) == 0
    new = greedy_ids(model, [seqs] if single else seqs, max_new_tokens, eos_id=eos_id, **kwargs)
    return new[0] if single else new
