"""The tokenization rule (EOS after every document, no BOS) and the in-memory TokenizedCorpus."""

import numpy as np
import pytest

from data_helpers import BOS, EOS, PERSUASION, expected_tokens, files, paras, tok  # noqa: F401 (fixtures)
from fairy2i_jax import data
from fairy2i_jax.data import corpus as corpus_mod


@pytest.fixture(scope="module")
def corpus(files, tok):
    return data.load_corpus(files, tok, doc_split="paragraph")


def test_tokens_eos_between_documents_no_bos(corpus, tok, paras):
    docs = paras[20:95]
    np.testing.assert_array_equal(corpus.tokens, expected_tokens(docs, tok))
    assert corpus.tokens.dtype == np.int32 and corpus.num_docs == 75
    assert BOS not in corpus.tokens
    assert (corpus.tokens == EOS).sum() == 75
    assert (corpus.tokens[corpus.doc_ends - 1] == EOS).all()
    assert [d.tolist() for d in corpus.documents()] == [tok.encode(d, add_special_tokens=False) + [EOS]
                                                       for d in docs]
    np.testing.assert_array_equal(corpus.document(3), corpus.documents()[3])


def test_encode_documents_batched_equals_encode_per_document(tok, paras):
    """The batched tokenizer call (the one home of the rule) gives exactly encode() per document; documents that
    encode to nothing are left out."""
    docs = paras[:300] + [""]
    ids, lengths = corpus_mod.encode_documents(tok, docs)
    per_doc = [tok.encode(d, add_special_tokens=False) + [EOS] for d in docs if d]
    assert lengths.tolist() == [len(x) for x in per_doc] and ids.tolist() == [i for x in per_doc for i in x]
    assert len(docs) > corpus_mod._ENCODE_BATCH  # more than one batched call


def test_sentencepiece_wrapper_no_bos_and_eos_appended(tmp_path, paras):
    spm = pytest.importorskip("sentencepiece")
    from fairy2i_jax.hf.tokenizer import SentencePieceTokenizer

    lines = [ln for p in paras[:80] for ln in p.splitlines()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "m"), vocab_size=120,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    sp = SentencePieceTokenizer(str(tmp_path / "m.model"))
    c = corpus_mod.tokenize_documents(paras[:3], sp)
    assert c.tokens.tolist() == [i for d in paras[:3] for i in sp.encode(d, add_special_tokens=False) + [2]]
    assert 1 not in c.tokens


def test_whole_novel_and_budget(tok):
    c = data.load_corpus(PERSUASION, tok)  # doc_split="file": the novel is one document
    assert c.num_docs == 1 and c.tokens[-1] == EOS and (c.tokens == EOS).sum() == 1
    assert c.num_tokens > 200_000
    assert corpus_mod.epochs_for_budget(c, seq_len=256, global_batch=8, steps=10) == pytest.approx(
        80 / (c.num_tokens // 256))


def test_error_empty_corpus_and_no_eos(tmp_path, tok):
    (tmp_path / "e.txt").write_text("\n  \n\n")
    with pytest.raises(data.DataError, match="empty corpus.*e.txt"):
        data.load_corpus(tmp_path / "e.txt", tok)

    class NoEos:
        eos_token_id = None

    with pytest.raises(data.DataError, match="NoEos has no eos_token_id"):
        corpus_mod.tokenize_documents(["a"], NoEos())
    with pytest.raises(data.DataError, match="seq_len must be an integer >= 2"):
        corpus_mod.check_seq_len(True)
