"""The exact widely-linear maps: round trips by value, the complex forward ``y = U z + W conj(z)``, shapes, errors."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fairy2i_jax.widely_linear import decompose_planes, from_widely_linear, to_widely_linear, widely_linear_apply

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)


def mixed_magnitudes(rng, shape, lo=1e-8, hi=1e2, zero_frac=0.05):
    """float64 entries with log-uniform magnitudes in [lo, hi], random signs, and a few +0 / -0."""
    x = np.exp(rng.uniform(np.log(lo), np.log(hi), shape)) * rng.choice([-1.0, 1.0], shape)
    zeros = rng.random(shape) < zero_frac
    x[zeros] = rng.choice([0.0, -0.0], int(zeros.sum()))
    return x


def quartet_max(A):
    """``max(|A11|, |A12|, |A21|, |A22|)`` of each 2x2 quartet, tiled back to ``A``'s shape."""
    n, m = A.shape[-2] // 2, A.shape[-1] // 2
    a = np.abs(A.astype(np.float64))
    q = np.maximum.reduce([a[..., :n, :m], a[..., :n, m:], a[..., n:, :m], a[..., n:, m:]])
    return np.tile(q, (1,) * (A.ndim - 2) + (2, 2))


def assert_equal_by_value(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    bad = got != want
    assert not bad.any(), f"{bad.sum()} entries differ, e.g. {got[bad][:3]} vs {want[bad][:3]}"


def assert_within_quartet_ulp(back, A):
    """Each entry within one float32 ulp of the largest magnitude in its quartet (widely_linear docstring)."""
    err = np.abs(np.asarray(back, np.float64) - A.astype(np.float64))
    tol = np.spacing(quartet_max(A).astype(np.float32)).astype(np.float64)
    assert (err <= tol).all(), f"max error / tol = {(err / tol).max()}"


# ----------------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(64, 96), (3, 16, 40)])
def test_numpy_half_precision_round_trip_is_exact(dtype, shape):
    rng = np.random.default_rng(0)
    A = mixed_magnitudes(rng, shape).astype(dtype)
    nonzero = np.abs(A[A != 0].astype(np.float64))
    assert nonzero.max() / nonzero.min() > 1e6 and (A == 0).any()  # the data really mixes scales and zeros
    U, W = to_widely_linear(A)
    assert U.dtype == np.complex128 and U.shape == (*shape[:-2], shape[-2] // 2, shape[-1] // 2)
    back = from_widely_linear(U, W, dtype=dtype)
    assert back.dtype == dtype
    assert_equal_by_value(back, A)
    assert_equal_by_value(from_widely_linear(U, W), A)  # float64, before the cast


def test_numpy_fp32_round_trip_is_exact_in_the_documented_range():
    """float64 arithmetic: exact for fp32 pairs whose magnitudes differ by less than 2^29 (1e-6..1e2 here)."""
    A = mixed_magnitudes(np.random.default_rng(1), (2, 48, 64), lo=1e-6).astype(F32)
    back = from_widely_linear(*to_widely_linear(A), dtype=F32)
    assert back.dtype == F32
    assert_equal_by_value(back, A)


def test_jax_fp32_round_trip_within_one_ulp_of_the_quartet():
    A = mixed_magnitudes(np.random.default_rng(2), (2, 64, 96)).astype(F32)
    U, W = to_widely_linear(jnp.asarray(A))
    assert U.dtype == jnp.complex64
    back = from_widely_linear(U, W)
    assert back.dtype == jnp.float32
    assert_within_quartet_ulp(back, A)


def test_jax_bf16_round_trip_exact_for_moderate_ratios():
    """float32 arithmetic holds bf16 pairs exactly while their magnitudes differ by less than 2^16."""
    A = mixed_magnitudes(np.random.default_rng(3), (32, 48), lo=1e-2).astype(BF16)
    back = from_widely_linear(*to_widely_linear(jnp.asarray(A)), dtype=jnp.bfloat16)
    assert back.dtype == jnp.bfloat16
    assert_equal_by_value(back, A)


def test_planes_follow_the_block_formulas():
    A = np.random.default_rng(4).standard_normal((6, 10))
    u_re, u_im, w_re, w_im = decompose_planes(A)
    a11, a12, a21, a22 = A[:3, :5], A[:3, 5:], A[3:, :5], A[3:, 5:]
    U, W = to_widely_linear(A)
    np.testing.assert_array_equal(U, (a11 + a22) / 2 + 1j * (a21 - a12) / 2)
    np.testing.assert_array_equal(W, (a11 - a22) / 2 + 1j * (a12 + a21) / 2)
    np.testing.assert_array_equal(u_re, U.real)
    np.testing.assert_array_equal(w_im, W.imag)


def test_leading_dims_are_independent_matrices():
    A = np.random.default_rng(5).standard_normal((3, 8, 12)).astype(F32)
    U, W = to_widely_linear(A)
    for i in range(3):
        Ui, Wi = to_widely_linear(A[i])
        np.testing.assert_array_equal(U[i], Ui)
        np.testing.assert_array_equal(W[i], Wi)
    np.testing.assert_array_equal(from_widely_linear(U, W), A)


# ----------------------------------------------------------------------------------------------------------
# the complex forward


def matmul_error_bound(x, A, eps):
    """``k eps (|x| @ Q^T)`` with ``Q`` the quartet maxima of ``A`` and ``k = in dim + 4``.

    A forward-error bound for the complex path: each U / W entry mixes a whole quartet, so its rounding scales
    with the quartet's largest magnitude, not with the entry of ``A`` it ends up in.
    """
    k = A.shape[-1] + 4
    return k * eps * (np.abs(x) @ np.swapaxes(quartet_max(A), -1, -2))


def test_apply_equals_real_matmul_float64():
    rng = np.random.default_rng(6)
    A = rng.standard_normal((2, 12, 20))
    x = rng.standard_normal((2, 5, 20))
    U, W = to_widely_linear(A)
    y = widely_linear_apply(U, W, x)
    ref = x @ np.swapaxes(A, -1, -2)
    assert y.shape == ref.shape and y.dtype == np.float64
    assert (np.abs(y - ref) <= matmul_error_bound(x, A, np.finfo(np.float64).eps)).all()


def test_apply_equals_real_matmul_jax_float32():
    rng = np.random.default_rng(7)
    A = rng.standard_normal((16, 24)).astype(F32)
    x = rng.standard_normal((4, 3, 24)).astype(F32)
    U, W = to_widely_linear(jnp.asarray(A))
    y = jax.jit(widely_linear_apply)(U, W, jnp.asarray(x))
    assert y.shape == (4, 3, 16) and y.dtype == jnp.float32
    ref = x.astype(np.float64) @ A.astype(np.float64).T
    assert (np.abs(np.asarray(y, np.float64) - ref) <= matmul_error_bound(x, A, np.finfo(F32).eps)).all()


# ----------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("shape", [(5, 8), (4, 7), (2, 3, 6)])
@pytest.mark.parametrize("fn", [to_widely_linear, decompose_planes])
def test_odd_dims_raise_naming_the_shape(fn, shape):
    with pytest.raises(ValueError, match=r"of shape " + str(shape).replace("(", r"\(").replace(")", r"\)")):
        fn(np.zeros(shape, F32))


@pytest.mark.parametrize("A", [np.zeros((4, 4), np.int32), jnp.zeros((4, 4), jnp.int8), np.zeros((4, 4), bool)])
def test_integer_dtype_raises(A):
    with pytest.raises(ValueError, match="real floating-point"):
        to_widely_linear(A)


def test_mismatched_planes_and_activations_raise():
    U = np.zeros((2, 3), np.complex128)
    with pytest.raises(ValueError, match=r"same shape"):
        from_widely_linear(U, np.zeros((2, 4), np.complex128))
    with pytest.raises(ValueError, match=r"expected 2\*m = 6"):
        widely_linear_apply(U, U, np.zeros((1, 5)))


# ----------------------------------------------------------------------------------------------------------
# properties over shapes and dtypes

even_dim = st.integers(1, 16).map(lambda k: 2 * k)
shapes = st.tuples(st.lists(st.integers(1, 3), max_size=1), even_dim, even_dim).map(lambda t: (*t[0], t[1], t[2]))


@settings(max_examples=30, deadline=None)
@given(shape=shapes, dtype=st.sampled_from([BF16, F16, F32]), seed=st.integers(0, 2**32 - 1))
def test_numpy_round_trip_property(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    A = mixed_magnitudes(rng, shape, lo=1e-6 if dtype == F32 else 1e-8).astype(dtype)
    U, W = to_widely_linear(A)
    assert U.shape == W.shape == (*shape[:-2], shape[-2] // 2, shape[-1] // 2)
    assert_equal_by_value(from_widely_linear(U, W, dtype=dtype), A)
    x = rng.standard_normal((3, shape[-1]))
    y, ref = widely_linear_apply(U, W, x), x @ np.swapaxes(A.astype(np.float64), -1, -2)
    assert (np.abs(y - ref) <= matmul_error_bound(x, A.astype(np.float64), np.finfo(np.float64).eps)).all()


@settings(max_examples=8, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**32 - 1))
def test_jax_fp32_round_trip_property(shape, seed):
    A = mixed_magnitudes(np.random.default_rng(seed), shape).astype(F32)
    U, W = to_widely_linear(jnp.asarray(A))
    back = from_widely_linear(U, W)
    assert back.shape == A.shape and back.dtype == jnp.float32
    assert_within_quartet_ulp(back, A)
