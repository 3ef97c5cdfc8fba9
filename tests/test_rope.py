"""fairy2i_jax.models.rope: cos / sin of every rope type against transformers' Llama rotary embedding (its
``ROPE_INIT_FUNCTIONS``), and ``apply_rope`` against transformers' ``apply_rotary_pos_emb``."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.llama import modeling_llama

from fairy2i_jax.hf.config_map import config_from_hf
from fairy2i_jax.models.rope import apply_rope, rope_cos_sin, rotate_half

BASE = dict(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
ROPES = {
    "default": dict(rope_type="default", rope_theta=10000.0),
    "linear": dict(rope_type="linear", rope_theta=5000.0, factor=4.0),
    "llama3": dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64),  # wavelengths in all three llama3 bands
    "dynamic": dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
}
# float32 angles up to ~150 rad: cos / sin agree to a few float32 ulps of the angle
TOL = 2e-5


def _theirs(hf_config, positions):
    """cos, sin of a fresh transformers rotary module (fresh: dynamic rope caches its grown frequencies)."""
    rotary = modeling_llama.LlamaRotaryEmbedding(hf_config)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.as_tensor(positions))
    return cos.numpy(), sin.numpy()


@pytest.mark.parametrize("rope", list(ROPES))
def test_cos_sin_equal_transformers(rope):
    hf_config = transformers.LlamaConfig(**BASE, rope_parameters=ROPES[rope])
    config = config_from_hf(hf_config.to_dict())
    assert config.rope_scaling.rope_type == rope
    # short: within max_position_embeddings; long: past it (dynamic grows its base), with a padded row
    short = np.arange(12)[None].repeat(2, 0)
    long = np.stack([np.arange(150), np.maximum(np.arange(150) - 40, 0)])
    for positions in (short, long):
        cos, sin = rope_cos_sin(config, jnp.asarray(positions, jnp.int32))
        want_cos, want_sin = _theirs(hf_config, positions)
        assert cos.shape == want_cos.shape == (2, positions.shape[1], 16)
        np.testing.assert_allclose(np.asarray(cos), want_cos, rtol=0, atol=TOL, err_msg=rope)
        np.testing.assert_allclose(np.asarray(sin), want_sin, rtol=0, atol=TOL, err_msg=rope)
    if rope == "dynamic":  # the grown base changes the frequencies: long positions differ from default rope
        default = config.replace(rope_scaling=type(config.rope_scaling)())
        assert not np.allclose(rope_cos_sin(default, jnp.asarray(long))[0], _theirs(hf_config, long)[0], atol=1e-3)


def test_apply_rope_equals_transformers():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 4, 16)).astype(np.float32)  # [B, T, heads, head_dim]
    np.testing.assert_array_equal(rotate_half(jnp.asarray(x)), np.concatenate([-x[..., 8:], x[..., :8]], -1))
    config = config_from_hf(transformers.LlamaConfig(**BASE, rope_parameters=ROPES["default"]).to_dict())
    positions = np.arange(5)[None].repeat(2, 0)
    cos, sin = rope_cos_sin(config, jnp.asarray(positions))
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    t = torch.tensor(x).transpose(1, 2)  # transformers: [B, heads, T, head_dim]
    want, _ = modeling_llama.apply_rotary_pos_emb(t, t, torch.tensor(np.asarray(cos)), torch.tensor(np.asarray(sin)))
    np.testing.assert_allclose(got, want.transpose(1, 2).numpy(), rtol=1e-6, atol=1e-6)
    half = apply_rope(jnp.asarray(x, jnp.bfloat16), cos, sin)
    assert half.dtype == jnp.bfloat16
