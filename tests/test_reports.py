"""fairy2i_jax.training.reports: a run's perplexity report equals ``evaluate_perplexity`` (with a plain jitted
forward, not the report's bucketed logits function) on the same capped official chunks, the held-out loss equals
the token-mean CE of the same held-out batches, and the global batch of one host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eval_helpers import austen_paragraphs, austen_sentences
from fairy2i_jax.data import eval_dataset, load_corpus
from fairy2i_jax.evaluation.perplexity import evaluate_perplexity, official_packed_chunks
from fairy2i_jax.hf.tokenizer import ByteTokenizer
from fairy2i_jax.models.config import ModelConfig
from fairy2i_jax.models.llama import abstract_model
from fairy2i_jax.sharding import make_mesh
from fairy2i_jax.training.config import load_train_config
from fairy2i_jax.training.optim import make_optimizer
from fairy2i_jax.training.reports import HeldOutLoss, global_batch, perplexity
from fairy2i_jax.training.state import ParamLayout, state_shardings
from fairy2i_jax.training.step import batch_sharding, token_nll
from train_helpers import DEBUG_CONFIG, optimizer

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def model():
    """A random 1-layer model over the byte tokenizer, its params drawn with numpy (nothing to compile)."""
    config = ModelConfig(vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                         num_kv_heads=1, compute_dtype=jnp.float32)
    model = abstract_model(config)
    rng = np.random.default_rng(0)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray(1 + 0.1 * rng.standard_normal(s.shape) if "norm" in jax.tree_util.keystr(path)
                                    else 0.2 * rng.standard_normal(s.shape), s.dtype), nnx.to_pure_dict(state)))
    nnx.update(model, state)
    return model


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


def _fixed_shape_logits(model, batch: int, length: int):
    """A plain logits function that pads every call to ``[batch, length]`` (one compile; right padding leaves the
    logits of the real positions of a causal model unchanged)."""
    def fn(ids, mask):
        b, t = ids.shape
        padded = np.full((batch, length), TOK.pad_token_id, np.int32)
        padded_mask = np.zeros((batch, length), np.int32)
        padded[:b, :t], padded_mask[:b, :t] = ids, mask
        return np.asarray(_forward(model, padded, padded_mask))[:b, :t]

    return fn


def test_perplexity_report_equals_evaluate_perplexity_on_the_capped_chunks(model):
    documents = austen_sentences(60)  # byte tokens: short items, most of them fit a 128-token chunk
    cfg = load_train_config(DEBUG_CONFIG, ["eval.ppl_max_tokens=700", "eval.ppl_seq_len=128", "eval.ppl_batch=2"])
    chunks = official_packed_chunks(documents, TOK, 128)
    lengths = np.cumsum([len(c) for c in chunks])
    kept = chunks[: int(np.argmax(lengths >= 700)) + 1]  # whole chunks until the cap is reached
    assert 1 < len(kept) < len(chunks)
    want = evaluate_perplexity(_fixed_shape_logits(model, 2, 128), kept, batch_size=2, eos_id=TOK.eos_token_id,
                               pad_id=TOK.pad_token_id, progress=False)
    assert perplexity(model, TOK, documents, cfg) == pytest.approx(want.ppl, rel=1e-5)
    assert perplexity(model, TOK, documents, load_train_config(DEBUG_CONFIG)) is None  # ppl_max_tokens: 0
    assert perplexity(model, TOK, [], cfg) is None


def test_held_out_loss_and_global_batch(model, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("\n\n".join(austen_paragraphs(20)), encoding="utf-8")
    corpus = load_corpus([text], TOK, doc_split="paragraph")
    # held-out batches of [2, 128]: the shape the perplexity test compiled the forward for
    cfg = load_train_config(DEBUG_CONFIG, ["data.seq_len=128", "data.global_batch=4", "train.grad_accum=2",
                                           "train.eval_batches=3"])
    mesh = make_mesh(2, 1, 1)
    layout = ParamLayout(model)
    tx, _ = make_optimizer(optimizer(), 10)
    shardings = state_shardings(layout, tx, "real", mesh)
    params = jax.device_put(ParamLayout.pure(model), shardings.params)
    held_out = HeldOutLoss(corpus, cfg, layout, shardings, mesh)
    assert held_out.shape == (2, 128)  # one micro-batch of the global batch
    nll = count = 0.0
    for i, b in enumerate(eval_dataset(corpus, seq_len=128, global_batch=2)):
        if i == 3:
            break
        s, c = token_nll(_forward(model, jnp.asarray(b["input_ids"]), jnp.ones_like(b["input_ids"])), b["labels"])
        nll, count = nll + float(s), count + float(c)
    assert held_out(params) == pytest.approx(nll / count, rel=1e-5)

    local = {"input_ids": np.arange(8 * 32, dtype=np.int32).reshape(8, 32)}
    arrays = global_batch(local, batch_sharding(mesh, (8, 32)), (8, 32))
    assert arrays["input_ids"].sharding == batch_sharding(mesh, (8, 32))
    assert len(arrays["input_ids"].addressable_shards) == 2
    np.testing.assert_array_equal(arrays["input_ids"], local["input_ids"])
