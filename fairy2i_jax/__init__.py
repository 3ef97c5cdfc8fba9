"""fairy2i_jax: Fairy2i (widely-linear complex conversion + phase QAT) for JAX/Flax."""

from fairy2i_jax.convert import convert, iter_real_state, to_real, to_real_state
from fairy2i_jax.hf.load import load_pretrained
from fairy2i_jax.hf.safetensors_io import CheckpointError
from fairy2i_jax.hf.tokenizer import load_tokenizer
from fairy2i_jax.models import CausalLM, KVCache, Linear, LinearSpec, ModelConfig, RopeScaling
from fairy2i_jax.quant import (
    QuantSpec,
    decode_phase_codes,
    quantize_complex_planes,
    quantize_real_weight,
    quantize_widely_linear,
    residual_phase_encode,
    residual_phase_quantize,
)
from fairy2i_jax.sharding import make_mesh, shard_like_params
from fairy2i_jax.widely_linear import from_widely_linear, to_widely_linear, widely_linear_apply

__version__ = "0.1.0"

__all__ = [
    "CausalLM", "CheckpointError", "KVCache", "Linear", "LinearSpec", "ModelConfig", "QuantSpec", "RopeScaling",
    "convert", "decode_phase_codes", "from_widely_linear", "iter_real_state", "load_pretrained", "load_tokenizer",
    "make_mesh", "quantize_complex_planes", "quantize_real_weight", "quantize_widely_linear",
    "residual_phase_encode", "residual_phase_quantize", "shard_like_params", "to_real", "to_real_state",
    "to_widely_linear", "widely_linear_apply",
]
