"""HF import: config mapping, safetensors layouts and dtypes, and one clear refusal per kind of bad checkpoint."""

import json
import shutil
import struct

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from fairy2i_jax import CheckpointError, load_pretrained
from fairy2i_jax.hf.config_map import config_from_hf, config_to_hf
from fairy2i_jax.hf.load import resolve_checkpoint
from fairy2i_jax.hf.safetensors_io import SafetensorsCheckpoint
from gguf_helpers import write_llama_gguf
from model_helpers import batch, checkpoint, jax_logits, max_diff_on_tokens, model_cls_copy, torch_logits, torch_model


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads(tmp_path):
    path = checkpoint("llama", "float32", "60KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ids, mask = batch()
    model = load_pretrained(path, compute_dtype=jnp.float32)
    assert max_diff_on_tokens(jax_logits(model, ids, mask), torch_logits(torch_model("llama"), ids, mask), mask) <= 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_load(dtype):
    """Loaded params equal the checkpoint's half-precision tensors exactly, in the param dtype asked for."""
    path = checkpoint("qwen2", dtype)
    half = model_cls_copy("qwen2").to(getattr(torch, dtype))
    model = load_pretrained(path, dtype=jnp.float32, compute_dtype=jnp.float32)
    lin, state = model.layers[1].self_attn.k_proj, half.state_dict()
    np.testing.assert_array_equal(lin.kernel.get_value(), state["model.layers.1.self_attn.k_proj.weight"].float().numpy())
    np.testing.assert_array_equal(lin.bias.get_value(), state["model.layers.1.self_attn.k_proj.bias"].float().numpy())
    ids, mask = batch()
    assert max_diff_on_tokens(jax_logits(model, ids, mask), torch_logits(half.float(), ids, mask), mask) <= 1e-4
    native = load_pretrained(path, dtype=jnp.bfloat16)
    assert native.embed_tokens.embedding.get_value().dtype == jnp.bfloat16


def test_scanned_load_stacks_layers():
    model = load_pretrained(checkpoint("qwen3"), compute_dtype=jnp.float32, scan_layers=True)
    state = torch_model("qwen3").state_dict()
    stacked = np.asarray(model.layers.self_attn.k_norm.weight.get_value())
    per_layer = [state[f"model.layers.{i}.self_attn.k_norm.weight"].numpy() for i in range(2)]
    np.testing.assert_array_equal(stacked, np.stack(per_layer))


# -- config mapping ---------------------------------------------------------------------------------------------


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


# -- refusals ---------------------------------------------------------------------------------------------------


def test_unknown_model_type_is_refused(tmp_path):
    path = _copy(checkpoint("llama"), tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(config, model_type="gpt_neox")))
    supported = "supported: llama, mistral, qwen2, qwen3"
    with pytest.raises(CheckpointError, match=f"unsupported model_type 'gpt_neox'.*{supported}"):
        load_pretrained(path)


def test_missing_config_is_refused(tmp_path):
    path = _copy(checkpoint("llama"), tmp_path / "ckpt")
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=f"{path}: no config.json"):
        load_pretrained(path)


def test_missing_unexpected_and_misshaped_tensors_are_listed(tmp_path):
    path = _copy(checkpoint("llama"), tmp_path / "ckpt")
    state = {k: v.numpy() for k, v in torch_model("llama").state_dict().items()}
    del state["model.layers.1.mlp.up_proj.weight"], state["model.norm.weight"]
    state["model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
    state["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_pretrained(path)
    text = str(info.value)
    assert "missing tensors (2): model.layers.1.mlp.up_proj.weight [128, 64], model.norm.weight [64]" in text
    assert "unexpected tensors (1): model.layers.0.self_attn.extra.weight" in text
    assert "mis-shaped tensors (1): model.layers.0.self_attn.k_proj.weight: found [16, 64], expected [32, 64]" in text


def _corrupt(tmp_path, mutate):
    path = _copy(checkpoint("llama"), tmp_path / "ckpt")
    file = path / "model.safetensors"
    file.write_bytes(mutate(file.read_bytes()))
    return path


def test_header_length_beyond_file_is_refused(tmp_path):
    path = _corrupt(tmp_path, lambda b: struct.pack("<Q", len(b) * 2) + b[8:])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated safetensors file.*header"):
        load_pretrained(path)


def test_bad_header_json_is_refused(tmp_path):
    def garble(b):
        n = struct.unpack("<Q", b[:8])[0]
        return b[:8] + b"{" * n + b[8 + n:]

    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated safetensors file.*JSON"):
        load_pretrained(_corrupt(tmp_path, garble))


def test_truncated_data_is_refused(tmp_path):
    path = _corrupt(tmp_path, lambda b: b[: len(b) - 1000])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated safetensors file.*not fully covered"):
        load_pretrained(path)


def test_missing_shard_is_refused(tmp_path):
    path = _copy(checkpoint("llama", "float32", "60KB"), tmp_path / "ckpt")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (path / shard).unlink()
    with pytest.raises(CheckpointError, match=f"shard file\\(s\\) \\['{shard}'\\] listed in the index do not exist"):
        SafetensorsCheckpoint(path)


def test_pickled_weights_are_never_loaded(tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    shutil.copy(checkpoint("llama") / "config.json", path / "config.json")
    payload = path / "pytorch_model.bin"
    payload.write_bytes(b"not even opened")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*pickled checkpoints are never loaded.*safetensors"):
        load_pretrained(path)
    assert payload.read_bytes() == b"not even opened"


def test_nonexistent_path_offline_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="does not exist locally and HF offline mode is on"):
        resolve_checkpoint("someone/no-such-model")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "nothing_here"))


# -- GGUF -------------------------------------------------------------------------------------------------------

def test_gguf_file_loads_through_the_same_path(tmp_path):
    path = write_llama_gguf(tmp_path / "tiny.gguf", torch_model("llama"), tokenizer=False)
    model = load_pretrained(path, compute_dtype=jnp.float32)
    ids, mask = batch()
    assert max_diff_on_tokens(jax_logits(model, ids, mask), torch_logits(torch_model("llama"), ids, mask), mask) <= 1e-4
