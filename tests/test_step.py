"""fairy2i_jax.training.step: the jitted train step sharded on (data 2, fsdp 2, tensor 2) against one device
with gradient accumulation, distillation from the unquantized teacher, the token losses against torch, and W2 QAT
recovering what W2 PTQ loses. (The update in real and complex coordinates against the official real update, with
the skipped non-finite step: test_optim.py.)"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fairy2i_jax import convert
from fairy2i_jax.convert import teacher_weights
from fairy2i_jax.data import eval_dataset, load_corpus, train_dataset
from fairy2i_jax.hf.tokenizer import ByteTokenizer
from fairy2i_jax.models.llama import init_model
from fairy2i_jax.sources import tiny_config
from fairy2i_jax.training.config import DistillSection
from fairy2i_jax.training.step import micro_batches, token_kl, token_nll
from fairy2i_jax.widely_linear import from_widely_linear
from train_helpers import converted, harness, host, optimizer, random_batch


@pytest.fixture(scope="module")
def w2_model():
    return converted("llama", "w2")


@pytest.fixture(scope="module")
def tied_scanned():
    return converted("llama_tied", "w2", scan_layers=True)


def test_token_losses_equal_torch():
    """Sum of next-token CE over targets != -100 and its count; the KL of the tempered distributions summed over
    the same positions."""
    rng = np.random.default_rng(0)
    logits, teacher = rng.standard_normal((2, 2, 7, 11)).astype(np.float32)
    labels = rng.integers(0, 11, size=(2, 7))
    labels[0, 3], labels[1, 0], labels[1, 5] = -100, -100, -100  # position 0 is never a target
    nll, count = token_nll(jnp.asarray(logits), jnp.asarray(labels))
    flat = torch.tensor(logits[:, :-1]).reshape(-1, 11)
    targets = torch.tensor(labels[:, 1:]).reshape(-1)
    want = torch.nn.functional.cross_entropy(flat, targets, ignore_index=-100, reduction="sum")
    assert float(count) == 10 and float(nll) == pytest.approx(float(want), rel=1e-5)
    kl = token_kl(jnp.asarray(teacher), jnp.asarray(logits), jnp.asarray(labels), temperature=2.0)
    keep = targets != -100
    log_q = torch.log_softmax(flat[keep] / 2.0, -1)
    log_p = torch.log_softmax(torch.tensor(teacher[:, :-1]).reshape(-1, 11)[keep] / 2.0, -1)
    want_kl = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="sum")
    assert float(kl) == pytest.approx(float(want_kl), rel=1e-5)
    rows = micro_batches(jnp.arange(6 * 3).reshape(6, 3), 2, None)
    assert rows.shape == (2, 3, 3) and rows[:, :, 0].tolist() == [[0, 6, 12], [3, 9, 15]]  # rows a::k


# The (data 2, fsdp 2, tensor 2) step against one device: tests/test_sharding.py
# (test_sharded_step_keeps_the_declared_shardings_and_equals_one_device, grad_accum 2, bounds from the arithmetic).


def test_distillation_from_the_unquantized_teacher(w2_model):
    """The teacher's matrices are the recomposed masters, unquantized; with quantization off (fp masters) the
    teacher is the student, so KL = 0 and the loss is (1 - w) CE exactly."""
    teacher, student = teacher_weights(w2_model), w2_model.effective_weights()
    lin = w2_model.layers[0].mlp.up_proj
    np.testing.assert_array_equal(teacher["model.layers.0.mlp.up_proj"],
                                  from_widely_linear(lin.U.get_value(), lin.W.get_value()))
    assert not np.allclose(teacher["lm_head"], student["lm_head"])
    batch = random_batch(2, 12, 256, seed=5)
    d = DistillSection(weight=0.25, temperature=2.0)
    m_fp = harness(convert(w2_model, "fp"), optimizer("sgd", 0.0), batch["input_ids"].shape, distill=d).run(batch)
    np.testing.assert_allclose(float(m_fp["loss"]), 0.75 * float(m_fp["ce"]), rtol=1e-5)


# -- W2 QAT recovers what W2 PTQ loses -------------------------------------------------------------------------

# On the Austen corpus a tiny byte-level Llama is pretrained briefly in fp, converted to W2 (PTQ), then trained 50
# QAT steps; the held-out loss (Northanger Abbey) drops below PTQ's.
AUSTEN = Path(__file__).resolve().parents[1] / "data" / "austen"
SEQ, BATCH = 64, 16


@jax.jit
def _nll(model, weights, ids, labels):
    return token_nll(model(ids, weights=weights), labels)


def _held_out_loss(model, corpus, batches: int = 8) -> float:
    weights = model.effective_weights()
    nll = count = 0.0
    for i, b in enumerate(eval_dataset(corpus, seq_len=SEQ, global_batch=BATCH)):
        if i == batches:
            break
        s, c = _nll(model, weights, jnp.asarray(b["input_ids"]), jnp.asarray(b["labels"]))
        nll, count = nll + float(s), count + float(c)
    return nll / count


def _train(model, steps: int, lr: float, data_iter):
    h = harness(model, optimizer("adamw", lr, "real", clip_norm=1.0), (BATCH, SEQ))
    losses = [float(h.run(next(data_iter))["loss"]) for _ in range(steps)]
    return h.layout.merge(h.state.params), losses


def test_w2_qat_beats_w2_ptq_within_50_steps():
    tok = ByteTokenizer()
    corpus = load_corpus([AUSTEN / "train" / "prideprejudice.txt.gz"], tok, doc_split="paragraph")
    held_out = load_corpus([AUSTEN / "validation"], tok, doc_split="paragraph")
    it = iter(train_dataset(corpus, seq_len=SEQ, global_batch=BATCH, seed=0))
    base = init_model(tiny_config(jnp.float32, jnp.float32, True, "none"), seed=0)
    fp, fp_losses = _train(base, 120, 3e-3, it)
    assert fp_losses[-1] < fp_losses[0] - 1.0, fp_losses[::25]
    ptq = convert(fp, "w2")
    fp_loss, ptq_loss = _held_out_loss(fp, held_out), _held_out_loss(ptq, held_out)
    assert ptq_loss > fp_loss + 0.05, (fp_loss, ptq_loss)  # quantization hurts before training
    qat, _ = _train(ptq, 50, 2e-3, it)
    qat_loss = _held_out_loss(qat, held_out)
    print(f"held-out loss: fp {fp_loss:.3f}, W2 PTQ {ptq_loss:.3f}, W2 QAT (50 steps) {qat_loss:.3f}")
    assert qat_loss < ptq_loss - 0.05, (fp_loss, ptq_loss, qat_loss)
    assert np.isfinite(qat_loss)
