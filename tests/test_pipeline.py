"""The grain pipeline: blocks, EOS-aware labels, shuffling, host sharding, iterator state (real grain iterators
over a corpus of a real BPE tokenizer trained on Austen)."""

import json

import numpy as np
import pytest

from data_helpers import EOS, files, paras, tok  # noqa: F401 (fixtures)
from data_helpers import stack as _stack
from data_helpers import take as _take
from fairy2i_jax import data
from fairy2i_jax.data import pipeline


@pytest.fixture(scope="module")
def corpus(files, tok):
    return data.load_corpus(files, tok, doc_split="paragraph")


# ----------------------------------------------------------------------------------------------- examples


def test_make_labels_by_hand():
    ids = np.array([[2, 5, 6, 2, 7, 2], [8, 2, 2, 9, 4, 3]], dtype=np.int32)
    want = np.array([[2, -100, 6, 2, -100, 2], [8, 2, -100, -100, 4, 3]])
    np.testing.assert_array_equal(pipeline.make_labels(ids, eos_id=2), want)


def test_blocks_and_labels_over_an_epoch(corpus):
    seq, g = 32, 4
    ds = pipeline.train_dataset(corpus, seq_len=seq, global_batch=g, seed=3, num_epochs=1)
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
    batches = list(pipeline.eval_dataset(corpus, seq_len=seq, global_batch=g))
    assert len(batches) == pipeline.num_eval_batches(corpus, seq_len=seq, global_batch=g) == -(-n_blocks // g)
    ids, labels = _stack(batches), _stack(batches, "labels")
    assert ids.shape == (len(batches) * g, seq)
    np.testing.assert_array_equal(ids[:n_blocks].reshape(-1), corpus.tokens[: n_blocks * seq])
    assert (ids[n_blocks:] == EOS).all() and (labels[n_blocks:] == -100).all()
    np.testing.assert_array_equal(labels[:n_blocks], pipeline.make_labels(ids[:n_blocks], EOS))
    # one shuffled epoch is a permutation of the same blocks (less the last partial global batch)
    train = _stack(list(pipeline.train_dataset(corpus, seq_len=seq, global_batch=g, seed=0, num_epochs=1)))
    assert train.shape == (n_blocks // g * g, seq)
    assert {r.tobytes() for r in train} <= {r.tobytes() for r in ids[:n_blocks]}
    assert not np.array_equal(train, ids[: len(train)])


# ----------------------------------------------------------------------------------------------- order


def test_shuffle_deterministic_seeded_and_new_each_epoch(corpus):
    seq = 32
    n = corpus.num_blocks(seq)

    def stream(seed, k):
        return _stack(_take(pipeline.train_dataset(corpus, seq_len=seq, global_batch=1, seed=seed), k))

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
    one = _take(pipeline.train_dataset(corpus, seq_len=seq, global_batch=g, seed=5), k)
    hosts = [_take(pipeline.train_dataset(corpus, seq_len=seq, global_batch=g, seed=5, process_index=h,
                                      process_count=2), k) for h in (0, 1)]
    for step in range(k):
        h0, h1 = hosts[0][step], hosts[1][step]
        assert h0["input_ids"].shape == (g // 2, seq)
        for key in ("input_ids", "labels"):  # host h: the contiguous rows h*L .. (h+1)*L - 1
            np.testing.assert_array_equal(one[step][key][: g // 2], h0[key])
            np.testing.assert_array_equal(one[step][key][g // 2:], h1[key])
    first_epoch = n_blocks // g
    rows0 = {r.tobytes() for r in _stack(hosts[0][:first_epoch])}
    rows1 = {r.tobytes() for r in _stack(hosts[1][:first_epoch])}
    assert not rows0 & rows1 and len(rows0) == len(rows1) == first_epoch * g // 2


def test_two_hosts_eval_same_batch_count_and_union(corpus):
    seq, g = 32, 8
    one = list(pipeline.eval_dataset(corpus, seq_len=seq, global_batch=g))
    hosts = [list(pipeline.eval_dataset(corpus, seq_len=seq, global_batch=g, process_index=h, process_count=2))
             for h in (0, 1)]
    assert len(hosts[0]) == len(hosts[1]) == len(one)
    for b, h0, h1 in zip(one, *hosts):
        np.testing.assert_array_equal(b["input_ids"][: g // 2], h0["input_ids"])
        np.testing.assert_array_equal(b["labels"][g // 2:], h1["labels"])


def test_state_save_and_restore(corpus):
    seq, g = 32, 4
    n_epoch = corpus.num_blocks(seq) // g
    for k, hosts in ((3, 1), (n_epoch - 1, 2)):  # mid-epoch, and a restore whose next batches cross an epoch
        make = lambda: pipeline.train_dataset(corpus, seq_len=seq, global_batch=g, seed=11, process_index=hosts - 1,
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
    one = list(pipeline.train_dataset(corpus, seq_len=seq, global_batch=g, seed=0, num_epochs=1))
    hosts = [list(pipeline.train_dataset(corpus, seq_len=seq, global_batch=g, seed=0, num_epochs=1,
                                     process_index=h, process_count=2)) for h in (0, 1)]
    assert len(one) == len(hosts[0]) == len(hosts[1]) == n_blocks // 2
    np.testing.assert_array_equal(_stack(one)[0::2], _stack(hosts[0]))  # g = 2: one row per host
    np.testing.assert_array_equal(_stack(one)[1::2], _stack(hosts[1]))


# ----------------------------------------------------------------------------------------------- errors


def test_error_corpus_smaller_than_one_batch(tok, paras):
    c = data.tokenize_documents(paras[30:32], tok)
    need = 8 * 256
    assert c.num_tokens < need
    with pytest.raises(data.DataError, match=rf"has {c.num_tokens} tokens .*needs {need} tokens"):
        pipeline.train_dataset(c, seq_len=256, global_batch=8, seed=0)
    pipeline.train_dataset(c, seq_len=256, global_batch=c.num_tokens // 256, seed=0)  # exactly one batch: fine
    with pytest.raises(data.DataError, match="fewer than one block"):
        pipeline.eval_dataset(c, seq_len=c.num_tokens + 1, global_batch=1)


def test_error_seq_len_and_layout(corpus):
    for bad in (1, 0):
        with pytest.raises(data.DataError, match="seq_len must be an integer >= 2"):
            pipeline.train_dataset(corpus, seq_len=bad, global_batch=2, seed=0)
        with pytest.raises(data.DataError, match="seq_len must be an integer >= 2"):
            pipeline.eval_dataset(corpus, seq_len=bad, global_batch=2)
    with pytest.raises(data.DataError, match="multiple of process_count"):
        pipeline.train_dataset(corpus, seq_len=8, global_batch=3, seed=0, process_count=2)
    with pytest.raises(data.DataError, match="process_index"):
        pipeline.train_dataset(corpus, seq_len=8, global_batch=4, seed=0, process_index=2, process_count=2)
