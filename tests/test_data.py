"""The grain data pipeline: real files, a real BPE tokenizer trained on Austen, real grain iterators."""

import gzip
import json
import os

import numpy as np
import pytest

from fairy2i_jax import data

AUSTEN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "austen")
PERSUASION = os.path.join(AUSTEN_DIR, "test", "persuasion.txt.gz")
PAD, BOS, EOS = 0, 1, 2


def _paragraphs() -> list[str]:
    """The blank-line separated paragraphs of Persuasion."""
    with gzip.open(PERSUASION, "rt", encoding="utf-8") as f:
        return data.split_text(f.read(), "paragraph")


@pytest.fixture(scope="module")
def paras():
    return _paragraphs()


@pytest.fixture(scope="module")
def tok(paras):
    """Byte-level BPE, vocab 300, <pad>=0 <bos>=1 <eos>=2; adds <bos> when asked for special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    t.train_from_iterator(paras[:60], trainer)
    t.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    assert (fast.pad_token_id, fast.bos_token_id, fast.eos_token_id) == (PAD, BOS, EOS)
    assert fast.encode("Anne")[0] == BOS  # the default path would add BOS: the pipeline must not
    return fast


@pytest.fixture(scope="module")
def files(tmp_path_factory, paras):
    """Three text files of 25 paragraphs each: plain, gzip, plain (paragraphs separated by blank lines)."""
    d = tmp_path_factory.mktemp("txt")
    out = []
    for i, name in enumerate(["a.txt", "b.txt.gz", "c.txt"]):
        path = d / name
        text = "\n\n".join(paras[20 + 25 * i: 45 + 25 * i]) + "\n"
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "wt", encoding="utf-8") as f:
            f.write(text)
        out.append(str(path))
    return out


@pytest.fixture(scope="module")
def corpus(files, tok):
    return data.load_corpus(files, tok, doc_split="paragraph")


def _expected_tokens(docs, tok) -> np.ndarray:
    return np.concatenate([tok.encode(d, add_special_tokens=False) + [EOS] for d in docs]).astype(np.int32)


def _take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def _stack(batches, key="input_ids"):
    return np.concatenate([b[key] for b in batches])


# ----------------------------------------------------------------------------------------------- documents


def test_doc_split_modes(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("Title\n\n\nfirst line\nsecond line\n  \n\nlast para\n", encoding="utf-8")
    assert list(data.read_documents(p, doc_split="file")) == [
        "Title\n\n\nfirst line\nsecond line\n  \n\nlast para"]
    assert list(data.read_documents(p, doc_split="paragraph")) == ["Title", "first line\nsecond line", "last para"]
    assert list(data.read_documents(p, doc_split="line")) == ["Title", "first line", "second line", "last para"]
    with pytest.raises(ValueError, match="doc_split"):
        list(data.read_documents(p, doc_split="sentence"))


def test_tokens_eos_between_documents_no_bos(corpus, files, tok, paras):
    docs = paras[20:95]
    assert list(data.read_documents(files, doc_split="paragraph")) == docs
    np.testing.assert_array_equal(corpus.tokens, _expected_tokens(docs, tok))
    assert corpus.tokens.dtype == np.int32 and corpus.num_docs == 75
    assert BOS not in corpus.tokens
    assert (corpus.tokens == EOS).sum() == 75
    assert (corpus.tokens[corpus.doc_ends - 1] == EOS).all()
    assert [d.tolist() for d in corpus.documents()] == [tok.encode(d, add_special_tokens=False) + [EOS]
                                                       for d in docs]


def test_directory_expands_to_sorted_files(files, corpus, tok):
    assert data.expand_paths(os.path.dirname(files[0])) == sorted(files)
    np.testing.assert_array_equal(data.load_corpus(os.path.dirname(files[0]), tok, doc_split="paragraph").tokens,
                                  corpus.tokens)


def test_sentencepiece_wrapper_no_bos_and_eos_appended(tmp_path, paras):
    spm = pytest.importorskip("sentencepiece")
    from fairy2i_jax.hf.tokenizer import SentencePieceTokenizer

    lines = [ln for p in paras[:80] for ln in p.splitlines()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "m"), vocab_size=120,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    sp = SentencePieceTokenizer(str(tmp_path / "m.model"))
    c = data.tokenize_documents(paras[:3], sp)
    assert c.tokens.tolist() == [i for d in paras[:3] for i in sp.encode(d, add_special_tokens=False) + [2]]
    assert 1 not in c.tokens


# ----------------------------------------------------------------------------------------------- examples


def test_make_labels_by_hand():
    ids = np.array([[2, 5, 6, 2, 7, 2], [8, 2, 2, 9, 4, 3]], dtype=np.int32)
    want = np.array([[2, -100, 6, 2, -100, 2], [8, 2, -100, -100, 4, 3]])
    np.testing.assert_array_equal(data.make_labels(ids, eos_id=2), want)


def test_blocks_and_labels_over_an_epoch(corpus):
    seq, g = 32, 4
    ds = data.train_dataset(corpus, seq_len=seq, global_batch=g, seed=3, num_epochs=1)
    batches = list(ds)
    n_blocks = corpus.num_blocks(seq)
    assert len(batches) == n_blocks // g
    for b in batches:
        ids, labels = b["input_ids"], b["labels"]
        assert ids.shape == labels.shape == (g, seq) and ids.dtype == labels.dtype == np.int32
        after_eos = np.zeros_like(ids, dtype=bool)
        after_eos[:, 1:] = ids[:, :-1] == EOS
        assert (labels == -100).sum() == after_eos.sum()
        np.testing.assert_array_equal(labels == -100, after_eos)
        np.testing.assert_array_equal(labels[~after_eos], ids[~after_eos])
        assert (labels[ids == EOS] == EOS).all()  # EOS is a target
    assert sum((b["labels"] == -100).sum() for b in batches) > 10


def test_unshuffled_pass_is_the_corpus(corpus):
    seq, g = 32, 8
    n_blocks = corpus.num_blocks(seq)
    assert n_blocks % g and corpus.num_tokens % seq  # both remainders are exercised
    batches = list(data.eval_dataset(corpus, seq_len=seq, global_batch=g))
    assert len(batches) == data.num_eval_batches(corpus, seq_len=seq, global_batch=g) == -(-n_blocks // g)
    ids, labels = _stack(batches), _stack(batches, "labels")
    assert ids.shape == (len(batches) * g, seq)
    np.testing.assert_array_equal(ids[:n_blocks].reshape(-1), corpus.tokens[: n_blocks * seq])
    assert (ids[n_blocks:] == EOS).all() and (labels[n_blocks:] == -100).all()
    np.testing.assert_array_equal(labels[:n_blocks], data.make_labels(ids[:n_blocks], EOS))
    # one shuffled epoch is a permutation of the same blocks (less the last partial global batch)
    train = _stack(list(data.train_dataset(corpus, seq_len=seq, global_batch=g, seed=0, num_epochs=1)))
    assert train.shape == (n_blocks // g * g, seq)
    assert {r.tobytes() for r in train} <= {r.tobytes() for r in ids[:n_blocks]}
    assert not np.array_equal(train, ids[: len(train)])


# ----------------------------------------------------------------------------------------------- order


def test_shuffle_deterministic_seeded_and_new_each_epoch(corpus):
    seq = 32
    n = corpus.num_blocks(seq)

    def stream(seed, k):
        return _stack(_take(data.train_dataset(corpus, seq_len=seq, global_batch=1, seed=seed), k))

    a, b, c = stream(0, 2 * n), stream(0, 2 * n), stream(1, 8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[:8], c)
    epoch1, epoch2 = a[:n], a[n:]
    assert sorted(r.tobytes() for r in epoch1) == sorted(r.tobytes() for r in epoch2)
    assert not np.array_equal(epoch1, epoch2)


def test_two_hosts_split_the_one_host_batches(corpus):
    seq, g = 32, 4
    n_blocks = corpus.num_blocks(seq)
    assert len({r.tobytes() for r in corpus.tokens[: n_blocks * seq].reshape(n_blocks, seq)}) == n_blocks
    k = n_blocks // g + 3  # crosses an epoch boundary
    one = _take(data.train_dataset(corpus, seq_len=seq, global_batch=g, seed=5), k)
    hosts = [_take(data.train_dataset(corpus, seq_len=seq, global_batch=g, seed=5, process_index=h,
                                      process_count=2), k) for h in (0, 1)]
    for step in range(k):
        h0, h1 = hosts[0][step], hosts[1][step]
        assert h0["input_ids"].shape == (g // 2, seq)
        for key in ("input_ids", "labels"):
            np.testing.assert_array_equal(one[step][key][0::2], h0[key])
            np.testing.assert_array_equal(one[step][key][1::2], h1[key])
    first_epoch = n_blocks // g
    rows0 = {r.tobytes() for r in _stack(hosts[0][:first_epoch])}
    rows1 = {r.tobytes() for r in _stack(hosts[1][:first_epoch])}
    assert not rows0 & rows1 and len(rows0) == len(rows1) == first_epoch * g // 2


def test_two_hosts_eval_same_batch_count_and_union(corpus):
    seq, g = 32, 8
    one = list(data.eval_dataset(corpus, seq_len=seq, global_batch=g))
    hosts = [list(data.eval_dataset(corpus, seq_len=seq, global_batch=g, process_index=h, process_count=2))
             for h in (0, 1)]
    assert len(hosts[0]) == len(hosts[1]) == len(one)
    for b, h0, h1 in zip(one, *hosts):
        np.testing.assert_array_equal(b["input_ids"][0::2], h0["input_ids"])
        np.testing.assert_array_equal(b["labels"][1::2], h1["labels"])


def test_state_save_and_restore(corpus):
    seq, g = 32, 4
    n_epoch = corpus.num_blocks(seq) // g
    for k, hosts in ((3, 1), (n_epoch - 1, 2)):  # mid-epoch, and a restore whose next batches cross an epoch
        make = lambda: data.train_dataset(corpus, seq_len=seq, global_batch=g, seed=11, process_index=hosts - 1,
                                          process_count=hosts)
        it = iter(make())
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        expected = [next(it) for _ in range(4)]
        fresh = iter(make())
        first = next(fresh)
        fresh.set_state(state)
        got = [next(fresh) for _ in range(4)]
        assert not np.array_equal(first["input_ids"], expected[0]["input_ids"])
        for e, r in zip(expected, got):
            np.testing.assert_array_equal(e["input_ids"], r["input_ids"])
            np.testing.assert_array_equal(e["labels"], r["labels"])


def test_finite_epochs_stop_on_whole_global_batches(corpus):
    seq = next(s for s in range(32, 64) if corpus.num_blocks(s) % 2)  # odd block count: hosts would differ
    n_blocks, g = corpus.num_blocks(seq), 2
    one = list(data.train_dataset(corpus, seq_len=seq, global_batch=g, seed=0, num_epochs=1))
    hosts = [list(data.train_dataset(corpus, seq_len=seq, global_batch=g, seed=0, num_epochs=1,
                                     process_index=h, process_count=2)) for h in (0, 1)]
    assert len(one) == len(hosts[0]) == len(hosts[1]) == n_blocks // 2
    np.testing.assert_array_equal(_stack(one)[0::2], _stack(hosts[0]))
    np.testing.assert_array_equal(_stack(one)[1::2], _stack(hosts[1]))


# ----------------------------------------------------------------------------------------------- sources


def test_jsonl_and_parquet_sources(tmp_path, tok, paras):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = paras[100:130]
    want = _expected_tokens(docs, tok)
    with open(tmp_path / "a.jsonl", "w", encoding="utf-8") as f:
        for i, d in enumerate(docs[:10]):
            f.write(json.dumps({"id": i, "body": d}) + "\n")
        f.write("\n")  # blank lines are skipped
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"body": d}) + "\n" for d in docs[10:20])
    pq.write_table(pa.table({"body": docs[20:], "n": list(range(10))}), tmp_path / "c.parquet", row_group_size=3)
    paths = [tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz", tmp_path / "c.parquet"]
    c = data.load_corpus(paths, tok, text_key="body")
    np.testing.assert_array_equal(c.tokens, want)
    assert c.num_docs == 30
    batch = next(iter(data.train_dataset(c, seq_len=16, global_batch=2, seed=0)))
    assert batch["input_ids"].shape == (2, 16)


def test_whole_novel_save_load_and_budget(tmp_path, tok):
    c = data.load_corpus(PERSUASION, tok)  # doc_split="file": the novel is one document
    assert c.num_docs == 1 and c.tokens[-1] == EOS and (c.tokens == EOS).sum() == 1
    assert c.num_tokens > 200_000
    seq, g = 256, 8
    assert data.epochs_for_budget(c, seq_len=seq, global_batch=g, steps=10) == pytest.approx(
        80 / (c.num_tokens // seq))
    c.save(tmp_path / "cache")
    loaded = data.TokenizedCorpus.load(tmp_path / "cache")
    assert isinstance(loaded.tokens, np.memmap) and loaded.eos_id == EOS
    a = _take(data.train_dataset(c, seq_len=seq, global_batch=g, seed=2), 3)
    b = _take(data.train_dataset(loaded, seq_len=seq, global_batch=g, seed=2), 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])


# ----------------------------------------------------------------------------------------------- errors


def test_error_missing_file_and_extension(tmp_path, tok):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="nope.txt.*does not exist"):
        data.load_corpus(missing, tok)
    (tmp_path / "t.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"t\.csv.*unsupported extension"):
        data.load_corpus(tmp_path / "t.csv", tok)
    with pytest.raises(ValueError, match="no file with a supported extension"):
        data.load_corpus(tmp_path, tok)


def test_error_empty_corpus(tmp_path, tok):
    (tmp_path / "e.txt").write_text("\n  \n\n")
    with pytest.raises(ValueError, match="empty corpus.*e.txt"):
        data.load_corpus(tmp_path / "e.txt", tok)


def test_error_jsonl_missing_key_and_bad_json(tmp_path, tok):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "fine"}\n{"content": "no text key"}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: record has no 'text' key"):
        data.load_corpus(p, tok)
    p.write_text('{"text": "fine"}\n\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:3: not valid JSON"):
        data.load_corpus(p, tok)


def test_error_parquet_missing_column(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a b c"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"p\.parquet.*no 'text' column"):
        data.load_corpus(tmp_path / "p.parquet", tok)


def test_error_corpus_smaller_than_one_batch(tok, paras):
    c = data.tokenize_documents(paras[30:32], tok)
    need = 8 * 256
    assert c.num_tokens < need
    with pytest.raises(ValueError, match=rf"has {c.num_tokens} tokens .*needs {need} tokens"):
        data.train_dataset(c, seq_len=256, global_batch=8, seed=0)
    data.train_dataset(c, seq_len=256, global_batch=c.num_tokens // 256, seed=0)  # exactly one batch: fine
    with pytest.raises(ValueError, match="fewer than one block"):
        data.eval_dataset(c, seq_len=c.num_tokens + 1, global_batch=1)


def test_error_seq_len_and_layout(corpus):
    for bad in (1, 0):
        with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
            data.train_dataset(corpus, seq_len=bad, global_batch=2, seed=0)
        with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
            data.eval_dataset(corpus, seq_len=bad, global_batch=2)
    with pytest.raises(ValueError, match="multiple of process_count"):
        data.train_dataset(corpus, seq_len=8, global_batch=3, seed=0, process_count=2)
    with pytest.raises(ValueError, match="process_index"):
        data.train_dataset(corpus, seq_len=8, global_batch=4, seed=0, process_index=2, process_count=2)
