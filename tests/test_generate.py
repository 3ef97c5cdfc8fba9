"""KV-cache greedy generation (`fairy2i_jax.generate`) against transformers' torch `generate` on tiny random
models, token for token; a QAT model against step-by-step full forwards; the lm-eval adapter's cached path."""

import numpy as np
import pytest
import torch

import model_helpers as mh
from eval_helpers import tiny_llama, tiny_tokenizer
from fairy2i_jax import convert, load_pretrained, load_tokenizer
from fairy2i_jax.generate.engine import generate, greedy_ids

PROMPTS = [[1, 50, 60, 70], [1, 9, 8, 7, 6, 5, 4, 3, 200, 100, 90], [1, 33]]


@pytest.fixture(scope="module")
def tiny():
    """(jax model, torch oracle) of the random Llama of model_helpers."""
    return load_pretrained(mh.checkpoint("llama"), compute_dtype="float32"), mh.torch_model("llama")


def torch_greedy(model, prompt, n, eos=None):
    """transformers' greedy `generate` on one unpadded prompt -> the new ids (EOS included, as it returns)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_batched_left_padded_equals_torch(tiny):
    model, oracle = tiny
    # 16 new tokens (the engine's smallest budget bucket): the compiled programs are shared with later tests
    want = [torch_greedy(oracle, p, 16) for p in PROMPTS]
    assert generate(model, PROMPTS, 16, eos_id=None) == want
    assert len(set(map(tuple, want))) == 3 and all(len(w) == 16 for w in want)
    assert generate(model, PROMPTS[1], 16, eos_id=None) == want[1]  # one sequence in, one list out


def test_stops_at_eos_and_budgets(tiny):
    model, oracle = tiny
    free = torch_greedy(oracle, PROMPTS[0], 16)
    eos = free[5]
    first = free.index(eos)
    want = [torch_greedy(oracle, p, 16, eos=eos) for p in PROMPTS]
    assert want[0] == free[: first + 1]  # torch stops after (and keeps) the EOS
    got = greedy_ids(model, PROMPTS, 16, eos_id=eos, batch_size=2)  # batches of 2: the second one padded
    assert got == [w[: w.index(eos) + 1] if eos in w else w for w in want]
    assert generate(model, PROMPTS, [3, 1, 7], eos_id=(eos, 255)) == [want[0][:3], want[1][:1], want[2][:7]]


def test_stop_callback_between_chunks(tiny):
    model, oracle = tiny
    full = torch_greedy(oracle, PROMPTS[1], 16)
    calls = []

    def stop(k, ids):
        calls.append((k, len(ids)))
        return len(ids) >= 7

    got = greedy_ids(model, [PROMPTS[1]], 16, eos_id=None, chunk=4, stop=stop)[0]
    assert got == full[:9]  # prefill gives 1 token, chunks of 4: checked at 5 (go on) and 9 (stop)
    assert calls == [(0, 5), (0, 9)]


def test_qat_model_equals_full_forward_greedy(tiny):
    model, _ = tiny
    w2 = convert(model, "w2")
    prompt, ids = PROMPTS[0], list(PROMPTS[0])
    weights = w2.effective_weights()
    for _ in range(6):  # right-padded to one length (one compile): padding never changes causal logits
        buf, mask = np.zeros((1, 16), np.int32), np.zeros((1, 16), np.int32)
        buf[0, : len(ids)], mask[0, : len(ids)] = ids, 1
        logits = mh.qat_logits(w2, buf, mask, weights)
        ids.append(int(np.argmax(logits[0, len(ids) - 1])))
    got = generate(w2, prompt, 6, eos_id=None)
    assert got == ids[len(prompt):]
    assert got != generate(model, prompt, 6, eos_id=None)  # quantization changed the continuation


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny random Llama saved with the Austen BPE tokenizer: (jax model, tokenizer, torch model)."""
    tok = tiny_tokenizer()
    oracle = tiny_llama(len(tok), seed=3)
    path = tmp_path_factory.mktemp("tiny_text")
    oracle.save_pretrained(path)
    tok.save_pretrained(path)
    return load_pretrained(path, compute_dtype="float32"), load_tokenizer(path), oracle


def test_text_generation_and_lm_eval_cached_path(text_model):
    from lm_eval.api.instance import Instance

    from fairy2i_jax.evaluation import jax_logits_fn, torch_logits_fn
    from fairy2i_jax.evaluation.lm_eval_adapter import LogitsLM

    model, tok, oracle = text_model
    prompt = "Sir Walter Elliot, of Kellynch Hall, was"
    ids = tok(prompt)["input_ids"]
    assert ids[0] == tok.bos_token_id  # the tokenizer adds BOS; generate keeps it
    want = tok.decode(torch_greedy(oracle, ids, 10, eos=tok.eos_token_id), skip_special_tokens=True)
    assert generate(model, tok, 10, prompt=prompt) == want and want.strip()

    contexts = ["Anne Elliot", prompt, "Captain Wentworth"]
    requests = [Instance("generate_until", {}, (c, {"max_gen_toks": 12, "until": ["zzz"]}), k)
                for k, c in enumerate(contexts)]
    reference = LogitsLM(torch_logits_fn(oracle), tok, max_length=64, batch_size=2, progress=False)
    cached = LogitsLM(jax_logits_fn(model, max_length=64, batch_size=2), tok, max_length=64, batch_size=2,
                      progress=False, model=model)
    expected = reference.generate_until(requests)
    assert cached.generate_until(requests) == expected and all(expected)
    stop = expected[1][len(expected[1]) // 2:][:2]
    cut = Instance("generate_until", {}, (contexts[1], {"until": [stop], "max_gen_toks": 12}), 0)
    assert cached.generate_until([cut]) == [expected[1][: expected[1].index(stop)]]


def test_packed_model_generates_the_qat_tokens(tiny):
    """Greedy decoding on the packed kernels (prepared, fused operands) = on the fake-quantized dense weights."""
    from fairy2i_jax.convert import to_packed

    w2 = convert(tiny[0], "w2")
    packed = to_packed(w2)
    assert greedy_ids(packed, PROMPTS, 12, eos_id=None) == greedy_ids(w2, PROMPTS, 12, eos_id=None)


def test_sampling_is_reproducible_and_top_k_one_is_greedy(tiny):
    from fairy2i_jax.generate.engine import Sampling, sample_ids

    model = tiny[0]
    warm = Sampling(temperature=1.5, top_p=0.95)
    a = sample_ids(model, PROMPTS, 16, sampling=warm, seed=7, eos_id=None)
    assert a == sample_ids(model, PROMPTS, 16, sampling=warm, seed=7, eos_id=None)
    assert a != sample_ids(model, PROMPTS, 16, sampling=warm, seed=8, eos_id=None)
    assert a != greedy_ids(model, PROMPTS, 16, eos_id=None)
    one = Sampling(temperature=0.7, top_k=1)
    assert sample_ids(model, PROMPTS, 16, sampling=one, seed=3, eos_id=None) == greedy_ids(model, PROMPTS, 16,
                                                                                            eos_id=None)
    streamed = []
    chunked = sample_ids(model, PROMPTS[:1], 9, eos_id=None, chunk=2, on_tokens=lambda new: streamed.extend(new[0]))
    assert streamed == chunked[0] == greedy_ids(model, PROMPTS[:1], 9, eos_id=None)[0]
    with pytest.raises(ValueError, match="0 < top_p <= 1"):
        Sampling(temperature=1.0, top_p=0.0)
