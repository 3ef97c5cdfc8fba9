"""Shared helpers of the packed-kernel tests: real packed layers from random matrices, the oracle, the bounds.

Oracle: ``x @ unpack_to_real(packed).T`` in float64 on the host (the value the ``reference`` implementation
computes in float32; ``test_reference_equals_the_oracle`` ties the two together).

Bounds, relative to ``max|y|``: float32 activations 1e-5; bf16 activations 2^-8 + 1e-5. Every
implementation multiplies the exact dequantized weights and sums in float32 (error ~1e-6 of ``max|y|``);
a bf16 result is that sum rounded once to bf16, at most half a bf16 ulp from it, and half an ulp of
``y_i`` in ``[2^e, 2^(e+1))`` is ``2^(e-8) <= 2^-8 |y_i|``. Measured over both test files (2026-12-01):
float32 3.0e-7, bf16 3.2e-3 (= 0.83 * 2^-8). (Against the float32 ``reference`` rounded to bf16 instead
of the float64 oracle, two roundings of sums that differ in summation order can be one ulp apart: up to
2^-7 of ``max|y|``.)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fairy2i_jax.packing import pack_real_weight, unpack_to_real
from fairy2i_jax.quant import QuantSpec

FP32_BOUND = 1e-5
BF16_BOUND = 2.0**-8 + FP32_BOUND

_dense = {}  # id(packed) -> float64 dense weight, for layers made here


@functools.partial(jax.jit, static_argnums=1)
def _pack_and_unpack(A, spec):
    """``(pack_real_weight(A, spec), unpack_to_real(...))`` in one compiled program (op by op takes seconds)."""
    packed = pack_real_weight(A, spec)
    return packed, unpack_to_real(packed)


def real_matrix(seed, out_dim, in_dim):
    """The random normal float32 ``[out, in]`` matrix behind ``packed_layer(seed, out_dim, in_dim, ...)``."""
    return np.random.default_rng(seed).standard_normal((out_dim, in_dim)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _packed_layer(seed, out_dim, in_dim, stages, spec_items):
    A = real_matrix(seed, out_dim, in_dim)
    packed, A_q = _pack_and_unpack(jnp.asarray(A), QuantSpec("complex_phase", stages, **dict(spec_items)))
    _dense[id(packed)] = np.asarray(A_q, np.float64)
    return packed


def packed_layer(seed, out_dim, in_dim, stages, **spec):
    """``pack_real_weight`` of a random normal real matrix ``[out, in]`` (bf16_exact unless ``numerics=``):
    real codes and scales; cached, since tests share layers."""
    return _packed_layer(seed, out_dim, in_dim, stages, tuple(sorted(spec.items())))


def dense(packed):
    """``unpack_to_real(packed)`` in float64 (cached for layers from :func:`packed_layer`)."""
    if id(packed) not in _dense:
        _dense[id(packed)] = np.asarray(unpack_to_real(packed), np.float64)
    return _dense[id(packed)]


def oracle(x, packed):
    """``x @ unpack_to_real(packed).T`` in float64."""
    return np.asarray(x, np.float64) @ dense(packed).T


def activations(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def rel_err(y, ref):
    """``max|y - ref| / max|ref|`` in float64 (NaN or a shape mismatch fails loudly)."""
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    assert y.shape == ref.shape, (y.shape, ref.shape)
    assert np.isfinite(y).all()
    return float(np.abs(y - ref).max() / np.abs(ref).max())


def assert_matches_reference(y, x, packed):
    """``y`` equals the oracle within the bound of x's dtype, with x's dtype and the right shape."""
    assert y.dtype == x.dtype, (y.dtype, x.dtype)
    bound = BF16_BOUND if x.dtype == jnp.bfloat16 else FP32_BOUND
    err = rel_err(y, oracle(x, packed))
    assert err <= bound, f"relative error {err:.3g} > {bound:.3g}"
    return err
