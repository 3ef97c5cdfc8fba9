"""Logits functions: the one model interface the evaluation code talks to, and wrappers that produce it.

A *logits function* is any callable

    logits_fn(input_ids: int32[B, T], attention_mask: int32[B, T]) -> float32[B, T, V]   (numpy in, numpy out)

where row b holds a sequence right-padded with `attention_mask[b, t] == 0` after its real tokens, and
`logits[b, t]` is the next-token distribution after `input_ids[b, :t+1]`. Right padding never changes the logits
of the real positions of a causal model, so the evaluation code may pad however it likes.

Wrappers here:

- `jax_logits_fn(model, ...)`: an NNX model (`model(input_ids, attention_mask=...) -> logits`) under one `jax.jit`;
  the batch is padded to a fixed batch size and the length to one of a few *buckets* (powers of two up to the
  maximum length), so XLA compiles once per bucket instead of once per distinct length. It also scores targets
  on the device (`token_logprobs`), so only [B, T] arrays come back to the host instead of [B, T, V] logits.
- `torch_logits_fn(model)`: a `transformers` torch model (used as the oracle in the tests).

`token_logprobs(logits_fn, ids, mask, targets)` is what the evaluation code calls: the log-probability of
`targets[b, t]` under `logits[b, t]` and whether it is the argmax. For a plain logits function it is computed on
the host in float64 (`log p = x_target - logsumexp(x)`); for a `JaxLogitsFn` on the device in float32.
`score_sequences` builds batches of whole sequences on top of it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

LogitsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def default_buckets(max_length: int, min_length: int = 16) -> tuple[int, ...]:
    """Powers of two from `min_length` up to (and always including) `max_length`: (16, 32, ..., max_length)."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    buckets, length = [], max(1, min_length)
    while length < max_length:
        buckets.append(length)
        length *= 2
    buckets.append(max_length)
    return tuple(buckets)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= `length`; ValueError when `length` exceeds the largest bucket."""
    for b in sorted(buckets):
        if b >= length:
            return b
    raise ValueError(f"sequence length {length} exceeds the largest shape bucket {max(buckets)}; "
                     f"build the logits function with a larger max_length or buckets")


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int = 0,
             length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad id sequences to `length` (default: the longest) -> (ids int32[B, L], attention_mask int32[B, L])."""
    length = max(len(r) for r in rows) if length is None else length
    ids = np.full((len(rows), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), length), dtype=np.int32)
    for b, row in enumerate(rows):
        if len(row) > length:
            raise ValueError(f"row {b} has {len(row)} tokens, more than the padded length {length}")
        ids[b, : len(row)] = np.asarray(row, dtype=np.int32)
        mask[b, : len(row)] = 1
    return ids, mask


def host_token_logprobs(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 log-softmax of `logits[B, T, V]` at `targets[B, T]` -> (logprob float64[B, T], is_argmax bool[B, T]).

    `log p(y) = x_y - logsumexp(x)` with `logsumexp(x) = m + log(sum(exp(x - m)))`, `m = max(x)`; one row at a
    time so the float64 copy stays [T, V]. Ties in the argmax go to the lowest id (as `torch.argmax`).
    """
    logits = np.asarray(logits)
    if logits.ndim != 3 or logits.shape[:2] != targets.shape:
        raise ValueError(f"logits shape {logits.shape} does not match targets shape {targets.shape} (+ vocab)")
    logp = np.empty(targets.shape, dtype=np.float64)
    greedy = np.empty(targets.shape, dtype=bool)
    for b in range(logits.shape[0]):
        x = logits[b].astype(np.float64)
        m = x.max(axis=-1, keepdims=True)
        lse = (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[:, 0]
        logp[b] = np.take_along_axis(x, targets[b][:, None], axis=-1)[:, 0] - lse
        greedy[b] = x.argmax(axis=-1) == targets[b]
    return logp, greedy


def token_logprobs(logits_fn: LogitsFn, ids: np.ndarray, mask: np.ndarray,
                   targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log p(targets[b, t] | ids[b, :t+1]), targets[b, t] == argmax) for every position, shape [B, T] each.

    Uses `logits_fn.token_logprobs` when the logits function scores on its own device (`JaxLogitsFn`), else
    `host_token_logprobs` on the returned logits.
    """
    own = getattr(logits_fn, "token_logprobs", None)
    if own is not None:
        logp, greedy = own(ids, mask, targets)
        return np.asarray(logp, dtype=np.float64), np.asarray(greedy, dtype=bool)
    return host_token_logprobs(logits_fn(ids, mask), targets)


def score_sequences(logits_fn: LogitsFn, seqs: Sequence[np.ndarray], scored: Sequence[np.ndarray],
                    batch_size: int, pad_id: int = 0, progress: bool = False,
                    desc: str = "scoring") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum of log p over the scored targets of each sequence.

    `seqs[i]` is an id sequence x_0..x_{L-1}; `scored[i]` a bool[L - 1] where `scored[i][t]` means the target
    x_{t+1}, predicted from x_0..x_t, counts. The model sees x_0..x_{L-2} (the last token is only a target, so a
    sequence of max_length + 1 tokens fits a model of max_length). Sequences are sorted by length (longest
    first, so an out-of-memory shows up in the first batch), right-padded per batch, and the results come back
    in the original order: (logprob_sum float64[N], all_scored_targets_greedy bool[N], num_scored int64[N]).
    Sequences of fewer than two tokens score nothing (0.0, True, 0).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(seqs)
    sums, greedy_all, counts = np.zeros(n), np.ones(n, dtype=bool), np.zeros(n, dtype=np.int64)
    for i in range(n):
        if len(scored[i]) != max(len(seqs[i]) - 1, 0):
            raise ValueError(f"sequence {i}: scored mask has {len(scored[i])} entries, expected {len(seqs[i]) - 1}")
    order = sorted((i for i in range(n) if len(seqs[i]) >= 2), key=lambda i: -len(seqs[i]))
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, disable=not progress):
        ids, mask = pad_rows([seqs[i][:-1] for i in batch], pad_id)
        targets, weights = np.full_like(ids, pad_id), np.zeros(ids.shape, dtype=bool)
        for row, i in enumerate(batch):
            targets[row, : len(seqs[i]) - 1] = seqs[i][1:]
            weights[row, : len(seqs[i]) - 1] = scored[i]
        logp, greedy = token_logprobs(logits_fn, ids, mask, targets)
        for row, i in enumerate(batch):
            w = weights[row]
            sums[i] = float(logp[row][w].sum())
            greedy_all[i] = bool(greedy[row][w].all())
            counts[i] = int(w.sum())
    return sums, greedy_all, counts


class TorchLogitsFn:
    """A `transformers` torch causal LM as a logits function (fp32 logits on the host)."""

    def __init__(self, model):
        self.model = model.eval()

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.from_numpy(np.asarray(input_ids, np.int64)),
                             attention_mask=torch.from_numpy(np.asarray(attention_mask, np.int64)))
        return out.logits.float().numpy()


def torch_logits_fn(model) -> TorchLogitsFn:
    """Wrap a `transformers` torch causal LM (`model(input_ids=..., attention_mask=...).logits`)."""
    return TorchLogitsFn(model)


class JaxLogitsFn:
    """An NNX model under `jax.jit`, padded to fixed shapes so XLA compiles once per (batch_size, bucket).

    The model is split once into (graphdef, state) with `nnx.split`; the jitted pure function merges them back
    (`nnx.merge`) and calls `model(input_ids, attention_mask=mask)`. Batches larger than `batch_size` run in
    slices; smaller ones get filler rows (pad ids, full mask, discarded). `shapes_seen` records the padded
    (batch, length) shapes that were run, i.e. the compilations. The state is the one the model held when the
    wrapper was built: rebuild the wrapper after changing the model's weights.
    """

    def __init__(self, model, buckets: Sequence[int], batch_size: int, pad_id: int = 0):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not buckets or min(buckets) < 1:
            raise ValueError(f"buckets must be positive lengths, got {tuple(buckets)}")
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))
        self.batch_size, self.pad_id = int(batch_size), int(pad_id)
        self.shapes_seen: set[tuple[int, int]] = set()
        graphdef, self._state = nnx.split(model)

        def forward(state, ids, mask):
            return nnx.merge(graphdef, state)(ids, attention_mask=mask).astype(jnp.float32)

        def scores(state, ids, mask, targets):
            logits = forward(state, ids, mask)
            lse = jax.nn.logsumexp(logits, axis=-1)
            picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
            return picked - lse, jnp.argmax(logits, axis=-1) == targets

        self._forward, self._scores = jax.jit(forward), jax.jit(scores)

    @property
    def max_length(self) -> int:
        """The longest sequence this function accepts (the largest bucket)."""
        return self.buckets[-1]

    def _padded_slices(self, *arrays: np.ndarray):
        """Yield (number of real rows, arrays padded to [batch_size, bucket]) for consecutive row slices."""
        rows, length = arrays[0].shape
        bucket = bucket_for(length, self.buckets)
        for start in range(0, rows, self.batch_size):
            real = min(self.batch_size, rows - start)
            padded = []
            for k, a in enumerate(arrays):
                # filler: pad ids / targets, but a full attention mask (k == 1) so no row is entirely masked
                fill = 1 if k == 1 else self.pad_id
                out = np.full((self.batch_size, bucket), fill, dtype=np.int32)
                out[:real, :length] = a[start: start + real]
                if k == 1:
                    out[:real, length:] = 0
                padded.append(out)
            self.shapes_seen.add((self.batch_size, bucket))
            yield real, padded

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        length = input_ids.shape[1]
        parts = [np.asarray(self._forward(self._state, ids, mask))[:real, :length]
                 for real, (ids, mask) in self._padded_slices(input_ids, attention_mask)]
        return np.concatenate(parts, axis=0)

    def token_logprobs(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                       targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Device-side float32 log-softmax at `targets` and argmax flags, [B, T] each (see module docstring)."""
        length = input_ids.shape[1]
        logps, greedys = [], []
        for real, (ids, mask, tgt) in self._padded_slices(input_ids, attention_mask, targets):
            logp, greedy = self._scores(self._state, ids, mask, tgt)
            logps.append(np.asarray(logp)[:real, :length])
            greedys.append(np.asarray(greedy)[:real, :length])
        return np.concatenate(logps, axis=0), np.concatenate(greedys, axis=0)


def jax_logits_fn(model, buckets: Sequence[int] | None = None, max_length: int = 2048, batch_size: int = 8,
                  pad_id: int = 0) -> JaxLogitsFn:
    """Wrap an NNX model as a jitted, shape-bucketed logits function.

    `buckets` defaults to `default_buckets(max_length)` = (16, 32, ..., max_length); every call is padded to
    `batch_size` rows and the smallest bucket that holds its length. Sequences longer than the largest bucket
    are an error (truncation is the caller's decision).
    """
    return JaxLogitsFn(model, buckets or default_buckets(max_length), batch_size, pad_id)
