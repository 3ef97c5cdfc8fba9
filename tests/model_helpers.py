"""Tiny random HF checkpoints (torch, built once per process) and forward helpers shared by the model tests.

Every family uses hidden 64, 2 layers, 4 heads, 2 kv heads, head_dim 16, intermediate 128, vocab 256,
initializer_range 0.02, random (not unit / zero) norm weights and biases so a mistake in them shows, and
q/k projections scaled by ``QK_GAIN`` so attention is far from uniform and RoPE or mask mistakes show.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

_ROOT = Path(tempfile.mkdtemp(prefix="fairy2i_tiny_"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)

BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    initializer_range=0.02,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama_llama3": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position_embeddings=64)),
    ),
    "llama_linear": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(rope_parameters=dict(rope_type="linear", rope_theta=5000.0, factor=4.0)),
    ),
    "llama_dynamic": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0), max_position_embeddings=8),
    ),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=4)),
    "qwen2": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    ),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {}),
    "llama_tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=True)),
}
QK_GAIN = 6.0
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _randomize_norms_and_biases(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(QK_GAIN)  # sharper attention, so RoPE / mask mistakes change the logits visibly


@functools.lru_cache(maxsize=None)
def torch_model(family: str, seed: int = 0) -> torch.nn.Module:
    """The fp32 torch oracle of ``family`` (random weights, eval mode)."""
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**BASE, **extra})).eval()
    _randomize_norms_and_biases(model, seed + 1)
    return model


@functools.lru_cache(maxsize=None)
def checkpoint(family: str, dtype: str = "float32", max_shard_size: str | None = None) -> Path:
    """A saved HF directory (safetensors) of :func:`torch_model` in ``dtype`` (optionally sharded)."""
    path = _ROOT / f"{family}_{dtype}_{max_shard_size or 'single'}"
    model = torch_model(family)
    if dtype != "float32":
        model = model_cls_copy(family).to(TORCH_DTYPES[dtype])
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def model_cls_copy(family: str) -> torch.nn.Module:
    """A fresh copy of the fp32 oracle (to cast or modify without touching the cached one)."""
    config_cls, model_cls, extra = FAMILIES[family]
    copy = model_cls(torch_model(family).config).eval()
    copy.load_state_dict(torch_model(family).state_dict())
    return copy


def batch(seed: int = 0, length: int = 10, pad: int = 3):
    """``(input_ids [2, T], attention_mask [2, T])`` numpy int: row 1 right-padded by ``pad`` tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 256, size=(2, length)).astype(np.int32)
    mask = np.ones((2, length), np.int32)
    mask[1, length - pad:] = 0
    ids[1, length - pad:] = 0
    return ids, mask


def torch_logits(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float32 logits of a torch model on a batch."""
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                    attention_mask=torch.as_tensor(mask, dtype=torch.long))
    return out.logits.float().numpy()


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


def jax_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """float32 logits of a fairy2i_jax model (jitted forward)."""
    mask = np.ones_like(ids) if mask is None else mask
    return np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))


@nnx.jit
def _forward_with_weights(model, ids, mask, weights):
    return model(ids, mask, weights=weights)


def qat_logits(model, ids: np.ndarray, mask: np.ndarray, weights=None) -> np.ndarray:
    """Logits with the effective weights computed once (per-shape jitted quantizers, see
    ``fairy2i_jax.models.linear.fake_quantize``) and passed to a jitted forward: far less compile time than
    tracing every quantizer inside the forward."""
    weights = model.effective_weights() if weights is None else weights
    return np.asarray(_forward_with_weights(model, jnp.asarray(ids), jnp.asarray(mask), weights))


def max_diff_on_tokens(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Max |a - b| over real (mask = 1) positions."""
    return float(np.abs(a - b)[mask.astype(bool)].max())


def quartet_ulp(A: np.ndarray) -> np.ndarray:
    """One float32 ulp of the largest magnitude in each entry's 2x2 quartet (A11, A12, A21, A22 at (i, j))."""
    n, m = A.shape[0] // 2, A.shape[1] // 2
    quartet = np.abs(np.stack([A[:n, :m], A[:n, m:], A[n:, :m], A[n:, m:]])).max(axis=0).astype(np.float32)
    ulp = np.spacing(quartet)
    return np.block([[ulp, ulp], [ulp, ulp]])
