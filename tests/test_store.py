"""The token store: layout and manifest, the same batches as the in-memory corpus on the Austen novels, exact
resume, per-host reads, flat memory over a store much larger than a batch, atomic writes and every refusal, and
two processes on loopback that read one store into the one-process global batches."""

import json
import os
import pickle
import socket
import subprocess
import sys

import numpy as np
import pytest

from data_helpers import (  # noqa: F401 (fixtures)
    AUSTEN_TRAIN, ROOT, assert_same_batches, bpe_tokenizer, files, paras, rss_anon_bytes, take, tok)
from fairy2i_jax import data
from fairy2i_jax.data import store
from fairy2i_jax.hf.tokenizer import ByteTokenizer

SEQ, G = 128, 8


@pytest.fixture(scope="module")
def austen(tmp_path_factory, tok):
    """The four training novels as paragraphs, in memory and as a store built by the parallel tokenizer."""
    out = tmp_path_factory.mktemp("stores") / "austen"
    result = data.tokenize_to_store([AUSTEN_TRAIN], tok, out, source="bpe-300", doc_split="paragraph",
                                    num_proc=2, progress=False)
    return data.load_corpus([AUSTEN_TRAIN], tok, doc_split="paragraph"), result


def test_layout_manifest_and_same_tokens_as_in_memory(austen, tok):
    memory, result = austen
    assert sorted(os.listdir(result.path)) == [store.DOC_ENDS, store.MANIFEST, store.TOKENS]
    assert not [n for n in os.listdir(os.path.dirname(result.path)) if n.startswith(".")]  # no temporary left
    m = store.read_manifest(result.path)
    assert (m.num_tokens, m.num_docs, m.dtype) == (memory.num_tokens, memory.num_docs, "uint16")
    assert (m.sources, m.doc_split, m.text_key) == ((AUSTEN_TRAIN,), "paragraph", "text")
    assert m.tokenizer == store.TokenizerIdentity.of(tok, "bpe-300") and m.tokenizer.vocab_size == 300
    assert os.path.getsize(os.path.join(result.path, store.TOKENS)) == 2 * memory.num_tokens
    opened = data.load_corpus([f"store:{result.path}"], tok, doc_split="paragraph")
    assert isinstance(opened.tokens, store.StoredArray) and opened.tokens.bytes_read == 0  # nothing read yet
    np.testing.assert_array_equal(opened.tokens[:], memory.tokens)
    np.testing.assert_array_equal(opened.doc_ends[:], memory.doc_ends)
    assert opened.eos_id == memory.eos_id and opened.num_blocks(SEQ) == memory.num_blocks(SEQ)


def test_same_batches_order_and_exact_resume_as_in_memory(austen, tok):
    memory, result = austen
    opened = data.open_store(result.path)
    epoch = memory.num_blocks(SEQ) // G
    k = epoch + 3  # crosses an epoch boundary (a new permutation)
    make = lambda c, **kw: data.train_dataset(c, seq_len=SEQ, global_batch=G, seed=7, **kw)
    assert_same_batches(take(make(opened), k), take(make(memory), k))
    assert_same_batches(list(data.eval_dataset(opened, seq_len=SEQ, global_batch=G)),
                        list(data.eval_dataset(memory, seq_len=SEQ, global_batch=G)))
    # resume: the grain state after `epoch - 1` batches of host 1 of 2, restored into a fresh store pipeline
    it = iter(make(opened, process_index=1, process_count=2))
    for _ in range(epoch - 1):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(3)]
    fresh = iter(make(data.open_store(result.path), process_index=1, process_count=2))
    fresh.set_state(state)
    assert_same_batches([next(fresh) for _ in range(3)], want)
    ref = iter(make(memory, process_index=1, process_count=2))
    ref.set_state(state)
    assert_same_batches([next(ref) for _ in range(3)], want)


def test_a_host_reads_only_the_blocks_of_its_rows(austen):
    _, result = austen
    n = 5
    for mmap in (False, True):  # ranged reads (what a gs:// store uses, here on a local path) and the memory map
        c = data.open_store(result.path, mmap=mmap)
        host = take(data.train_dataset(c, seq_len=SEQ, global_batch=G, seed=1, process_index=1, process_count=2), n)
        assert c.tokens.mmap is mmap and len(host) == n
        assert c.tokens.bytes_read == n * (G // 2) * SEQ * 2  # rows x seq_len x uint16, nothing else
    assert len(pickle.dumps(c.tokens)) < 1000  # a worker gets the path, never the data


def test_memory_stays_flat_over_a_store_much_larger_than_a_batch(tmp_path):
    """64M synthetic tokens (128 MB): iterating 300 batches of 8 x 2048 leaves anonymous memory flat and reads
    exactly those rows (a memory map's pages are file-backed: the kernel drops them under pressure)."""
    n_tokens, vocab, seq, g = 64 * 2**20, 50000, 2048, 8
    ident = store.TokenizerIdentity("synthetic", "none", vocab, 0, None, "0" * 64)
    rng = np.random.default_rng(0)
    with store.StoreWriter(tmp_path / "big", identity=ident, sources=["synthetic"], doc_split="file",
                           text_key="text") as w:
        for _ in range(n_tokens // 2**22):
            w.append(rng.integers(1, vocab, 2**22, dtype=np.int32), np.array([2**22]))
        w.commit()
    assert os.path.getsize(tmp_path / "big" / store.TOKENS) == 2 * n_tokens
    start = rss_anon_bytes()
    c = data.open_store(tmp_path / "big")
    it = iter(data.train_dataset(c, seq_len=seq, global_batch=g, seed=0))
    for _ in range(10):  # warm up grain's and numpy's own allocations
        next(it)
    before, read_before = rss_anon_bytes(), c.tokens.bytes_read
    for _ in range(300):
        batch = next(it)
    grown, total = rss_anon_bytes() - before, rss_anon_bytes() - start
    assert batch["input_ids"].shape == (g, seq)
    assert c.tokens.bytes_read - read_before == 300 * g * seq * 2  # 9.8 MB of the 128 MB store
    assert grown < 4 * 2**20, f"anonymous memory grew by {grown / 2**20:.1f} MiB over 300 batches"
    assert total < 16 * 2**20, f"opening and iterating took {total / 2**20:.1f} MiB (the store is 128 MiB)"


def test_atomic_write_and_refusals(tmp_path, tok, paras, files):
    out = tmp_path / "s"
    kw = dict(doc_split="paragraph", progress=False)
    data.tokenize_to_store(files, tok, out, **kw)
    with pytest.raises(store.StoreError, match="exists: pass --overwrite"):
        data.tokenize_to_store(files, tok, out, **kw)
    # a failure while writing (a bad file after good ones) leaves no temporary and the old store whole
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"nope": 1}\n')
    with pytest.raises(data.DataError, match="bad.jsonl:2"):
        data.tokenize_to_store([*files, str(tmp_path / "bad.jsonl")], tok, out, overwrite=True, **kw)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "s"] and store.is_store(out)
    before = store.read_manifest(out)
    data.tokenize_to_store(files[:1], tok, out, overwrite=True, **kw)
    assert store.read_manifest(out).num_tokens < before.num_tokens and sorted(os.listdir(tmp_path)) == [
        "bad.jsonl", "s"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(store.StoreError, match="exists and is not a token store"):
        data.tokenize_to_store(files, tok, tmp_path / "other", overwrite=True, **kw)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train: {}\n")
    with pytest.raises(store.StoreError, match="is a training run directory"):
        data.tokenize_to_store(files, tok, run, overwrite=True, **kw)
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine" and os.listdir(run) == ["config.yaml"]


def test_opening_refuses_another_tokenizer_split_or_a_partial_copy(tmp_path, tok, paras, files):
    out = tmp_path / "s"
    data.tokenize_to_store(files, tok, out, source="bpe-a", doc_split="paragraph", progress=False)
    other = bpe_tokenizer(paras[200:260])  # same vocab size and EOS, other merges: only the probe tells
    mine, theirs = store.TokenizerIdentity.of(tok, "bpe-a"), store.TokenizerIdentity.of(other, "bpe-b")
    assert mine.fingerprint()[:2] == theirs.fingerprint()[:2] and mine.probe_sha256 != theirs.probe_sha256
    with pytest.raises(store.StoreMismatch) as e:
        data.load_corpus([f"store:{out}"], other, source="bpe-b")
    assert mine.describe() in str(e.value) and theirs.describe() in str(e.value)
    with pytest.raises(store.StoreMismatch, match="vocab 260"):
        data.load_corpus([f"store:{out}"], ByteTokenizer(), source="random:tiny")
    with pytest.raises(store.StoreMismatch, match="data.doc_split = 'paragraph', the config says 'line'"):
        data.load_corpus([f"store:{out}"], tok, doc_split="line")
    assert data.load_corpus([f"store:{out}"], tok, source="elsewhere").num_docs == 75  # the source is not compared
    with open(out / store.TOKENS, "r+b") as f:
        f.truncate(100)
    with pytest.raises(store.StoreError, match=r"tokens.bin has 100 bytes, the manifest says \d+ x uint16"):
        data.open_store(out)
    (out / store.MANIFEST).unlink()
    with pytest.raises(store.StoreError, match="is not a token store"):
        data.open_store(out)


def test_token_dtype_and_vocabulary_check(tmp_path):
    assert store.token_dtype(65536) == np.dtype("<u2") and store.token_dtype(65537) == np.dtype("<i4")
    ident = store.TokenizerIdentity("x", "none", 128256, 128001, None, "0" * 64)
    with store.StoreWriter(tmp_path / "wide", identity=ident, sources=[], doc_split="file", text_key="t") as w:
        w.append(np.array([128255, 70000, 128001]), np.array([3]))
        with pytest.raises(store.StoreError, match="token id 128256 outside the vocabulary of 128256"):
            w.append(np.array([128256]), np.array([1]))
        w.commit()
    c = data.open_store(tmp_path / "wide")
    assert c.tokens[:].tolist() == [128255, 70000, 128001] and c.tokens[-1] == 128001


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_read_one_store_into_the_one_process_global_batches(austen, tmp_path):
    memory, result = austen
    n = 4
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT)
    port, out = _free_port(), tmp_path / "global.npz"
    args = [result.path, str(port), None, str(out), str(SEQ), str(G), "3", str(n)]
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "store_host_child.py"),
                               *[str(i) if a is None else a for a in args]], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    got = np.load(out)
    want = take(data.train_dataset(memory, seq_len=SEQ, global_batch=G, seed=3), n)
    np.testing.assert_array_equal(got["input_ids"], np.stack([b["input_ids"] for b in want]))
    np.testing.assert_array_equal(got["labels"], np.stack([b["labels"] for b in want]))
