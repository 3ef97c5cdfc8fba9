"""fairy2i_jax.hf.load (load_pretrained and its checkpoint resolution): sharded, half-precision, scanned and GGUF
checkpoints give transformers' logits and tensors, and one clear refusal per kind of unusable checkpoint
(safetensors-level refusals: test_safetensors_io.py)."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from fairy2i_jax import CheckpointError, load_pretrained
from fairy2i_jax.hf.load import resolve_checkpoint
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
