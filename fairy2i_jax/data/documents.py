"""Documents: local text / jsonl / parquet files and Hugging Face datasets -> a stream of document strings.

Formats. :func:`read_documents` yields the documents of local files: ``.txt`` / ``.txt.gz`` (UTF-8),
``.jsonl`` / ``.jsonl.gz`` (one JSON object per line, text under ``text_key``) and ``.parquet`` (a ``text_key``
column); a directory stands for its supported files, sorted by name. ``doc_split`` says what one document is:
``"file"`` = a whole file (text) or a whole record (jsonl / parquet), ``"paragraph"`` = each blank-line
separated paragraph of it, ``"line"`` = each non-empty line. Documents are stripped; empty ones are skipped.
:func:`hf_documents` does the same for an HF dataset (:func:`load_hf_dataset`, the one
``datasets.load_dataset`` call: hub datasets need network or the local HF cache).

Config entries. A ``data.train`` / ``data.eval`` / ``data.test`` list holds entries of three kinds:

* a local path (file or directory, as above);
* ``hf:NAME[:CONFIG][:SPLIT]`` (split default ``train``, an empty CONFIG = none, e.g. ``hf:allenai/c4:en`` or
  ``hf:wikitext::test``): the dataset streamed with ``datasets`` (``streaming=True``: no full download), which
  needs the network; offline (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set) such an entry is refused;
* ``store:DIR``: a token store (:mod:`fairy2i_jax.data.store`), already tokenized; it must be the list's only
  entry.

:func:`entry_documents` yields the documents of a list of local and ``hf:`` entries, in order.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import re
import typing
import zlib
from typing import Iterator, Literal, Sequence

from fairy2i_jax.config import PKG_PREFIX, package_path
from fairy2i_jax.errors import Fairy2iError
from fairy2i_jax.hf.hub import offline_variables
from fairy2i_jax.jsonl import iter_jsonl, open_text

DocSplit = Literal["file", "paragraph", "line"]
DOC_SPLITS: tuple[str, ...] = typing.get_args(DocSplit)
SUPPORTED_EXTENSIONS = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
HF_PREFIX, STORE_PREFIX = "hf:", "store:"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")  # the variables that keep `datasets` offline
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")

PathLike = str | os.PathLike


class DataError(Fairy2iError, ValueError):
    """Data that cannot be read as asked: a missing file, a bad record, an empty corpus, a store that does not
    fit (the message names the file, key or value)."""


# ---------------------------------------------------------------------------------------------------- local files


def _extension(path: str) -> str | None:
    """The supported extension ``path`` ends with (longest first), or None."""
    lower = path.lower()
    for ext in sorted(SUPPORTED_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return ext
    return None


def expand_paths(paths: PathLike | Sequence[PathLike]) -> list[str]:
    """The files named by ``paths`` (a path or a list; a directory = its supported files, sorted by name).

    :class:`DataError` for a path that does not exist, a file with an unsupported extension, a directory with
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


def check_doc_split(doc_split: str) -> None:
    """:class:`DataError` unless ``doc_split`` is one of :data:`DOC_SPLITS`."""
    if doc_split not in DOC_SPLITS:
        raise DataError(f"doc_split must be one of {DOC_SPLITS}, got {doc_split!r}")


def split_text(text: str, doc_split: str) -> list[str]:
    """The non-empty, stripped documents of one text under ``doc_split`` ("file", "paragraph" or "line")."""
    check_doc_split(doc_split)
    if doc_split == "file":
        parts = [text]
    elif doc_split == "paragraph":
        parts = _PARAGRAPH_BREAK.split(text)
    else:
        parts = text.splitlines()
    return [s for s in (p.strip() for p in parts) if s]


def _jsonl_records(path: str, text_key: str) -> Iterator[str]:
    """The ``text_key`` strings of a jsonl file; :class:`DataError` (or :class:`~fairy2i_jax.jsonl.JsonlError`)
    naming file and line for a bad line."""
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
    check_doc_split(doc_split)
    for path in expand_paths(paths):
        for text in _file_records(path, text_key):
            yield from split_text(text, doc_split)


# ---------------------------------------------------------------------------------------------------- HF datasets


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

    :class:`DataError` when the dataset has no ``text_key`` field or a value is not a string.
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
    check_doc_split(doc_split)
    ds = load_hf_dataset(name, split=split, config=config, data_files=data_files, streaming=streaming)
    for text in dataset_texts(ds, text_key):
        yield from split_text(text, doc_split)


# ---------------------------------------------------------------------------------------------------- entries


@dataclasses.dataclass(frozen=True)
class HFEntry:
    """A parsed ``hf:NAME[:CONFIG][:SPLIT]`` entry."""

    name: str
    config: str | None = None
    split: str = "train"


def parse_hf_entry(entry: str) -> HFEntry:
    """``hf:NAME[:CONFIG][:SPLIT]`` -> :class:`HFEntry`; :class:`DataError` for an empty name or extra fields."""
    parts = entry[len(HF_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3:
        raise DataError(f"data entry {entry!r}: expected hf:NAME[:CONFIG][:SPLIT], e.g. hf:allenai/c4:en:train")
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return HFEntry(parts[0], config, split)


def is_store_entry(entry: str) -> bool:
    """True for a ``store:DIR`` entry."""
    return str(entry).startswith(STORE_PREFIX)


def store_entry_path(entries: Sequence[str], key: str = "data") -> str | None:
    """The DIR of a list holding one ``store:DIR`` entry, None when the list has no store entry;
    :class:`DataError` when a store entry is mixed with others or its path is empty."""
    stores = [e for e in entries if is_store_entry(e)]
    if not stores:
        return None
    if len(entries) != 1 or not stores[0][len(STORE_PREFIX):]:
        raise DataError(f"{key}: a store:DIR entry must be the list's only entry, got {list(entries)}")
    return stores[0][len(STORE_PREFIX):]


def _check_hf_entry(entry: str) -> HFEntry:
    hf = parse_hf_entry(entry)
    offline = offline_variables(OFFLINE_VARIABLES)
    if offline:
        raise DataError(f"data entry {entry!r} streams from the Hugging Face hub, but this machine is offline "
                        f"({', '.join(offline)}): tokenize it into a store where the network is "
                        "(python -m fairy2i_jax.data tokenize) and use store:DIR")
    return hf


def _hf_entry_documents(entry: str, hf: HFEntry, doc_split: str, text_key: str) -> Iterator[str]:
    try:
        yield from hf_documents(hf.name, split=hf.split, config=hf.config, text_key=text_key, doc_split=doc_split,
                                streaming=True)
    except (ConnectionError, OSError) as e:
        raise DataError(f"data entry {entry!r}: could not stream the dataset ({type(e).__name__}: {e})") from e


def entry_documents(entries: Sequence[str], *, doc_split: str = "file", text_key: str = "text") -> Iterator[str]:
    """The documents of local and ``hf:`` entries (module docstring), in order. Checked before the first
    document is read (here, not lazily): every local path exists, every ``hf:`` entry parses and the machine is
    online; :class:`DataError` otherwise, and for a ``store:`` entry (already tokenized)."""
    check_doc_split(doc_split)
    if not entries:
        raise DataError("no data entries given")
    plan = []
    for entry in map(str, entries):
        if is_store_entry(entry):
            raise DataError(f"data entry {entry!r} is a token store (already tokenized), not documents")
        plan.append((entry, _check_hf_entry(entry) if entry.startswith(HF_PREFIX) else expand_paths(entry)))
    return _documents(plan, doc_split, text_key)


def _documents(plan, doc_split: str, text_key: str) -> Iterator[str]:
    for entry, what in plan:
        if isinstance(what, HFEntry):
            yield from _hf_entry_documents(entry, what, doc_split, text_key)
        else:
            yield from read_documents(what, doc_split=doc_split, text_key=text_key)
