"""Config entries -> tokens: a corpus in memory (:func:`load_corpus`) or a token store on disk
(:func:`tokenize_to_store`, what ``python -m fairy2i_jax.data tokenize`` runs).

:func:`load_corpus` takes the entries of a ``data.train`` / ``data.eval`` / ``data.test`` list
(:mod:`fairy2i_jax.data.documents`): a ``store:DIR`` entry opens that store (memory-mapped, checked against the
tokenizer's identity and the document split), anything else is read and tokenized in memory.

:func:`tokenize_to_store` reads the documents in the main process, in order, hands batches of
``docs_per_task`` documents to ``num_proc`` worker processes, and appends the results in submission order, so
the store holds exactly the tokens :func:`load_corpus` gives in memory. At most ``2 * num_proc`` batches are in
flight: memory stays bounded whatever the corpus size. A tqdm bar counts tokens. Workers are forked (they
start at once and share the loaded tokenizer) unless this process has started a JAX backend, whose threads
make forking unsafe: then they are spawned (each imports the package and unpickles the tokenizer, seconds
per worker). Either way each worker runs the tokenizer with the HF tokenizers' own thread pool off.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import multiprocessing
import os
import pickle
import time
from typing import Any, Iterable, Iterator, Sequence

from fairy2i_jax.data.corpus import TokenizedCorpus, encode_documents, tokenize_documents
from fairy2i_jax.data.documents import PathLike, entry_documents, store_entry_path
from fairy2i_jax.data.store import StoreManifest, StoreWriter, TokenizerIdentity, open_store

_WORKER_TOKENIZER: Any = None


def _entries(paths: PathLike | Sequence[PathLike]) -> list[str]:
    return [os.fspath(paths)] if isinstance(paths, (str, os.PathLike)) else [os.fspath(p) for p in paths]


def _name(entries: Sequence[str]) -> str:
    return entries[0] if len(entries) == 1 else f"{len(entries)} entries ({entries[0]}, ...)"


def load_corpus(paths: PathLike | Sequence[PathLike], tokenizer: Any, *, doc_split: str | None = None,
                text_key: str | None = None, source: str = "", progress: bool = False) -> TokenizedCorpus:
    """The corpus of config entries (module docstring). ``doc_split`` / ``text_key`` default to ``"file"`` /
    ``"text"`` for documents; for a store they default to the store's own and, when given, must match it.
    ``source``: where ``tokenizer`` comes from (named in a mismatch error); ``progress``: a bar while
    tokenizing in memory."""
    entries = _entries(paths)
    store = store_entry_path(entries)
    if store is not None:
        return open_store(store, identity=TokenizerIdentity.of(tokenizer, source), doc_split=doc_split,
                          text_key=text_key)
    docs = entry_documents(entries, doc_split=doc_split or "file", text_key=text_key or "text")
    return tokenize_documents(docs, tokenizer, name=_name(entries), progress=progress)


@dataclasses.dataclass(frozen=True)
class TokenizeResult:
    """What :func:`tokenize_to_store` wrote and how fast."""

    path: str
    manifest: StoreManifest
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.manifest.num_tokens / max(self.seconds, 1e-9)


def _batches(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _init_worker(tokenizer_bytes: bytes | None) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    if tokenizer_bytes is not None:  # spawned; a forked worker inherits _WORKER_TOKENIZER
        _WORKER_TOKENIZER = pickle.loads(tokenizer_bytes)


def _start_method() -> str:
    """``fork`` where available and no JAX backend runs in this process (module docstring), else ``spawn``."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return "spawn"
    try:
        from jax._src import xla_bridge

        started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        started = True
    return "spawn" if started else "fork"


def _encode_task(docs: list[str]):
    return encode_documents(_WORKER_TOKENIZER, docs)


def _encoded(batches: Iterator[list[str]], tokenizer: Any, num_proc: int) -> Iterator[tuple[Any, Any]]:
    """``encode_documents`` of every batch, in order: inline for one process, else through a pool of
    ``num_proc`` spawned workers with at most ``2 * num_proc`` batches in flight."""
    if num_proc <= 1:
        for batch in batches:
            yield encode_documents(tokenizer, batch)
        return
    global _WORKER_TOKENIZER
    method = _start_method()
    _WORKER_TOKENIZER = tokenizer
    payload = pickle.dumps(tokenizer) if method == "spawn" else None
    ctx = multiprocessing.get_context(method)
    with concurrent.futures.ProcessPoolExecutor(num_proc, mp_context=ctx, initializer=_init_worker,
                                                initargs=(payload,)) as pool:
        pending: collections.deque = collections.deque()
        try:
            for batch in batches:
                pending.append(pool.submit(_encode_task, batch))
                if len(pending) >= 2 * num_proc:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
            _WORKER_TOKENIZER = None


def tokenize_to_store(entries: Sequence[str], tokenizer: Any, out: PathLike, *, source: str = "",
                      doc_split: str = "file", text_key: str = "text", num_proc: int = 1, overwrite: bool = False,
                      progress: bool = True, docs_per_task: int = 512) -> TokenizeResult:
    """Tokenize the documents of ``entries`` into a new token store at ``out`` (module docstring; the format,
    the atomic write and the overwrite rules are :mod:`fairy2i_jax.data.store`'s)."""
    from tqdm import tqdm

    entries = _entries(entries)
    identity = TokenizerIdentity.of(tokenizer, source)
    start = time.perf_counter()
    docs = entry_documents(entries, doc_split=doc_split, text_key=text_key)
    with StoreWriter(out, identity=identity, sources=entries, doc_split=doc_split, text_key=text_key,
                     overwrite=overwrite) as writer:
        with tqdm(desc=f"tokenize -> {os.fspath(out)}", unit="tok", unit_scale=True, disable=not progress) as bar:
            for tokens, lengths in _encoded(_batches(docs, docs_per_task), tokenizer, num_proc):
                writer.append(tokens, lengths)
                bar.update(int(tokens.size))
                bar.set_postfix(docs=writer.num_docs, refresh=False)
        manifest = writer.commit()
    return TokenizeResult(writer.out, manifest, time.perf_counter() - start)
