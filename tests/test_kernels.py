"""Packed matmul: the exact decode, the layouts, the reference, the xla implementation and the public API.

Every result is checked against the float64 oracle ``x @ unpack_to_real(packed).T`` (kernel_helpers):
float32 activations within 1e-5 of ``max|y|``, bf16 activations within 2^-8 + 1e-5 (derived there).
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from kernel_helpers import activations, assert_matches_reference, dense, oracle, packed_layer, real_matrix, rel_err

from fairy2i_jax import kernels
from fairy2i_jax.kernels import api, decode, layout, xla
from fairy2i_jax.kernels.base import Implementation
from fairy2i_jax.kernels.reference import reference_matmul
from fairy2i_jax.packing import pack_codes, unpack_codes
from fairy2i_jax.quant import QuantSpec, quantize_real_weight

# ----------------------------------------------------------------------------------------------------------
# decode math


def test_sign_bit_identity_gives_twice_the_phase_for_every_slot():
    phase = np.array([1, 1j, -1, -1j])
    codes = np.tile(np.arange(4, dtype=np.uint8), 4)  # each code at slots 0..15 across the 4 words
    words = pack_codes(np.stack([np.roll(codes, s) for s in range(4)]))  # [4, 1]
    for slot in range(16):
        re2, im2 = decode.twice_phase(decode.code_to_top(jnp.asarray(words[:, 0]), slot))
        k = np.array([np.roll(codes, s)[slot] for s in range(4)])
        np.testing.assert_array_equal(np.asarray(re2), 2 * phase[k].real)
        np.testing.assert_array_equal(np.asarray(im2), 2 * phase[k].imag)


def test_bitwise_rounding_equals_the_convert_on_ties_and_random_values():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
    bits = bits[(bits & 0x7F800000) != 0x7F800000]  # finite only
    ties = (bits & np.uint32(0xFFFF0000)) | np.uint32(0x8000)  # exact midpoints between two bf16 values
    v = np.concatenate([bits, ties]).view(np.float32)
    want = v.astype(ml_dtypes.bfloat16).astype(np.float32)
    got = np.asarray(decode.round_to(jnp.asarray(v), jnp.bfloat16, bitwise=True))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    got = np.asarray(decode.round_to(jnp.asarray(v), jnp.bfloat16))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("block_words", [2, 16])
def test_slot_major_puts_contiguous_positions_in_each_slot(block_words):
    codes = np.random.default_rng(block_words).integers(0, 4, (3, 16 * 4 * block_words), dtype=np.uint8)
    out = np.asarray(jax.jit(layout.slot_major, static_argnums=1)(jnp.asarray(pack_codes(codes)), block_words))
    got = unpack_codes(out, codes.shape[1])  # got[r, 16 * word + slot]
    for kb in range(4):
        for w in range(block_words):
            for slot in range(16):
                pos = kb * 16 * block_words + slot * block_words + w
                np.testing.assert_array_equal(got[:, 16 * (kb * block_words + w) + slot], codes[:, pos])


@pytest.mark.parametrize(
    "stages,numerics,granularity",
    [(1, "bf16_exact", "tensor"), (2, "bf16_exact", "tensor"), (3, "bf16_exact", "tensor"),
     (2, "fp32", "tensor"), (2, "bf16_exact", "group")],
)
def test_decoded_blocks_equal_unpack_to_real_bit_for_bit(stages, numerics, granularity):
    """The exact decode (sign-bit values, stage sums and recomposition rounded like unpack_to_real) over
    several chunks, including the padded tail, rebuilds the dense weight exactly, with either float32
    rounding (converts, as the Pallas kernels do; integer round-to-nearest-even, as xla does)."""
    plain = granularity == "tensor" and numerics == "bf16_exact"
    spec = {} if plain else dict(numerics=numerics, granularity=granularity, group_size=8)
    packed = packed_layer(0, 26, 144, stages, **spec)  # m = 72: 5 words, the last one padded
    arrays, meta = xla.prepare_layer(packed, chunk_positions=13 * 32)  # 2-word chunks
    assert meta.num_chunks == 3
    decode_chunks = jax.jit(lambda w, h, rounding: [xla.chunk_blocks(w, h, meta, c, jnp.float32, rounding)
                                                    for c in range(meta.num_chunks)], static_argnums=2)
    want = dense(packed).astype(np.float32)  # unpack_to_real, compiled once with the layer (kernel_helpers)
    # "bits" (xla) everywhere, "convert" (the Pallas kernels) for T = 3, the most roundings; "native" is exact
    # only where the compiler keeps per-op bf16 rounding, which XLA (so this test) does not promise
    for rounding in ("bits", "convert") if stages == 3 else ("bits",):
        blocks = decode_chunks(arrays["words"], arrays["h"], rounding)
        a11, a12, a21, a22 = (jnp.concatenate(b, axis=-1)[:, : packed.m] for b in zip(*blocks))  # each [n, m]
        decoded = np.asarray(jnp.block([[a11, a12], [a21, a22]]))
        np.testing.assert_array_equal(decoded == 0, want == 0)
        np.testing.assert_array_equal(decoded[want != 0], want[want != 0])


def test_the_rounding_matters_for_bf16_layers():
    """Why the decode reproduces the roundings: the unrounded sum_t s_t i^k is ~1e-3 off for W2 (so a kernel
    factoring the scales out would fail the 1e-5 bound)."""
    packed = packed_layer(0, 26, 144, 2)
    exact = dense(packed)
    arrays, meta = xla.prepare_layer(packed, 1 << 19)
    loose = dataclasses.replace(meta, scale_dtype="float32")  # same codes and scales, no bf16 rounding
    b = [np.asarray(v, np.float64)[:, : packed.m]
         for v in jax.jit(lambda w, h: xla.chunk_blocks(w, h, loose, 0, jnp.float32))(arrays["words"], arrays["h"])]
    unrounded = np.block([[b[0], b[1]], [b[2], b[3]]])
    x = np.random.default_rng(1).standard_normal((4, 144))
    assert rel_err(x @ unrounded.T, x @ exact.T) > 1e-4


# ----------------------------------------------------------------------------------------------------------
# reference and xla


def test_reference_equals_the_oracle_and_the_fake_quantized_matmul():
    packed = packed_layer(0, 26, 144, 2)
    A = jnp.asarray(real_matrix(0, 26, 144))
    x = activations(4, (5, 144))
    y = kernels.packed_matmul(x, packed, implementation="reference")
    assert y.dtype == jnp.float32 and rel_err(y, oracle(x, packed)) < 1e-6
    spec = QuantSpec("complex_phase", 2)
    A_q = jax.jit(lambda A: quantize_real_weight(A, spec=spec))(A)
    fake_quant = np.asarray(x, np.float64) @ np.asarray(A_q, np.float64).T
    assert rel_err(y, fake_quant) < 1e-6
    xb = x.astype(jnp.bfloat16)
    yb = kernels.packed_matmul(xb, packed, implementation="reference")
    np.testing.assert_array_equal(np.asarray(yb, np.float32), np.asarray(reference_matmul(xb, packed), np.float32))


@pytest.mark.parametrize("stages,out_dim,in_dim", [(1, 26, 144), (2, 40, 80), (2, 26, 144), (3, 26, 144)])
def test_xla_equals_reference(stages, out_dim, in_dim):
    """Batch 1, > 1 and leading dims [2, 3, 2m]; fp32 and bf16; one chunk, and one word per chunk."""
    packed = packed_layer(0, out_dim, in_dim, stages)
    cases = [(xla.Xla(), (1,), jnp.float32), (xla.Xla(chunk_positions=16 * out_dim // 2), (2, 3), jnp.bfloat16)]
    for i, (impl, lead, dtype) in enumerate(cases):
        x = activations(10 * stages + i, (*lead, in_dim), dtype)
        assert_matches_reference(kernels.packed_matmul(x, packed, implementation=impl), x, packed)


@pytest.mark.parametrize("numerics,granularity", [("bf16_exact", "row"), ("bf16_exact", "group"), ("fp32", "tensor")])
def test_xla_serves_row_and_group_scales_and_fp32_numerics(numerics, granularity):
    packed = packed_layer(0, 26, 144, 2, numerics=numerics, granularity=granularity, group_size=8)
    x = activations(8, (3, 144))
    assert_matches_reference(kernels.packed_matmul(x, packed, implementation="xla"), x, packed)


def test_xla_never_builds_the_dense_weight_when_chunked():
    """With many chunks the jitted program holds one chunk of blocks at a time, never the dense weight."""
    packed = packed_layer(0, 26, 144, 2)
    whole = kernels.prepare(packed, "xla")
    chunked = kernels.prepare(packed, xla.Xla(chunk_positions=13 * 16))
    assert chunked.meta[0].num_chunks == 5 and whole.meta[0].num_chunks == 1
    x = activations(1, (1, 144))
    hlo = jax.jit(lambda x, p: kernels.packed_matmul(x, p)).lower(x, chunked).as_text()
    assert "13x16x" in hlo  # one chunk of blocks [n, 16]
    assert "26x144" not in hlo and "13x72" not in hlo and "13x80" not in hlo  # no dense weight, no whole block
    assert rel_err(kernels.packed_matmul(x, chunked), kernels.packed_matmul(x, whole)) < 1e-6


# ----------------------------------------------------------------------------------------------------------
# api: dispatch, prepared operands, fused entry


def test_available_implementations_on_cpu():
    assert jax.default_backend() == "cpu"
    assert kernels.available_implementations() == ("xla", "reference") == api.DEFAULT_PREFERENCE
    assert set(kernels.IMPLEMENTATIONS) == {"reference", "xla", "pallas_gpu", "pallas_tpu"}
    assert all(set(order) <= set(kernels.IMPLEMENTATIONS) for order in kernels.PREFERENCE.values())


def test_default_dispatch_prepared_operand_and_jit():
    packed = packed_layer(0, 26, 144, 2)
    x = activations(6, (2, 3, 144), jnp.bfloat16)
    y = kernels.packed_matmul(x, packed)
    assert_matches_reference(y, x, packed)
    prep = kernels.prepare(packed)
    assert prep.implementation.name == "xla" and prep.ns == (13,) and prep.m == 72
    y_jit = jax.jit(lambda x, p: kernels.packed_matmul(x, p))(x, prep)
    np.testing.assert_array_equal(np.asarray(y_jit, np.float32), np.asarray(y, np.float32))
    y_traced = jax.jit(lambda x, p: kernels.packed_matmul(x, kernels.prepare(p)))(x, packed)  # prepare under jit
    np.testing.assert_array_equal(np.asarray(y_traced, np.float32), np.asarray(y, np.float32))
    empty = kernels.packed_matmul(jnp.zeros((0, 144), jnp.float32), prep)
    assert empty.shape == (0, 26) and empty.dtype == jnp.float32


def test_fused_equals_separate_calls():
    """xla and reference run fused layers as a loop: bit for bit the separate calls (Pallas: one launch,
    test_kernels_pallas)."""
    layers = [packed_layer(0, 26, 144, 2), packed_layer(1, 40, 144, 2)]  # q, k sharing x
    x = activations(9, (4, 144))
    fused = kernels.packed_matmul_fused(x, layers, implementation="xla")
    prep = kernels.prepare(layers, "xla")
    assert prep.ns == (13, 20)
    from_prepared = kernels.packed_matmul_fused(x, prep)
    by_reference = kernels.packed_matmul_fused(x, layers, implementation="reference")
    for y, y2, y_ref, p in zip(fused, from_prepared, by_reference, layers):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(kernels.packed_matmul(x, p, implementation="xla")))
        np.testing.assert_array_equal(np.asarray(y2), np.asarray(y))
        assert_matches_reference(y, x, p)
        assert_matches_reference(y_ref, x, p)


@dataclasses.dataclass(frozen=True)
class RefusingCall(Implementation):
    """A real registry-shaped implementation that serves nothing at call time (tests the dispatcher)."""

    name: str = "refusing"

    def available(self):
        return True

    def prepare(self, layers):
        return dataclasses.replace(kernels.IMPLEMENTATIONS["reference"].prepare(layers), implementation=self)

    def __call__(self, x, prepared):
        raise NotImplementedError("refusing serves no activations")


def test_fallthrough_and_forced_refusal():
    packed = packed_layer(0, 26, 144, 2, numerics="bf16_exact", granularity="group", group_size=8)
    x = activations(3, (2, 144))
    from fairy2i_jax.kernels.pallas_gpu import PallasGpu

    pallas = PallasGpu(interpret=True)
    with pytest.raises(NotImplementedError, match="group scales"):
        pallas.prepare((packed,))
    # a custom order falls through a refusing prepare (Pallas: group scales) and a refusing call
    assert kernels.prepare(packed, [pallas, "xla"]).implementation.name == "xla"
    y = kernels.packed_matmul(x, packed, implementation=[pallas, RefusingCall(), "xla"])
    assert_matches_reference(y, x, packed)
    # forced: the refusal propagates with its message
    with pytest.raises(NotImplementedError, match="refusing serves no activations"):
        kernels.packed_matmul(x, packed, implementation=RefusingCall())
    with pytest.raises(NotImplementedError, match="group scales"):
        kernels.packed_matmul(x, packed, implementation=pallas)
    with pytest.raises(NotImplementedError, match="refusing: refusing serves no .*pallas_gpu: .*group scales"):
        kernels.packed_matmul(x, packed, implementation=[RefusingCall(), pallas])


def test_errors_name_the_shapes_and_the_known_implementations():
    packed = packed_layer(0, 40, 80, 2)
    x = activations(0, (3, 80))
    with pytest.raises(ValueError, match=r"unknown packed-matmul implementation 'triton'; known: \['pallas_gpu', "
                                         r"'pallas_tpu', 'reference', 'xla'\]"):
        kernels.packed_matmul(x, packed, implementation="triton")
    with pytest.raises(ValueError, match=r"'pallas_gpu' does not run on backend 'cpu'"):
        kernels.packed_matmul(x, packed, implementation="pallas_gpu")
    with pytest.raises(ValueError, match=r"activations of shape \(3, 82\) do not fit .*\[40, 80\].*x \[..., 80\]"):
        kernels.packed_matmul(activations(0, (3, 82)), packed)
    with pytest.raises(ValueError, match="floating point.*int32"):
        kernels.packed_matmul(jnp.ones((3, 80), jnp.int32), packed)
    stacked = jax.tree_util.tree_map(lambda a: a[:, None], packed)
    with pytest.raises(ValueError, match=r"u_words has shape \(2, 1, 20, 3\), expected .*\(2, 20, 3\).*index one"):
        kernels.packed_matmul(x, stacked)
    other = packed_layer(0, 26, 144, 2)
    with pytest.raises(ValueError, match=r"share their input dim.*\[40, 80\], \[26, 144\]"):
        kernels.packed_matmul_fused(x, [packed, other])
    with pytest.raises(ValueError, match="at least one packed layer"):
        kernels.packed_matmul_fused(x, [])
    with pytest.raises(ValueError, match="sequence of layers"):
        kernels.packed_matmul_fused(x, packed)
    fused = kernels.prepare([packed, packed])
    with pytest.raises(ValueError, match="2 fused layers needs packed_matmul_fused"):
        kernels.packed_matmul(x, fused)
    with pytest.raises(ValueError, match="prepared for 'xla'"):
        kernels.packed_matmul(x, kernels.prepare(packed, "xla"), implementation="reference")
    with pytest.raises(ValueError, match="PackedWidelyLinear or a prepared operand, got ndarray"):
        kernels.packed_matmul(x, np.zeros((40, 80)))
