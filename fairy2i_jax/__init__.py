"""fairy2i_jax: Fairy2i (widely-linear complex conversion + phase QAT) for JAX/Flax."""

from fairy2i_jax.quant import (
    QuantSpec,
    decode_phase_codes,
    quantize_complex_planes,
    quantize_real_weight,
    quantize_widely_linear,
    residual_phase_encode,
    residual_phase_quantize,
)
from fairy2i_jax.widely_linear import from_widely_linear, to_widely_linear, widely_linear_apply

__version__ = "0.1.0"
