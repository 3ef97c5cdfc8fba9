"""``ModelConfig``: the architecture of one Llama-family decoder (Llama 2/3/3.1+, Mistral, Qwen2/2.5, Qwen3).

A frozen, hashable dataclass (it is static metadata of the NNX modules and of jitted functions). Built from a
Hugging Face ``config.json`` by :mod:`fairy2i_jax.hf.config_map`; every field is validated in ``__post_init__``
and a bad value raises ``ValueError`` naming the field, the value and what is allowed.

RoPE scaling is a :class:`RopeScaling` (frozen): ``rope_type`` is ``default``, ``linear``, ``llama3`` or
``dynamic`` (dynamic NTK, as transformers computes it), with the parameters each type needs.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

RopeType = Literal["default", "linear", "llama3", "dynamic"]
RematPolicy = Literal["none", "full", "dots", "dots_with_no_batch_dims"]
ModelType = Literal["llama", "mistral", "qwen2", "qwen3"]
DtypeName = Literal["float32", "bfloat16", "float16"]  # dtypes a config or CLI may name for params / compute
ROPE_TYPES: tuple[str, ...] = typing.get_args(RopeType)
REMAT_POLICIES: tuple[str, ...] = typing.get_args(RematPolicy)
MODEL_TYPES: tuple[str, ...] = typing.get_args(ModelType)
DTYPE_NAMES: tuple[str, ...] = typing.get_args(DtypeName)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (transformers ``rope_parameters`` minus ``rope_theta``).

    rope_type: ``default`` (no scaling), ``linear`` (``inv_freq / factor``), ``llama3`` (Llama 3.1 smooth
        wavelength-dependent scaling: needs factor, low_freq_factor, high_freq_factor,
        original_max_position_embeddings) or ``dynamic`` (dynamic NTK: the base grows once positions exceed
        ``max_position_embeddings``; needs factor).
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        if not (isinstance(self.factor, (int, float)) and self.factor > 0):
            raise ValueError(f"rope factor must be a positive number, got {self.factor!r}")
        object.__setattr__(self, "factor", float(self.factor))
        if self.rope_type == "llama3":
            missing = [
                name
                for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(f"rope_type 'llama3' needs {', '.join(missing)}")
            if not self.high_freq_factor > self.low_freq_factor:
                raise ValueError(
                    f"llama3 rope needs high_freq_factor > low_freq_factor, got {self.high_freq_factor} "
                    f"<= {self.low_freq_factor}"
                )


def _canonical_dtype(value: Any, field: str) -> np.dtype:
    try:
        dtype = np.dtype(value)
    except TypeError as e:
        raise ValueError(f"{field} must be a dtype (float32, bfloat16, float16), got {value!r}") from e
    if dtype not in (np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16), np.dtype(np.float64)):
        raise ValueError(f"{field} must be float32, bfloat16, float16 or float64, got {dtype}")
    return dtype


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture, dtypes and layout of a decoder-only Llama-family model.

    Shapes: ``q_proj [num_heads*head_dim, hidden]``, ``k_proj/v_proj [num_kv_heads*head_dim, hidden]``,
    ``o_proj [hidden, num_heads*head_dim]``, ``gate/up [intermediate, hidden]``, ``down [hidden, intermediate]``
    (HF ``[out, in]`` layout). ``attention_bias`` adds q/k/v biases (Qwen2; ``o_bias`` adds one to o_proj, off
    for every supported family), ``qk_norm`` adds RMSNorm over ``head_dim`` on q and k before RoPE (Qwen3),
    ``sliding_window`` limits attention to the last ``sliding_window`` keys (Mistral). ``param_dtype`` is the
    storage dtype of real params (complex masters are always complex64), ``compute_dtype`` the activation and
    matmul dtype (softmax, norms and logits are float32). ``scan_layers`` stacks the layers' params with a
    leading ``layers`` axis and runs them under ``jax.lax.scan``; ``remat`` is the rematerialisation policy of
    each layer (``none``, ``full``, ``dots`` = save matmul outputs, ``dots_with_no_batch_dims``).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.bfloat16
    scan_layers: bool = False
    remat: str = "none"

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                    "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; give head_dim"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, (int, np.integer)) or self.head_dim < 2:
            raise ValueError(f"ModelConfig.head_dim must be an integer >= 2, got {self.head_dim!r}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for rotate-half RoPE, got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads} (GQA groups)"
            )
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ValueError(f"ModelConfig.rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and not isinstance(self.rope_theta, bool)
                and self.rope_theta > 0):
            raise ValueError(f"ModelConfig.rope_theta must be a positive number, got {self.rope_theta!r}")
        object.__setattr__(self, "rope_theta", float(self.rope_theta))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"ModelConfig.rope_scaling must be a RopeScaling, got {self.rope_scaling!r}")
        if self.sliding_window is not None and (
            isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, int) or self.sliding_window < 1
        ):
            raise ValueError(
                f"ModelConfig.sliding_window must be None or a positive integer, got {self.sliding_window!r}"
            )
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"unsupported model_type {self.model_type!r}; supported: {', '.join(MODEL_TYPES)}")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        object.__setattr__(self, "param_dtype", _canonical_dtype(self.param_dtype, "param_dtype"))
        object.__setattr__(self, "compute_dtype", _canonical_dtype(self.compute_dtype, "compute_dtype"))
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; expected one of {', '.join(REMAT_POLICIES)}")
        for flag in ("tie_word_embeddings", "attention_bias", "o_bias", "mlp_bias", "qk_norm", "scan_layers"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"ModelConfig.{flag} must be a bool, got {getattr(self, flag)!r}")

    def replace(self, **changes) -> "ModelConfig":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)
