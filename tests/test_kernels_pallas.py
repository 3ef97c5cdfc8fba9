"""Pallas kernels (Triton GPU, Mosaic TPU) in interpret mode on CPU, against the float64 oracle.

Interpret instances use tiny blocks (GPU: 16-row blocks and row padding, so grids stay a few steps) and a
``fori_loop`` over the 16 bit slots (``unroll_slots=False``: the same per-slot code with dynamic shifts; a
16x smaller program, since interpret-mode compile time dominates). The unrolled production variant is
checked by lowering it for its real platform (``cuda`` / ``tpu``: the Pallas lowering that rejects
non-power-of-two Triton blocks or unsupported primitives runs on CPU) and, in a ``slow`` test, in
interpret mode. Bounds as in test_kernels: float32 1e-5 of ``max|y|``, bf16 2^-8 + 1e-5.
"""

import jax
import jax.extend
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from kernel_helpers import activations, assert_matches_reference, packed_layer, rel_err

from fairy2i_jax import kernels
from fairy2i_jax.kernels.pallas_gpu import PallasGpu, split_k
from fairy2i_jax.kernels.pallas_tpu import PallasTpu

GPU = PallasGpu(interpret=True, row_multiple=16, gemv_block_n=16, gemm_block_n=16, gemv_max_batch=1,
                unroll_slots=False)
TPU = PallasTpu(interpret=True, unroll_slots=False)
BOTH = pytest.mark.parametrize("impl", [GPU, TPU], ids=["gpu", "tpu"])


def launches(fn, *args):
    """Number of ``pallas_call`` equations in the jaxpr of ``fn(*args)`` (nested jaxprs included)."""

    def count(jaxpr):
        n = 0
        for eqn in jaxpr.eqns:
            n += eqn.primitive is pl.pallas_call_p
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                n += count(sub)
        return n

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


# (stages, (out, in), x shape, dtype): together every T, both odd word counts (m = 72: 5 words, m = 40: 3),
# n = 13 and n = 20 (not multiples of 8), batch 1, 2, 20 and leading dims [2, 3, 2m], fp32 and bf16. The GPU
# instance takes batch 1 on the decode path (its multi-token loop, whose interpret program compiles slowly,
# is in the slow tests: split-K decode path, unrolled variant) and larger batches on the tensor-core path.
CASES = [
    (1, (26, 144), (1, 144), jnp.bfloat16),
    (2, (26, 144), (2, 3, 144), jnp.float32),
    (3, (26, 144), (2, 144), jnp.float32),
    (2, (40, 80), (20, 80), jnp.bfloat16),
]


def _case_params():
    """(impl, case) pairs; the GPU's large-batch bf16 case is slow in interpret mode (its tensor-core path is
    also covered by the split-K test), so it runs with the slow tests."""
    params = []
    for name, impl in (("gpu", GPU), ("tpu", TPU)):
        for c in CASES:
            slow = name == "gpu" and c[2][0] == 20
            case_id = f"{name}-T{c[0]}-m{c[1][1] // 2}-x{'x'.join(map(str, c[2][:-1]))}"
            params.append(pytest.param(impl, *c, id=case_id, marks=[pytest.mark.slow] if slow else []))
    return params


@pytest.mark.parametrize("impl,stages,shape,x_shape,dtype", _case_params())
def test_matches_reference(impl, stages, shape, x_shape, dtype):
    packed = packed_layer(0, *shape, stages)
    x = activations(stages, x_shape, dtype)
    assert_matches_reference(kernels.packed_matmul(x, packed, implementation=impl), x, packed)


@BOTH
def test_fused_layers_run_in_one_launch_with_their_own_scales(impl):
    """q/k-like layers of different n and scales sharing x: one pallas_call, each equal to the oracle and
    to its separate call."""
    layers = [packed_layer(0, 26, 144, 2), packed_layer(1, 40, 144, 2)]
    assert float(layers[0].u_scales[0][0]) != float(layers[1].u_scales[0][0])
    x = activations(3, (3, 144))
    prep = kernels.prepare(layers, impl)
    assert prep.implementation is impl and prep.ns == (13, 20)
    assert launches(lambda x, p: kernels.packed_matmul_fused(x, p), x, prep) == 1
    ys = kernels.packed_matmul_fused(x, prep)
    for y, p in zip(ys, layers):
        assert y.shape == (3, 2 * p.n)
        assert_matches_reference(y, x, p)
    alone = kernels.packed_matmul(x, layers[0], implementation=impl)  # fused == separate (up to split-K order)
    assert rel_err(ys[0], alone) < 1e-6


@BOTH
def test_row_scales(impl):
    """Row scales ride in the per-row scale table (fused here with a per-tensor layer of the same shape)."""
    row = packed_layer(0, 26, 144, 2, numerics="bf16_exact", granularity="row", group_size=8)
    tensor = packed_layer(0, 26, 144, 2)
    x = activations(5, (3, 144), jnp.bfloat16)
    for y, p in zip(kernels.packed_matmul_fused(x, [row, tensor], implementation=impl), [row, tensor]):
        assert_matches_reference(y, x, p)


@pytest.mark.parametrize("impl", [pytest.param(GPU, marks=pytest.mark.slow), TPU], ids=["gpu", "tpu"])
def test_fp32_numerics(impl):
    """fp32 scales keep float32 weights: float32 dots at HIGHEST even for bf16 activations (the GPU variant
    shares that path with the float32-activation cases, so it runs with the slow tests)."""
    fp32 = packed_layer(0, 26, 144, 2, numerics="fp32", granularity="tensor", group_size=8)
    x = activations(6, (2, 144), jnp.bfloat16)
    assert_matches_reference(kernels.packed_matmul(x, fp32, implementation=impl), x, fp32)


@BOTH
def test_group_scales_and_mixed_fusions_are_refused(impl):
    group = packed_layer(0, 26, 144, 2, numerics="bf16_exact", granularity="group", group_size=8)
    with pytest.raises(NotImplementedError, match="group scales"):
        impl.prepare((group,))
    with pytest.raises(NotImplementedError, match="one scale dtype"):
        impl.prepare((packed_layer(0, 26, 144, 2),
                      packed_layer(0, 26, 144, 2, numerics="fp32", granularity="tensor", group_size=8)))
    with pytest.raises(NotImplementedError, match="one stage count"):
        impl.prepare((packed_layer(0, 26, 144, 2), packed_layer(0, 26, 144, 1)))


@pytest.mark.parametrize("batch,dtype", [pytest.param(3, jnp.float32, marks=pytest.mark.slow), (17, jnp.bfloat16)],
                         ids=["decode-path", "tensor-core-path"])
def test_gpu_split_k_row_blocks_and_batch_blocks(batch, dtype):
    """Several row blocks (n = 48: three 16-row blocks), K-blocks (m = 300: 19 words -> 2 K-blocks of 16
    words) split over 2 programs, and (batch 17 with 16-wide blocks) 2 batch blocks."""
    impl = PallasGpu(interpret=True, row_multiple=16, gemv_block_n=16, gemm_block_n=16, gemv_max_batch=4,
                     max_block_b=16, target_programs=12, unroll_slots=False)
    assert split_k(2, 3, 12) == (2, 1) and split_k(5, 1, 2) == (2, 3) and split_k(3, 100, 264) == (3, 1)
    assert split_k(8, 300, 264) == (1, 8)
    packed = packed_layer(0, 96, 600, 2)
    x = activations(batch, (batch, 600), dtype)
    assert_matches_reference(kernels.packed_matmul(x, packed, implementation=impl), x, packed)


def test_tpu_several_k_blocks():
    """m = 2100 -> 132 words -> 2 K-blocks of 128 words: the accumulator carries across the K grid axis."""
    packed = packed_layer(0, 40, 4200, 2)
    x = activations(11, (3, 4200))
    assert_matches_reference(kernels.packed_matmul(x, packed, implementation=TPU), x, packed)


def _lowered(impl, platform, x, prep):
    fn = jax.jit(lambda x, p: kernels.packed_matmul(x, p))
    try:
        return fn.trace(x, prep).lower(lowering_platforms=(platform,)).as_text()
    except RuntimeError as e:  # jax >= 0.11 wants a real (or abstract) GPU to lower Triton kernels
        if "No supported GPU devices found" in str(e):
            pytest.skip(f"this jax cannot lower Triton kernels without a GPU: {e}")
        raise


@pytest.mark.parametrize("batch", [1, 32])
def test_production_gpu_kernels_lower_for_cuda(batch):
    """The registry's PallasGpu (unrolled slots, 32/64-row blocks) lowers to a Triton call for cuda."""
    packed = packed_layer(0, 26, 144, 2)
    impl = kernels.IMPLEMENTATIONS["pallas_gpu"]
    prep = impl.prepare((packed,))
    text = _lowered(impl, "cuda", activations(0, (batch, 144), jnp.bfloat16), prep)
    assert "__gpu$xla.gpu.triton" in text or "triton_kernel_call" in text
    assert ("fairy2i_packed_gemv" if batch <= 8 else "fairy2i_packed_gemm") in text


def test_production_tpu_kernel_lowers_for_tpu():
    packed = packed_layer(0, 26, 144, 2)
    impl = kernels.IMPLEMENTATIONS["pallas_tpu"]
    text = _lowered(impl, "tpu", activations(0, (4, 144), jnp.bfloat16), impl.prepare((packed,)))
    assert "tpu_custom_call" in text


@pytest.mark.slow
@BOTH
def test_unrolled_production_variant_in_interpret_mode(impl):
    """The unrolled slots (static shifts and offsets) compute the same as the loop (slow: big programs). One
    batch: 3 rows padded to one 16-row batch block takes the GPU instance's tensor-core path and the TPU kernel;
    a larger batch only changes the static block size of the same unrolled program."""
    import dataclasses

    impl = dataclasses.replace(impl, unroll_slots=True)
    packed = packed_layer(0, 26, 144, 2)
    x = activations(3, (3, 144), jnp.bfloat16)
    assert_matches_reference(kernels.packed_matmul(x, packed, implementation=impl), x, packed)
