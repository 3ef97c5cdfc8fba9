"""Examples and order: a :class:`~fairy2i_jax.data.corpus.TokenizedCorpus` -> packed blocks with EOS-aware labels
-> shuffled, repeated, host-sharded batches via grain.

The pipeline follows the official Fairy2i data code (reference F.1); documents and tokens come from
:mod:`fairy2i_jax.data.documents` and :mod:`fairy2i_jax.data.corpus` (in memory) or a token store
(:mod:`fairy2i_jax.data.store`, memory-mapped):

1. **Blocks.** The concatenation is cut into ``num_tokens // seq_len`` blocks of ``seq_len`` tokens; the
   remainder (< seq_len tokens) is dropped. The packing is a pure function of the document order (files in
   the order given, documents in file order) and is the same in every epoch, like the official pre-chunked
   data.
2. **Examples.** Each block gives ``{"input_ids": block, "labels": labels}`` with ``labels = input_ids`` except
   ``-100`` at every position whose previous token is EOS (the first token of the next document is not
   predicted from EOS); EOS itself is a target. The model sees the whole block and the loss shifts inside:
   ``CE(logits[:, :-1], labels[:, 1:])`` (HF convention), so ``labels[:, 0]`` is never used.
3. **Order and hosts.** :func:`train_dataset` shuffles the blocks (grain ``MapDataset.shuffle(seed)``, a
   different permutation each epoch: epoch ``e`` uses seed ``seed + e``), repeats (forever by default), and
   cuts the stream into host batches of ``L = global_batch // process_count`` consecutive blocks, host
   ``process_index`` taking every ``process_count``-th of them. So global batch ``b`` is blocks
   ``b*G .. (b+1)*G - 1`` of the stream and host ``h`` holds its rows ``h*L .. (h+1)*L - 1``: a contiguous
   block, exactly where ``jax.make_array_from_process_local_data`` puts process ``h``'s rows on a mesh whose
   devices are process-major (``jax.devices()`` order), so the assembled global array is the one-host batch.
   Grain's map datasets are lazy: a host reads only the tokens of its own blocks (from a store: ``seq_len``
   tokens per row, nothing else).
4. **State.** The iterator is a plain grain ``DatasetIterator``: ``it.get_state()`` is a JSON-serialisable
   dict (``{"next_index": k}``, k = local batches consumed) and ``it.set_state(state)`` on an iterator of an
   identically built pipeline yields exactly the batches the original would have yielded next (orbax's
   ``grain.python.PyGrainCheckpointHandler`` can store it). The state does not identify the corpus or the
   arguments: restore it only into the same pipeline.
5. **Held-out.** :func:`eval_dataset`: the same blocks, no shuffle, one pass. The last global batch is padded
   with EOS rows whose labels are all -100, so every batch has the static shape ``[global_batch /
   process_count, seq_len]`` and every host yields the same number of batches; no block is dropped.

A batch is ``{"input_ids": int32[global_batch // process_count, seq_len], "labels": int32[same]}``
(numpy); the caller assembles the global array (``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import grain
import numpy as np

from fairy2i_jax.data.corpus import TokenizedCorpus, check_seq_len
from fairy2i_jax.data.documents import DataError

IGNORE_INDEX = -100
# The blocks live in memory (or a memory map): threads would only add GIL contention (grain's own advice).
_DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


# ---------------------------------------------------------------------------------------------------- examples


def make_labels(input_ids: np.ndarray, eos_id: int) -> np.ndarray:
    """``input_ids`` with -100 at every position whose previous token (same row) is ``eos_id``."""
    labels = np.array(input_ids, dtype=np.int32, copy=True)
    labels[..., 1:][np.asarray(input_ids)[..., :-1] == eos_id] = IGNORE_INDEX
    return labels


class _BlockReader:
    """Block index -> example dict; indices >= ``num_blocks`` give an all-EOS row with all labels -100."""

    def __init__(self, tokens, seq_len: int, eos_id: int, num_blocks: int):
        self.tokens, self.seq_len, self.eos_id, self.num_blocks = tokens, seq_len, eos_id, num_blocks

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        if index >= self.num_blocks:
            row = np.full((self.seq_len,), self.eos_id, dtype=np.int32)
            return {"input_ids": row, "labels": np.full_like(row, IGNORE_INDEX)}
        start = int(index) * self.seq_len
        row = np.asarray(self.tokens[start:start + self.seq_len], dtype=np.int32)
        return {"input_ids": row, "labels": make_labels(row, self.eos_id)}


def local_batch_size(global_batch: int, process_index: int, process_count: int) -> int:
    """``global_batch // process_count``, after checking the host layout (:class:`DataError` otherwise)."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"need 0 <= process_index < process_count, got {process_index} of {process_count}")
    if global_batch < 1 or global_batch % process_count:
        raise DataError(f"global_batch {global_batch} must be a positive multiple of process_count "
                        f"{process_count}")
    return global_batch // process_count


def _blocks(corpus: TokenizedCorpus, seq_len: int, length: int) -> grain.MapDataset:
    """A MapDataset of ``length`` example dicts: the corpus blocks in order, then padding rows."""
    reader = _BlockReader(corpus.tokens, seq_len, corpus.eos_id, corpus.num_blocks(seq_len))
    return grain.MapDataset.range(length).map(reader)


def check_fits_one_batch(corpus: TokenizedCorpus, *, seq_len: int, global_batch: int) -> None:
    """:class:`DataError` unless the corpus holds at least one global batch: ``num_tokens // seq_len >=
    global_batch``."""
    n_blocks = corpus.num_blocks(seq_len)
    if n_blocks < global_batch:
        raise DataError(f"the corpus has {corpus.num_tokens} tokens ({n_blocks} blocks of {seq_len}); one "
                        f"global batch of {global_batch} x {seq_len} needs {global_batch * seq_len} tokens")


def train_dataset(corpus: TokenizedCorpus, *, seq_len: int, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1, num_epochs: int | None = None,
                  read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
    """Shuffled, repeated, host-sharded batches of this host (see the module docstring).

    ``num_epochs=None`` repeats forever; a finite count stops after the last full global batch. Iterate with
    ``it = iter(ds)``; ``it.get_state()`` / ``it.set_state(state)`` save and restore the position.
    """
    check_seq_len(seq_len)
    local = local_batch_size(global_batch, process_index, process_count)
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise DataError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if num_epochs is not None and num_epochs < 1:
        raise DataError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    check_fits_one_batch(corpus, seq_len=seq_len, global_batch=global_batch)
    n_blocks = corpus.num_blocks(seq_len)
    ds = _blocks(corpus, seq_len, n_blocks).shuffle(seed).repeat(num_epochs)
    if num_epochs is not None:  # whole global batches only, so every host yields as many batches
        ds = ds[: len(ds) // global_batch * global_batch]
    ds = ds.batch(local, drop_remainder=True)[process_index::process_count]  # lazy: only this host's blocks
    return ds.to_iter_dataset(read_options or _DEFAULT_READ_OPTIONS)


def eval_dataset(corpus: TokenizedCorpus, *, seq_len: int, global_batch: int, process_index: int = 0,
                 process_count: int = 1, read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
    """One ordered pass over the blocks, host-sharded like training; the last global batch is padded with
    all-EOS rows whose labels are all -100 (so shapes are static and every host has the same batch count)."""
    check_seq_len(seq_len)
    local = local_batch_size(global_batch, process_index, process_count)
    n_blocks = corpus.num_blocks(seq_len)
    if n_blocks == 0:
        raise DataError(f"the held-out corpus has {corpus.num_tokens} tokens, fewer than one block of "
                        f"seq_len {seq_len}")
    padded = -(-n_blocks // global_batch) * global_batch
    ds = _blocks(corpus, seq_len, padded).batch(local, drop_remainder=True)[process_index::process_count]
    return ds.to_iter_dataset(read_options or _DEFAULT_READ_OPTIONS)


def num_eval_batches(corpus: TokenizedCorpus, *, seq_len: int, global_batch: int) -> int:
    """Batches :func:`eval_dataset` yields per host: ``ceil(num_blocks / global_batch)``."""
    return -(-corpus.num_blocks(seq_len) // global_batch)
