"""Pallas Triton kernels for NVIDIA GPUs (written for Hopper): a decode GEMV (batch <= 8) and a small-batch GEMM.

What is computed. ``y^T = A_q x^T`` with the weights as the A operand and the batch on N: per 2x2 block
position the exact values ``(A11, A12, A21, A22)`` (decode.py: sign-bit decode, stage sums and recomposition
rounded in the scales' dtype exactly as ``unpack_to_real``), then ``y1 += A11 a + A12 b``,
``y2 += A21 a + A22 b`` in float32. Several layers sharing ``x`` (q/k/v, gate/up) are stacked along rows by
``prepare`` and run in one launch, each row carrying its own layer's scales.

Layout chosen by ``prepare`` (layout.stack_rows, once at load time):

* words ``uint32 [2T, R, Wp]``: the 2T code planes (U stages, W stages), rows of all fused layers stacked
  (each layer padded to ``row_multiple = 128`` rows), K padded to ``Wp = round_up(ceil(m/16), 16)`` words and
  made *slot-major* within each K-block of ``bw = 16`` words (256 positions): bit slot ``i`` of word ``w``
  holds position ``16 i + w``, so slot ``i`` of a ``[BN, 16]`` word tile decodes 16 contiguous positions and
  pairs with one contiguous ``[BB, 16]`` activation slab; same bytes as the canonical format (2 bits per
  real weight), 64 contiguous bytes per row and plane per K-block (16-byte vector loads);
* scales ``float32 [4T, R]``: ``s / 2`` per row for (matrix, part, stage): per-tensor scales broadcast to rows
  (so fused layers keep their own), per-row scales as they are. Group scales are refused
  (``NotImplementedError``: they vary along K; xla serves them).

Kernels. Grid ``(R / BN, S, B_pad / BB)``: row block, split-K part, batch block. Each program streams its
share of the K-blocks (``fori_loop``; code loads ``evict_first``, activations default-cached since every row
block rereads them), decodes the 16 bit slots of each word tile (unrolled: static shifts and offsets), and
writes float32 partials ``[S, 2, R, B_pad]`` that one small XLA reduction sums and casts (deterministic,
unlike atomics).

* decode path, ``B <= 8``: no tensor cores (no layout conversion of the decoded tile into MMA operands);
  ``2B`` float32 accumulators ``[BN, 16]`` of FMAs, reduced once at the end (gemlite style). ``BN = 32``
  keeps the accumulators of B = 8 at 64 registers per thread (4 warps).
* small-batch path, ``B > 8``: ``BB = clamp(next_pow2(B), 16, 64)`` and four ``[BN, 16] x [16, BB]`` dots per
  slot (bf16 when activations and scales are bf16, which is exact; float32 at ``HIGHEST`` = IEEE otherwise,
  never TF32). ``BN = 64``.
* split-K ``S``: enough parts that ``R/BN * S * B_pad/BB`` reaches ``target_programs`` (two waves of the
  H200's 132 SMs), at most one per K-block.

Why these choices (kernels.md). At 2 bits per weight the decode, not HBM, bounds a naive kernel, and the
exact decode of this format is not free: the bf16 roundings of the stage sums and of the recomposition
(decode.py) rule out factoring the scales out of the sums. Per 2x2 position of W2 (4 codes) this kernel
spends about 24 ops on the codes (shift, and, xor+and, two multiplies per code), 12 on the stage sums and
8-12 on the recomposition (add + two converts per rounding, ``rounding="convert"``), plus 4 FMAs per token
on the decode path: ~48 ops, ~12 per code. Estimate for a 4096 x 4096 layer on an H200 (not measured):
4.2M positions x 48 = 2e8 lane-ops at ~3.3e13/s (fp32; integer ops at half rate) is 6-10 us of issue time,
against ~1 us to stream its 4.2 MB and ~8 us for XLA's bf16 GEMV to stream 33.5 MB: issue-bound, around
bf16 speed at batch 1 rather than the 8x byte ratio. ``rounding="native"`` (bf16 ALU ops, bf16x2 where
Triton vectorises) should roughly halve the rounding cost; it is exact where the compiler keeps per-op
bf16 rounding (expected of Triton's op-by-op lowering, not verified) but cannot be checked in interpret
mode (decode.py), so it is an option for the device run, where ``benchmarks/kernels.py`` checks it against
the reference with float32 activations. The known way to
~1 op per code is the per-layer byte table of kernels.md decoded straight into the MMA fragment layout
(shared-memory lookups: Mosaic GPU), the next step for this module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fairy2i_jax.kernels import decode
from fairy2i_jax.kernels.base import PallasImplementation, Prepared, prepared_meta, runs_here, same_scale_dtype
from fairy2i_jax.kernels.layout import activation_halves, cdiv, round_up, split_rows, stack_rows
from fairy2i_jax.kernels.xla import compute_dtype
from fairy2i_jax.packing import CODES_PER_WORD, PackedWidelyLinear

try:  # jax 0.10.2 and 0.11.x: jax.experimental.pallas.triton has CompilerParams and load(eviction_policy=)
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    _CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    _load = getattr(plgpu, "load", None)
    _IMPORT_ERROR = None
except Exception as e:  # pragma: no cover - a jaxlib without the Triton bindings
    pl = plgpu = _CompilerParams = _load = None
    _IMPORT_ERROR = e

Array = Any


def _code_tiles(words_ref, rows, cols, T: int, evict_first: bool):
    """The 2T word tiles ``[BN, bw]`` of one K-block. ``evict_first`` streams them past the cache (read once;
    the activations, reread by every row block, stay); a plain load in interpret mode, where the hint means
    nothing and the masked-load discharge would only slow the program down."""
    if evict_first and _load is not None:
        return [_load(words_ref.at[np.int32(p), rows, cols], eviction_policy="evict_first") for p in range(2 * T)]
    return [words_ref[p, rows, cols] for p in range(2 * T)]


def _scales(h_ref, rows, T: int):
    """Nested halved scales ``h[mat][part][t]`` as float32 ``[BN, 1]`` columns from ``h_ref [4T, R]``."""
    cols = [h_ref[j, rows][:, None] for j in range(4 * T)]
    return [[cols[(mat * 2 + part) * T : (mat * 2 + part + 1) * T] for part in (0, 1)] for mat in (0, 1)]


def _slot_blocks(planes, slot: int, h, T: int, scale_dtype, rounding: str, dtype):
    """Exact blocks of bit slot ``slot`` of the ``2T`` word tiles (``[BN, bw]`` uint32): four ``[BN, bw]`` in
    ``dtype`` (``rounding`` as in decode.block_values)."""
    tops = [decode.code_to_top(w, slot) for w in planes]
    return [v.astype(dtype) for v in decode.block_values(tops[:T], tops[T:], h, scale_dtype, rounding)]


def _k_range(split, per: int, kb_total: int):
    start = split * per
    return start, jnp.minimum(start + per, kb_total)


def _gemv_kernel(words_ref, h_ref, x_ref, out_ref, *, T, bw, bn, batch, per, kb_total, scale_dtype, unroll,
                 evict_first, rounding):
    """Decode path: ``2 batch`` float32 accumulators ``[BN, bw]`` of FMAs, one row reduction at the end."""
    i, split = pl.program_id(0), pl.program_id(1)
    rows = pl.ds(i * bn, bn)
    h = _scales(h_ref, rows, T)

    def body(kb, accs):
        planes = _code_tiles(words_ref, rows, pl.ds(kb * bw, bw), T, evict_first)

        def slot_body(slot, accs):
            a11, a12, a21, a22 = _slot_blocks(planes, slot, h, T, scale_dtype, rounding, jnp.float32)
            pos = pl.ds(kb * (CODES_PER_WORD * bw) + slot * bw, bw)
            accs = list(accs)
            for t in range(batch):
                xa = x_ref[0, t, pos].astype(jnp.float32)[None, :]
                xb = x_ref[1, t, pos].astype(jnp.float32)[None, :]
                accs[2 * t] = accs[2 * t] + a11 * xa + a12 * xb
                accs[2 * t + 1] = accs[2 * t + 1] + a21 * xa + a22 * xb
            return tuple(accs)

        return decode.over_slots(slot_body, accs, unroll)

    start, stop = _k_range(split, per, kb_total)
    zeros = tuple(jnp.zeros((bn, bw), jnp.float32) for _ in range(2 * batch))
    accs = jax.lax.fori_loop(start, stop, body, zeros)
    for t in range(batch):
        out_ref[split, 0, rows, t] = jnp.sum(accs[2 * t], axis=1)
        out_ref[split, 1, rows, t] = jnp.sum(accs[2 * t + 1], axis=1)


def _gemm_kernel(words_ref, h_ref, x_ref, out_ref, *, T, bw, bn, bb, per, kb_total, scale_dtype, dtype, unroll,
                 evict_first, rounding):
    """Small-batch path: four ``[BN, bw] x [bw, BB]`` dots per slot into float32 ``[BN, BB]`` accumulators."""
    i, split, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows, cols = pl.ds(i * bn, bn), pl.ds(b * bb, bb)
    h = _scales(h_ref, rows, T)
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT

    def dot(w, xs):  # [BN, bw] x [BB, bw]^T -> [BN, BB]
        return jax.lax.dot_general(w, xs, (((1,), (1,)), ((), ())), precision=precision,
                                   preferred_element_type=jnp.float32)

    def body(kb, acc):
        planes = _code_tiles(words_ref, rows, pl.ds(kb * bw, bw), T, evict_first)

        def slot_body(slot, acc):
            acc1, acc2 = acc
            a11, a12, a21, a22 = _slot_blocks(planes, slot, h, T, scale_dtype, rounding, dtype)
            pos = pl.ds(kb * (CODES_PER_WORD * bw) + slot * bw, bw)
            xa, xb = x_ref[0, cols, pos], x_ref[1, cols, pos]
            return acc1 + dot(a11, xa) + dot(a12, xb), acc2 + dot(a21, xa) + dot(a22, xb)

        return decode.over_slots(slot_body, acc, unroll)

    start, stop = _k_range(split, per, kb_total)
    zeros = (jnp.zeros((bn, bb), jnp.float32), jnp.zeros((bn, bb), jnp.float32))
    acc1, acc2 = jax.lax.fori_loop(start, stop, body, zeros)
    out_ref[split, 0, rows, cols] = acc1
    out_ref[split, 1, rows, cols] = acc2


def split_k(kb_total: int, programs: int, target: int) -> tuple[int, int]:
    """``(S, per)``: ``S = clamp(ceil(target / programs), 1, KB)`` parts of ``per = ceil(KB / S)`` K-blocks
    (recomputing ``S = ceil(KB / per)`` so no part is empty)."""
    want = int(np.clip(cdiv(target, max(programs, 1)), 1, kb_total))
    per = cdiv(kb_total, want)
    return cdiv(kb_total, per), per


def next_pow2(v: int) -> int:
    """The smallest power of two ``>= v`` (v >= 1)."""
    return 1 << (int(v) - 1).bit_length()


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclasses.dataclass(frozen=True)
class PallasGpu(PallasImplementation):
    """Registry entry (module docstring). ``interpret=True`` runs the same kernels in Pallas interpret mode."""

    name: str = "pallas_gpu"
    block_words: int = 16
    row_multiple: int = 128
    gemv_max_batch: int = 8
    gemv_block_n: int = 32
    gemm_block_n: int = 64
    max_block_b: int = 64
    target_programs: int = 264
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        super().__post_init__()
        for f in ("block_words", "gemv_block_n", "gemm_block_n", "max_block_b"):
            if not _is_pow2(getattr(self, f)):
                raise ValueError(f"PallasGpu.{f} must be a power of two (Triton blocks), got {getattr(self, f)}")
        for f in ("gemv_block_n", "gemm_block_n"):
            if self.row_multiple % getattr(self, f):
                raise ValueError(f"PallasGpu.row_multiple={self.row_multiple} must be a multiple of {f}")
        if self.max_block_b < 16:
            raise ValueError(f"PallasGpu.max_block_b must be >= 16 (Triton dots), got {self.max_block_b}")

    def available(self) -> bool:
        return runs_here(_IMPORT_ERROR, self.interpret, "gpu")

    def prepare(self, layers: tuple[PackedWidelyLinear, ...]) -> Prepared:
        scale_dtype = same_scale_dtype(layers, self.name)
        words, h, offsets, rows = stack_rows(layers, self.row_multiple, self.block_words)
        T = layers[0].stages
        meta = prepared_meta(layers, offsets, rows, words, scale_dtype)
        return Prepared({"words": words, "h": h.reshape(4 * T, rows)}, self, tuple(p.n for p in layers),
                        layers[0].m, meta)

    def __call__(self, x: Array, prepared: Prepared) -> list[Array]:
        T, scale_dtype, offsets, rows, n_words = prepared.meta
        scale_dtype = np.dtype(scale_dtype)
        batch, bw = x.shape[0], self.block_words
        kb_total = n_words // bw
        dtype = compute_dtype(x.dtype, scale_dtype)
        if batch <= self.gemv_max_batch:
            bn, bb, padded = self.gemv_block_n, batch, batch
            kernel = _gemv_kernel
            static = dict(batch=batch)
        else:
            bn = self.gemm_block_n
            bb = int(np.clip(next_pow2(batch), 16, self.max_block_b))
            padded = round_up(batch, bb)
            kernel = _gemm_kernel
            static = dict(bb=bb, dtype=dtype)
        halves = activation_halves(x, prepared.m, n_words * CODES_PER_WORD, padded, dtype)
        programs = (rows // bn) * (padded // bb)
        splits, per = split_k(kb_total, programs, self.target_programs)
        grid = (rows // bn, splits, padded // bb)
        body = _bind(kernel, T=T, bw=bw, bn=bn, per=per, kb_total=kb_total, scale_dtype=scale_dtype,
                     unroll=self.unroll_slots, evict_first=not self.interpret, rounding=self.rounding,
                     **static)
        partials = pl.pallas_call(
            body,
            out_shape=jax.ShapeDtypeStruct((splits, 2, rows, padded), jnp.float32),
            grid=grid,
            compiler_params=_CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages),
            interpret=self.interpret,
            name=f"fairy2i_packed_{'gemv' if kernel is _gemv_kernel else 'gemm'}",
        )(prepared.arrays["words"], prepared.arrays["h"], halves)
        y = jnp.sum(partials, axis=0)[:, :, :batch]  # [2, R, B]
        return split_rows(y[0].T, y[1].T, prepared.ns, offsets)


def _bind(kernel, **static):
    """``kernel`` with its static keyword arguments bound (a named function, for readable lowering)."""

    def body(*refs):
        return kernel(*refs, **static)

    body.__name__ = kernel.__name__
    return body
