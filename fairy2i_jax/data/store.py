"""The token store: a tokenized corpus on disk that every host reads without loading it whole.

Format (the choice: a memory-mapped token array plus document ends, which fits grain's random access: block
``i`` of ``seq_len`` tokens is bytes ``[i * seq_len * itemsize, (i + 1) * seq_len * itemsize)`` of one file; an
ArrayRecord of blocks would fix ``seq_len`` at tokenization time, this keeps it a training-time choice). A store
is a directory:

==================  ==========================================================================================
``tokens.bin``      every token id of the corpus (:mod:`fairy2i_jax.data.corpus`'s rule: each document + EOS,
                    concatenated in corpus order), raw little-endian, no header; dtype ``uint16`` when the
                    tokenizer's vocabulary fits (<= 65536 ids), else ``int32`` (the manifest says which)
``doc_ends.bin``    int64 little-endian ``[num_docs]``: the end (exclusive) of each document in ``tokens.bin``
``manifest.json``   written last: format and version, the tokenizer identity, dtype, ``num_tokens``,
                    ``num_docs``, the source entries, ``doc_split``, ``text_key``, creation time
==================  ==========================================================================================

Tokenizer identity (:class:`TokenizerIdentity`): what the tokenizer was loaded from and its class (for people),
and what actually tells tokenizers apart (the fingerprint, compared): the vocabulary size, the EOS id and the
SHA-256 of the ids of :data:`PROBE_TEXT`. Opening a store for a model whose tokenizer has another fingerprint
raises :class:`StoreMismatch` naming both identities.

Writing (:class:`StoreWriter`) is atomic: everything goes into a hidden sibling directory
``.<name>.tmp-<pid>-<hex>`` that is renamed to ``DIR`` once complete (so a store directory is always whole). An
existing ``DIR`` is replaced only with ``overwrite`` and only when it is itself a token store (never a run
directory or any other directory); the old store is removed after the new one is in place. Writing is local;
reading goes through ``etils.epath``, so a store copied to ``gs://bucket/dir`` is read with ranged reads (a
local store is memory-mapped). Every file's size is checked against the manifest on opening, so a partial copy
is refused.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import uuid
from typing import Any, Sequence

import numpy as np

from fairy2i_jax.data.corpus import TokenizedCorpus, encode_documents, special_ids
from fairy2i_jax.data.documents import DataError
from fairy2i_jax.runs import is_run_dir

FORMAT, VERSION = "fairy2i_jax token store", 1
MANIFEST, TOKENS, DOC_ENDS = "manifest.json", "tokens.bin", "doc_ends.bin"
DOC_ENDS_DTYPE = np.dtype("<i8")
# Fixed text whose ids fingerprint a tokenizer: mixed case, digits, punctuation, whitespace runs, accents, CJK.
PROBE_TEXT = ("The quick brown fox jumps over the lazy dog. It is a truth universally acknowledged, that a single "
              "man in possession of a good fortune, must be in want of a wife.\n\n  Numbers: 0 7 42 1999 3.14159; "
              "code: def f(x):\n\treturn x ** 2  # done\nÉlégance, naïveté, Straße, 東京, ¿qué? — end.")


class StoreError(DataError):
    """A token store that cannot be written or read as asked (the message names the directory and file)."""


class StoreMismatch(StoreError):
    """A token store built with another tokenizer or another document split than the run uses."""


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id ``< vocab_size`` fits in 16 bits, else ``int32`` (little-endian)."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<i4")


@dataclasses.dataclass(frozen=True)
class TokenizerIdentity:
    """Who tokenized a store (module docstring); :meth:`fingerprint` is what must match."""

    source: str
    kind: str
    vocab_size: int
    eos_id: int
    bos_id: int | None
    probe_sha256: str

    @classmethod
    def of(cls, tokenizer: Any, source: str = "") -> "TokenizerIdentity":
        """The identity of ``tokenizer`` (``source``: where it was loaded from, e.g. the model source)."""
        eos, bos = special_ids(tokenizer)
        vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else int(tokenizer.vocab_size)
        ids, _ = encode_documents(tokenizer, [PROBE_TEXT])
        digest = hashlib.sha256(np.asarray(ids, dtype="<i8").tobytes()).hexdigest()
        return cls(str(source), type(tokenizer).__name__, int(vocab), eos, bos, digest)

    def fingerprint(self) -> tuple[int, int, str]:
        """``(vocab_size, eos_id, probe_sha256)``."""
        return self.vocab_size, self.eos_id, self.probe_sha256

    def describe(self) -> str:
        """One line: ``<kind> from <source> (vocab V, eos E, probe <12 hex>)``."""
        return (f"{self.kind} from {self.source or '?'} (vocab {self.vocab_size}, eos {self.eos_id}, probe "
                f"{self.probe_sha256[:12]})")


@dataclasses.dataclass(frozen=True)
class StoreManifest:
    """``manifest.json`` of a store (module docstring)."""

    tokenizer: TokenizerIdentity
    dtype: str
    num_tokens: int
    num_docs: int
    sources: tuple[str, ...]
    doc_split: str
    text_key: str
    created: str = ""
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> "StoreManifest":
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT or raw.get("version") != VERSION:
                raise StoreError(f"{where}: not a {FORMAT} version {VERSION} (format {raw.get('format')!r}, "
                                 f"version {raw.get('version')!r})")
            raw["tokenizer"] = TokenizerIdentity(**raw["tokenizer"])
            raw["sources"] = tuple(raw["sources"])
            return cls(**raw)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            if isinstance(e, StoreError):
                raise
            raise StoreError(f"{where}: unreadable store manifest ({type(e).__name__}: {e})") from None


def _is_local(path: str) -> bool:
    return "://" not in path


def _epath(path: str):
    from etils import epath

    return epath.Path(path)


class StoredArray:
    """A 1-D little-endian array in a raw file, read lazily: a memory map for local files (``mmap``), ranged
    reads through ``etils.epath`` otherwise. Indexing (an int or a step-1 slice) returns numpy values in
    ``out_dtype``; ``bytes_read`` counts the bytes of every read. Pickles as its path (the file is opened
    again, lazily, in the process that reads), so grain workers never copy the data."""

    def __init__(self, path: str, dtype: str | np.dtype, length: int, *, out_dtype: Any = np.int32,
                 mmap: bool = True):
        self.path, self.file_dtype, self.length = str(path), np.dtype(dtype), int(length)
        self.dtype, self.mmap = np.dtype(out_dtype), bool(mmap) and _is_local(str(path))
        self.bytes_read, self._handle = 0, None

    @property
    def shape(self) -> tuple[int]:
        return (self.length,)

    def __len__(self) -> int:
        return self.length

    def __getstate__(self):
        return {**self.__dict__, "_handle": None}

    def _read(self, start: int, stop: int) -> np.ndarray:
        n = max(stop - start, 0)
        self.bytes_read += n * self.file_dtype.itemsize
        if self.mmap:
            if self._handle is None:
                self._handle = np.memmap(self.path, dtype=self.file_dtype, mode="r", shape=(self.length,))
            return self._handle[start:stop]
        if self._handle is None:
            self._handle = _epath(self.path).open("rb")
        self._handle.seek(start * self.file_dtype.itemsize)
        data = self._handle.read(n * self.file_dtype.itemsize)
        return np.frombuffer(data, dtype=self.file_dtype, count=n)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.length)
            if step != 1:
                raise IndexError(f"{self.path}: only step-1 slices are supported, got {key}")
            return np.asarray(self._read(start, stop), dtype=self.dtype)
        i = int(key) + (self.length if int(key) < 0 else 0)
        if not 0 <= i < self.length:
            raise IndexError(f"index {key} out of range for {self.path} of length {self.length}")
        return self.dtype.type(self._read(i, i + 1)[0])

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)


# ---------------------------------------------------------------------------------------------------- reading


def is_store(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a ``manifest.json`` of a token store."""
    manifest = _epath(os.fspath(path)) / MANIFEST
    try:
        return manifest.exists() and json.loads(manifest.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_manifest(path: str | os.PathLike) -> StoreManifest:
    """The manifest of the store at ``path``; :class:`StoreError` when there is none (not a complete store)."""
    where = _epath(os.fspath(path)) / MANIFEST
    if not where.exists():
        raise StoreError(f"{os.fspath(path)} is not a token store (no {MANIFEST}; build one with python -m "
                         "fairy2i_jax.data tokenize --config CFG --out DIR)")
    return StoreManifest.from_json(where.read_text(), str(where))


def check_identity(manifest: StoreManifest, identity: TokenizerIdentity, where: str) -> None:
    """:class:`StoreMismatch` naming both identities when the fingerprints differ."""
    if manifest.tokenizer.fingerprint() != identity.fingerprint():
        raise StoreMismatch(f"token store {where} was built with tokenizer {manifest.tokenizer.describe()}, but this "
                            f"run's tokenizer is {identity.describe()}: rebuild the store with this model's tokenizer")


def _check_split(manifest: StoreManifest, where: str, doc_split: str | None, text_key: str | None) -> None:
    for key, want in (("doc_split", doc_split), ("text_key", text_key)):
        if want is not None and getattr(manifest, key) != want:
            raise StoreMismatch(f"token store {where} was built with data.{key} = {getattr(manifest, key)!r}, the "
                                f"config says {want!r}: set data.{key}={getattr(manifest, key)} or rebuild the store")


def _checked_file(directory, name: str, length: int, dtype: np.dtype) -> str:
    path = directory / name
    want = length * dtype.itemsize
    if not path.exists():
        raise StoreError(f"token store {directory}: {name} is missing")
    size = path.stat().length
    if size != want:
        raise StoreError(f"token store {directory}: {name} has {size} bytes, the manifest says {length} x "
                         f"{dtype.name} = {want} (an incomplete copy?)")
    return os.fspath(path)


def open_store(path: str | os.PathLike, *, identity: TokenizerIdentity | None = None, doc_split: str | None = None,
               text_key: str | None = None, mmap: bool = True) -> TokenizedCorpus:
    """The store at ``path`` (a local directory or an ``etils.epath`` URI) as a :class:`TokenizedCorpus` whose
    tokens and document ends are :class:`StoredArray` s (nothing is read until a block is asked for).

    Checks the file sizes, and when given, the tokenizer ``identity`` (:class:`StoreMismatch`), ``doc_split``
    and ``text_key`` against the manifest. ``mmap=False`` reads with ranged reads even for a local store.
    """
    where = os.fspath(path)
    manifest = read_manifest(where)
    if identity is not None:
        check_identity(manifest, identity, where)
    _check_split(manifest, where, doc_split, text_key)
    directory = _epath(where)
    dtype = np.dtype(manifest.dtype).newbyteorder("<")
    tokens = StoredArray(_checked_file(directory, TOKENS, manifest.num_tokens, dtype), dtype, manifest.num_tokens,
                         out_dtype=np.int32, mmap=mmap)
    ends = StoredArray(_checked_file(directory, DOC_ENDS, manifest.num_docs, DOC_ENDS_DTYPE), DOC_ENDS_DTYPE,
                       manifest.num_docs, out_dtype=np.int64, mmap=mmap)
    return TokenizedCorpus(tokens=tokens, doc_ends=ends, eos_id=manifest.tokenizer.eos_id)


# ---------------------------------------------------------------------------------------------------- writing


def check_output(out: str | os.PathLike, overwrite: bool) -> None:
    """:class:`StoreError` unless a store may be written at ``out`` (module docstring: never over a run
    directory or a non-store directory; over a store only with ``overwrite``)."""
    out = os.fspath(out)
    if not _is_local(out):
        raise StoreError(f"{out}: a token store is written to a local path (copy it to a bucket afterwards)")
    if is_run_dir(out):
        raise StoreError(f"{out} is a training run directory: write the token store elsewhere")
    if os.path.lexists(out):
        if not is_store(out):
            raise StoreError(f"{out} exists and is not a token store: refusing to replace it")
        if not overwrite:
            raise StoreError(f"token store {out} exists: pass --overwrite to replace it")


class StoreWriter:
    """Appends tokens to a new store in a temporary sibling directory; :meth:`commit` makes it ``out`` (module
    docstring). Use as a context manager: an exception removes the temporary directory, nothing else."""

    def __init__(self, out: str | os.PathLike, *, identity: TokenizerIdentity, sources: Sequence[str],
                 doc_split: str, text_key: str, overwrite: bool = False):
        check_output(out, overwrite)
        self.out = os.path.abspath(os.fspath(out))
        self.identity, self.sources = identity, tuple(str(s) for s in sources)
        self.doc_split, self.text_key, self.overwrite = doc_split, text_key, overwrite
        self.dtype = token_dtype(identity.vocab_size)
        parent, name = os.path.split(self.out)
        os.makedirs(parent, exist_ok=True)
        self.tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.makedirs(self.tmp)
        self._tokens = open(os.path.join(self.tmp, TOKENS), "wb")
        self._ends = open(os.path.join(self.tmp, DOC_ENDS), "wb")
        self.num_tokens = self.num_docs = 0

    def append(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Add documents: their concatenated ``tokens`` (each ending with EOS) and their ``lengths``."""
        tokens, lengths = np.asarray(tokens), np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise StoreError(f"{self.out}: {tokens.size} tokens do not add up to the document lengths "
                             f"({int(lengths.sum())})")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.identity.vocab_size):
            raise StoreError(f"{self.out}: token id {int(tokens.max())} outside the vocabulary of "
                             f"{self.identity.vocab_size}")
        self._tokens.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._ends.write((self.num_tokens + np.cumsum(lengths)).astype(DOC_ENDS_DTYPE).tobytes())
        self.num_tokens += int(tokens.size)
        self.num_docs += int(lengths.size)

    def commit(self) -> StoreManifest:
        """Flush, write the manifest, and rename the temporary directory to ``out``."""
        if self.num_tokens == 0:
            raise StoreError(f"{self.out}: empty corpus: the sources {list(self.sources)} gave no tokens")
        for f in (self._tokens, self._ends):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        manifest = StoreManifest(self.identity, self.dtype.name, self.num_tokens, self.num_docs,
                                 self.sources, self.doc_split, self.text_key,
                                 created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        with open(os.path.join(self.tmp, MANIFEST), "w") as f:
            f.write(manifest.to_json())
            f.flush()
            os.fsync(f.fileno())
        check_output(self.out, self.overwrite)  # nothing appeared at `out` meanwhile
        old = None
        if os.path.lexists(self.out):
            old = self.tmp + ".old"
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old)
        return manifest

    def abort(self) -> None:
        """Remove the temporary directory (``out`` is untouched)."""
        for f in (self._tokens, self._ends):
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and os.path.isdir(self.tmp):
            self.abort()
