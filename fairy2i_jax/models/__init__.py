"""The Llama-family decoder (Flax NNX) and its parts."""

from fairy2i_jax.models.config import ModelConfig, RopeScaling
from fairy2i_jax.models.linear import (
    LINEAR_KINDS,
    LINEAR_STORAGE,
    ComplexMaster,
    Linear,
    LinearKind,
    LinearSpec,
    LinearWeight,
    PackedCodes,
)
from fairy2i_jax.models.llama import CausalLM, KVCache, abstract_model, init_model
