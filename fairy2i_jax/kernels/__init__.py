"""Packed W2 matmul kernels: ``y = x @ unpack_to_real(packed).T`` without the dense weight.

Implementations (registry in :mod:`fairy2i_jax.kernels.api`): ``reference`` (unpack + dot, the oracle),
``xla`` (chunked exact decode + dot, every backend), ``pallas_gpu`` (Pallas Triton, NVIDIA), ``pallas_tpu``
(Pallas Mosaic TPU). Imports only the packing / quant / widely_linear modules of the package.
"""

from fairy2i_jax.kernels.api import (
    IMPLEMENTATIONS,
    PREFERENCE,
    available_implementations,
    packed_matmul,
    packed_matmul_fused,
    prepare,
)
from fairy2i_jax.kernels.base import Implementation, Prepared
from fairy2i_jax.kernels.reference import reference_matmul

__all__ = [
    "IMPLEMENTATIONS", "PREFERENCE", "Implementation", "Prepared", "available_implementations", "packed_matmul",
    "packed_matmul_fused", "prepare", "reference_matmul",
]
