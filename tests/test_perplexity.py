"""fairy2i_jax.evaluation.perplexity: the official packed, contiguous and strided protocols against direct loops
over a tiny random torch Llama (transformers) and a BPE tokenizer trained on Austen. (The JAX logits function
and a JAX model's perplexity: test_logits.py.)"""

import math

import numpy as np
import pytest

from eval_helpers import austen_paragraphs, austen_sentences, model, tok, torch_logprobs  # noqa: F401 (fixtures)
from fairy2i_jax.evaluation.logits import torch_logits_fn
from fairy2i_jax.evaluation.perplexity import (
    contiguous_ids,
    contiguous_perplexity,
    contiguous_windows,
    evaluate_perplexity,
    official_packed_chunks,
    official_perplexity,
    official_windows,
    wikitext_lines,
)

REL = 1e-4


def _enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def _text_with_tokens(tok, n):
    """A prefix of an Austen paragraph that is exactly `n` tokens long (without special tokens)."""
    para = " ".join(austen_paragraphs(3))
    for end in range(1, len(para) + 1):
        if len(_enc(tok, para[:end])) == n:
            return para[:end]
    raise AssertionError(f"no prefix with {n} tokens")


def test_wikitext_lines_drops_only_empty_lines():
    text = [" = Title = \n", "\n", " first line\n", " \n", "second\nthird\n"]
    assert wikitext_lines(text) == [" = Title = ", " first line", " ", "second", "third"]


def test_official_chunks_hand_made(tok):
    bos, eos = tok.bos_token_id, tok.eos_token_id
    short = ["Anne", "Sir Walter", "Bath", "Lyme"]
    e1, e2, e3 = (_enc(tok, t) for t in short[:3])
    seqlen = 1 + (len(e1) + 1) + (len(e2) + 1)           # BOS + item1 + item2 fill a chunk exactly
    too_long = _text_with_tokens(tok, seqlen - 1)           # + EOS = seqlen tokens: BOS would not fit -> dropped
    just_fits = _text_with_tokens(tok, seqlen - 2)          # + EOS = seqlen - 1: a chunk of exactly seqlen
    texts = [short[0], "", short[1], too_long, short[2], just_fits, short[3]]
    chunks = official_packed_chunks(texts, tok, seqlen)
    expected = [
        [bos] + e1 + [eos] + e2 + [eos],
        [bos] + e3 + [eos],
        [bos] + _enc(tok, just_fits) + [eos],
        [bos] + _enc(tok, short[3]) + [eos],                # the last partial chunk is kept
    ]
    assert [c.tolist() for c in chunks] == expected
    assert all(len(c) <= seqlen and c[0] == bos for c in chunks)
    assert len(chunks[2]) == seqlen
    # items already encoded (a token store's documents without their EOS) pack the same way
    encoded = [np.asarray(_enc(tok, t), dtype=np.int32) for t in texts]
    assert [c.tolist() for c in official_packed_chunks(encoded, tok, seqlen)] == expected


def test_official_masks_after_eos(tok):
    chunk = np.array([1, 40, 41, 2, 50, 2, 60, 61, 2], np.int32)
    (window,) = official_windows([chunk], eos_id=2)
    # targets: 40 41 2 50 2 60 61 2; masked are those right after an EOS: 50 and 60
    assert window.scored.tolist() == [True, True, True, False, True, False, True, True]


def _direct_official(model, chunks, eos):
    """Both official denominators with a plain loop over unpadded torch forwards."""
    loss, positions, masked = 0.0, 0, 0
    for chunk in chunks:
        logp = torch_logprobs(model, chunk)
        for t in range(len(chunk) - 1):
            positions += 1
            if chunk[t] == eos:
                masked += 1
            else:
                loss -= logp[t, chunk[t + 1]]
    return math.exp(loss / positions), math.exp(loss / (positions - masked)), positions, masked


def test_official_perplexity_matches_direct_torch(tok, model):
    texts = austen_sentences(20)
    chunks = official_packed_chunks(texts, tok, seqlen=128)
    assert len(chunks) >= 4
    ppl_off, ppl_cor, positions, masked = _direct_official(model, chunks, tok.eos_token_id)
    assert masked > 0 and ppl_cor > ppl_off
    res = evaluate_perplexity(torch_logits_fn(model), chunks, batch_size=3, protocol="official",
                              eos_id=tok.eos_token_id, progress=False)
    assert res.num_chunks == len(chunks) and res.num_positions == positions
    assert res.num_scored == positions - masked
    assert res.ppl_official == pytest.approx(ppl_off, rel=REL)
    assert res.ppl_corrected == pytest.approx(ppl_cor, rel=REL)
    end_to_end = official_perplexity(torch_logits_fn(model), texts, tok, seqlen=128, batch_size=5, progress=False)
    assert end_to_end.ppl_official == pytest.approx(ppl_off, rel=REL)


def test_contiguous_perplexity_matches_direct_torch(tok, model):
    texts = austen_paragraphs(4)
    ids = contiguous_ids(texts, tok)
    assert ids[0] == tok.bos_token_id and (ids == tok.bos_token_id).sum() == 1
    seqlen = 40
    loss, count = 0.0, 0
    for start in range(0, len(ids) - seqlen + 1, seqlen):      # full windows only (GPTQ)
        window = ids[start: start + seqlen]
        logp = torch_logprobs(model, window)
        loss -= sum(logp[t, window[t + 1]] for t in range(seqlen - 1))
        count += seqlen - 1
    res = contiguous_perplexity(torch_logits_fn(model), texts, tok, seqlen=seqlen, batch_size=4, progress=False)
    assert res.num_chunks == len(ids) // seqlen and res.num_scored == count
    assert res.ppl == pytest.approx(math.exp(loss / count), rel=REL) and res.ppl_official is None
    kept = contiguous_windows(ids, seqlen, keep_last=True)
    assert len(kept) == -(-len(ids) // seqlen) and sum(len(w.ids) for w in kept) == len(ids)


def test_strided_perplexity_matches_hf_guide_loop(tok, model):
    """HF perplexity guide: windows every `stride` tokens, labels -100 except the new tokens, model's own loss."""
    import torch

    texts = austen_paragraphs(3)
    ids = contiguous_ids(texts, tok)
    seqlen, stride = 48, 20
    total, valid, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + seqlen, len(ids))
        trg_len = end - prev_end
        inp = torch.tensor([ids[begin:end].tolist()])
        labels = inp.clone()
        labels[:, :-trg_len] = -100
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            total += float(model(input_ids=inp, labels=labels).loss) * n
        valid += n
        prev_end = end
        if end == len(ids):
            break
    assert valid == len(ids) - 1                                # every token after the first scored once
    res = contiguous_perplexity(torch_logits_fn(model), texts, tok, seqlen=seqlen, stride=stride,
                                batch_size=4, progress=False)
    assert res.num_scored == valid
    assert res.ppl == pytest.approx(math.exp(total / valid), rel=REL)


def test_errors_name_the_problem(tok, model):
    with pytest.raises(ValueError, match="no text to evaluate in wikitext2"):
        official_packed_chunks(["", ""], tok, 64, source="wikitext2")
    with pytest.raises(ValueError, match="no chunk survives from c4"):
        official_packed_chunks([austen_paragraphs(1)[0]], tok, 8, source="c4")
    with pytest.raises(ValueError, match="seqlen must be an integer >= 2"):
        official_packed_chunks(["Anne"], tok, 1)
    with pytest.raises(ValueError, match="no text to evaluate in wiki"):
        contiguous_ids(["", "  "], tok, source="wiki")
    with pytest.raises(ValueError, match="fewer than seqlen"):
        contiguous_windows(np.arange(10), seqlen=16)
    with pytest.raises(ValueError, match="unknown perplexity protocol"):
        evaluate_perplexity(torch_logits_fn(model), [np.arange(4)], protocol="gptq")
