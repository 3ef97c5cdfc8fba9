"""The exact map between a real weight and its widely-linear complex pair.

A real linear layer ``y = A x`` with ``A`` of shape ``[..., out, in] = [..., 2n, 2m]`` (PyTorch / Hugging Face
layout) is split by first half / second half of rows and columns (never even/odd interleaving)::

    A11 = A[:n, :m]   A12 = A[:n, m:]   A21 = A[n:, :m]   A22 = A[n:, m:]

    U = (A11 + A22)/2 + i (A21 - A12)/2        W = (A11 - A22)/2 + i (A12 + A21)/2

    A11 = Re W + Re U   A12 = Im W - Im U   A21 = Im W + Im U   A22 = Re U - Re W

and with the activation pairing ``z = x[..., :m] + i x[..., m:]`` the layer is ``y = U z + W conj(z)`` returned
in the same half layout ``[Re y, Im y]``. Leading dims (stacked layers) are independent matrices.

Exactness. ``(a + b)/2`` and back is exact only while ``a + b`` and ``a - b`` are exact in the working
arithmetic, i.e. while the two magnitudes of a pair ``(A11, A22)`` or ``(A12, A21)`` differ by less than about
``2^(p - q)`` where ``p`` is the working precision and ``q`` the input precision (bf16: q = 8, fp16: q = 11,
fp32: q = 24 bits). Therefore:

* numpy inputs are mapped in float64 (p = 53): the round trip of bf16 and fp16 weights is exact by value for
  any magnitudes bf16/fp16 can hold side by side in practice (ratios up to 2^44 / 2^41, e.g. 1e-8 next to 1e2),
  fp32 weights are exact for ratios up to 2^29;
* JAX inputs are mapped in the widest float JAX has enabled: float64 under ``jax_enable_x64``, else float32,
  where bf16 pairs are exact up to a ratio of 2^16 and otherwise (and for fp32 weights) the error of each
  entry is at most one float32 ulp of the largest magnitude in its 2x2 quartet.
* Outside that range (e.g. a pair like (3e38, 1e-40)) no finite arithmetic is exact: the small entry is lost
  to rounding of the large one, and XLA on CPU flushes subnormals to zero.

Use numpy (host) arrays where exactness matters: checkpoint import and export do.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any  # numpy or JAX array


def _is_numpy(x: Array) -> bool:
    return isinstance(x, np.ndarray) or np.isscalar(x)


def _xp(x: Array):
    """The array namespace of ``x``: numpy for host arrays, jax.numpy for everything else."""
    return np if _is_numpy(x) else jnp


def check_even_shape(shape: tuple[int, ...], what: str = "weight") -> tuple[int, int]:
    """Return ``(n, m) = (out/2, in/2)`` for a ``[..., out, in]`` shape, or raise ``ValueError`` naming it."""
    if len(shape) < 2:
        raise ValueError(f"{what} must have at least 2 dims [..., out, in], got shape {tuple(shape)}")
    out_dim, in_dim = shape[-2], shape[-1]
    if out_dim % 2 or in_dim % 2:
        raise ValueError(
            f"{what} of shape {tuple(shape)} has an odd "
            f"{'out' if out_dim % 2 else 'in'} dim; the widely-linear form needs even out and in dims "
            "(callers keep such layers real)"
        )
    return out_dim // 2, in_dim // 2


def _check_real_float(A: Array, what: str) -> None:
    dtype = np.dtype(A.dtype)
    if not (jnp.issubdtype(dtype, jnp.floating)):
        raise ValueError(f"{what} must be a real floating-point array, got dtype {dtype}")


def working_real_dtype(x: Array) -> np.dtype:
    """The arithmetic used by the exact maps: float64 for numpy, float64/float32 for JAX (x64 on/off)."""
    if _is_numpy(x):
        return np.dtype(np.float64)
    return np.dtype(jnp.float64) if jax.config.jax_enable_x64 else np.dtype(jnp.float32)


def decompose_planes(A: Array) -> tuple[Array, Array, Array, Array]:
    """Split real ``A[..., 2n, 2m]`` into ``(Re U, Im U, Re W, Im W)``, each ``[..., n, m]``, in A's own arithmetic.

    ``Re U = (A11 + A22)/2, Im U = (A21 - A12)/2, Re W = (A11 - A22)/2, Im W = (A12 + A21)/2``.
    The sums are rounded to A's dtype (this is the official bf16 arithmetic when A is bf16); the halving is exact.
    """
    n, m = check_even_shape(A.shape)
    a11, a12 = A[..., :n, :m], A[..., :n, m:]
    a21, a22 = A[..., n:, :m], A[..., n:, m:]
    half = A.dtype.type(0.5) if _is_numpy(A) else jnp.asarray(0.5, A.dtype)
    return (a11 + a22) * half, (a21 - a12) * half, (a11 - a22) * half, (a12 + a21) * half


def recompose_planes(u_re: Array, u_im: Array, w_re: Array, w_im: Array) -> Array:
    """Inverse of :func:`decompose_planes`: ``A = [[Re W + Re U, Im W - Im U], [Im W + Im U, Re U - Re W]]``."""
    xp = _xp(u_re)
    top = xp.concatenate([w_re + u_re, w_im - u_im], axis=-1)
    bottom = xp.concatenate([w_im + u_im, u_re - w_re], axis=-1)
    return xp.concatenate([top, bottom], axis=-2)


def to_widely_linear(A: Array, *, dtype: Any = None) -> tuple[Array, Array]:
    """Real ``A[..., 2n, 2m]`` -> complex ``(U, W)``, each ``[..., n, m]``, with ``A x = U z + W conj(z)``.

    Computed in :func:`working_real_dtype` (float64 for numpy input, see the module docstring for exactness).
    Returns complex128 for numpy input and the matching complex dtype for JAX input, unless ``dtype`` is given.
    Raises ``ValueError`` for odd ``out`` / ``in`` or a non-float dtype.
    """
    _check_real_float(A, "to_widely_linear input")
    check_even_shape(A.shape)
    work = working_real_dtype(A)
    u_re, u_im, w_re, w_im = decompose_planes(A.astype(work))
    U = u_re + 1j * u_im
    W = w_re + 1j * w_im
    if dtype is not None:
        U, W = U.astype(dtype), W.astype(dtype)
    return U, W


def from_widely_linear(U: Array, W: Array, *, dtype: Any = None) -> Array:
    """Complex ``(U, W)``, each ``[..., n, m]`` -> real ``A[..., 2n, 2m]``, the inverse of :func:`to_widely_linear`.

    ``A11 = Re W + Re U, A12 = Im W - Im U, A21 = Im W + Im U, A22 = Re U - Re W``, computed in float64 for
    numpy input (float32 / float64 for JAX), then cast to ``dtype`` if given (one rounding, from the exact sum).
    """
    if U.shape != W.shape:
        raise ValueError(f"U and W must have the same shape, got {tuple(U.shape)} and {tuple(W.shape)}")
    work = working_real_dtype(U)
    xp = _xp(U)
    A = recompose_planes(
        xp.real(U).astype(work), xp.imag(U).astype(work), xp.real(W).astype(work), xp.imag(W).astype(work)
    )
    return A if dtype is None else A.astype(dtype)


def widely_linear_apply(U: Array, W: Array, x: Array) -> Array:
    """The complex reference forward on real activations: ``y = U z + W conj(z)`` with ``z = x[..., :m] + i x[..., m:]``.

    ``x`` is ``[..., 2m]``; the result is ``[..., 2n] = [Re y, Im y]`` and equals ``x @ A.T``. Reference path
    (complex arithmetic, highest precision), not the fast one.
    """
    m = U.shape[-1]
    if x.shape[-1] != 2 * m:
        raise ValueError(f"activations have last dim {x.shape[-1]}, expected 2*m = {2 * m} for U of shape {U.shape}")
    xp = _xp(x)
    z = x[..., :m] + 1j * x[..., m:]
    if xp is np:
        y = z @ np.swapaxes(U, -1, -2) + np.conj(z) @ np.swapaxes(W, -1, -2)
    else:
        hi = jax.lax.Precision.HIGHEST
        y = jnp.matmul(z, jnp.swapaxes(U, -1, -2), precision=hi) + jnp.matmul(
            jnp.conj(z), jnp.swapaxes(W, -1, -2), precision=hi
        )
    return xp.concatenate([xp.real(y), xp.imag(y)], axis=-1).astype(x.dtype)
