"""The phase quantizer against the official arithmetic; error levels, STE, JAX transforms, options and errors."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import official_torch as official
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fairy2i_jax import quant
from fairy2i_jax.quant import QuantSpec, quantize_real_weight, quantize_widely_linear
from fairy2i_jax.widely_linear import decompose_planes, recompose_planes

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)


# jitted entry point for tests that only need values: one compile per shape instead of one per eager op
jit_quantize = jax.jit(
    quantize_real_weight,
    static_argnames=("method", "stages", "numerics", "granularity", "group_size", "spec"),
)
jit_encode = jax.jit(quant.residual_phase_encode, static_argnums=2)
jit_planes = jax.jit(quant.residual_phase_quantize, static_argnums=2)


def to_torch(a):
    """numpy bf16 / float -> torch bf16 (exact: the values are bf16 already)."""
    return torch.from_numpy(np.asarray(a, np.float32)).to(torch.bfloat16)


def from_torch(t):
    return t.float().numpy().astype(BF16)


def assert_bits_equal(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    g, w = got.view(f"u{got.itemsize}"), want.view(f"u{want.itemsize}")
    bad = g != w
    assert not bad.any(), f"{bad.sum()} of {bad.size} entries differ, e.g. {got[bad][:4]} vs {want[bad][:4]}"


def grid_values(rng, shape, scale=40.0):
    """bf16 multiples of 2^-10 with |k| <= 127: sums of two are exact in bf16, float32 sums of up to 2^16 exact.

    Many exact ties |re| == |im| and zeros occur naturally; every reduction order gives the same float32 sum.
    """
    k = np.clip(np.round(rng.normal(0.0, scale, shape)), -127, 127)
    return (k / 1024.0).astype(BF16)


def weight_with_ties(rng, n, m):
    """bf16 ``A[2n, 2m]`` built from chosen grid planes of U and W with injected ties and zeros (exactly)."""
    ur, ui, wr, wi = (grid_values(rng, (n, m)) for _ in range(4))
    sign = rng.choice([-1.0, 1.0], (n, m)).astype(BF16)
    tie_u, tie_w = rng.random((n, m)) < 0.1, rng.random((n, m)) < 0.1
    ui[tie_u] = ur[tie_u] * sign[tie_u]
    wi[tie_w] = -wr[tie_w] * sign[tie_w]
    zero = rng.random((n, m)) < 0.05
    ur[zero] = ui[zero] = 0
    wr[rng.random((n, m)) < 0.05] = 0
    A = recompose_planes(ur, ui, wr, wi)
    for got, want in zip(decompose_planes(A), (ur, ui, wr, wi)):  # the construction is exact (by value)
        np.testing.assert_array_equal(got.astype(np.float64), want.astype(np.float64))
    return A


def gaussian_weight_with_zeros(rng, shape, std=0.02):
    """bf16 Gaussian weight with zero rows / columns (U = W = 0 there) and random zeros."""
    A = rng.normal(0.0, std, shape)
    A[: shape[0] // 8] = 0
    A[:, 3] = 0
    A[rng.random(shape) < 0.05] = 0
    return A.astype(BF16)


# ----------------------------------------------------------------------------------------------------------
# official semantics

A_TEST = 0.375
K6_VECTORS = [  # reference K.6: (re, im) -> code (0 = +1, 1 = +i, 2 = -1, 3 = -i)
    ((A_TEST, 0.0), 0), ((0.0, A_TEST), 1), ((-A_TEST, 0.0), 2), ((0.0, -A_TEST), 3),
    ((A_TEST, A_TEST), 1), ((-A_TEST, A_TEST), 2), ((-A_TEST, -A_TEST), 3), ((A_TEST, -A_TEST), 0),
    ((0.0, 0.0), 0),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.float16])
def test_k6_code_vectors(dtype):
    re = np.array([v[0][0] for v in K6_VECTORS] * 3) * np.repeat([1.0, 1e-3, 7.0], len(K6_VECTORS))
    im = np.array([v[0][1] for v in K6_VECTORS] * 3) * np.repeat([1.0, 1e-3, 7.0], len(K6_VECTORS))
    want = np.array([v[1] for v in K6_VECTORS] * 3, np.uint8)
    got = quant.phase_code(jnp.asarray(re, dtype), jnp.asarray(im, dtype))
    assert got.dtype == jnp.uint8
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(official.official_codes(to_torch(re), to_torch(im)).numpy(), want)


def test_codes_match_official_on_random_bf16_with_ties():
    rng = np.random.default_rng(0)
    re, im = grid_values(rng, (64, 96)), grid_values(rng, (64, 96))
    assert (np.abs(re) == np.abs(im)).sum() > 50  # plenty of ties in all quadrants, and zeros
    got = quant.phase_code(jnp.asarray(re), jnp.asarray(im))
    np.testing.assert_array_equal(got, official.official_codes(to_torch(re), to_torch(im)).numpy())


@pytest.mark.parametrize("numerics", ["bf16_exact", "fp32"])
def test_every_stage_is_plus_minus_one_or_i_times_its_scale(numerics):
    rng = np.random.default_rng(1)
    re, im = rng.normal(size=(2, 24, 40)).astype(F32), rng.normal(size=(2, 24, 40)).astype(F32)
    spec = QuantSpec(stages=3, numerics=numerics)
    pc = jit_encode(re, im, spec)
    assert pc.codes.shape == (3, 2, 24, 40) and pc.s_re.shape == pc.s_im.shape == (3, 2)
    for t in range(3):
        q_re, q_im = (np.asarray(p, np.float64) for p in quant.phase_decode(pc.codes[t], pc.s_re[t], pc.s_im[t]))
        s_re = np.asarray(pc.s_re[t], np.float64)[:, None, None]
        s_im = np.asarray(pc.s_im[t], np.float64)[:, None, None]
        assert ((q_re != 0) ^ (q_im != 0)).all()  # exactly one plane per entry
        assert ((np.abs(q_re) == s_re) | (q_re == 0)).all() and ((np.abs(q_im) == s_im) | (q_im == 0)).all()
        code = np.asarray(pc.codes[t])
        np.testing.assert_array_equal(code, np.select([q_re > 0, q_im > 0, q_re < 0], [0, 1, 2], 3))
    total = quant.decode_phase_codes(pc)
    for a, b in zip(total, jit_planes(re, im, spec)):
        assert_bits_equal(a, b)


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_bit_exact_against_official_with_ties_and_zeros(stages):
    rng = np.random.default_rng(10 + stages)
    for A in (weight_with_ties(rng, 48, 80), gaussian_weight_with_zeros(rng, (96, 160))):
        got = jit_quantize(jnp.asarray(A), stages=stages)
        assert got.dtype == jnp.bfloat16 and got.shape == A.shape
        assert_bits_equal(got, from_torch(official.official_fake_quant(to_torch(A), stages)))


@pytest.mark.parametrize(
    "method, oracle", [("binary", official.official_bitnet), ("ternary", official.official_ternary)]
)
def test_real_baselines_bit_exact_against_official(method, oracle):
    rng = np.random.default_rng(2)
    for A in (rng.normal(0, 0.02, (96, 160)).astype(BF16), rng.normal(0, 1.0, (64, 64)).astype(BF16)):
        assert_bits_equal(jit_quantize(jnp.asarray(A), method), from_torch(oracle(to_torch(A))))


@pytest.mark.parametrize("stages, published", [(1, 0.363), (2, 0.130), (3, 0.058)])
def test_relative_mse_on_gaussian_matches_reference(stages, published):
    rng = np.random.default_rng(3)
    re, im = rng.normal(size=(512, 512)).astype(F32), rng.normal(size=(512, 512)).astype(F32)
    q_re, q_im = jit_planes(re, im, QuantSpec(stages=stages, numerics="fp32"))
    err = np.sum((re - np.asarray(q_re, np.float64)) ** 2 + (im - np.asarray(q_im, np.float64)) ** 2)
    rel = err / np.sum(re.astype(np.float64) ** 2 + im.astype(np.float64) ** 2)
    assert abs(rel - published) <= 0.01, rel


@pytest.mark.parametrize("numerics", ["bf16_exact", "fp32"])
@pytest.mark.parametrize("shape", [(100, 37), (18, 61), (3, 64, 48)])
def test_one_stage_output_requantizes_to_itself(numerics, shape):
    rng = np.random.default_rng(4)
    re, im = rng.normal(size=shape).astype(F32), rng.normal(size=shape).astype(F32)
    spec = QuantSpec(stages=1, numerics=numerics)
    q = jit_planes(re, im, spec)
    for a, b in zip(jit_planes(*q, spec), q):
        assert_bits_equal(a, b)


@pytest.mark.parametrize("numerics", ["bf16_exact", "fp32"])
def test_all_zero_tensor_gets_the_clamped_scale(numerics):
    spec = QuantSpec(stages=1, numerics=numerics)
    zero = jnp.zeros((2, 6, 10), jnp.float32)
    floor = np.asarray(quant.SCALE_MIN, spec.work_dtype)  # 1e-6 rounded to the working dtype
    pc = jit_encode(zero, zero, spec)
    assert pc.s_re.dtype == spec.work_dtype
    assert_bits_equal(pc.s_re, np.full((1, 2), floor))
    assert_bits_equal(pc.s_im, np.full((1, 2), floor))
    q_re, q_im = jit_planes(zero, zero, spec)
    assert_bits_equal(q_re, np.full(zero.shape, floor))  # (0, 0) -> +1 on the real axis
    assert (np.asarray(q_im, np.float64) == 0).all()
    A_q = np.asarray(jit_quantize(jnp.zeros((4, 6), jnp.float32), stages=1, numerics=numerics), np.float64)
    np.testing.assert_array_equal(A_q[:2, :3], 2 * np.float64(floor))  # A11 = Re W + Re U
    assert (A_q[:2, 3:] == 0).all() and (A_q[2:] == 0).all()


# ----------------------------------------------------------------------------------------------------------
# straight-through estimator


@pytest.mark.parametrize("numerics", ["bf16_exact", "fp32"])
@pytest.mark.parametrize("method", ["complex_phase", "binary", "ternary"])
def test_ste_gradient_is_identity_for_real_weights(method, numerics):
    rng = np.random.default_rng(5)
    A, c = rng.normal(size=(2, 8, 12)).astype(F32), rng.normal(size=(2, 8, 12)).astype(F32)
    loss = lambda A: jnp.sum(c * quantize_real_weight(A, method, numerics=numerics))  # noqa: E731
    assert_bits_equal(jax.jit(jax.grad(loss))(A), c)


@pytest.mark.parametrize("numerics", ["bf16_exact", "fp32"])
def test_ste_gradient_for_complex_masters_is_that_of_the_recomposition(numerics):
    rng = np.random.default_rng(6)
    U = (rng.normal(size=(6, 10)) + 1j * rng.normal(size=(6, 10))).astype(np.complex64)
    W = (rng.normal(size=(6, 10)) + 1j * rng.normal(size=(6, 10))).astype(np.complex64)
    c = rng.integers(-8, 9, (12, 20)).astype(F32)  # small integers: every cotangent sum is exact in bf16 too
    spec = QuantSpec(stages=2, numerics=numerics)
    grad = lambda s: jax.jit(jax.grad(lambda U, W: jnp.sum(c * quantize_widely_linear(U, W, s)), (0, 1)))  # noqa: E731
    gU, gW = grad(spec)(U, W)
    # analytic: d/dRe U = c11 + c22, d/dIm U = c21 - c12, d/dRe W = c11 - c22, d/dIm W = c12 + c21,
    # and JAX's gradient of a real loss in a complex input is d/dRe - i d/dIm
    _, vjp = jax.vjp(recompose_planes, *(jnp.zeros((6, 10), jnp.float32),) * 4)
    d_ur, d_ui, d_wr, d_wi = vjp(jnp.asarray(c))
    assert_bits_equal(gU, np.asarray(d_ur - 1j * d_ui, np.complex64))
    assert_bits_equal(gW, np.asarray(d_wr - 1j * d_wi, np.complex64))
    none = QuantSpec(method="none", numerics="fp32")
    gU0, gW0 = grad(none)(U, W)
    assert_bits_equal(gU, gU0)
    assert_bits_equal(gW, gW0)


# ----------------------------------------------------------------------------------------------------------
# JAX transforms and sharding: grid weights make every float32 statistic exact, so any reduction order
# (per slice, vmapped, scanned, per shard + all-reduce) must give identical bits; a difference is a real bug
# such as a statistic reduced over the wrong axes or over one shard only.

TRANSFORM_CASES = [("bf16_exact", 2), ("fp32", 1)]


@pytest.mark.parametrize("numerics, stages", TRANSFORM_CASES)
def test_jit_vmap_scan_and_per_slice_agree(numerics, stages):
    rng = np.random.default_rng(7)
    A = jnp.asarray(np.stack([weight_with_ties(rng, 16, 24) for _ in range(3)]))
    f = lambda a: quantize_real_weight(a, stages=stages, numerics=numerics)  # noqa: E731
    ref = f(A)  # eager, all leading dims at once
    assert_bits_equal(jnp.stack([jax.jit(f)(A[i]) for i in range(3)]), ref)
    assert_bits_equal(jax.jit(f)(A), ref)
    assert_bits_equal(jax.jit(jax.vmap(f))(A), ref)
    assert_bits_equal(jax.lax.scan(lambda carry, a: (carry, f(a)), 0, A)[1], ref)


@pytest.mark.parametrize("numerics, stages", TRANSFORM_CASES)
def test_sharded_weight_on_a_2x4_mesh_matches_unsharded(numerics, stages):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))
    A = weight_with_ties(np.random.default_rng(8), 32, 48)
    sharded = jax.device_put(jnp.asarray(A), NamedSharding(mesh, P("a", "b")))
    f = jax.jit(lambda a: quantize_real_weight(a, stages=stages, numerics=numerics))
    got = f(sharded)
    assert len(got.sharding.device_set) == 8
    assert_bits_equal(got, f(jnp.asarray(A)))


def test_widely_linear_quantizer_under_jit_and_vmap():
    rng = np.random.default_rng(9)
    U = jnp.asarray(rng.normal(size=(3, 8, 12)) + 1j * rng.normal(size=(3, 8, 12)), jnp.complex64)
    W = jnp.asarray(rng.normal(size=(3, 8, 12)) + 1j * rng.normal(size=(3, 8, 12)), jnp.complex64)
    f = lambda u, w: quantize_widely_linear(u, w, stages=2)  # noqa: E731
    ref = f(U, W)
    assert ref.shape == (3, 16, 24) and ref.dtype == jnp.bfloat16
    assert_bits_equal(jax.jit(f)(U, W), ref)
    assert_bits_equal(jax.jit(jax.vmap(f))(U, W), ref)


# ----------------------------------------------------------------------------------------------------------
# scale granularity


def numpy_phase_quant(re, im, stages, group):
    """Independent numpy reimplementation of bf16_exact with one scale pair per ``group`` consecutive entries
    of a row (group = m: per row). float64 sums (exact for grid inputs), float32 division, bf16 rounding."""
    n, m = re.shape
    re, im = re.astype(np.float64), im.astype(np.float64)
    acc_re, acc_im = np.zeros((n, m)), np.zeros((n, m))
    scales = []
    for _ in range(stages):
        to_im = (np.abs(im) > np.abs(re)) | ((np.abs(im) == np.abs(re)) & (re != 0) & ((re >= 0) == (im >= 0)))

        def mean(values, mask):
            tot = (values * mask).reshape(n, m // group, group).sum(-1)
            cnt = np.maximum(mask.reshape(n, m // group, group).sum(-1), 1)
            s = (tot.astype(F32) / cnt.astype(F32)).astype(BF16)
            return np.maximum(s, np.asarray(quant.SCALE_MIN, BF16)).astype(np.float64)

        s_re, s_im = mean(np.abs(re), ~to_im), mean(np.abs(im), to_im)
        scales.append((s_re, s_im))
        e_re, e_im = np.repeat(s_re, group, -1), np.repeat(s_im, group, -1)
        q_re = np.where(to_im, 0.0, np.where(re >= 0, e_re, -e_re))
        q_im = np.where(to_im, np.where(im >= 0, e_im, -e_im), 0.0)
        acc_re = (acc_re + q_re).astype(BF16).astype(np.float64)
        acc_im = (acc_im + q_im).astype(BF16).astype(np.float64)
        re, im = (re - q_re).astype(BF16).astype(np.float64), (im - q_im).astype(BF16).astype(np.float64)
    return acc_re, acc_im, scales


@pytest.mark.parametrize("granularity, group_size", [("row", 128), ("group", 16)])  # 64 columns: 4 groups
def test_row_and_group_scales(granularity, group_size):
    rng = np.random.default_rng(11)
    n, m, T = 12, 64, 2
    A = weight_with_ties(rng, n, m)
    spec = QuantSpec(stages=T, granularity=granularity, group_size=group_size)
    group = m if granularity == "row" else group_size
    planes = decompose_planes(A)
    want_planes = []
    for re, im in (planes[:2], planes[2:]):
        pc = jit_encode(jnp.asarray(re), jnp.asarray(im), spec)
        want_re, want_im, scales = numpy_phase_quant(re, im, T, group)
        want_planes += [want_re, want_im]
        expected_shape = (T, n) if granularity == "row" else (T, n, m // group_size)
        assert pc.s_re.shape == pc.s_im.shape == expected_shape
        for t, (s_re, s_im) in enumerate(scales):
            np.testing.assert_array_equal(np.asarray(pc.s_re[t], np.float64).reshape(s_re.shape), s_re)
            np.testing.assert_array_equal(np.asarray(pc.s_im[t], np.float64).reshape(s_im.shape), s_im)
    got = jit_quantize(jnp.asarray(A), stages=T, granularity=granularity, group_size=group_size)
    want = recompose_planes(*(p.astype(BF16) for p in want_planes))
    assert_bits_equal(got, want)


def test_row_scales_of_the_real_baseline_match_official_per_row():
    A = grid_values(np.random.default_rng(12), (8, 40))
    got = jit_quantize(jnp.asarray(A), "binary", granularity="row")
    want = np.stack([from_torch(official.official_bitnet(to_torch(row[None])))[0] for row in A])
    assert_bits_equal(got, want)


def test_group_size_must_divide_the_input_dim():
    with pytest.raises(ValueError, match="multiple of 2 \\* group_size=24"):
        quantize_real_weight(jnp.zeros((8, 128)), granularity="group", group_size=24)
    with pytest.raises(ValueError, match="input dim 64 to be a multiple of group_size=24"):
        quant.residual_phase_encode(jnp.zeros((4, 64)), jnp.zeros((4, 64)), granularity="group", group_size=24)


# ----------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "A, kwargs, message",
    [
        (np.zeros((5, 8), F32), {}, r"shape \(5, 8\) has an odd out dim"),
        (np.zeros((4, 7), F32), {}, r"shape \(4, 7\) has an odd in dim"),
        (np.zeros((4, 8), np.int32), {}, "real floating-point weight, got dtype int32"),
        (np.zeros((4, 8), np.complex64), {}, "use quantize_widely_linear"),
        (np.zeros((4, 8), F32), {"stages": 0}, "stages must be an integer >= 1, got 0"),
        (np.zeros((4, 8), F32), {"stages": 1.5}, "stages must be an integer >= 1, got 1.5"),
        (np.zeros((4, 8), F32), {"method": "phase"}, "unknown quantization method 'phase'"),
        (np.zeros((4, 8), F32), {"numerics": "fp8"}, "unknown numerics 'fp8'"),
    ],
)
def test_bad_input_gives_one_clear_error(A, kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantize_real_weight(A, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# properties over shapes, dtypes and options

even_dim = st.integers(1, 12).map(lambda k: 2 * k)


@settings(max_examples=12, deadline=None)
@given(
    lead=st.lists(st.integers(1, 2), max_size=1),
    out_dim=even_dim,
    in_dim=even_dim,
    dtype=st.sampled_from([F32, BF16, F16]),
    method=st.sampled_from(["complex_phase", "binary", "ternary"]),
    stages=st.integers(1, 3),
    numerics=st.sampled_from(["bf16_exact", "fp32"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_output_keeps_shape_and_dtype_property(lead, out_dim, in_dim, dtype, method, stages, numerics, seed):
    shape = (*lead, out_dim, in_dim)
    A = np.random.default_rng(seed).normal(0, 0.05, shape).astype(dtype)
    got = jit_quantize(jnp.asarray(A), method, stages, numerics=numerics)
    assert got.shape == shape and got.dtype == dtype
    assert np.isfinite(np.asarray(got, np.float64)).all()
    if method == "complex_phase" and numerics == "bf16_exact" and dtype == BF16 and not lead:
        assert_bits_equal(got, from_torch(official.official_fake_quant(to_torch(A), stages)))
