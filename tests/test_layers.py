"""fairy2i_jax.models.layers: RMSNorm, grouped-query attention and the SwiGLU MLP against transformers' Llama
modules (same weights), and the decoder layer's plan check."""

import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.models.llama import modeling_llama

from fairy2i_jax.models.config import ModelConfig
from fairy2i_jax.models.layers import MASK_VALUE, MLP, DecoderLayer, RMSNorm, attend
from fairy2i_jax.models.linear import LinearSpec

CFG = ModelConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=4, num_kv_heads=2,
                  compute_dtype=jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rms_norm_equals_transformers(dtype):
    """Statistics in float32, cast back to the input dtype, then times the weight in that dtype (a bfloat16
    model's weight: bit-equal)."""
    rng = np.random.default_rng(0)
    x, weight = rng.standard_normal((2, 3, 8)).astype(np.float32), 1 + 0.2 * rng.standard_normal(8)
    norm = RMSNorm(8, 1e-5)
    norm.weight.set_value(jnp.asarray(weight, jnp.float32))
    torch_dtype = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
    theirs = modeling_llama.LlamaRMSNorm(8, eps=1e-5)
    with torch.no_grad():
        theirs.weight.copy_(torch.tensor(weight, dtype=torch.float32))
        want = theirs.to(torch_dtype)(torch.tensor(x).to(torch_dtype)).float().numpy()
    got = np.asarray(norm(jnp.asarray(x, dtype)).astype(jnp.float32))
    if dtype == jnp.bfloat16:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_grouped_query_attention_equals_transformers_eager_attention():
    """Query head h reads kv head h // 2 (4 heads, 2 kv heads); a causal mask with a padded key; a query whose
    keys are all masked stays finite (uniform over the keys, as transformers' additive finfo.min mask)."""
    rng = np.random.default_rng(1)
    b, t, h, kv, d = 2, 5, 4, 2, 16
    q, k, v = (rng.standard_normal((b, t, n, d)).astype(np.float32) for n in (h, kv, kv))
    allowed = np.tril(np.ones((t, t), bool))[None].repeat(b, 0)
    allowed[1, :, 0] = False  # row 1: key 0 is padding, so its query 0 sees nothing
    got = np.asarray(attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(allowed)))
    module = types.SimpleNamespace(num_key_value_groups=h // kv, training=False)
    additive = torch.tensor(np.where(allowed, 0.0, MASK_VALUE)[:, None], dtype=torch.float32)
    as_torch = lambda x: torch.tensor(x).transpose(1, 2)  # [B, heads, T, D]
    want, _ = modeling_llama.eager_attention_forward(module, as_torch(q), as_torch(k), as_torch(v), additive,
                                                     scaling=d**-0.5)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got[1, 0], np.broadcast_to(v[1].mean(0).repeat(2, 0), (h, d)), rtol=1e-5, atol=1e-5)


def test_swiglu_mlp_equals_transformers():
    rng = np.random.default_rng(2)
    mlp = nnx.eval_shape(lambda: MLP(CFG, {}, rngs=nnx.Rngs(0)))  # weights set below: no random init to compile
    theirs = modeling_llama.LlamaMLP(transformers.LlamaConfig(hidden_size=8, intermediate_size=16,
                                                              num_attention_heads=4)).eval()
    with torch.no_grad():
        for name, shape in (("gate_proj", (16, 8)), ("up_proj", (16, 8)), ("down_proj", (8, 16))):
            weight = rng.standard_normal(shape).astype(np.float32)
            getattr(mlp, name).kernel.set_value(jnp.asarray(weight))
            getattr(theirs, name).weight.copy_(torch.tensor(weight))
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    with torch.no_grad():
        want = theirs(torch.tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


def test_decoder_layer_plan_names_and_kinds():
    layer = nnx.eval_shape(lambda: DecoderLayer(CFG, {"mlp.up_proj": LinearSpec("widely_linear")}, rngs=nnx.Rngs(0)))
    assert set(layer.linears()) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert layer.linears()["mlp.up_proj"].spec.kind == "widely_linear"
    assert layer.mlp.up_proj.U.get_value().shape == (8, 4)
    assert layer.linears()["mlp.down_proj"].spec.kind == "real" and layer.self_attn.q_norm is None
    with pytest.raises(ValueError, match=r"unknown layer linear name\(s\) \['mlp.upproj'\]"):
        nnx.eval_shape(lambda: DecoderLayer(CFG, {"mlp.upproj": LinearSpec()}, rngs=nnx.Rngs(0)))
