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
