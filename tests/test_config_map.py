"""fairy2i_jax.hf.config_map: HF ``config.json`` <-> ModelConfig for every family of the tiny test checkpoints,
the v5 and legacy RoPE spellings, and the refusals."""

import json

import pytest

from fairy2i_jax.hf.config_map import config_from_hf, config_to_hf
from model_helpers import checkpoint


def test_config_spellings_and_round_trip():
    hf = json.loads((checkpoint("llama_llama3") / "config.json").read_text())
    cfg = config_from_hf(hf)
    assert cfg.rope_scaling.rope_type == "llama3" and cfg.rope_scaling.original_max_position_embeddings == 64
    legacy = {k: v for k, v in hf.items() if k != "rope_parameters"}
    legacy.update(rope_theta=10000.0, rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    assert config_from_hf(legacy) == cfg
    big_theta = dict(hf, rope_parameters={"rope_type": "default", "rope_theta": 500000.5})
    assert config_from_hf(big_theta).rope_theta == 500000.5  # never int()-ed
    for family in ("llama_tied", "mistral", "qwen2", "qwen3"):
        original = config_from_hf(json.loads((checkpoint(family) / "config.json").read_text()))
        assert config_from_hf(config_to_hf(original)) == original, family
    qwen2 = config_from_hf(json.loads((checkpoint("qwen2") / "config.json").read_text()))
    assert qwen2.attention_bias and not qwen2.o_bias and qwen2.sliding_window is None
    with pytest.raises(ValueError, match="mixes sliding-window and full-attention"):
        config_from_hf(dict(hf, model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1))
    with pytest.raises(ValueError, match="unsupported rope_type 'yarn'"):
        config_from_hf(dict(hf, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}))
