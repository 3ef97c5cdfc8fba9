"""Generation with the model's static KV cache: one jitted prefill, then one compiled `lax.while_loop` decode.

`generate(model, tokenizer, max_new_tokens, prompt="...")` returns the continuation text;
`generate(model, ids, max_new_tokens)` (one id list, or a list of them) returns the new token ids. Both run
`sample_ids` (greedy by default; `Sampling(temperature, top_k, top_p)` and a seed for sampling):

1. Prompts are left-padded to a shape bucket P (a power of two >= 16) and batched; the cache has
   `P + N` slots, N = the token budget rounded up to a power of two, so XLA compiles once per (batch, P, N).
   Padding slots are invalid keys and the positions of real tokens start at 0 (`CausalLM` derives them from
   the attention mask), so a padded row decodes exactly as it would alone.
2. Prefill: one forward over the whole prompt fills the cache; the token chosen at the last slot is token 1.
3. Decode: a `lax.while_loop` feeds the last token back, one slot per step, until every row is done (EOS
   emitted, or its budget used) or `chunk` steps have run. Between chunks the host hands the new tokens to
   `on_tokens` (streaming) and asks `stop(row, ids)` (e.g. stop strings); `chunk=None` runs the whole budget in
   one call.

Token choice (`select_tokens`): greedy = argmax; sampling = softmax(logits / temperature) restricted to the
`top_k` largest logits and to the smallest set whose probability reaches `top_p`, drawn with the key
`fold_in(key(seed), step)` (the same seed gives the same tokens). The weights (`CausalLM.inference_weights`:
fake-quantized matrices of a QAT model, the kernels' prepared operands of a packed one) are formed once per call
and passed to every forward. Tokens after a row's EOS are never returned; the EOS itself is (as transformers'
`generate` does). The command line (`python -m fairy2i_jax.generate`) is :mod:`fairy2i_jax.generate.__main__`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fairy2i_jax.hf.tokenizer import pad_token_id

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy when ``temperature == 0``; else sampled at ``temperature`` from the
    ``top_k`` largest logits (0 = all) within nucleus ``top_p`` (1 = all)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got {self}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


def select_tokens(logits: jax.Array, sampling: Sampling, key: jax.Array) -> jax.Array:
    """The next token of each row of ``logits [B, V]`` (int32 [B]) under ``sampling`` (module docstring)."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    z = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(z, min(sampling.top_k, z.shape[-1]))[0][..., -1:]
        z = jnp.where(z < kth, -jnp.inf, z)
    if sampling.top_p < 1:
        order = jnp.sort(z, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(order, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens strictly more likely
        cutoff = jnp.min(jnp.where(before < sampling.top_p, order, jnp.inf), axis=-1, keepdims=True)
        z = jnp.where(z < cutoff, -jnp.inf, z)
    return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)


def _bucket(n: int) -> int:
    """The smallest power of two >= max(n, MIN_BUCKET)."""
    size = MIN_BUCKET
    while size < n:
        size *= 2
    return size


@functools.partial(jax.jit, static_argnums=(0, 1))
def _prefill(graphdef, sampling, state, weights, ids, mask, cache, key):
    """Forward over the left-padded prompts -> (next token int32[B], filled cache)."""
    logits, cache = nnx.merge(graphdef, state)(ids, attention_mask=mask, cache=cache, weights=weights)
    return select_tokens(logits[:, -1], sampling, jax.random.fold_in(key, 0)), cache


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _decode(graphdef, chunk, sampling, state, weights, cache, token, done, count, budget, eos_ids, pad_id, key):
    """Up to `chunk` steps. `token [B]`: last emitted token; `count [B]`: tokens emitted so far (also the step
    index of the sampling key); a row is done after EOS or when `count == budget`. Returns (tokens int32[B, chunk]
    (pad after done), steps run, cache, last token, done, count)."""
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
        chosen = select_tokens(logits[:, -1], sampling, jax.random.fold_in(key, jnp.max(count)))
        nxt = jnp.where(done, pad_id, chosen)
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


@dataclasses.dataclass(frozen=True)
class _Run:
    """What every batch of one `sample_ids` call shares."""

    graphdef: object
    state: object
    weights: object
    model: object
    sampling: Sampling
    key: jax.Array
    eos: np.ndarray
    pad_id: int
    chunk: int | None


def _run_batch(run: _Run, prompts, budgets, rows, stop, on_tokens):
    """Decode one batch (at most `rows` prompts, padded to `rows`) -> new ids per prompt."""
    length, n_new = _bucket(max(len(p) for p in prompts)), _bucket(max(budgets))
    ids, mask = _left_pad(prompts, rows, length, run.pad_id)
    budget = np.array(list(budgets) + [1] * (rows - len(prompts)), np.int32)
    cache = run.model.init_cache(rows, length + n_new)
    token, cache = _prefill(run.graphdef, run.sampling, run.state, run.weights, ids, mask, cache, run.key)
    token = np.asarray(token)
    done = np.isin(token, run.eos) | (budget <= 1)
    done[len(prompts):] = True
    new = [[int(token[r])] for r in range(len(prompts))]
    if on_tokens is not None:
        on_tokens([list(n) for n in new])
    count, chunk = np.ones(rows, np.int32), min(run.chunk or n_new, n_new)
    while not done.all():
        before = count
        out, _, cache, token, done, count = _decode(run.graphdef, chunk, run.sampling, run.state, run.weights,
                                                    cache, token, done, count, budget, run.eos,
                                                    np.int32(run.pad_id), run.key)
        out, done, count = np.asarray(out), np.array(done), np.asarray(count)
        fresh = [[int(t) for t in out[r, : count[r] - before[r]]] for r in range(len(prompts))]
        for r in range(len(prompts)):  # a row emits its tokens first, then pads once done
            new[r].extend(fresh[r])
            if stop is not None and not done[r] and stop(r, new[r]):
                done[r] = True
        if on_tokens is not None:
            on_tokens(fresh)
    return [_cut_after_eos(n, run.eos) for n in new]


def _cut_after_eos(ids: list[int], eos: np.ndarray) -> list[int]:
    """`ids` up to and including the first EOS."""
    for k, t in enumerate(ids):
        if t in eos:
            return ids[: k + 1]
    return ids


def sample_ids(model, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
               sampling: Sampling = GREEDY, seed: int = 0, eos_id: int | Sequence[int] | None = None,
               pad_id: int = 0, batch_size: int | None = None, chunk: int | None = None,
               stop: Callable[[int, list[int]], bool] | None = None,
               on_tokens: Callable[[list[list[int]]], None] | None = None) -> list[list[int]]:
    """Continuations (new token ids, EOS included when emitted) of id prompts (module docstring).

    `max_new_tokens`: one budget or one per prompt; `eos_id`: id(s) that end a row (default: the model
    config's); `batch_size`: prompts per compiled batch (default all; the last batch is padded to it);
    `chunk`: decode steps per device call (default: the whole budget); `stop(index, new_ids)`: host check
    between chunks, True ends that prompt (its ids so far are returned); `on_tokens(new)`: called with each
    batch row's newly emitted ids after the prefill and after every chunk (streaming).
    """
    prompts = [list(map(int, p)) for p in prompts]
    budgets = [int(max_new_tokens)] * len(prompts) if np.ndim(max_new_tokens) == 0 else list(max_new_tokens)
    if len(budgets) != len(prompts):
        raise ValueError(f"{len(budgets)} budgets for {len(prompts)} prompts")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    if any(b < 1 for b in budgets):
        raise ValueError(f"max_new_tokens must be >= 1, got {min(budgets)}")
    graphdef, state = nnx.split(model)
    run = _Run(graphdef, state, model.inference_weights(), model, sampling, jax.random.key(seed),
               _eos_array(model.config.eos_token_id if eos_id is None else eos_id), pad_id, chunk)
    rows = batch_size or len(prompts)
    out: list[list[int]] = []
    for start in range(0, len(prompts), rows):
        part = slice(start, start + rows)
        stop_part = None if stop is None else (lambda r, ids, s=start: stop(s + r, ids))
        out.extend(_run_batch(run, prompts[part], budgets[part], rows, stop_part, on_tokens))
    return out


def greedy_ids(model, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], **kwargs):
    """:func:`sample_ids` with greedy decoding (the lm-eval adapter's `generate_until`)."""
    return sample_ids(model, prompts, max_new_tokens, sampling=GREEDY, **kwargs)


def generate(model, tokenizer_or_ids, max_new_tokens: int = 32, *, prompt: str | Sequence[str] | None = None,
             eos_id: int | Sequence[int] | None = None, **kwargs):
    """Generation (module docstring), greedy unless ``sampling=`` says otherwise.

    With a tokenizer: `prompt` (a string or a list) is encoded as the tokenizer does by default (BOS if it
    adds one) and the continuation text(s) come back, decoded without special tokens. With ids (one sequence
    or a list of sequences): the new ids come back in the same nesting. `eos_id` defaults to the tokenizer's
    EOS, else the model config's. Other keyword arguments go to `sample_ids`.
    """
    if hasattr(tokenizer_or_ids, "decode"):
        tok = tokenizer_or_ids
        if prompt is None:
            raise ValueError("generate with a tokenizer needs prompt= (a string or a list of strings)")
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        eos = eos_id if eos_id is not None else tok.eos_token_id
        kwargs.setdefault("pad_id", pad_token_id(tok))
        ids = [tok(t)["input_ids"] for t in texts]
        new = sample_ids(model, ids, max_new_tokens, eos_id=eos, **kwargs)
        out = [tok.decode(n, skip_special_tokens=True) for n in new]
        return out[0] if isinstance(prompt, str) else out
    if prompt is not None:
        raise ValueError("prompt= is for a tokenizer; pass the ids as the second argument")
    seqs = tokenizer_or_ids
    single = len(seqs) > 0 and np.ndim(seqs[0]) == 0
    new = sample_ids(model, [seqs] if single else seqs, max_new_tokens, eos_id=eos_id, **kwargs)
    return new[0] if single else new
