"""Mesh, logical axis rules, and sharded loading / conversion on 8 fake CPU devices (2 x 2 x 2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from fairy2i_jax import convert, load_pretrained
from fairy2i_jax.models import ModelConfig, init_model
from fairy2i_jax.sharding import logical_to_sharding, logical_to_spec, make_mesh, shard_like_params
from model_helpers import batch, checkpoint


@nnx.jit
def _forward(model, ids, mask, weights):
    return model(ids, mask, weights=weights)


def logits(model, ids, mask, mesh=None):
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    if mesh is not None:
        ids = jax.device_put(ids, logical_to_sharding(("batch", "seq"), mesh, ids.shape))
        mask = jax.device_put(mask, logical_to_sharding(("batch", "seq"), mesh, mask.shape))
    return np.asarray(_forward(model, ids, mask, model.effective_weights()))


def test_make_mesh_axes_and_rules():
    mesh = make_mesh(2, 2, 2)
    assert mesh.axis_names == ("data", "fsdp", "tensor") and dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh(2, 2, 4)
    assert logical_to_spec(("heads", "embed")) == P("tensor", "fsdp")
    assert logical_to_spec(("layers", "mlp", "embed")) == P(None, "tensor", "fsdp")
    assert logical_to_spec(("batch", "seq")) == P(("data", "fsdp"), None)
    # a mesh axis that does not divide its dim is dropped (replicated), the others stay
    assert logical_to_spec(("batch", "seq"), (2, 10), mesh) == P("data", None)
    assert logical_to_spec(("vocab", "embed"), (255, 64), mesh) == P(None, "fsdp")
    with pytest.raises(ValueError, match="logical axis 'heads_typo' has no rule"):
        logical_to_spec(("heads_typo",))


def test_sharded_load_and_w2_conversion_match_one_device():
    ids, mask = batch()
    mesh = make_mesh(2, 2, 2)
    single = load_pretrained(checkpoint("qwen2"), compute_dtype=jnp.float32)
    sharded = load_pretrained(checkpoint("qwen2"), compute_dtype=jnp.float32, mesh=mesh)
    kernel = sharded.layers[0].self_attn.q_proj.kernel.get_value()
    assert kernel.sharding.spec == P("tensor", "fsdp") and kernel.addressable_shards[0].data.shape == (32, 32)
    assert sharded.embed_tokens.embedding.get_value().sharding.spec == P("tensor", "fsdp")
    assert sharded.layers[0].self_attn.k_proj.bias.get_value().sharding.spec == P("tensor")
    np.testing.assert_allclose(logits(sharded, ids, mask, mesh), logits(single, ids, mask), atol=1e-5)

    quantized_single, quantized = convert(single, "w2"), convert(sharded, "w2")
    U = quantized.layers[1].mlp.down_proj.U.get_value()
    assert U.shape == (32, 64) and U.sharding.spec == P("fsdp", "tensor")
    assert U.addressable_shards[0].data.shape == (16, 32)
    # The conversion is elementwise, so the sharded masters are the single-device ones bit for bit ...
    for a, b in zip(jax.tree.leaves(nnx.state(quantized)), jax.tree.leaves(nnx.state(quantized_single))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # ... but each stage scale is a float32 mean over a sharded tensor, rounded to bf16: another summation order
    # can land on the other side of a rounding boundary (probability ~ n u / 2^-8 per scale), changing that
    # scale by one bf16 ulp (2^-8 relative), the matrix by about that much on average (a later stage's code near
    # its decision boundary may flip, so entries are compared on average, not one by one).
    w_sharded, w_single = quantized.effective_weights(), quantized_single.effective_weights()
    changed = [name for name in w_single if not np.array_equal(np.asarray(w_sharded[name]), np.asarray(w_single[name]))]
    for name in changed:
        a, b = (np.asarray(w[name], np.float32) for w in (w_sharded, w_single))
        assert np.mean(np.abs(a - b)) <= 2**-6 * np.mean(np.abs(b)), name
    np.testing.assert_allclose(logits(quantized, ids, mask, mesh), logits(quantized_single, ids, mask),
                               atol=1e-5 if not changed else 5e-2)


def test_shard_like_params_places_every_param():
    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                      num_kv_heads=2, scan_layers=True, compute_dtype=jnp.float32)
    model = init_model(cfg)
    mesh = make_mesh(1, 2, 4)
    shard_like_params(model, mesh)
    assert model.layers.mlp.gate_proj.kernel.get_value().sharding.spec == P(None, "tensor", "fsdp")
    assert model.layers.input_layernorm.weight.get_value().sharding.spec == P(None, None)
    leaves = jax.tree.leaves(nnx.state(model))
    assert all(isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh == mesh for x in leaves)


# ------------------------------------------------------------------------------------------------ activations

U32 = 2.0**-24  # float32 unit roundoff
TINY_MESH = (2, 2, 2)
# Constraints the tiny model's step must carry on 2 x 2 x 2, per micro-batch [4, 16] (global batch 8, grad_accum 2):
# (mesh axes per dim as lowered, shape) -> what it is.
DECLARED = {
    ('[{"data", "fsdp"}, {}, {}]', "4x16x64"): "residual stream",
    ('[{"data", "fsdp"}, {}, {"tensor"}, {}]', "4x16x4x16"): "q heads",
    ('[{"data", "fsdp"}, {}, {"tensor"}, {}]', "4x16x2x16"): "k / v heads",
    ('[{"data", "fsdp"}, {}, {"tensor"}]', "4x16x64"): "attention output",
    ('[{"data", "fsdp"}, {}, {"tensor"}]', "4x16x128"): "mlp hidden",
    ('[{"data", "fsdp"}, {}, {"tensor"}]', "4x16x260"): "logits",
    ('[{"tensor"}, {}]', "260x64"): "embedding table read by the lookup",
}


def _tiny_w2():
    from fairy2i_jax.sources import tiny_config

    return convert(init_model(tiny_config(scan_layers=True), seed=0), "w2")


def _harness(model, mesh_shape, seq=None):
    from fairy2i_jax.training.config import DistillSection
    from fairy2i_jax.training.optim import make_optimizer
    from fairy2i_jax.training.state import ParamLayout, init_state
    from fairy2i_jax.training.step import jit_train_step, make_train_step
    from train_helpers import Harness, optimizer

    mesh, layout = make_mesh(*mesh_shape), ParamLayout(model)
    opt = optimizer("sgd", 0.1)
    tx, schedule = make_optimizer(opt, 100)
    state, shardings = init_state(layout, model, tx, "real", 0, mesh)
    fn = make_train_step(layout, tx, schedule, coordinates="real", grad_accum=2, distill=DistillSection(), mesh=mesh,
                         seq=seq)
    return Harness(layout, state, jit_train_step(fn, shardings, mesh, (8, 16)), mesh)


def _constraints(lowered_text: str) -> set[tuple[str, str]]:
    import re

    found = re.findall(r"sdy.sharding_constraint %\S+ <@mesh, (\[.*?\])> : tensor<([0-9x]+)x[a-z0-9]+>", lowered_text)
    return set(found)


def _batch(seed):
    from train_helpers import random_batch

    return {k: jnp.asarray(v) for k, v in random_batch(8, 16, 260, seed=seed).items()}


def test_the_step_declares_the_activation_shardings_and_seq_is_a_rule():
    """The lowered 2 x 2 x 2 train step carries a sharding constraint for every activation boundary (batch over
    data x fsdp, heads / kv heads / ffn / vocab over tensor); with ``seq="tensor"`` the residual stream's
    sequence goes over tensor instead and the interiors keep theirs. Without a mesh ``constrain`` is a no-op."""
    from fairy2i_jax.sharding import axis_rules, constrain

    model = _tiny_w2()
    h = _harness(model, TINY_MESH)
    found = _constraints(h.step.lower(h.state, _batch(0), None).as_text())
    assert set(DECLARED) <= found, sorted(set(DECLARED) - found)
    seq = _harness(model, TINY_MESH, seq="tensor")
    found = _constraints(seq.step.lower(seq.state, _batch(0), None).as_text())
    assert ('[{"data", "fsdp"}, {"tensor"}, {}]', "4x16x64") in found  # residual: sequence over tensor
    assert ('[{"data", "fsdp"}, {}, {"tensor"}, {}]', "4x16x4x16") in found  # q heads still over tensor
    x = jnp.ones((4, 16, 64))
    assert constrain(x, ("batch", "seq", "act_embed")) is x
    with pytest.raises(ValueError, match="no logical axis rule named"):
        with axis_rules(sequence="tensor"):
            pass


def _reorder_rtol(n: int, depth: int) -> float:
    """Relative bound on the change of a float32 result whose value passes through ``depth`` reductions of at
    most ``n`` terms each when every reduction is evaluated in another order: a sum of ``n`` terms moves by at
    most ``2 (n - 1) u`` of the sum of its terms' magnitudes (Higham, Accuracy and Stability, section 4.2), to
    first order per stage."""
    return depth * 2 * (n - 1) * U32


def test_sharded_step_keeps_the_declared_shardings_and_equals_one_device():
    """The compiled 2 x 2 x 2 step computes every activation per device at its sharded shape and two SGD steps
    equal the one-device steps.

    Tolerance, from the arithmetic (float32 compute, the tiny model): the sharded program sums in another order
    (partial matmuls over tensor, the batch over data x fsdp, the vocab of the logsumexp over tensor). Every
    number of the step passes through at most ``depth = 2 L + 3 = 7`` reduction stages (per layer the attention
    and MLP contractions, then the head, the logsumexp, the batch sum), each of at most ``n = 260`` terms (vocab;
    hidden 64, ffn 128, 16 keys, 8 x 16 tokens are fewer): ``rtol = depth 2 (n - 1) u = 2.2e-4`` of the
    magnitudes involved. Loss and gradient norm are compared relative to themselves; a param after SGD moves by
    ``lr * g``, so it may differ by ``lr * rtol * max|g|``.
    """
    model = _tiny_w2()
    one, many = _harness(model, (1, 1, 1)), _harness(model, TINY_MESH)
    compiled = many.step.lower(many.state, _batch(0), None).compile()
    text = compiled.as_text()
    for shape, what in (("f32[1,16,130]", "logits: 1 row, half the vocab"), ("f32[1,16,2,16]", "q: half the heads"),
                        ("f32[1,16,1,16]", "k / v: half the kv heads")):
        assert shape in text, what
    for unsharded in ("f32[4,16,260]", "f32[4,16,128]", "f32[4,16,4,16]"):
        assert unsharded not in text  # no activation of a whole micro-batch on one device
    rtol = _reorder_rtol(260, 2 * 2 + 3)
    many.step = compiled
    grads_scale = []
    for s in range(2):
        m1, m8 = one.run(_batch(s)), many.run(_batch(s))
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(float(m8[key]), float(m1[key]), rtol=rtol, atol=0)
        grads_scale.append(float(m1["grad_norm"]))
    p1, p8 = jax.device_get(one.state.params), jax.device_get(many.state.params)
    bound = 2 * 0.1 * rtol * max(grads_scale)  # two steps, lr 0.1, |g| <= grad_norm
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=bound)
    u = many.state.params["layers"]["mlp"]["down_proj"]["U"]
    assert u.sharding.spec == P(None, "fsdp", "tensor") and len(u.sharding.device_set) == 8
