"""The project's one error base class.

Every error a user can cause and fix (a bad config key, a missing or corrupt file, a model source that cannot be
used, an export that cannot be done as asked) derives from :class:`Fairy2iError`; the command-line tools catch
it and print its message as one line with exit code 2, while any other exception keeps its traceback (a bug).
Subclasses also derive from the builtin that fits (``ValueError``, ``RuntimeError``) so callers that catch those
keep working.
"""

from __future__ import annotations

import sys
from typing import Any, Callable


class Fairy2iError(Exception):
    """An error in the user's input or environment, reported as one line naming the file, key, shape or value."""


class CheckpointError(Fairy2iError, ValueError):
    """A model checkpoint (HF directory, safetensors file, GGUF file, packed export) that cannot be loaded:
    missing, corrupt, pickled, or not matching the model; the message names the file and tensor."""


def run_cli(fn: Callable[..., Any], *args: Any) -> int:
    """``fn(*args)`` as a command line's body: exit code 0, or for a :class:`Fairy2iError` the one line
    ``error: <Type>: <message>`` on stderr and exit code 2 (any other exception keeps its traceback)."""
    try:
        fn(*args)
    except Fairy2iError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0
