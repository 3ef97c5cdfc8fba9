"""2-bit code packing: bit order, padding, exact round trips, the packed layer vs the fake quantizer, storage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairy2i_jax import packing
from fairy2i_jax.quant import QuantSpec, quantize_real_weight, quantize_widely_linear


def random_codes(rng, shape):
    return rng.integers(0, 4, shape, dtype=np.uint8)


def complex_pair(rng, shape):
    U = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    W = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    return jnp.asarray(U, jnp.complex64), jnp.asarray(W, jnp.complex64)


def assert_bits_equal(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    bad = got.view(f"u{got.itemsize}") != want.view(f"u{want.itemsize}")
    assert not bad.any(), f"{bad.sum()} of {bad.size} entries differ"


# ----------------------------------------------------------------------------------------------------------
# bit layout


def test_bit_order_on_hand_built_words():
    codes = np.zeros(32, np.uint8)
    codes[:3] = [1, 2, 3]  # bits 0-1 = 01, bits 2-3 = 10, bits 4-5 = 11
    codes[15] = 3  # the top two bits of the first word
    codes[16] = 2  # the lowest bits of the second word
    words = packing.pack_codes(codes)
    assert words.dtype == np.uint32 and words.shape == (2,)
    assert int(words[0]) == 0b11_10_01 + (3 << 30) and int(words[1]) == 2
    assert int(packing.pack_codes(jnp.asarray(codes))[0]) == int(words[0])


@pytest.mark.parametrize("m", [1, 15, 16, 17, 33, 64])
def test_round_trip_numpy_and_jitted_jax(m):
    rng = np.random.default_rng(m)
    codes = random_codes(rng, (2, 3, m))
    words = packing.pack_codes(codes)
    assert isinstance(words, np.ndarray) and words.dtype == np.uint32 and words.shape == (2, 3, -(-m // 16))
    back = packing.unpack_codes(words, m)
    assert isinstance(back, np.ndarray) and back.dtype == np.uint8
    np.testing.assert_array_equal(back, codes)
    jwords = jax.jit(packing.pack_codes)(jnp.asarray(codes))
    assert jwords.dtype == jnp.uint32
    np.testing.assert_array_equal(jwords, words)
    jback = jax.jit(packing.unpack_codes, static_argnums=1)(jwords, m)
    assert jback.dtype == jnp.uint8
    np.testing.assert_array_equal(jback, codes)


@pytest.mark.parametrize("m", [1, 15, 17, 33])
def test_padded_tail_holds_code_zero(m):
    codes = np.full((4, m), 3, np.uint8)  # all ones in every used bit pair
    words = packing.pack_codes(codes)
    used = 2 * (m % 16)
    assert (words[:, -1] >> np.uint32(used) == 0).all() and (words[:, -1] & np.uint32((1 << used) - 1)).all()
    full = packing.unpack_codes(words, 16 * words.shape[-1])  # read the padding as if it were data
    assert (full[:, m:] == 0).all() and (full[:, :m] == 3).all()


# ----------------------------------------------------------------------------------------------------------
# packed layers


@pytest.mark.parametrize("numerics", ["bf16_exact", "fp32"])
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_unpacked_layer_equals_the_fake_quantizer(stages, numerics):
    U, W = complex_pair(np.random.default_rng(stages), (2, 6, 33))  # m = 33: a padded tail word
    spec = QuantSpec(stages=stages, numerics=numerics)
    packed = jax.jit(packing.pack_widely_linear, static_argnums=2)(U, W, spec)
    assert packed.u_words.shape == packed.w_words.shape == (stages, 2, 6, 3)
    assert packed.u_words.dtype == jnp.uint32
    assert packed.u_scales[0].shape == packed.w_scales[1].shape == (stages, 2)
    assert packed.u_scales[0].dtype == spec.work_dtype
    assert (packed.n, packed.m, packed.stages) == (6, 33, stages)
    A_q = jax.jit(packing.unpack_to_real)(packed)
    assert A_q.shape == (2, 12, 66)
    assert_bits_equal(A_q, quantize_widely_linear(U, W, spec))
    assert packing.unpack_to_real(packed, jnp.float32).dtype == jnp.float32


@pytest.mark.parametrize("numerics", ["bf16_exact", "fp32"])
def test_packed_real_weight_equals_quantize_real_weight(numerics):
    """``pack_real_weight`` forms the planes as the quantizer does (bf16 arithmetic for bf16_exact), so unpacking
    gives ``quantize_real_weight`` bit for bit, for a float32 matrix that is not bf16-representable."""
    A = jnp.asarray(np.random.default_rng(9).standard_normal((2, 24, 70)), jnp.float32)
    for granularity in ("tensor", "row"):
        spec = QuantSpec(stages=2, numerics=numerics, granularity=granularity)
        packed = packing.pack_real_weight(A, spec)
        assert (packed.n, packed.m) == (12, 35)
        assert_bits_equal(packing.unpack_to_real(packed), quantize_real_weight(A, spec=spec).astype(spec.work_dtype))
    with pytest.raises(ValueError, match="needs method='complex_phase'"):
        packing.pack_real_weight(A, QuantSpec("binary"))
    with pytest.raises(ValueError, match="odd"):
        packing.pack_real_weight(A[..., :69], QuantSpec())


def test_row_and_group_scales_pack_too():
    U, W = complex_pair(np.random.default_rng(5), (4, 32))
    for spec, scale_shape in [
        (QuantSpec(stages=2, granularity="row"), (2, 4)),
        (QuantSpec(stages=2, granularity="group", group_size=16), (2, 4, 2)),
    ]:
        packed = packing.pack_widely_linear(U, W, spec)
        assert packed.u_scales[0].shape == scale_shape
        assert_bits_equal(packing.unpack_to_real(packed), quantize_widely_linear(U, W, spec))


def test_bits_per_weight():
    w2 = packing.packed_bits_per_weight(4096, 11008, stages=2, scale_bytes=2)
    assert 2.0 < w2 <= 2.1, w2  # LLaMA-2-7B FFN layer, Fairy2i-W2, bf16 scales
    # the formula counts exactly the bytes of a real packed layer (m = 50: a padded tail word); its arrays'
    # shapes and dtypes, traced (jax.eval_shape: what pack_widely_linear returns, without running it op by op)
    U, W = complex_pair(np.random.default_rng(6), (16, 50))
    for stages in (1, 2, 3):
        packed = jax.eval_shape(lambda u, w, t=stages: packing.pack_widely_linear(u, w, stages=t), U, W)
        nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(packed))
        assert packing.packed_bits_per_weight(32, 100, stages) == 8 * nbytes / (32 * 100)


# ----------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("xp", [np, jnp])
def test_codes_out_of_range_or_of_the_wrong_dtype_raise(xp):
    with pytest.raises(ValueError, match=r"must lie in 0..3 \(value i\^k\), got values in \[0, 4\]"):
        packing.pack_codes(xp.asarray([0, 1, 4], xp.uint8))
    with pytest.raises(ValueError, match=r"got values in \[-1, 2\]"):
        packing.pack_codes(xp.asarray([2, -1], xp.int8))
    with pytest.raises(ValueError, match="integer array with values 0..3 .*got dtype float32"):
        packing.pack_codes(xp.asarray([0.0, 1.0], xp.float32))


def test_bad_words_and_layers_raise():
    words = packing.pack_codes(np.zeros((2, 20), np.uint8))
    with pytest.raises(ValueError, match="must be uint32, got dtype int32"):
        packing.unpack_codes(words.astype(np.int32), 20)
    with pytest.raises(ValueError, match=r"shape \(2, 2\) do not hold m=40 .* ceil\(m/16\) = 3"):
        packing.unpack_codes(words, 40)
    U, W = complex_pair(np.random.default_rng(7), (4, 8))
    with pytest.raises(ValueError, match="needs method='complex_phase', got 'binary'"):
        packing.pack_widely_linear(U, W, QuantSpec(method="binary"))
    with pytest.raises(ValueError, match="U must be a complex array"):
        packing.pack_widely_linear(jnp.real(U), W)
    with pytest.raises(ValueError, match="same shape"):
        packing.pack_widely_linear(U, W[:2])
    with pytest.raises(ValueError, match=r"shape \(4095, 11008\) has an odd out dim"):
        packing.packed_bits_per_weight(4095, 11008, 2)
