"""The oracle: dequantize with ``unpack_to_real`` and multiply, ``y = x @ unpack_to_real(packed).T`` in float32.

``y = (x.astype(f32) @ A_q.astype(f32).T).astype(x.dtype)`` with ``Precision.HIGHEST`` (no TF32/bf16 passes),
one layer at a time. Serves every case (any T, tensor/row/group scales, any float activations); it
materialises the dense ``[2n, 2m]`` weight, so it is the slowest implementation and only the last fallback.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fairy2i_jax.kernels.base import Implementation, Prepared
from fairy2i_jax.packing import PackedWidelyLinear, unpack_to_real

Array = Any


def reference_matmul(x: Array, packed: PackedWidelyLinear) -> Array:
    """``x [..., 2m] -> x @ unpack_to_real(packed).T [..., 2n]``: float32 product, output in ``x.dtype``."""
    A = unpack_to_real(packed).astype(jnp.float32)
    y = jnp.matmul(x.astype(jnp.float32), A.T, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Reference(Implementation):
    """Registry entry of :func:`reference_matmul`; ``prepare`` keeps the canonical layers as they are."""

    name: str = "reference"

    def available(self) -> bool:
        return True

    def prepare(self, layers: tuple[PackedWidelyLinear, ...]) -> Prepared:
        return Prepared(tuple(layers), self, tuple(p.n for p in layers), layers[0].m)

    def __call__(self, x: Array, prepared: Prepared) -> list[Array]:
        return [reference_matmul(x, p) for p in prepared.arrays]
