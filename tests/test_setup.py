"""fairy2i_jax.training.setup: what a run builds from the debug config before any weight exists: the mesh, the
architecture, the abstract converted model (the restore target), the test documents, and the seq_len check."""

import jax
import pytest
from flax import nnx

import fairy2i_jax.training.setup as training_setup
from fairy2i_jax.config import ConfigError
from fairy2i_jax.sources import tiny_config
from fairy2i_jax.training.config import load_train_config
from train_helpers import DEBUG_CONFIG, ROOT


def _cfg(*overrides):
    return load_train_config(DEBUG_CONFIG, list(overrides))


def test_mesh_over_all_devices():
    assert dict(training_setup.build_mesh(_cfg()).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(training_setup.build_mesh(_cfg("mesh.fsdp=2", "mesh.tensor=2")).shape) == {
        "data": 2, "fsdp": 2, "tensor": 2}


def test_architecture_and_abstract_training_model():
    cfg = _cfg("quant.skip=[down_proj]")
    mc = training_setup.model_config(cfg)
    assert mc == tiny_config(compute_dtype="float32", scan_layers=True)  # random:tiny as debug.yaml lays it out
    model = training_setup.abstract_training_model(cfg, mc)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(model)))
    plan = model.linear_plan()
    assert plan["model.layers.1.mlp.up_proj"].kind == "qat" and plan["lm_head"].quant.stages == 2  # w2
    assert plan["model.layers.0.mlp.down_proj"].kind == "real"  # quant.skip
    assert model.layers.mlp.up_proj.U.get_value().shape == (2, 64, 32)  # scanned, [layers, mlp/2, embed/2]


def test_seq_len_is_checked_against_the_model_positions():
    mc = training_setup.model_config(_cfg())
    training_setup.check_seq_len(_cfg("data.seq_len=1024"), mc)
    with pytest.raises(ConfigError, match=r"data.seq_len = 1025 exceeds the model's max_position_embeddings = "
                                          r"1024 \(random:tiny\)"):
        training_setup.check_seq_len(_cfg("data.seq_len=1025"), mc)


def test_test_documents(monkeypatch):
    monkeypatch.chdir(ROOT)  # data.test is relative to the repository root
    from fairy2i_jax.hf.tokenizer import ByteTokenizer

    tok = ByteTokenizer()  # the debug config's random:tiny tokenizer; text entries are returned as texts
    assert training_setup.test_documents(_cfg("data.test=[]"), tok) == []
    assert training_setup.test_documents(_cfg("eval.ppl_max_tokens=0"), tok) == []  # the report is off
    docs = training_setup.test_documents(_cfg("eval.ppl_max_tokens=256"), tok)
    assert len(docs) > 100 and all(isinstance(d, str) and d.strip() for d in docs)
    assert any("Anne" in d for d in docs)  # Persuasion, the test novel
