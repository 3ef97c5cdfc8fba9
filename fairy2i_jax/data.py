"""Training and held-out data: text / jsonl / parquet files (or an HF dataset) -> packed token blocks via grain.

The pipeline follows the official Fairy2i data code (reference F.1):

1. **Documents.** :func:`read_documents` yields the documents of local files: ``.txt`` / ``.txt.gz`` (UTF-8),
   ``.jsonl`` / ``.jsonl.gz`` (one JSON object per line, text under ``text_key``) and ``.parquet`` (a
   ``text_key`` column); a directory stands for its supported files, sorted. ``doc_split`` says what one
   document is: ``"file"`` = a whole file (text) or a whole record (jsonl/parquet), ``"paragraph"`` = each
   blank-line separated paragraph of it, ``"line"`` = each non-empty line. Documents are stripped; empty ones
   are skipped. :func:`hf_documents` does the same for an HF dataset (:func:`load_hf_dataset`, the one
   ``datasets.load_dataset`` call: hub datasets need network or the local HF cache).
2. **Tokens.** :func:`tokenize_documents`: ``tokenizer.encode(doc, add_special_tokens=False)`` (a leading BOS,
   if a tokenizer adds one anyway, is stripped), EOS appended to every document, all documents concatenated
   in corpus order into one int32 array (:class:`TokenizedCorpus`). No BOS anywhere, as in the official
   training sequences.
3. **Blocks.** The concatenation is cut into ``num_tokens // seq_len`` blocks of ``seq_len`` tokens; the
   remainder (< seq_len tokens) is dropped. The packing is a pure function of the document order (files in
   the order given, documents in file order) and is the same in every epoch, like the official pre-chunked
   data.
4. **Examples.** Each block gives ``{"input_ids": block, "labels": labels}`` with ``labels = input_ids`` except
   ``-100`` at every position whose previous token is EOS (the first token of the next document is not
   predicted from EOS); EOS itself is a target. The model sees the whole block and the loss shifts inside:
   ``CE(logits[:, :-1], labels[:, 1:])`` (HF convention), so ``labels[:, 0]`` is never used.
5. **Order and hosts.** :func:`train_dataset` shuffles the blocks (grain ``MapDataset.shuffle(seed)``, a
   different permutation each epoch: epoch ``e`` uses seed ``seed + e``), repeats (forever by default), and
   gives host ``process_index`` the elements ``process_index::process_count`` of that global stream, batched
   by ``global_batch // process_count``. So global batch ``b`` is blocks ``b*G .. (b+1)*G - 1`` of the stream,
   host ``h`` holds rows ``h, h+n, h+2n, ...`` of it, and the hosts' batches together are exactly the
   one-host batch. Every host reads only its own blocks' tokens; tokenization itself reads the whole corpus,
   so for large corpora tokenize once, :meth:`TokenizedCorpus.save`, and :meth:`TokenizedCorpus.load` (memory
   mapped) on each host.
6. **State.** The iterator is a plain grain ``DatasetIterator``: ``it.get_state()`` is a JSON-serialisable
   dict (``{"next_index": k}``, k = local batches consumed) and ``it.set_state(state)`` on an iterator of an
   identically built pipeline yields exactly the batches the original would have yielded next (orbax's
   ``grain.python.PyGrainCheckpointHandler`` can store it). The state does not identify the corpus or the
   arguments: restore it only into the same pipeline.
7. **Held-out.** :func:`eval_dataset`: the same blocks, no shuffle, one pass. The last global batch is padded
   with EOS rows whose labels are all -100, so every batch has the static shape ``[global_batch /
   process_count, seq_len]`` and every host yields the same number of batches; no block is dropped.

A batch is ``{"input_ids": int32[global_batch // process_count, seq_len], "labels": int32[same]}``
(numpy); the caller assembles the global array (``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
import typing
import zlib
from typing import Any, Iterable, Iterator, Literal, Sequence

import grain
import numpy as np

from fairy2i_jax.config import PKG_PREFIX, package_path
from fairy2i_jax.errors import Fairy2iError
from fairy2i_jax.jsonl import iter_jsonl, open_text

IGNORE_INDEX = -100


class DataError(Fairy2iError, ValueError):
    """A corpus that cannot be used as asked (missing or unreadable file, bad record, too few tokens); the message
    names the file, line or value."""

DocSplit = Literal["file", "paragraph", "line"]
DOC_SPLITS: tuple[str, ...] = typing.get_args(DocSplit)
SUPPORTED_EXTENSIONS = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
# The blocks live in memory (or a memory map): threads would only add GIL contention (grain's own advice).
_DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------------------------- documents


def _extension(path: str) -> str | None:
    """The supported extension ``path`` ends with (longest first), or None."""
    lower = path.lower()
    for ext in sorted(SUPPORTED_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return ext
    return None


def expand_paths(paths: PathLike | Sequence[PathLike]) -> list[str]:
    """The files named by ``paths`` (a path or a list; a directory = its supported files, sorted by name).

    Raises ValueError for a path that does not exist, a file with an unsupported extension, a directory with
    no supported file, or an empty list.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[str] = []
    for p in map(os.fspath, paths):
        if p.startswith(PKG_PREFIX):
            p = str(package_path(p))
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p)
                           if _extension(f) and os.path.isfile(os.path.join(p, f)))
            if not found:
                raise DataError(f"directory {p!r} holds no file with a supported extension "
                                f"{', '.join(SUPPORTED_EXTENSIONS)}")
            files.extend(found)
        elif not os.path.exists(p):
            raise DataError(f"data file {p!r} does not exist")
        elif _extension(p) is None:
            raise DataError(f"data file {p!r} has an unsupported extension; supported: "
                            f"{', '.join(SUPPORTED_EXTENSIONS)}")
        else:
            files.append(p)
    if not files:
        raise DataError("no data files given")
    return files


def split_text(text: str, doc_split: str) -> list[str]:
    """The non-empty, stripped documents of one text under ``doc_split`` ("file", "paragraph" or "line")."""
    if doc_split == "file":
        parts = [text]
    elif doc_split == "paragraph":
        parts = _PARAGRAPH_BREAK.split(text)
    elif doc_split == "line":
        parts = text.splitlines()
    else:
        raise DataError(f"doc_split must be one of {DOC_SPLITS}, got {doc_split!r}")
    return [s for s in (p.strip() for p in parts) if s]


def _jsonl_records(path: str, text_key: str) -> Iterator[str]:
    """The ``text_key`` strings of a jsonl file; ValueError naming file and line for a bad line."""
    for lineno, record in iter_jsonl(path):
        if not isinstance(record, dict) or text_key not in record:
            raise DataError(f"{path}:{lineno}: record has no {text_key!r} key")
        if not isinstance(record[text_key], str):
            raise DataError(f"{path}:{lineno}: {text_key!r} is not a string")
        yield record[text_key]


def _parquet_records(path: str, text_key: str) -> Iterator[str]:
    """The non-null strings of the ``text_key`` column of a parquet file."""
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    if text_key not in names:
        raise DataError(f"{path}: parquet file has no {text_key!r} column (columns: {names})")
    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(columns=[text_key]):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield value


def _file_records(path: str, text_key: str) -> Iterator[str]:
    """The raw texts of one file: the whole file for text, one per record for jsonl / parquet; :class:`DataError`
    naming the file for bytes that are not UTF-8, a ``.gz`` that is not gzip (or is truncated), or a read error."""
    ext = _extension(path)
    try:
        if ext in (".txt", ".txt.gz"):
            with open_text(path) as f:
                yield f.read()
        elif ext in (".jsonl", ".jsonl.gz"):
            yield from _jsonl_records(path, text_key)
        else:
            yield from _parquet_records(path, text_key)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}: byte {e.object[e.start:e.start + 1]!r})") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a readable gzip file ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def read_documents(paths: PathLike | Sequence[PathLike], *, doc_split: str = "file",
                   text_key: str = "text") -> Iterator[str]:
    """The documents of local files, in order (see the module docstring for formats and ``doc_split``)."""
    if doc_split not in DOC_SPLITS:
        raise DataError(f"doc_split must be one of {DOC_SPLITS}, got {doc_split!r}")
    for path in expand_paths(paths):
        for text in _file_records(path, text_key):
            yield from split_text(text, doc_split)


def load_hf_dataset(path: str, *, split: str, config: str | None = None,
                    data_files: Sequence[str] | None = None, streaming: bool = False):
    """``datasets.load_dataset(path, config, data_files={split: data_files}, split=split)``.

    ``path``: a hub dataset id (needs network or the local HF cache) or a packaged builder (``"json"``,
    ``"parquet"``, ``"text"``) reading local ``data_files``; ``data_files``: the files of ``split`` (paths
    inside the hub repository, or local paths), None for the dataset's own split files.
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError("reading an HF dataset needs the `datasets` package: pip install datasets") from e
    files = None if data_files is None else {split: list(data_files)}
    return datasets.load_dataset(path, config, data_files=files, split=split, streaming=streaming)


def dataset_texts(ds, text_key: str = "text", batch_size: int = 1000) -> Iterator[str]:
    """The ``text_key`` string of every record of a loaded HF dataset, in order; null values are skipped.

    ValueError when the dataset has no ``text_key`` field or a value is not a string.
    """
    if ds.column_names is not None and text_key not in ds.column_names:
        raise DataError(f"the HF dataset has no {text_key!r} field (fields: {ds.column_names})")
    for batch in ds.select_columns([text_key]).iter(batch_size=batch_size):
        for value in batch[text_key]:
            if value is None:
                continue
            if not isinstance(value, str):
                raise DataError(f"the HF dataset's {text_key!r} field holds a {type(value).__name__}, not text")
            yield value


def hf_documents(name: str, *, split: str = "train", config: str | None = None,
                 data_files: Sequence[str] | None = None, text_key: str = "text", doc_split: str = "file",
                 streaming: bool = False) -> Iterator[str]:
    """The documents (``doc_split``, as :func:`read_documents`) of the ``text_key`` texts of
    :func:`load_hf_dataset` ``(name, split=split, config=config, data_files=data_files)``."""
    if doc_split not in DOC_SPLITS:
        raise DataError(f"doc_split must be one of {DOC_SPLITS}, got {doc_split!r}")
    ds = load_hf_dataset(name, split=split, config=config, data_files=data_files, streaming=streaming)
    for text in dataset_texts(ds, text_key):
        yield from split_text(text, doc_split)


# ---------------------------------------------------------------------------------------------------- tokens


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
    """All documents, each followed by EOS, concatenated in corpus order.

    ``tokens``: int32 ``[num_tokens]``; ``doc_ends``: int64 ``[num_docs]``, the end (exclusive) of each
    document, so ``tokens[doc_ends - 1] == eos_id``; ``eos_id``: the EOS token id.
    """

    tokens: np.ndarray
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
        """Blocks of ``seq_len`` tokens one epoch holds (the remainder is dropped)."""
        check_seq_len(seq_len)
        return self.num_tokens // seq_len

    def documents(self) -> list[np.ndarray]:
        """The token arrays of the documents, EOS included (for inspection and tests)."""
        return np.split(np.asarray(self.tokens), np.asarray(self.doc_ends)[:-1])

    def save(self, directory: PathLike) -> None:
        """Write ``tokens.npy``, ``doc_ends.npy`` and ``meta.json`` into ``directory`` (created if needed)."""
        os.makedirs(directory, exist_ok=True)
        np.save(os.path.join(directory, "tokens.npy"), np.asarray(self.tokens, dtype=np.int32))
        np.save(os.path.join(directory, "doc_ends.npy"), np.asarray(self.doc_ends, dtype=np.int64))
        with open(os.path.join(directory, "meta.json"), "w") as f:
            json.dump({"eos_id": int(self.eos_id), "num_tokens": self.num_tokens}, f)

    @classmethod
    def load(cls, directory: PathLike, mmap: bool = True) -> "TokenizedCorpus":
        """Read a corpus written by :meth:`save`; with ``mmap`` the tokens stay on disk until read."""
        directory = os.fspath(directory)
        meta_path = os.path.join(directory, "meta.json")
        if not os.path.isfile(meta_path):
            raise DataError(f"{directory!r} is not a saved TokenizedCorpus (no meta.json)")
        with open(meta_path) as f:
            meta = json.load(f)
        tokens = np.load(os.path.join(directory, "tokens.npy"), mmap_mode="r" if mmap else None)
        doc_ends = np.load(os.path.join(directory, "doc_ends.npy"))
        return cls(tokens=tokens, doc_ends=doc_ends, eos_id=int(meta["eos_id"]))


def tokenize_documents(documents: Iterable[str], tokenizer: Any, *, name: str = "corpus",
                       progress: bool = False) -> TokenizedCorpus:
    """Tokenize and concatenate documents: ``encode(doc, add_special_tokens=False)`` + ``[eos]`` each.

    ``tokenizer``: anything with ``encode(text, add_special_tokens=False)`` and ``eos_token_id`` (an HF
    tokenizer, :class:`fairy2i_jax.hf.tokenizer.SentencePieceTokenizer`). A leading BOS is stripped; documents
    that encode to nothing are skipped. ValueError when no document has a token (``name`` in the message).
    ``progress``: a progress bar (documents and tokens so far).
    """
    from tqdm.auto import tqdm

    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id; documents need an EOS")
    bos = getattr(tokenizer, "bos_token_id", None)
    chunks: list[np.ndarray] = []
    lengths: list[int] = []
    seen = 0
    bar = tqdm(documents, desc=f"tokenize {name}", unit="doc", disable=not progress)
    for doc in bar:
        seen += 1
        ids = list(tokenizer.encode(doc, add_special_tokens=False))
        if ids and bos is not None and ids[0] == bos:
            ids = ids[1:]
        if not ids:
            continue
        ids.append(eos)
        chunks.append(np.asarray(ids, dtype=np.int32))
        lengths.append(len(ids))
    if not chunks:
        raise DataError(f"empty corpus: {name} gave no tokens ({seen} non-empty documents read)")
    return TokenizedCorpus(tokens=np.concatenate(chunks), doc_ends=np.cumsum(lengths, dtype=np.int64),
                           eos_id=int(eos))


def load_corpus(paths: PathLike | Sequence[PathLike], tokenizer: Any, *, doc_split: str = "file",
                text_key: str = "text", progress: bool = False) -> TokenizedCorpus:
    """:func:`read_documents` then :func:`tokenize_documents` over local files."""
    files = expand_paths(paths)
    name = files[0] if len(files) == 1 else f"{len(files)} files ({files[0]}, ...)"
    return tokenize_documents(read_documents(files, doc_split=doc_split, text_key=text_key), tokenizer,
                              name=name, progress=progress)


def epochs_for_budget(corpus: TokenizedCorpus, *, seq_len: int, global_batch: int, steps: int) -> float:
    """How many epochs of the corpus ``steps`` global batches of ``[global_batch, seq_len]`` consume."""
    return steps * global_batch / corpus.num_blocks(seq_len)


# ---------------------------------------------------------------------------------------------------- examples


def make_labels(input_ids: np.ndarray, eos_id: int) -> np.ndarray:
    """``input_ids`` with -100 at every position whose previous token (same row) is ``eos_id``."""
    labels = np.array(input_ids, dtype=np.int32, copy=True)
    labels[..., 1:][np.asarray(input_ids)[..., :-1] == eos_id] = IGNORE_INDEX
    return labels


class _BlockReader:
    """Block index -> example dict; indices >= ``num_blocks`` give an all-EOS row with all labels -100."""

    def __init__(self, tokens: np.ndarray, seq_len: int, eos_id: int, num_blocks: int):
        self.tokens, self.seq_len, self.eos_id, self.num_blocks = tokens, seq_len, eos_id, num_blocks

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        if index >= self.num_blocks:
            row = np.full((self.seq_len,), self.eos_id, dtype=np.int32)
            return {"input_ids": row, "labels": np.full_like(row, IGNORE_INDEX)}
        start = int(index) * self.seq_len
        row = np.asarray(self.tokens[start:start + self.seq_len], dtype=np.int32)
        return {"input_ids": row, "labels": make_labels(row, self.eos_id)}


def check_seq_len(seq_len: int) -> None:
    """ValueError unless ``seq_len`` is an int >= 2 (one input and one target)."""
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise DataError(f"seq_len must be an integer >= 2, got {seq_len!r}")


def local_batch_size(global_batch: int, process_index: int, process_count: int) -> int:
    """``global_batch // process_count``, after checking the host layout (ValueError otherwise)."""
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
    ds = ds[process_index::process_count].batch(local, drop_remainder=True)
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
    ds = _blocks(corpus, seq_len, padded)[process_index::process_count].batch(local, drop_remainder=True)
    return ds.to_iter_dataset(read_options or _DEFAULT_READ_OPTIONS)


def num_eval_batches(corpus: TokenizedCorpus, *, seq_len: int, global_batch: int) -> int:
    """Batches :func:`eval_dataset` yields per host: ``ceil(num_blocks / global_batch)``."""
    return -(-corpus.num_blocks(seq_len) // global_batch)
