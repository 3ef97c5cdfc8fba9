"""fairy2i_jax.hf.keymap: the HF tensor names of param paths, by hand for each kind of leaf and, for whole
unscanned and scanned models, against the tensor names the tiny test checkpoints hold."""

import json

import pytest

from fairy2i_jax.convert import model_variables
from fairy2i_jax.hf.config_map import config_from_hf
from fairy2i_jax.hf.keymap import hf_names, is_ignored
from fairy2i_jax.hf.safetensors_io import SafetensorsCheckpoint
from fairy2i_jax.models.llama import abstract_model
from model_helpers import checkpoint


def test_names_of_each_kind_of_path():
    assert hf_names(("embed_tokens", "embedding"), False, 2) == ["model.embed_tokens.weight"]
    assert hf_names(("layers", 1, "self_attn", "q_proj", "kernel"), False, 2) == [
        "model.layers.1.self_attn.q_proj.weight"]
    assert hf_names(("layers", "self_attn", "q_proj", "bias"), True, 3) == [
        f"model.layers.{i}.self_attn.q_proj.bias" for i in range(3)]
    assert hf_names(("layers", "self_attn", "k_norm", "weight"), True, 2) == [
        "model.layers.0.self_attn.k_norm.weight", "model.layers.1.self_attn.k_norm.weight"]
    assert hf_names(("norm", "weight"), True, 2) == ["model.norm.weight"]  # not a layer param: one name
    assert hf_names(("lm_head", "kernel"), True, 2) == ["lm_head.weight"]  # no "model." prefix
    with pytest.raises(KeyError, match="layers.0.mlp.up_proj.U has no HF tensor"):
        hf_names(("layers", 0, "mlp", "up_proj", "U"), False, 2)
    assert is_ignored("model.layers.0.self_attn.rotary_emb.inv_freq") and not is_ignored("model.norm.weight")


@pytest.mark.parametrize("scanned", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("family", ["qwen3", "llama_tied"])  # q/k norms and an untied head; a tied head
def test_the_params_of_a_model_name_every_checkpoint_tensor_once(family, scanned):
    path = checkpoint(family)
    config = config_from_hf(json.loads((path / "config.json").read_text()), scan_layers=scanned)
    names = [n for p in model_variables(abstract_model(config)) for n in hf_names(p, scanned, config.num_layers)]
    assert len(names) == len(set(names))
    assert set(names) == set(SafetensorsCheckpoint(path).keys())
