"""Hugging Face ``config.json`` <-> :class:`~fairy2i_jax.models.config.ModelConfig`.

Supported ``model_type``: llama, mistral, qwen2, qwen3 (anything else raises ``ValueError`` listing them).

RoPE is read from the transformers v5 ``rope_parameters`` dict (``rope_theta``, ``rope_type``, ``factor``, ...)
or from the older top-level ``rope_theta`` plus ``rope_scaling`` (``type`` or ``rope_type``); the theta is kept
as a float (never ``int()``-ed). Family differences handled here:

* llama: ``attention_bias`` puts biases on q, k, v AND o; ``mlp_bias`` on gate/up/down.
* qwen2: q, k, v always have biases, o never; sliding window only when ``use_sliding_window``.
* qwen3: ``attention_bias`` on q, k, v, o; RMSNorm on q and k over ``head_dim`` (default head_dim 128).
* mistral: ``sliding_window`` (null = full attention).

A sliding window that applies to some layers only (Qwen ``max_window_layers`` / ``layer_types`` mixing
full and sliding attention) is refused: the model applies one window to all layers.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from fairy2i_jax.hf.remote import base_model_type
from fairy2i_jax.models.config import MODEL_TYPES, ROPE_TYPES, ModelConfig, RopeScaling

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
DEFAULT_ROPE_THETA = 10000.0


def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling]:
    """``(rope_theta, RopeScaling)`` from v5 ``rope_parameters`` or legacy ``rope_theta`` / ``rope_scaling``."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"per-layer-type rope_parameters {sorted(params)} are not supported")
    legacy = hf.get("rope_scaling")
    scaling = dict(params or {})
    if legacy:
        scaling = {**legacy, **scaling}
    theta = scaling.pop("rope_theta", hf.get("rope_theta", DEFAULT_ROPE_THETA))
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r} in config.json; supported: {', '.join(ROPE_TYPES)}")
    if theta is None or isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise ValueError(f"config.json rope_theta must be a number, got {theta!r}")
    kwargs: dict[str, Any] = {"rope_type": rope_type}
    if rope_type != "default":
        if "factor" not in scaling:
            raise ValueError(f"rope_type {rope_type!r} needs a 'factor' in rope_parameters / rope_scaling")
        kwargs["factor"] = float(scaling["factor"])
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in scaling:
                raise ValueError(f"rope_type 'llama3' needs {key!r} in rope_parameters / rope_scaling")
        kwargs["low_freq_factor"] = float(scaling["low_freq_factor"])
        kwargs["high_freq_factor"] = float(scaling["high_freq_factor"])
        kwargs["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
    return float(theta), RopeScaling(**kwargs)


def _sliding_window(hf: dict, model_type: str, num_layers: int) -> int | None:
    if model_type == "mistral":
        return hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3"):
        if not hf.get("use_sliding_window", False) or hf.get("sliding_window") is None:
            return None
        layer_types = hf.get("layer_types")
        if layer_types is None:
            start = hf.get("max_window_layers", 28)
            layer_types = ["sliding_attention" if i >= start else "full_attention" for i in range(num_layers)]
        if all(t == "sliding_attention" for t in layer_types):
            return int(hf["sliding_window"])
        if all(t == "full_attention" for t in layer_types):
            return None
        raise ValueError(
            "config.json mixes sliding-window and full-attention layers (layer_types / max_window_layers); "
            "fairy2i_jax applies one attention pattern to all layers"
        )
    return None


def _token_id(value):
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    return None if value is None else int(value)


def config_from_hf(
    hf: dict,
    *,
    param_dtype: Any = jnp.float32,
    compute_dtype: Any = jnp.bfloat16,
    scan_layers: bool = False,
    remat: str = "none",
) -> ModelConfig:
    """:class:`ModelConfig` from a HF ``config.json`` dict (see the module docstring for family rules)."""
    model_type = base_model_type(hf)  # a packed export says model_type "fairy2i" and base_model_type
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r} in config.json; supported: {', '.join(MODEL_TYPES)}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r} in config.json; the supported families use 'silu'")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in hf]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or (128 if model_type == "qwen3" else hf["hidden_size"] // num_heads)
    theta, scaling = _rope_from_hf(hf)
    bias = bool(hf.get("attention_bias", False))
    attention_bias = {"llama": bias, "mistral": False, "qwen2": True, "qwen3": bias}[model_type]
    o_bias = {"llama": bias, "mistral": False, "qwen2": False, "qwen3": bias}[model_type]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        o_bias=o_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=model_type == "qwen3",
        sliding_window=_sliding_window(hf, model_type, hf["num_hidden_layers"]),
        model_type=model_type,
        bos_token_id=_token_id(hf.get("bos_token_id")),
        eos_token_id=_token_id(hf.get("eos_token_id")),
        pad_token_id=_token_id(hf.get("pad_token_id")),
        param_dtype=param_dtype,
        compute_dtype=compute_dtype,
        scan_layers=scan_layers,
        remat=remat,
    )


def config_to_hf(cfg: ModelConfig, dtype: Any = None) -> dict:
    """A HF ``config.json`` dict (transformers v5 spelling, ``rope_parameters``) that rebuilds ``cfg``'s model."""
    scaling = cfg.rope_scaling
    rope: dict[str, Any] = {"rope_type": scaling.rope_type, "rope_theta": cfg.rope_theta}
    if scaling.rope_type != "default":
        rope["factor"] = scaling.factor
    if scaling.rope_type == "llama3":
        rope.update(
            low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_max_position_embeddings,
        )
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": cfg.pad_token_id,
        "dtype": str(np.dtype(dtype or cfg.param_dtype)),
    }
    if cfg.model_type == "llama":
        if cfg.attention_bias != cfg.o_bias:
            raise ValueError("a llama config.json cannot express q/k/v biases without an o_proj bias")
        hf.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    elif cfg.model_type == "qwen3":
        hf["attention_bias"] = cfg.attention_bias
    if cfg.model_type == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    elif cfg.model_type in ("qwen2", "qwen3"):
        hf.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                  max_window_layers=0 if cfg.sliding_window is not None else cfg.num_layers)
    return hf
