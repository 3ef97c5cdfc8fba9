"""Read a Llama-architecture GGUF file (llama.cpp format) into Hugging Face names, layout and config.

Only the `gguf` package (numpy) is used for the weights: `gguf.GGUFReader` memory-maps the file and
`gguf.quants.dequantize` turns each (possibly quantized) tensor into float32, one tensor at a time, so a large
GGUF is never materialised twice. What llama.cpp's converter changed is undone here:

* names: `blk.{i}.attn_q.weight` -> `model.layers.{i}.self_attn.q_proj.weight`, etc.;
* layout: GGUF lists dimensions fastest-first (`ne = [in, out]`), but the numpy array the reader returns (and
  `dequantize` produces) is already row-major `[out, in]`, which is exactly the HF `nn.Linear.weight` layout;
* RoPE: llama.cpp permutes the rows of `attn_q` / `attn_k` from HF's rotate-half order to interleaved pairs;
  `_unpermute_rope` inverts it (see its docstring).

The config is a dict in the form of a transformers v5 `config.json` for `LlamaForCausalLM`
(`rope_parameters`, not `rope_theta`/`rope_scaling`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from fairy2i_jax.errors import CheckpointError

SUPPORTED_ARCHITECTURES = ("llama",)
GGUF_MAGIC = b"GGUF"

# GGUF per-layer tensor suffix -> HF per-layer module path.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclasses.dataclass(frozen=True)
class _TensorSpec:
    """Where one HF tensor lives in the GGUF file and how to post-process it."""

    gguf_name: str
    shape: tuple[int, ...]  # HF (numpy row-major) shape
    rope_heads: int | None  # number of heads to un-permute for q/k, else None


def _err(path: str, msg: str) -> CheckpointError:
    """A :class:`CheckpointError` that always names the GGUF file."""
    return CheckpointError(f"GGUF file {path!r}: {msg}")


def _open_reader(path: str):
    """Open `path` with `gguf.GGUFReader`, turning bad / truncated files into a clear ValueError."""
    import gguf

    if not os.path.isfile(path):
        raise _err(path, "no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise _err(path, f"not a GGUF file (magic bytes {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on garbage
        raise _err(path, f"cannot parse the file, it is truncated or corrupt ({type(e).__name__}: {e})") from e
    size = os.path.getsize(path)
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.size * t.data.itemsize != int(t.n_bytes):
            raise _err(path, f"truncated: tensor {t.name!r} needs bytes up to {end}, the file has {size}")
    return reader


def _field(reader, key: str, default: Any = None) -> Any:
    """The value of metadata `key` (scalar, string or list), or `default` if absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _f32_to_float(x: float) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.9999997e-06)."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def _require(reader, path: str, key: str) -> Any:
    """Metadata `key`, or a ValueError naming the file and the key."""
    value = _field(reader, key)
    if value is None:
        raise _err(path, f"missing metadata key {key!r}")
    return value


def _rope_parameters(reader, path: str, arch: str) -> dict[str, Any]:
    """HF `rope_parameters` from the GGUF rope keys; refuses scalings that cannot be mapped exactly."""
    theta = _f32_to_float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise _err(path, "has a 'rope_freqs.weight' tensor (Llama-3.1 style frequency scaling), "
                         "which cannot be mapped to HF rope_parameters; supported: default, linear")
    kind = _field(reader, f"{arch}.rope.scaling.type")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    legacy = _field(reader, f"{arch}.rope.scale_linear")  # old converters wrote only this key
    if kind is None and legacy is not None:
        kind, factor = "linear", legacy
    if kind in (None, "none"):
        return {"rope_type": "default", "rope_theta": theta}
    if kind == "linear":
        if factor is None:
            raise _err(path, f"rope scaling 'linear' without key '{arch}.rope.scaling.factor'")
        return {"rope_type": "linear", "factor": _f32_to_float(factor), "rope_theta": theta}
    raise _err(path, f"rope scaling type {kind!r} (key '{arch}.rope.scaling.type') is not supported; "
                     "supported: none (default), linear")


def _token_id(reader, name: str) -> int | None:
    """A special token id from `tokenizer.ggml.{name}_token_id`, or None."""
    value = _field(reader, f"tokenizer.ggml.{name}_token_id")
    return None if value is None else int(value)


def _build_config(reader, path: str, arch: str, by_name: dict[str, Any]) -> dict[str, Any]:
    """The HF `config.json` dict for `LlamaForCausalLM` described by the GGUF metadata."""
    hidden = int(_require(reader, path, f"{arch}.embedding_length"))
    heads = int(_require(reader, path, f"{arch}.attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    value_dim = int(_field(reader, f"{arch}.attention.value_length", head_dim))
    rope_dim = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if value_dim != head_dim or rope_dim != head_dim:
        raise _err(path, f"key_length {head_dim}, value_length {value_dim} and rope.dimension_count {rope_dim} "
                         "must be equal for a Llama model")
    embd = by_name.get("token_embd.weight")
    if embd is None:
        raise _err(path, "missing tensor 'token_embd.weight'")
    vocab = int(embd.shape[-1])  # GGUF shape is [hidden, vocab] (fastest first)
    declared = _field(reader, f"{arch}.vocab_size")
    if declared is not None and int(declared) != vocab:
        raise _err(path, f"'{arch}.vocab_size' = {declared} but token_embd.weight has {vocab} rows")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(_require(reader, path, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_require(reader, path, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32_to_float(_require(reader, path, f"{arch}.attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "initializer_range": 0.02,
        "tie_word_embeddings": "output.weight" not in by_name,
        "bos_token_id": _token_id(reader, "bos"),
        "eos_token_id": _token_id(reader, "eos"),
        "pad_token_id": _token_id(reader, "padding"),
        "rope_parameters": _rope_parameters(reader, path, arch),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def _tensor_by_name(reader) -> dict[str, Any]:
    """GGUF tensor name -> `ReaderTensor`."""
    return {t.name: t for t in reader.tensors}


def _expected_specs(config: dict[str, Any]) -> dict[str, _TensorSpec]:
    """HF name -> `_TensorSpec` for every tensor a `LlamaForCausalLM` with `config` needs."""
    d, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    h, kv, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    shapes = {"attn_norm": (d,), "ffn_norm": (d,), "attn_q": (h * hd, d), "attn_k": (kv * hd, d),
              "attn_v": (kv * hd, d), "attn_output": (d, h * hd), "ffn_gate": (i, d), "ffn_up": (i, d),
              "ffn_down": (d, i)}
    rope = {"attn_q": h, "attn_k": kv}
    specs = {"model.embed_tokens.weight": _TensorSpec("token_embd.weight", (v, d), None)}
    for layer in range(config["num_hidden_layers"]):
        for g, hf in _LAYER_NAMES.items():
            specs[f"model.layers.{layer}.{hf}.weight"] = _TensorSpec(f"blk.{layer}.{g}.weight", shapes[g], rope.get(g))
    specs["model.norm.weight"] = _TensorSpec("output_norm.weight", (d,), None)
    if not config["tie_word_embeddings"]:
        specs["lm_head.weight"] = _TensorSpec("output.weight", (v, d), None)
    return specs


def _check_tensors(path: str, by_name: dict[str, Any], specs: dict[str, _TensorSpec]) -> None:
    """Every expected tensor is present with the right shape, and nothing unknown is left over."""
    for hf_name, spec in specs.items():
        t = by_name.get(spec.gguf_name)
        if t is None:
            raise _err(path, f"missing tensor {spec.gguf_name!r} (HF {hf_name!r})")
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims fastest-first
        if shape != spec.shape:
            raise _err(path, f"tensor {spec.gguf_name!r} has shape {shape} (HF order), expected {spec.shape}")
    unknown = sorted(set(by_name) - {s.gguf_name for s in specs.values()})
    if unknown:
        raise _err(path, f"unsupported tensors for a Llama model (e.g. biases or extra layers): {unknown[:8]}")


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    The converter maps HF rows (head, half, i) -> (head, i, half): within each head the two rotate-half halves
    are interleaved. Viewing the GGUF rows as (head, i, half) and swapping back restores the HF order.
    """
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFTensors(Mapping):
    """Read-only mapping HF name -> float32 numpy array that dequantizes each tensor on access (no cache)."""

    def __init__(self, path: str, reader, specs: dict[str, _TensorSpec]):
        self._path, self._reader, self._specs = path, reader, specs
        self._by_name = _tensor_by_name(reader)

    def __getitem__(self, name: str) -> np.ndarray:
        """Dequantize, reshape to HF layout and un-permute q/k: a fresh, writable float32 array."""
        import gguf

        spec = self._specs.get(name)
        if spec is None:
            raise KeyError(f"{name!r} is not a tensor of {self._path!r}")
        t = self._by_name[spec.gguf_name]
        w = gguf.quants.dequantize(t.data, t.tensor_type)  # F32 tensors come back as read-only memmap views
        if w.dtype != np.float32 or type(w) is not np.ndarray or not (w.flags.owndata and w.flags.writeable):
            w = np.array(w, dtype=np.float32, copy=True, subok=False)
        w = w.reshape(spec.shape)
        if spec.rope_heads is not None:
            w = _unpermute_rope(w, spec.rope_heads)
        return np.ascontiguousarray(w)

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    @property
    def reader(self):
        """The underlying `gguf.GGUFReader` (memory-mapped file and parsed metadata)."""
        return self._reader

    def shape(self, name: str) -> tuple[int, ...]:
        """The HF shape of `name` without reading its data."""
        return self._specs[name].shape

    def gguf_type(self, name: str) -> str:
        """The GGUF storage type of `name` (e.g. 'F32', 'Q4_1', 'Q8_0')."""
        return self._by_name[self._specs[name].gguf_name].tensor_type.name


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
    """A GGUF file seen as an HF Llama checkpoint: `config` (HF config.json dict) and lazy `tensors`."""

    path: str
    config: dict[str, Any]
    tensors: GGUFTensors

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (HF name, float32 array) one tensor at a time, in HF state-dict order."""
        for name in self.tensors:
            yield name, self.tensors[name]

    def metadata(self, key: str, default: Any = None) -> Any:
        """A raw GGUF metadata value (e.g. 'tokenizer.chat_template'), or `default` if absent."""
        return _field(self.tensors.reader, key, default)

    def tokenizer(self):
        """The transformers tokenizer embedded in this GGUF file (see `gguf_tokenizer`)."""
        return _hf_tokenizer(os.path.abspath(self.path), self.tensors.reader)


def load_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Open a Llama GGUF file: validate metadata and every tensor's shape; tensors dequantize lazily."""
    path = os.fspath(path)
    reader = _open_reader(path)
    arch = _require(reader, path, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise _err(path, f"architecture {arch!r} (key 'general.architecture') is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    by_name = _tensor_by_name(reader)
    config = _build_config(reader, path, arch, by_name)
    specs = _expected_specs(config)
    _check_tensors(path, by_name, specs)
    return GGUFCheckpoint(path=path, config=config, tensors=GGUFTensors(path, reader, specs))


def gguf_tokenizer(path: str | os.PathLike):
    """A transformers tokenizer built (offline, without torch) from the tokenizer embedded in the GGUF file at `path`.

    The metadata (`tokenizer.ggml.*`: BPE 'gpt2' vocab + merges, or sentencepiece 'llama' pieces + scores, the
    special token ids, the chat template) is read with gguf-py and handed to transformers' own GGUF tokenizer
    converter, which picks the family's normalizer, pre-tokenizer and decoder; the result equals
    `AutoTokenizer.from_pretrained(dir, gguf_file=name)` (tested), which itself needs torch to read the file.
    """
    path = os.path.abspath(os.fspath(path))
    return _hf_tokenizer(path, _open_reader(path))


def _tokenizer_fields(reader) -> tuple[dict, dict]:
    """``(tokenizer_dict, tokenizer_config)`` in transformers' GGUF-tokenizer naming, from the reader's metadata."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

    grouped = {group: {name: _field(reader, f"tokenizer.{key}") for key, name in renames.items()
                       if f"tokenizer.{key}" in reader.fields}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unk_token_id"),
                      ("pad_token", "pad_token_id")):
        token_id = tokenizer.get(key)
        config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    if tokenizer.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)  # llama.cpp adds BOS to a sentencepiece vocabulary by default
    return tokenizer, config


def _hf_tokenizer(path: str, reader):
    """`gguf_tokenizer` for an already opened reader (checks the tokenizer keys first, for a clear error)."""
    import transformers

    model = _field(reader, "tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in reader.fields:
        raise _err(path, "has no embedded tokenizer (keys 'tokenizer.ggml.model' / 'tokenizer.ggml.tokens')")
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:  # an older transformers (< 5.2x): its GGUF path, which needs torch
        return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    try:
        tokenizer, config = _tokenizer_fields(reader)
        backend, extra = convert_gguf_tokenizer(_field(reader, "general.architecture"), tokenizer)
        return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, name_or_path=path,
                                                    **{**config, **extra})
    except Exception as e:
        raise _err(path, f"transformers could not build its {model!r} tokenizer ({type(e).__name__}: {e})") from e
