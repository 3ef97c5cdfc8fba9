"""lm-eval adapter against a tiny random torch Llama and lm-eval's own code (TemplateLM, simple_evaluate)."""

import json
import os

import numpy as np
import pytest
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM

from eval_helpers import austen_sentences, model, tok, torch_logprobs  # noqa: F401 (fixtures)
from fairy2i_jax.evaluation import torch_logits_fn
from fairy2i_jax.evaluation.lm_eval_adapter import LogitsLM, evaluate_tasks, resolve_tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK_DIR = os.path.join(REPO, "tests", "data", "tiny_mc")
REL = 1e-4


def _docs():
    with open(os.path.join(TASK_DIR, "tiny_mc.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _mc_requests():
    """The task's requests as lm-eval builds them: (doc_to_text, target_delimiter + choice)."""
    out = []
    for doc in _docs():
        ctx = f"Question: {doc['question']}\nAnswer:"
        out.extend((ctx, " " + choice) for choice in doc["choices"])
    return out


def _instances(pairs, kind="loglikelihood"):
    return [Instance(kind, {}, args, k) for k, args in enumerate(pairs)]


def _direct(model, ctx_ids, cont_ids):
    """Torch oracle: sum of log p of the continuation after the context, and whether every token is the argmax."""
    ids = list(ctx_ids) + list(cont_ids)
    logp = torch_logprobs(model, ids)
    rows = range(len(ctx_ids) - 1, len(ids) - 1)
    total = sum(logp[t, ids[t + 1]] for t in rows)
    greedy = all(int(np.argmax(logp[t])) == ids[t + 1] for t in rows)
    return total, greedy


def _assert_close(got, want):
    assert len(got) == len(want)
    for (g_ll, g_greedy), (w_ll, w_greedy) in zip(got, want):
        assert g_ll == pytest.approx(w_ll, rel=REL) and g_greedy == w_greedy


def test_official_loglikelihoods_equal_torch(tok, model):
    pairs = _mc_requests() + [("", " Anne Elliot"), ("  Sir Walter ", " Elliot ")]
    lm = LogitsLM(torch_logits_fn(model), tok, max_length=64, batch_size=5, progress=False)
    got = lm.loglikelihood(_instances(pairs))
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    want = []
    for ctx, cont in pairs:
        ctx_ids = [tok.eos_token_id] if not ctx.strip() else [tok.bos_token_id] + enc(ctx.strip())
        want.append(_direct(model, ctx_ids, enc(cont.strip())))
    _assert_close(got, want)


class _LmEvalEncodings(TemplateLM):
    """lm-eval's own `TemplateLM.loglikelihood` encoding (HFLM semantics), capturing the token pairs it builds."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self):  # HFLM: BOS when the tokenizer has one
        return self.tokenizer.bos_token_id

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **kw)

    def _loglikelihood_tokens(self, requests, **kwargs):
        return [(ctx, cont) for _, ctx, cont in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm=False):
        raise NotImplementedError


def test_harness_encoding_matches_lm_eval_and_scores_equal_torch(tok, model):
    pairs = _mc_requests()[:8] + [("", " Anne Elliot"), ("Sir Walter ", "Elliot"), ("Kellynch  ", " Hall")]
    reference = _LmEvalEncodings(tok).loglikelihood(_instances(pairs), disable_tqdm=True)
    lm = LogitsLM(torch_logits_fn(model), tok, max_length=64, batch_size=4, encoding="harness", progress=False)
    ours = [lm.encode_pair(ctx, cont) for ctx, cont in pairs]
    assert [(list(a), list(b)) for a, b in ours] == [(list(a), list(b)) for a, b in reference]
    _assert_close(lm.loglikelihood(_instances(pairs)), [_direct(model, c, x) for c, x in reference])
    official = LogitsLM(torch_logits_fn(model), tok, max_length=64, encoding="official", progress=False)
    assert official.encode_pair(*pairs[0]) != lm.encode_pair(*pairs[0])  # the leading space is kept here only


def test_left_truncation_to_max_length(tok, model):
    ctx, cont = " ".join(austen_sentences(3)), " Anne"
    lm = LogitsLM(torch_logits_fn(model), tok, max_length=24, progress=False)
    ctx_ids, cont_ids = lm.encode_pair(ctx, cont)
    whole = (ctx_ids + cont_ids)[-25:]
    want = _direct(model, whole[: len(whole) - len(cont_ids)], cont_ids)
    _assert_close(lm.loglikelihood(_instances([(ctx, cont)])), [want])
    with pytest.raises(ValueError, match="does not fit max_length=24"):
        lm.loglikelihood(_instances([("a", " ".join(austen_sentences(2)))]))


def test_simple_evaluate_acc_matches_own_loglikelihoods(tok, model, monkeypatch):
    monkeypatch.chdir(REPO)  # the task's data_files path is relative to the repository root
    lm = LogitsLM(torch_logits_fn(model), tok, max_length=64, batch_size=4, progress=False)
    out = evaluate_tasks(lm, ["tiny_mc"], include_path=TASK_DIR, include_defaults=False)
    acc = out["results"]["tiny_mc"]["acc,none"]
    lls = [ll for ll, _ in lm.loglikelihood(_instances(_mc_requests()))]
    correct, k = [], 0
    for doc in _docs():
        scores = lls[k: k + len(doc["choices"])]
        k += len(doc["choices"])
        correct.append(int(np.argmax(scores)) == doc["label"])
    assert 0.0 <= acc <= 1.0 and out["results"]["tiny_mc"]["sample_len"] == 10
    assert acc == pytest.approx(float(np.mean(correct)), abs=1e-12)
    logged = [r[0][0] for s in sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"]) for r in s["resps"]]
    np.testing.assert_allclose(logged, lls, rtol=1e-12)


def test_unknown_task_is_one_clear_error():
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['tiny_mcq', 'no_such_task'\]") as err:
        resolve_tasks(["tiny_mc", "tiny_mcq", "no_such_task"], include_path=TASK_DIR, include_defaults=False)
    assert "did you mean ['tiny_mc']" in str(err.value)
    with pytest.raises(ValueError, match="include_path does not exist"):
        resolve_tasks(["tiny_mc"], include_path=os.path.join(TASK_DIR, "missing"), include_defaults=False)
    assert "tiny_mc" in resolve_tasks(["tiny_mc"], include_path=TASK_DIR, include_defaults=False).all_tasks


def test_loglikelihood_rolling_predicts_every_token_once(tok, model):
    """Oracle: tokens in blocks of max_length, each block read from the max_length tokens of [BOS] + text before it."""
    max_length = 16
    lm = LogitsLM(torch_logits_fn(model), tok, max_length=max_length, batch_size=3, progress=False)
    long_text, short_text = " ".join(austen_sentences(2)), "Anne Elliot"
    want = []
    for text in (long_text, short_text):
        tokens = tok.encode(text, add_special_tokens=False)
        padded, total = [tok.bos_token_id] + tokens, 0.0       # padded[j + 1] is token j
        for a in range(0, len(tokens), max_length):
            b = min(a + max_length, len(tokens))
            start = max(0, b - max_length)
            logp = torch_logprobs(model, padded[start:b])
            total += sum(logp[j - start, tokens[j]] for j in range(a, b))
        want.append(total)
    assert len(tok.encode(long_text, add_special_tokens=False)) > 3 * max_length
    got = lm.loglikelihood_rolling(_instances([(long_text,), (short_text,)], "loglikelihood_rolling"))
    np.testing.assert_allclose(got, want, rtol=REL)


def test_generate_until_equals_torch_greedy(tok, model):
    import torch

    contexts = ["Anne Elliot", "Sir Walter Elliot, of Kellynch Hall, was"]
    expected = []
    for ctx in contexts:
        ids = torch.tensor([[tok.bos_token_id] + tok.encode(ctx, add_special_tokens=False)])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        new = [t for t in out[0, ids.shape[1]:].tolist() if t != tok.eos_token_id]
        expected.append(tok.decode(new))
    lm = LogitsLM(torch_logits_fn(model), tok, max_length=64, batch_size=2, progress=False)
    got = lm.generate_until(_instances([(c, {"max_gen_toks": 12}) for c in contexts], "generate_until"))
    assert got == expected and all(got)
    stop = expected[1][len(expected[1]) // 2:][:2]
    cut = lm.generate_until(_instances([(contexts[1], {"until": [stop], "max_gen_toks": 12})], "generate_until"))
    assert cut == [expected[1][: expected[1].index(stop)]]
