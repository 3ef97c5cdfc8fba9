"""Config entries -> tokens: load_corpus over files and stores, and the parallel store writer (order, equality
with the in-memory corpus, both worker start methods, nothing left behind on bad input)."""

import os

import numpy as np
import pytest

from data_helpers import files, paras, tok  # noqa: F401 (fixtures)
from fairy2i_jax import data
from fairy2i_jax.data import tokenize


def test_workers_are_spawned_once_a_jax_backend_runs():
    import jax

    jax.devices()  # this test process now runs a backend (the CLI's process never starts one)
    assert tokenize._start_method() == "spawn"


def test_parallel_store_equals_in_memory_in_order(tmp_path, files, tok, monkeypatch):
    """Two forked workers (the CLI's start method; this test process may run a JAX backend, where the code would
    spawn: that path is the slow test below) and 7 documents per task: the same tokens and document ends as the
    in-memory corpus, in corpus order."""
    monkeypatch.setattr(tokenize, "_start_method", lambda: "fork")
    memory = data.load_corpus(files, tok, doc_split="paragraph")
    one = data.tokenize_to_store(files, tok, tmp_path / "one", doc_split="paragraph", progress=False)
    two = data.tokenize_to_store(files, tok, tmp_path / "two", doc_split="paragraph", progress=False, num_proc=2,
                                 docs_per_task=7)
    for result in (one, two):
        c = data.load_corpus([f"store:{result.path}"], tok)
        np.testing.assert_array_equal(c.tokens[:], memory.tokens)
        np.testing.assert_array_equal(c.doc_ends[:], memory.doc_ends)
        assert result.tokens_per_s > 0 and result.manifest.num_docs == 75
    with open(os.path.join(one.path, "tokens.bin"), "rb") as a, open(os.path.join(two.path, "tokens.bin"), "rb") as b:
        assert a.read() == b.read()


@pytest.mark.slow
def test_spawned_workers_give_the_same_store(tmp_path, files, tok, monkeypatch):
    """Where a JAX backend runs in the parent, workers are spawned and unpickle the tokenizer (seconds each)."""
    monkeypatch.setattr(tokenize, "_start_method", lambda: "spawn")
    memory = data.load_corpus(files, tok, doc_split="paragraph")
    r = data.tokenize_to_store(files, tok, tmp_path / "s", doc_split="paragraph", progress=False, num_proc=2,
                               docs_per_task=16)
    np.testing.assert_array_equal(data.open_store(r.path).tokens[:], memory.tokens)


def test_bad_entries_are_refused_before_anything_is_written(tmp_path, files, tok):
    for entries, match in (([files[0], str(tmp_path / "missing.txt")], "does not exist"),
                           ([files[0], "hf:allenai/c4:en"], "offline"),
                           (["store:/somewhere"], "is a token store")):
        with pytest.raises(data.DataError, match=match):
            data.tokenize_to_store(entries, tok, tmp_path / "out", progress=False)
        assert os.listdir(tmp_path) == []


def test_load_corpus_reads_files_or_opens_a_store(tmp_path, files, tok):
    memory = data.load_corpus(files, tok, doc_split="paragraph")
    assert isinstance(memory.tokens, np.ndarray)
    r = data.tokenize_to_store(files, tok, tmp_path / "s", doc_split="paragraph", progress=False)
    opened = data.load_corpus([f"store:{r.path}"], tok, doc_split="paragraph", text_key="text")
    assert isinstance(opened.tokens, data.store.StoredArray)
    np.testing.assert_array_equal(opened.document(5), memory.document(5))
    assert data.load_corpus(files[0], tok).num_docs == 1  # one path, doc_split "file" by default
