"""Tokens: documents -> one concatenated token array with an EOS after every document (:class:`TokenizedCorpus`).

The rule (the official training sequences, reference F.1): each document is encoded with
``add_special_tokens=False`` (a leading BOS, if a tokenizer adds one anyway, is stripped), EOS is appended, and
all documents are concatenated in corpus order. No BOS anywhere. Documents that encode to nothing are skipped.
:func:`encode_documents` is the one home of that rule: the in-memory path (:func:`tokenize_documents`) and the
token store's writer processes (:mod:`fairy2i_jax.data.tokenize`) both call it, so both give the same ids.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np

from fairy2i_jax.data.documents import DataError

_ENCODE_BATCH = 256  # documents per batched tokenizer call


def special_ids(tokenizer: Any) -> tuple[int, int | None]:
    """``(eos_id, bos_id or None)`` of ``tokenizer``; :class:`DataError` when it has no EOS."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id; documents need an EOS")
    bos = getattr(tokenizer, "bos_token_id", None)
    return int(eos), None if bos is None else int(bos)


def _encode(tokenizer: Any, docs: Sequence[str]) -> list[Sequence[int]]:
    """Ids of each document without special tokens: the tokenizer's batched ``__call__`` when it has one
    (HF tokenizers, :class:`~fairy2i_jax.hf.tokenizer.SentencePieceTokenizer`, ``ByteTokenizer``), else
    ``encode`` per document (the same ids)."""
    if callable(tokenizer):
        return tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    return [tokenizer.encode(d, add_special_tokens=False) for d in docs]


def encode_documents(tokenizer: Any, docs: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens int32, lengths int64)``: the module docstring's rule over ``docs`` (lengths include the EOS;
    documents that encode to nothing are left out, so ``len(lengths) <= len(docs)``)."""
    eos, bos = special_ids(tokenizer)
    chunks: list[np.ndarray] = []
    for start in range(0, len(docs), _ENCODE_BATCH):
        for ids in _encode(tokenizer, docs[start:start + _ENCODE_BATCH]):
            ids = np.asarray(ids, dtype=np.int32)
            if ids.size and bos is not None and ids[0] == bos:
                ids = ids[1:]
            if ids.size:
                chunks.append(np.append(ids, np.int32(eos)))
    if not chunks:
        return np.zeros((0,), np.int32), np.zeros((0,), np.int64)
    return np.concatenate(chunks), np.array([c.size for c in chunks], dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
    """All documents, each followed by EOS, concatenated in corpus order.

    ``tokens``: int32 ``[num_tokens]`` (a numpy array, or a token store's lazily read
    :class:`~fairy2i_jax.data.store.TokenArray`); ``doc_ends``: int64 ``[num_docs]``, the end (exclusive) of each
    document, so ``tokens[doc_ends - 1] == eos_id``; ``eos_id``: the EOS token id.
    """

    tokens: Any
    doc_ends: np.ndarray
    eos_id: int

    @property
    def num_tokens(self) -> int:
        """Tokens in the corpus, EOS included."""
        return int(self.tokens.shape[0])

    @property
    def num_docs(self) -> int:
        """Documents in the corpus."""
        return int(self.doc_ends.shape[0])

    def num_blocks(self, seq_len: int) -> int:
        """Blocks of ``seq_len`` tokens one epoch holds: ``num_tokens // seq_len`` (the remainder is dropped)."""
        check_seq_len(seq_len)
        return self.num_tokens // seq_len

    def document(self, i: int) -> np.ndarray:
        """The int32 tokens of document ``i``, its EOS included (reads only that document)."""
        start = 0 if i == 0 else int(self.doc_ends[i - 1])
        return np.asarray(self.tokens[start:int(self.doc_ends[i])], dtype=np.int32)

    def documents(self) -> list[np.ndarray]:
        """The token arrays of every document, EOS included (reads the whole corpus: inspection and tests)."""
        return [self.document(i) for i in range(self.num_docs)]


def check_seq_len(seq_len: int) -> None:
    """:class:`DataError` unless ``seq_len`` is an int >= 2 (one input and one target)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise DataError(f"seq_len must be an integer >= 2, got {seq_len!r}")


def tokenize_documents(documents: Iterable[str], tokenizer: Any, *, name: str = "corpus",
                       progress: bool = False) -> TokenizedCorpus:
    """The :class:`TokenizedCorpus` of ``documents`` in memory (module docstring's rule).

    ``tokenizer``: anything with ``encode(text, add_special_tokens=False)`` (or the batched HF ``__call__``) and
    ``eos_token_id``. :class:`DataError` when no document has a token (``name`` in the message). ``progress``: a
    progress bar counting documents.
    """
    from tqdm.auto import tqdm

    eos, _ = special_ids(tokenizer)
    documents = tqdm(documents, desc=f"tokenize {name}", unit="doc", disable=not progress)
    tokens, lengths, seen, batch = [], [], 0, []

    def flush():
        ids, lens = encode_documents(tokenizer, batch)
        tokens.append(ids)
        lengths.append(lens)
        batch.clear()

    for doc in documents:
        seen += 1
        batch.append(doc)
        if len(batch) == _ENCODE_BATCH:
            flush()
    flush()
    lens = np.concatenate(lengths)
    if not lens.size:
        raise DataError(f"empty corpus: {name} gave no tokens ({seen} non-empty documents read)")
    return TokenizedCorpus(tokens=np.concatenate(tokens), doc_ends=np.cumsum(lens, dtype=np.int64), eos_id=eos)


def epochs_for_budget(corpus: TokenizedCorpus, *, seq_len: int, global_batch: int, steps: int) -> float:
    """How many epochs of the corpus ``steps`` global batches of ``[global_batch, seq_len]`` consume:
    ``steps * global_batch / num_blocks(seq_len)``."""
    return steps * global_batch / corpus.num_blocks(seq_len)
