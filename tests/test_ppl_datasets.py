"""fairy2i_jax.evaluation.ppl_datasets (`eval.py --ppl-datasets`): the registry, the official record -> document
rules on real `datasets.Dataset`s, the real `load_dataset` path on local files (offline), and the offline /
missing-package errors. (The command line's dataset errors and perplexities: test_eval_cli.py.)

The test machine has no network (conftest sets HF_HUB_OFFLINE=1), so the hub datasets themselves are never
downloaded here: a `PplDataset` pointing a packaged builder ("json", "parquet") at local files goes through the
same `load_documents` / `load_hf_dataset` code as `wikitext2` and `c4`.
"""

import sys

import pytest

from eval_helpers import write_jsonl_gz
from fairy2i_jax.data import hf_documents
from fairy2i_jax.evaluation.cli import build_parser
from fairy2i_jax.evaluation.ppl_datasets import (
    C4,
    PPL_DATASETS,
    WIKITEXT2,
    PplDataset,
    PplDatasetError,
    PplDatasetUnavailable,
    dataset_documents,
    documents_from_texts,
    load_documents,
    offline_variables,
    resolve_ppl_datasets,
)

datasets = pytest.importorskip("datasets")

WIKI_RECORDS = [" = Title = \n", "", " text a \n", " text b\n", " \n", "\n", "tail without newline"]
WIKI_DOCS = [" = Title = ", " text a ", " text b", " ", "tail without newline"]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Every `load_dataset` of a test writes its prepared arrow files under tmp_path, not ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


# ------------------------------------------------------------------------------------------------ registry


def test_registry_follows_the_official_eval_code():
    assert list(PPL_DATASETS) == ["wikitext2", "c4"]
    assert (WIKITEXT2.path, WIKITEXT2.config, WIKITEXT2.split, WIKITEXT2.data_files, WIKITEXT2.documents) == (
        "Salesforce/wikitext", "wikitext-2-raw-v1", "test", None, "lines")
    assert (C4.path, C4.config, C4.split, C4.documents) == ("allenai/c4", None, "validation", "records")
    assert C4.data_files == ("en/c4-validation.00000-of-00008.json.gz", "en/c4-validation.00001-of-00008.json.gz")
    assert WIKITEXT2.text_field == C4.text_field == "text"
    help_text = build_parser().format_help()
    assert all(name in help_text for name in PPL_DATASETS)
    with pytest.raises(ValueError, match="documents must be one of"):
        PplDataset("x", "json", documents="paragraphs")


def test_resolve_names():
    assert resolve_ppl_datasets(["c4", "wikitext2", "c4"]) == [C4, WIKITEXT2]
    assert resolve_ppl_datasets([]) == []
    known = r"unknown perplexity dataset\(s\) \['wiki', 'ptb'\]; known: wikitext2, c4"
    with pytest.raises(PplDatasetError, match=known):
        resolve_ppl_datasets(["wikitext2", "wiki", "ptb"])


# ------------------------------------------------------------------------------------------------ records -> documents


def test_wikitext_rule_on_a_dataset():
    """Official: "".join(texts).split("\\n"), only exactly-empty lines dropped (" " stays, nothing stripped)."""
    ds = datasets.Dataset.from_dict({"text": WIKI_RECORDS})
    assert dataset_documents(ds, WIKITEXT2) == WIKI_DOCS
    # records are concatenated, not separated: a record without "\n" runs into the next one
    ds = datasets.Dataset.from_dict({"text": ["a", "b\n", "c"]})
    assert dataset_documents(ds, WIKITEXT2) == ["ab", "c"]


def test_c4_rule_on_a_dataset():
    """Every record's text is one document, untouched; empty texts and nulls dropped; other fields ignored."""
    texts = ["First doc.\nIts second line.", "", "  spaced  ", None, "Last doc."]
    ds = datasets.Dataset.from_dict({"text": texts, "url": [f"u{i}" for i in range(5)],
                                     "timestamp": ["t"] * 5})
    assert dataset_documents(ds, C4) == ["First doc.\nIts second line.", "  spaced  ", "Last doc."]
    assert documents_from_texts(["x", "", "y"], "records") == ["x", "y"]
    with pytest.raises(ValueError, match="no 'text' field"):
        dataset_documents(datasets.Dataset.from_dict({"content": ["x"]}), C4)
    with pytest.raises(ValueError, match="unknown document rule"):
        documents_from_texts(["x"], "words")


# ------------------------------------------------------------------------------------------------ loading


def test_load_documents_from_local_files(tmp_path):
    """The real `load_dataset` path, offline: parquet (how the hub stores WikiText) and gzipped JSON lines
    (how it stores C4), with data_files for the split as the c4 entry has."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    wiki_file = tmp_path / "wiki-test.parquet"
    pq.write_table(pa.table({"text": WIKI_RECORDS}), wiki_file)
    wiki = PplDataset("wikilocal", "parquet", split="test", data_files=(str(wiki_file),), documents="lines")
    assert load_documents(wiki) == WIKI_DOCS

    shards = [write_jsonl_gz(tmp_path / f"c4-validation.0000{i}.json.gz",
                             [{"text": f"doc {i}.{j}\nline", "url": "u"} for j in range(3)] + [{"text": ""}])
              for i in range(2)]
    c4 = PplDataset("c4local", "json", split="validation", data_files=tuple(shards))
    assert load_documents(c4) == [f"doc {i}.{j}\nline" for i in range(2) for j in range(3)]

    # data.hf_documents reads through the same loader, then cuts documents like read_documents
    assert list(hf_documents("json", split="validation", data_files=shards[:1], doc_split="line")) == [
        "doc 0.0", "line", "doc 0.1", "line", "doc 0.2", "line"]


def test_load_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert offline_variables() == ["HF_HUB_OFFLINE=1"]
    assert offline_variables({"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "TRUE"}) == ["HF_DATASETS_OFFLINE=TRUE"]
    with pytest.raises(PplDatasetUnavailable) as e:
        load_documents(WIKITEXT2)
    message = str(e.value)
    assert "'wikitext2' (Salesforce/wikitext wikitext-2-raw-v1, split test)" in message
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in message
    assert "it needs network access or a copy in the local HF cache" in message

    missing = PplDataset("gone", "json", data_files=(str(tmp_path / "missing.json"),))
    with pytest.raises(PplDatasetUnavailable, match="cannot load perplexity dataset 'gone'.*FileNotFoundError"):
        load_documents(missing)

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the package were not installed
    with pytest.raises(PplDatasetError, match=r"needs the `datasets` package: pip install '\.\[eval\]'"):
        load_documents(C4)
