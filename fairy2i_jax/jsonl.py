"""JSON Lines files (corpora, ``metrics.jsonl``): one reader with one error format for every caller."""

from __future__ import annotations

import gzip
import json
import os
from typing import IO, Any, Iterator

from fairy2i_jax.errors import Fairy2iError


class JsonlError(Fairy2iError, ValueError):
    """A line of a JSON Lines file that is not valid JSON (the message names the file and the line)."""


def open_text(path: str | os.PathLike) -> IO[str]:
    """A text-mode UTF-8 handle, gunzipping ``.gz`` files."""
    path = os.fspath(path)
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_jsonl(path: str | os.PathLike, *, skip_invalid: bool = False) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` of every non-blank line of ``path`` (``.gz`` read transparently);
    :class:`JsonlError` ``"<path>:<line>: not valid JSON (<reason>)"`` for a line that does not parse, or, with
    ``skip_invalid``, that line left out (a log torn by a killed process and then appended to)."""
    with open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                if skip_invalid:
                    continue
                raise JsonlError(f"{os.fspath(path)}:{lineno}: not valid JSON ({e.msg})") from None
            yield lineno, value
