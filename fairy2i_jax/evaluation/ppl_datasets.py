"""Perplexity datasets of the HF hub (`eval.py --ppl-datasets`), loaded as the official Fairy2i eval code does.

`PPL_DATASETS` is the registry: name -> `PplDataset` (what `datasets.load_dataset` gets, which field holds the
text, and how the records become documents, the items of the official packed protocol). Reference G.1:

- `wikitext2`: `load_dataset("wikitext", "wikitext-2-raw-v1", split="test")` (the hub now keeps it under
  `Salesforce/wikitext`, same files); documents = `"".join(texts).split("\\n")` without the empty strings
  (`perplexity.wikitext_lines`): every non-empty line is one item.
- `c4`: the shards `en/c4-validation.00000-of-00008.json.gz` and `...00001...` of `allenai/c4` (split
  `validation`); documents = every record's text, all of them (no sampling), empty strings dropped.

The contiguous protocol joins the documents with "\\n\\n", as for `--ppl-files` (see `cli.py`). Loading goes
through `fairy2i_jax.data.load_hf_dataset` (the one `load_dataset` call): the first use downloads into the HF
cache, later uses (and offline mode, HF_HUB_OFFLINE=1) read that cache.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Iterable, Sequence

from fairy2i_jax.data import OFFLINE_VARIABLES, dataset_texts, load_hf_dataset
from fairy2i_jax.errors import Fairy2iError
from fairy2i_jax.hf.hub import offline_variables as hub_offline_variables
from fairy2i_jax.evaluation.perplexity import wikitext_lines

DOCUMENT_RULES = ("lines", "records")


class PplDatasetError(Fairy2iError, ValueError):
    """A perplexity dataset that cannot be used; the message says which and why."""


class PplDatasetUnavailable(PplDatasetError):
    """A known perplexity dataset that could not be loaded (no network and no local cache, or a failed load)."""


@dataclass(frozen=True)
class PplDataset:
    """How to load one perplexity dataset and cut it into documents.

    `load_hf_dataset(path, config=config, split=split, data_files=data_files)`, the string field `text_field`
    of each record, then `documents` = "lines" (all texts concatenated, split at "\\n", empty lines dropped)
    or "records" (each non-empty text is one document).
    """

    name: str
    path: str
    config: str | None = None
    split: str = "test"
    data_files: tuple[str, ...] | None = None
    text_field: str = "text"
    documents: str = "records"

    def __post_init__(self):
        if self.documents not in DOCUMENT_RULES:
            raise ValueError(f"documents must be one of {DOCUMENT_RULES}, got {self.documents!r}")

    @property
    def source(self) -> str:
        """`path [config], split S[, files F1 F2]`, for messages."""
        config = "" if self.config is None else " " + self.config
        files = "" if self.data_files is None else ", files " + " ".join(self.data_files)
        return f"{self.path}{config}, split {self.split}{files}"


WIKITEXT2 = PplDataset("wikitext2", "Salesforce/wikitext", "wikitext-2-raw-v1", "test", documents="lines")
C4 = PplDataset("c4", "allenai/c4", None, "validation", documents="records", data_files=(
    "en/c4-validation.00000-of-00008.json.gz", "en/c4-validation.00001-of-00008.json.gz"))
PPL_DATASETS: dict[str, PplDataset] = {spec.name: spec for spec in (WIKITEXT2, C4)}


def resolve_ppl_datasets(names: Sequence[str]) -> list[PplDataset]:
    """The `PPL_DATASETS` entries of `names`, in order, each once; PplDatasetError naming the known ones
    otherwise."""
    unknown = [n for n in names if n not in PPL_DATASETS]
    if unknown:
        raise PplDatasetError(f"unknown perplexity dataset(s) {unknown}; known: {', '.join(PPL_DATASETS)}")
    return [PPL_DATASETS[n] for n in dict.fromkeys(names)]


def documents_from_texts(texts: Iterable[str], rule: str) -> list[str]:
    """The documents of a dataset's texts: "lines" = `wikitext_lines("".join(texts))` (every non-empty line),
    "records" = every text that is not the empty string."""
    if rule == "lines":
        return wikitext_lines(list(texts))
    if rule == "records":
        return [t for t in texts if t != ""]
    raise ValueError(f"unknown document rule {rule!r}; expected one of {DOCUMENT_RULES}")


def dataset_documents(ds, spec: PplDataset) -> list[str]:
    """The documents of a loaded dataset `ds` (records with a `spec.text_field` string) under `spec.documents`."""
    return documents_from_texts(dataset_texts(ds, spec.text_field), spec.documents)


def offline_variables(environ: dict | None = None) -> list[str]:
    """`NAME=value` of every `datasets` offline variable (`OFFLINE_VARIABLES`) set to a true value."""
    return hub_offline_variables(OFFLINE_VARIABLES, environ)


def load_documents(spec: PplDataset) -> list[str]:
    """`dataset_documents` of `spec`'s dataset, loaded (or read from the HF cache) by `load_hf_dataset`.

    PplDatasetError when the `datasets` package is missing; PplDatasetUnavailable (naming the dataset, the
    offline variables if set, and the original error) when loading fails for any reason.
    """
    try:
        importlib.import_module("datasets")
    except ImportError:
        raise PplDatasetError(f"perplexity dataset {spec.name!r} needs the `datasets` package: "
                              "pip install '.[eval]'") from None
    try:
        ds = load_hf_dataset(spec.path, split=spec.split, config=spec.config, data_files=spec.data_files)
        return dataset_documents(ds, spec)
    except Exception as e:  # network, cache, hub and format errors differ across datasets / hub versions
        offline = offline_variables()
        mode = f"offline mode is on ({', '.join(offline)}) and " if offline else ""
        raise PplDatasetUnavailable(
            f"cannot load perplexity dataset {spec.name!r} ({spec.source}): {mode}it needs network access or a "
            f"copy in the local HF cache [{type(e).__name__}: {e}]") from None
