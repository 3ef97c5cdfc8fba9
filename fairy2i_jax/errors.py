"""The project's one error base class.

Every error a user can cause and fix (a bad config key, a missing or corrupt file, a model source that cannot be
used, an export that cannot be done as asked) derives from :class:`Fairy2iError`; the command-line tools catch
it and print its message as one line with exit code 2, while any other exception keeps its traceback (a bug).
Subclasses also derive from the builtin that fits (``ValueError``, ``RuntimeError``) so callers that catch those
keep working.
"""

from __future__ import annotations


class Fairy2iError(Exception):
    """An error in the user's input or environment, reported as one line naming the file, key, shape or value."""


class CheckpointError(Fairy2iError, ValueError):
    """A model checkpoint (HF directory, safetensors file, GGUF file, packed export) that cannot be loaded:
    missing, corrupt, pickled, or not matching the model; the message names the file and tensor."""
