"""The transformers remote code of ``packed`` exports, and the export-side hooks that ship it.

This package holds two plain-torch files, ``configuration_fairy2i.py`` and ``modeling_fairy2i.py``, that a
``packed`` export directory carries next to its ``config.json``; :func:`remote_code_config` turns the export's
base-model ``config.json`` dict into the one that names them (``model_type: fairy2i``, ``base_model_type``,
``architectures``, ``auto_map``), and :func:`copy_remote_code` copies them. Then::

    AutoModelForCausalLM.from_pretrained(packed_dir, trust_remote_code=True)   # torch + transformers only

builds the base family's transformers model with a ``Fairy2iLinear`` (codes + scales) per packed linear, and
without ``trust_remote_code`` transformers refuses the directory (``ValueError``: "... contains custom code
which must be executed to correctly load the model ... pass the argument `trust_remote_code=True`"). This
package's ``__init__`` imports neither torch nor transformers.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

REMOTE_DIR = Path(__file__).parent
REMOTE_FILES = ("configuration_fairy2i.py", "modeling_fairy2i.py")
MODEL_TYPE = "fairy2i"
ARCHITECTURE = "Fairy2iForCausalLM"
AUTO_MAP = {"AutoConfig": "configuration_fairy2i.Fairy2iConfig",
            "AutoModelForCausalLM": "modeling_fairy2i.Fairy2iForCausalLM"}


def remote_code_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The packed ``config.json`` dict of a base-model dict ``hf``: same keys, ``model_type`` ``fairy2i`` with the
    base recorded as ``base_model_type``, ``architectures`` ``[Fairy2iForCausalLM]`` and the ``auto_map``."""
    out = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "base_model_type": hf["model_type"],
           "auto_map": dict(AUTO_MAP)}
    out.update({k: v for k, v in hf.items() if k not in out and k not in ("architectures", "model_type")})
    return out


def base_model_type(hf: dict[str, Any]) -> str | None:
    """The base family of a ``config.json`` dict: ``base_model_type`` for a packed export, else ``model_type``."""
    return hf.get("base_model_type") if hf.get("model_type") == MODEL_TYPE else hf.get("model_type")


def copy_remote_code(dest: str | Path) -> list[str]:
    """Copy the two remote-code files into ``dest``; returns their names."""
    for name in REMOTE_FILES:
        shutil.copyfile(REMOTE_DIR / name, Path(dest) / name)
    return list(REMOTE_FILES)
