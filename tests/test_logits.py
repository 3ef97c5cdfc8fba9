"""fairy2i_jax.evaluation.logits: shape buckets and padding, host scoring and ``score_sequences`` against a tiny
random torch Llama, and the jitted, bucketed ``jax_logits_fn`` against an eager NNX model and, as perplexity, a
JAX Llama against its torch original."""

import numpy as np
import pytest

from eval_helpers import austen_sentences, model, tok, torch_logprobs  # noqa: F401 (fixtures)
from fairy2i_jax.evaluation.logits import (
    bucket_for,
    default_buckets,
    host_token_logprobs,
    jax_logits_fn,
    pad_rows,
    score_sequences,
    torch_logits_fn,
)
from fairy2i_jax.evaluation.perplexity import evaluate_perplexity, official_packed_chunks

REL = 1e-4


def test_buckets_and_right_padding():
    assert default_buckets(100) == (16, 32, 64, 100) and default_buckets(64) == (16, 32, 64)
    assert default_buckets(8) == (8,) and default_buckets(40, min_length=10) == (10, 20, 40)
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        default_buckets(0)
    assert bucket_for(17, (64, 16, 32)) == 32 and bucket_for(16, (32, 16)) == 16
    with pytest.raises(ValueError, match="sequence length 65 exceeds the largest shape bucket 64"):
        bucket_for(65, (16, 64))
    ids, mask = pad_rows([[5, 6, 7], [8]], pad_id=9)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == np.int32 and pad_rows([[1]], length=4)[0].tolist() == [[1, 0, 0, 0]]
    with pytest.raises(ValueError, match="row 0 has 3 tokens, more than the padded length 2"):
        pad_rows([[1, 2, 3]], length=2)


def test_host_scoring_and_score_sequences_equal_torch(tok, model):
    """Whole sequences scored in batches of 2 (sorted by length, right-padded) equal per-sequence torch
    log-softmax sums over the scored targets, in the original order; a 1-token sequence scores nothing."""
    seqs = [np.asarray(tok.encode(s), np.int32) for s in austen_sentences(5)] + [np.asarray([1], np.int32)]
    rng = np.random.default_rng(0)
    scored = [rng.random(len(s) - 1) < 0.7 for s in seqs[:-1]] + [np.zeros(0, bool)]
    sums, greedy, counts = score_sequences(torch_logits_fn(model), seqs, scored, batch_size=2)
    for i, (seq, mask) in enumerate(zip(seqs[:-1], scored[:-1])):
        logp = torch_logprobs(model, seq)[:-1]
        picked = logp[np.arange(len(seq) - 1), seq[1:]]
        assert sums[i] == pytest.approx(picked[mask].sum(), rel=1e-5)
        assert counts[i] == mask.sum() and greedy[i] == bool(np.all(logp.argmax(-1)[mask] == seq[1:][mask]))
    assert (sums[-1], greedy[-1], counts[-1]) == (0.0, True, 0)
    logits = torch_logits_fn(model)(seqs[0][None], np.ones((1, len(seqs[0])), np.int32))
    logp, top = host_token_logprobs(logits, seqs[0][None])
    want = torch_logprobs(model, seqs[0])
    np.testing.assert_allclose(logp[0], want[np.arange(len(seqs[0])), seqs[0]], rtol=1e-5)
    assert logp.dtype == np.float64 and top.tolist() == [(want.argmax(-1) == seqs[0]).tolist()]
    with pytest.raises(ValueError, match="sequence 0: scored mask has 1 entries, expected"):
        score_sequences(torch_logits_fn(model), seqs[:1], [np.ones(1, bool)], batch_size=2)


def _causal_mean_model(vocab, dim=16, seed=0):
    """A tiny NNX causal LM for the wrapper test: logits_t = W tanh(4 mean(embed(x_0..x_t))), masked ids skipped."""
    import jax.numpy as jnp
    from flax import nnx

    class CausalMean(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(vocab, dim, rngs=rngs)
            self.out = nnx.Linear(dim, vocab, rngs=rngs)

        def __call__(self, input_ids, attention_mask=None):
            mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
            h = self.embed(input_ids) * mask[..., None]
            mean = jnp.cumsum(h, axis=1) / jnp.maximum(jnp.cumsum(mask, axis=1), 1)[..., None]
            return self.out(jnp.tanh(mean) * 4.0)

    return CausalMean(nnx.Rngs(seed))


def test_jax_logits_fn_buckets_and_matches_eager_model(tok):
    import jax.numpy as jnp

    model = _causal_mean_model(len(tok))
    fn = jax_logits_fn(model, max_length=64, batch_size=4, pad_id=tok.pad_token_id)
    assert fn.buckets == (16, 32, 64)
    chunks = official_packed_chunks(austen_sentences(12), tok, seqlen=60)
    rows = [chunks[0][:5], chunks[1][:9], chunks[2][:13]]
    for row in rows:                                             # lengths 5, 9, 13: one shape, one compile
        ids = np.asarray([row], np.int32)
        got = fn(ids, np.ones_like(ids))
        want = np.asarray(model(jnp.asarray(ids)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert fn.shapes_seen == {(4, 16)}

    def eager(ids, mask):
        return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)), np.float32)

    via_jit = evaluate_perplexity(fn, chunks, batch_size=6, eos_id=tok.eos_token_id, progress=False)
    via_eager = evaluate_perplexity(eager, chunks, batch_size=6, eos_id=tok.eos_token_id, progress=False)
    assert via_jit.ppl_official == pytest.approx(via_eager.ppl_official, rel=1e-5)
    assert via_jit.ppl_corrected == pytest.approx(via_eager.ppl_corrected, rel=1e-5)
    assert fn.shapes_seen <= {(4, 16), (4, 32), (4, 64)}
    with pytest.raises(ValueError, match="exceeds the largest shape bucket 64"):
        fn(np.zeros((1, 65), np.int32), np.ones((1, 65), np.int32))


def test_jax_model_perplexity_equals_torch(tok, model, tmp_path):
    """The JAX Llama (`load_pretrained`, fp32 compute) through jax_logits_fn gives the torch model's perplexity."""
    import jax.numpy as jnp

    from fairy2i_jax.hf.load import load_pretrained

    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    jax_model = load_pretrained(str(tmp_path), dtype=jnp.float32, compute_dtype=jnp.float32)
    chunks = official_packed_chunks(austen_sentences(16), tok, seqlen=96)
    fn = jax_logits_fn(jax_model, max_length=128, batch_size=4, pad_id=tok.pad_token_id)
    got = evaluate_perplexity(fn, chunks, batch_size=4, eos_id=tok.eos_token_id, progress=False)
    want = evaluate_perplexity(torch_logits_fn(model), chunks, batch_size=4, eos_id=tok.eos_token_id,
                               progress=False)
    assert got.num_scored == want.num_scored and got.num_positions == want.num_positions
    assert got.ppl_official == pytest.approx(want.ppl_official, rel=REL)
    assert got.ppl_corrected == pytest.approx(want.ppl_corrected, rel=REL)
    assert fn.shapes_seen <= {(4, 64), (4, 128)}               # chunk inputs of <= 95 tokens: two buckets at most
