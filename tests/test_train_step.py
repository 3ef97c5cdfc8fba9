"""The train step: the complex master update against the official real-coordinate update (torch oracle),
sharded vs one device, gradient accumulation, non-finite detection, distillation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fairy2i_jax import convert, load_pretrained
from fairy2i_jax.training.config import DistillSection
from fairy2i_jax.convert import teacher_weights
from fairy2i_jax.widely_linear import from_widely_linear, to_widely_linear
from model_helpers import checkpoint, model_cls_copy
from train_helpers import harness, host, optimizer, random_batch

LR = 0.1


def _torch_real_grads(model, batch):
    """dL/dA_q of every linear (torch autograd on the fake-quantized weights) and dL/d(other params).

    The torch model gets the JAX model's effective (fake-quantized) matrices, so this is the official QAT
    gradient: the STE makes dL/dA = dL/dA_q for the real master A.
    """
    weights = {k: np.asarray(v, np.float32) for k, v in jax.device_get(model.effective_weights()).items()}
    oracle = model_cls_copy("llama")
    modules = dict(oracle.named_modules())
    with torch.no_grad():
        for name, w in weights.items():
            modules[name].weight.copy_(torch.from_numpy(w.copy()))
    out = oracle(input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long),
                 labels=torch.as_tensor(batch["labels"], dtype=torch.long))
    out.loss.backward()
    grads = {n: p.grad.double().numpy() for n, p in oracle.named_parameters()}
    return out.loss.item(), grads


@pytest.fixture(scope="module")
def w2_model():
    real = load_pretrained(checkpoint("llama"), compute_dtype=jnp.float32)
    return convert(real, "w2")


@pytest.mark.parametrize("coordinates, factor, grad_accum", [("real", 1.0, 2), ("complex", 2.0, 1)])
def test_sgd_update_equals_official_real_update(w2_model, coordinates, factor, grad_accum):
    """real: dU, dW = to_widely_linear(-lr dL/dA_q), exactly the official SGD step on A mapped to complex.
    complex: per-coordinate SGD on (Re, Im) of U, W equals the official update with lr doubled (R R^T = 2 I).
    The real case accumulates 2 micro-batches: the oracle's loss is the token mean of the whole batch."""
    batch = random_batch(4, 12, 256, seed=1)
    ref_loss, g = _torch_real_grads(w2_model, batch)
    h = harness(w2_model, optimizer("sgd", LR, coordinates), batch["input_ids"].shape, grad_accum=grad_accum)
    before = host(h.state.params)
    metrics = h.run(batch)
    after = host(h.state.params)
    assert bool(metrics["finite"]) and int(h.state.step) == 1
    np.testing.assert_allclose(float(metrics["loss"]), ref_loss, rtol=1e-5)
    checked = 0
    for i in range(2):
        for mod in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
            name = f"model.layers.{i}.{mod}"
            want_u, want_w = to_widely_linear(-factor * LR * g[name + ".weight"])
            node_b, node_a = before["layers"][i], after["layers"][i]
            for part in mod.split("."):
                node_b, node_a = node_b[part], node_a[part]
            for key, want in (("U", want_u), ("W", want_w)):
                got = node_a[key].astype(np.complex128) - node_b[key]
                np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4 * np.abs(want).max(), err_msg=name)
                checked += 1
    want_u, _ = to_widely_linear(-factor * LR * g["lm_head.weight"])
    np.testing.assert_allclose(after["lm_head"]["U"] - before["lm_head"]["U"], want_u, rtol=2e-3,
                               atol=2e-4 * np.abs(want_u).max())
    # real params get the plain SGD step in both coordinate systems
    d_embed = after["embed_tokens"]["embedding"] - before["embed_tokens"]["embedding"]
    np.testing.assert_allclose(d_embed, -LR * g["model.embed_tokens.weight"], rtol=2e-3, atol=1e-7)
    assert checked == 12

    # a non-finite gradient (an inf planted in a norm weight) skips the update and names the first bad leaf:
    # the inf reaches the loss and, backwards, every gradient upstream of layer 1, so it is the embedding table
    params = h.state.params
    params["layers"][1]["post_attention_layernorm"]["weight"] = (
        params["layers"][1]["post_attention_layernorm"]["weight"].at[3].set(jnp.inf))
    before = host(params)
    metrics = h.run(batch)
    assert not bool(metrics["finite"]) and int(h.state.step) == 1
    assert h.layout.paths[int(metrics["bad_leaf"])] == "embed_tokens.embedding"
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(host(h.state.params))):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def tied_scanned():
    real = load_pretrained(checkpoint("llama_tied"), compute_dtype=jnp.float32, scan_layers=True)
    return convert(real, "w2")


def test_sharded_step_matches_one_device(tied_scanned):
    """(data 2, fsdp 2, tensor 2) on 8 CPU devices vs 1 device, two AdamW steps with grad_accum 2.

    Tolerance: the sharded program sums gradients and losses in a different order (all-reduces over the data
    and fsdp axes, partial matmuls and the vocab's logsumexp over tensor), so the float32 results differ in the
    last bits: loss to 1e-6 relative. Adam divides each update by the gradient's own magnitude, so an entry
    moves by about lr times the relative change of its gradient: 1e-6 + 1e-3 * lr for all but the rare entries
    whose gradient is a nearly cancelling sum (its reordering error is relative to the terms, not to the tiny
    result), which get 1e-2 * lr; in norm the params agree to 1e-3 * lr per entry.
    """
    lr = 1e-3
    batch = random_batch(8, 16, 256, seed=2)
    opt = optimizer("adamw", lr, "real", clip_norm=1.0, b2=0.95)
    one = harness(tied_scanned, opt, batch["input_ids"].shape, mesh_shape=(1, 1, 1), grad_accum=2)
    many = harness(tied_scanned, opt, batch["input_ids"].shape, mesh_shape=(2, 2, 2), grad_accum=2)
    u = many.state.params["layers"]["mlp"]["down_proj"]["U"]
    assert len(u.sharding.device_set) == 8 and not u.sharding.is_fully_replicated
    for s in range(2):
        m1, m8 = one.run(random_batch(8, 16, 256, seed=s)), many.run(random_batch(8, 16, 256, seed=s))
        np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-6)
        np.testing.assert_allclose(float(m8["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    p1, p8 = host(one.state.params), host(many.state.params)
    diff = np.concatenate([np.abs(np.asarray(b) - np.asarray(a)).ravel()
                           for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8))])
    assert diff.max() <= 1e-6 + 1e-2 * lr and np.mean(diff > 1e-6 + 1e-3 * lr) <= 1e-3
    assert np.sqrt(np.mean(diff**2)) <= 1e-3 * lr


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
