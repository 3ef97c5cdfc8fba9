"""fairy2i_jax.models.config (ModelConfig, RopeScaling): every field validated, a bad value names the field."""

import jax.numpy as jnp
import numpy as np
import pytest

from fairy2i_jax.models.config import ModelConfig, RopeScaling


def test_model_config_validation():
    base = dict(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=2)
    assert ModelConfig(**base).head_dim == 4
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(**{**base, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="remat"):
        ModelConfig(**base, remat="sometimes")
    with pytest.raises(ValueError, match="rope_type"):
        ModelConfig(**base, rope_scaling=RopeScaling("yarn"))
    with pytest.raises(ValueError, match="llama3.*needs"):
        RopeScaling("llama3", factor=8.0)
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig(**base, model_type="gpt2")


def test_values_are_canonicalised_and_replace_validates_again():
    base = dict(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=2)
    cfg = ModelConfig(**base, rope_scaling={"rope_type": "linear", "factor": 2}, eos_token_id=[2, 3],
                      param_dtype="bfloat16", rope_theta=10000)
    assert cfg.rope_scaling == RopeScaling("linear", 2.0) and cfg.eos_token_id == (2, 3)
    assert cfg.param_dtype == np.dtype(jnp.bfloat16) and isinstance(cfg.rope_theta, float)
    assert hash(cfg) == hash(ModelConfig(**base, rope_scaling=RopeScaling("linear", 2.0), eos_token_id=(2, 3),
                                         param_dtype=jnp.bfloat16, rope_theta=10000.0))
    for change, message in [({"head_dim": 5}, "head_dim must be even for rotate-half RoPE, got 5"),
                            ({"scan_layers": 1}, "ModelConfig.scan_layers must be a bool, got 1"),
                            ({"param_dtype": "int32"}, "param_dtype must be float32, bfloat16, float16 or float64"),
                            ({"sliding_window": 0}, "sliding_window must be None or a positive integer, got 0")]:
        with pytest.raises(ValueError, match=message):
            cfg.replace(**change)
