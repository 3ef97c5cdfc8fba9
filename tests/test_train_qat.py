"""W2 QAT recovers what W2 PTQ loses: on the Austen corpus a tiny byte-level Llama is pretrained briefly in fp,
converted to W2 (PTQ), then trained 50 QAT steps; the held-out loss (Northanger Abbey) drops below PTQ's."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fairy2i_jax import convert
from fairy2i_jax.data import eval_dataset, load_corpus, train_dataset
from fairy2i_jax.models.llama import init_model
from fairy2i_jax.hf.tokenizer import ByteTokenizer
from fairy2i_jax.sources import tiny_config
from fairy2i_jax.training.step import token_nll
from train_helpers import harness, optimizer

AUSTEN = Path(__file__).resolve().parents[1] / "data" / "austen"
SEQ, BATCH = 64, 16


@jax.jit
def _nll(model, weights, ids, labels):
    return token_nll(model(ids, weights=weights), labels)


def held_out_loss(model, corpus, batches: int = 8) -> float:
    weights = model.effective_weights()
    nll = count = 0.0
    for i, b in enumerate(eval_dataset(corpus, seq_len=SEQ, global_batch=BATCH)):
        if i == batches:
            break
        s, c = _nll(model, weights, jnp.asarray(b["input_ids"]), jnp.asarray(b["labels"]))
        nll, count = nll + float(s), count + float(c)
    return nll / count


def train(model, steps: int, lr: float, data_iter):
    h = harness(model, optimizer("adamw", lr, "real", clip_norm=1.0), (BATCH, SEQ))
    losses = [float(h.run(next(data_iter))["loss"]) for _ in range(steps)]
    return h.layout.merge(h.state.params), losses


def test_w2_qat_beats_w2_ptq_within_50_steps():
    tok = ByteTokenizer()
    corpus = load_corpus([AUSTEN / "train" / "prideprejudice.txt.gz"], tok, doc_split="paragraph")
    held_out = load_corpus([AUSTEN / "validation"], tok, doc_split="paragraph")
    it = iter(train_dataset(corpus, seq_len=SEQ, global_batch=BATCH, seed=0))
    base = init_model(tiny_config(jnp.float32, jnp.float32, True, "none"), seed=0)
    fp, fp_losses = train(base, 120, 3e-3, it)
    assert fp_losses[-1] < fp_losses[0] - 1.0, fp_losses[::25]
    ptq = convert(fp, "w2")
    fp_loss, ptq_loss = held_out_loss(fp, held_out), held_out_loss(ptq, held_out)
    assert ptq_loss > fp_loss + 0.05, (fp_loss, ptq_loss)  # quantization hurts before training
    qat, _ = train(ptq, 50, 2e-3, it)
    qat_loss = held_out_loss(qat, held_out)
    print(f"held-out loss: fp {fp_loss:.3f}, W2 PTQ {ptq_loss:.3f}, W2 QAT (50 steps) {qat_loss:.3f}")
    assert qat_loss < ptq_loss - 0.05, (fp_loss, ptq_loss, qat_loss)
    assert np.isfinite(qat_loss)
