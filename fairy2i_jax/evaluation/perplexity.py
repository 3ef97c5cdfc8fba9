"""Perplexity: the official Fairy2i packed protocol and the standard contiguous-window protocol.

Both reduce to a list of `Window`s (a token sequence and which of its next-token targets count) scored by one
function, `evaluate_perplexity`, against any logits function (see `fairy2i_jax.evaluation.logits`).
For a window with ids x_0..x_{L-1} and scored targets S (subset of 1..L-1) the loss is

    loss = sum_{t in S} -log p(x_t | x_0..x_{t-1})

and over all windows

    PPL_corrected = exp(sum loss / sum |S|)                 (mean NLL per scored token)
    PPL_official  = exp(sum loss / sum (L - 1))             (official protocol only: counts masked targets too)

Official packed protocol (reference G.1, `Fairy2i-W2 eval/eval_utils.py get_test_dataset`, `eval_ppl.py`):
each non-empty item is tokenized without special tokens and gets EOS appended; chunks start with BOS and are
filled greedily with whole items; the target right after every EOS is masked (S excludes t with x_{t-1} = EOS).
The official denominator counts those masked positions, which biases PPL low (reference J.1 item 5); both are
reported. Chunk length rule ("longer than seqlen"): an item of n tokens including its EOS is dropped when
BOS + item would not fit, i.e. n > seqlen - 1 (n > seqlen without a BOS token), so no chunk ever exceeds seqlen.
The official code drops only n > seqlen: an item of exactly seqlen tokens there yields a seqlen + 1 chunk (and a
BOS-only chunk before it); this is the only difference.

Contiguous protocol (GPTQ / AQLM style): texts joined with "\\n\\n", tokenized once with the tokenizer's default
special tokens (a BOS only at the very start, and only if the tokenizer adds one), cut into non-overlapping
windows of seqlen; every target inside a window counts (the first token of each window is context only); the
last partial window is dropped (GPTQ) unless `keep_last`. With `stride` < seqlen (HF perplexity guide), windows
of up to seqlen tokens start every `stride` tokens and only the tokens not scored by an earlier window count,
so every token after the first is scored exactly once; the last (partial) window is always kept.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from fairy2i_jax.evaluation.logits import LogitsFn, score_sequences

Protocol = Literal["official", "contiguous"]
PROTOCOLS: tuple[str, ...] = typing.get_args(Protocol)
_ENCODE_BATCH = 1000


@dataclass(frozen=True)
class Window:
    """One scored sequence: `ids` int32[L] and `scored` bool[L - 1] (`scored[t]`: target `ids[t + 1]` counts)."""

    ids: np.ndarray
    scored: np.ndarray


@dataclass(frozen=True)
class PerplexityResult:
    """Totals of one perplexity run (see the module docstring for the formulas)."""

    protocol: str
    num_chunks: int
    num_tokens: int       # sum of window lengths L
    num_positions: int    # sum (L - 1): every predicted position, masked or not
    num_scored: int       # targets that count
    nll_sum: float        # sum of -log p over the scored targets (natural log)
    ppl_corrected: float  # exp(nll_sum / num_scored)
    ppl_official: float | None  # exp(nll_sum / num_positions) for the official protocol, else None

    @property
    def ppl(self) -> float:
        """The perplexity per scored token (`ppl_corrected`)."""
        return self.ppl_corrected


def check_seqlen(seqlen: int) -> None:
    """A sequence needs at least one context token and one target."""
    if not isinstance(seqlen, (int, np.integer)) or seqlen < 2:
        raise ValueError(f"seqlen must be an integer >= 2, got {seqlen!r}")


def wikitext_lines(text: str | Sequence[str]) -> list[str]:
    """The official WikiText-2 items: `"".join(text).split("\\n")` without the empty strings.

    Only exactly-empty lines are dropped (a line holding a single space stays, as in the official code).
    """
    joined = text if isinstance(text, str) else "".join(text)
    return [line for line in joined.split("\n") if line != ""]


def encode_many(tokenizer, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of each text, through the tokenizer's batched `__call__` in blocks of 1000 texts."""
    out: list[list[int]] = []
    for start in range(0, len(texts), _ENCODE_BATCH):
        block = list(texts[start: start + _ENCODE_BATCH])
        out.extend(list(ids) for ids in tokenizer(block, add_special_tokens=add_special_tokens)["input_ids"])
    return out


def official_packed_chunks(texts: Sequence[str], tokenizer, seqlen: int, source: str = "texts") -> list[np.ndarray]:
    """Official greedy packing (module docstring): chunks of <= seqlen ids, each `[BOS] + item + item + ...`.

    `texts`: the items (use `wikitext_lines` for WikiText-2, the documents for C4), or items already encoded
    (int sequences, e.g. a token store's documents without their EOS); empty items are skipped.
    Every item is `encode(item, add_special_tokens=False) + [EOS]`; items with more than `seqlen - 1` tokens
    (EOS included; `seqlen` when the tokenizer has no BOS) are dropped. The last partial chunk is kept.
    """
    check_seqlen(seqlen)
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if eos is None:
        raise ValueError(f"the tokenizer has no EOS token; the official protocol ends every item of {source} with EOS")
    items = [t for t in texts if len(t)]
    if not items:
        raise ValueError(f"no text to evaluate in {source}: it is empty or holds only empty strings")
    head = [] if bos is None else [bos]
    capacity = seqlen - len(head)
    chunks, current = [], list(head)
    encoded = encode_many(tokenizer, items) if isinstance(items[0], str) else [[int(i) for i in t] for t in items]
    for ids in encoded:
        item = ids + [eos]
        if len(item) > capacity:
            continue
        if len(current) + len(item) > seqlen:
            chunks.append(np.asarray(current, dtype=np.int32))
            current = list(head)
        current.extend(item)
    if len(current) > len(head):
        chunks.append(np.asarray(current, dtype=np.int32))
    if not chunks:
        raise ValueError(f"no chunk survives from {source}: all {len(items)} items are longer than "
                         f"seqlen - 1 = {capacity} tokens (EOS included)")
    return chunks


def official_windows(chunks: Sequence[np.ndarray], eos_id: int) -> list[Window]:
    """Official masking: every target is scored except the one right after an EOS (`ids[t] == eos_id`).

    As in the official code the test is on the id, so a BOS that equals EOS also masks the target after it.
    """
    out = []
    for chunk in chunks:
        ids = np.asarray(chunk, dtype=np.int32)
        out.append(Window(ids, ids[:-1] != eos_id))
    return out


def contiguous_ids(texts: Sequence[str] | str, tokenizer, source: str = "texts") -> np.ndarray:
    """`"\\n\\n".join(texts)` tokenized once with the tokenizer's default special tokens (BOS only at the start)."""
    joined = texts if isinstance(texts, str) else "\n\n".join(texts)
    if joined.strip() == "":
        raise ValueError(f"no text to evaluate in {source}: it is empty or whitespace only")
    return np.asarray(tokenizer(joined)["input_ids"], dtype=np.int32)


def contiguous_windows(ids: np.ndarray, seqlen: int, stride: int | None = None, keep_last: bool = False,
                       source: str = "texts") -> list[Window]:
    """Cut one token stream into windows (module docstring). `stride=None`: non-overlapping windows of seqlen."""
    check_seqlen(seqlen)
    ids = np.asarray(ids, dtype=np.int32)
    if stride is None:
        pieces = [ids[s: s + seqlen] for s in range(0, len(ids), seqlen)]
        windows = [Window(p, np.ones(len(p) - 1, bool)) for p in pieces
                   if len(p) == seqlen or (keep_last and len(p) >= 2)]
    else:
        if not 1 <= stride <= seqlen:
            raise ValueError(f"stride must be in [1, seqlen={seqlen}], got {stride}")
        windows, prev_end = [], 0
        for begin in range(0, len(ids), stride):
            end = min(begin + seqlen, len(ids))
            new = end - max(prev_end, begin + 1)  # tokens not yet scored; the window's first token is context
            if end - begin >= 2 and new > 0:
                scored = np.zeros(end - begin - 1, bool)
                scored[len(scored) - new:] = True
                windows.append(Window(ids[begin:end], scored))
            prev_end = end
            if end == len(ids):
                break
    if not windows:
        raise ValueError(f"no window from {source}: {len(ids)} tokens is fewer than seqlen={seqlen}"
                         + ("" if keep_last or stride else " (pass keep_last=True to keep a partial window)"))
    return windows


def _as_windows(chunks: Sequence[np.ndarray | Window], protocol: str, eos_id: int | None) -> list[Window]:
    """Windows from arrays (official: EOS masking; contiguous: all targets) or already-built `Window`s."""
    out = []
    for c in chunks:
        if isinstance(c, Window):
            out.append(c)
        elif protocol == "official":
            if eos_id is None:
                raise ValueError("the official protocol needs eos_id to mask the targets after EOS")
            out.extend(official_windows([c], eos_id))
        else:
            ids = np.asarray(c, dtype=np.int32)
            out.append(Window(ids, np.ones(max(len(ids) - 1, 0), bool)))
    return out


def evaluate_perplexity(logits_fn: LogitsFn, chunks: Sequence[np.ndarray | Window], batch_size: int = 8,
                        protocol: str = "official", eos_id: int | None = None, pad_id: int = 0,
                        progress: bool = True, source: str = "chunks") -> PerplexityResult:
    """Score `chunks` with `logits_fn` and return both perplexities (module docstring).

    `chunks`: `Window`s, or id arrays (official: targets after `eos_id` masked; contiguous: all targets count).
    Batches are length-sorted and right-padded with `pad_id`; log-softmax in float64 on the host (or float32
    on the device for a `JaxLogitsFn`), sums in float64.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown perplexity protocol {protocol!r}; expected one of {PROTOCOLS}")
    windows = _as_windows(chunks, protocol, eos_id)
    if not windows:
        raise ValueError(f"no chunk to evaluate in {source}")
    sums, _, counts = score_sequences(logits_fn, [w.ids for w in windows], [w.scored for w in windows],
                                      batch_size, pad_id, progress, desc=f"perplexity ({source})")
    nll, scored = -float(sums.sum()), int(counts.sum())
    if scored == 0:
        raise ValueError(f"no scored target in {source}: every window is a single token or fully masked")
    positions = sum(len(w.ids) - 1 for w in windows)
    return PerplexityResult(
        protocol=protocol, num_chunks=len(windows), num_tokens=sum(len(w.ids) for w in windows),
        num_positions=positions, num_scored=scored, nll_sum=nll, ppl_corrected=math.exp(nll / scored),
        ppl_official=math.exp(nll / positions) if protocol == "official" else None)


def official_perplexity(logits_fn: LogitsFn, texts: Sequence[str], tokenizer, seqlen: int = 2048,
                        batch_size: int = 8, progress: bool = True, source: str = "texts") -> PerplexityResult:
    """The official packed protocol end to end: `official_packed_chunks` then `evaluate_perplexity`."""
    chunks = official_packed_chunks(texts, tokenizer, seqlen, source)
    return evaluate_perplexity(logits_fn, chunks, batch_size, "official", eos_id=tokenizer.eos_token_id,
                               pad_id=_pad_id(tokenizer), progress=progress, source=source)


def contiguous_perplexity(logits_fn: LogitsFn, texts: Sequence[str] | str, tokenizer, seqlen: int = 2048,
                          stride: int | None = None, keep_last: bool = False, batch_size: int = 8,
                          progress: bool = True, source: str = "texts") -> PerplexityResult:
    """The contiguous-window protocol end to end: `contiguous_ids`, `contiguous_windows`, `evaluate_perplexity`."""
    windows = contiguous_windows(contiguous_ids(texts, tokenizer, source), seqlen, stride, keep_last, source)
    return evaluate_perplexity(logits_fn, windows, batch_size, "contiguous", pad_id=_pad_id(tokenizer),
                               progress=progress, source=source)


def _pad_id(tokenizer) -> int:
    """Any valid id works as right padding (it is masked and never scored): the pad id, else EOS, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0
