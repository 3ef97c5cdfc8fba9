"""Upload a finished export directory to the Hugging Face hub (``python -m fairy2i_jax.export --push-to-hub``).

The CLI checks :func:`hub_offline` before doing any work, so an offline machine (``HF_HUB_OFFLINE`` or
``TRANSFORMERS_OFFLINE`` set, as on the test machines) is refused in one line, before any model is loaded or
directory written. :func:`push_export` creates the repo (``exist_ok``) and uploads the whole directory in one
commit with ``huggingface_hub.upload_folder``; the token is huggingface_hub's usual one (``HF_TOKEN`` or
``hf auth login``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from fairy2i_jax.errors import Fairy2iError

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = ("1", "ON", "YES", "TRUE")


class HubError(Fairy2iError, RuntimeError):
    """The hub cannot be reached or refused the upload (the message says which)."""


def offline_variables(names: Sequence[str] = OFFLINE_VARS, environ: Mapping[str, str] | None = None) -> list[str]:
    """``NAME=value`` of every variable of ``names`` set to a true value (``1``, ``ON``, ``YES``, ``TRUE``, any
    case) in ``environ`` (default ``os.environ``, read at call time: huggingface_hub reads it once, at import)."""
    environ = os.environ if environ is None else environ
    return [f"{k}={environ[k]}" for k in names if environ.get(k, "").strip().upper() in _TRUE]


def hub_offline() -> str | None:
    """The name of the first of :data:`OFFLINE_VARS` that is set to a true value, else None."""
    found = offline_variables()
    return found[0].split("=", 1)[0] if found else None


def check_online(repo_id: str) -> None:
    """Raise :class:`HubError` (one line) when the hub is switched off by an offline variable."""
    var = hub_offline()
    if var:
        raise HubError(f"--push-to-hub {repo_id}: the hub is offline ({var} is set); nothing was exported. Export "
                       f"without --push-to-hub, then upload the directory from an online machine")


def push_export(path: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                commit_message: str | None = None) -> str:
    """Upload the export directory ``path`` to the model repo ``repo_id`` (created if missing); returns its URL.
    Raises :class:`HubError` when offline or when the hub refuses (auth, name, network)."""
    check_online(repo_id)
    from huggingface_hub import create_repo, upload_folder

    path = Path(path)
    try:
        url = create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        upload_folder(repo_id=repo_id, folder_path=path, repo_type="model",
                      commit_message=commit_message or f"fairy2i_jax export ({path.name})")
    except Exception as e:  # the network boundary: auth, naming, HTTP and transport errors all end here
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise HubError(f"--push-to-hub {repo_id}: upload of {path} failed: {type(e).__name__}: {first}") from e
    return str(url)
