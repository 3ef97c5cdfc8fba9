"""Pallas Mosaic TPU kernel: decode uint32 code tiles to exact 2x2 blocks on the VPU, contract on the MXU.

Same contract as the other implementations: ``y = x @ unpack_to_real(packed).T`` (decode.py reproduces the
roundings of the format bit for bit), several layers sharing ``x`` stacked along rows in one launch.

Layout chosen by ``prepare`` (layout.stack_rows):

* words ``uint32 [2T, R, Wp]``: the 2T code planes, fused layers' rows stacked (each padded to ``block_n =
  128`` rows), K padded to ``Wp = round_up(ceil(m/16), 128)`` words and slot-major within K-blocks of
  ``bw = 128`` words (2048 positions): bit slot ``i`` of lane ``w`` holds position ``128 i + w``. A
  ``[BN, 128]`` word tile is one (8, 128)-tiled uint32 block whose slot ``i`` decodes 128 contiguous positions,
  paired with a lane-aligned ``[BB, 128]`` activation slab: only 32-bit shifts/ands/xors and same-width
  bitcasts (what Mosaic vectorises), no lane shuffles or int8 widening. The cost: ``m`` pads to a multiple
  of 2048 (Llama-2-7B: 2048 exact, 5504 -> 6144).
* scales ``float32 [R, 128]``: ``s / 2`` per row, column ``(mat * 2 + part) * T + t`` (T <= 32), read as
  ``[BN, 1]`` columns that broadcast along lanes. Group scales are refused (``NotImplementedError``).

Kernel. Grid ``(R / 128, B_pad / BB, KB)`` with the K axis last and ``arbitrary`` (a float32 VMEM
accumulator ``[2, BB, 128]``, written in the output dtype at the last K step); row and batch axes
``parallel``. Per K step: 2T word tiles (``64 KiB`` each), 16 slots x (decode on ``[128, 128]`` tiles + four
``[BB, 128] x [128, 128]^T`` MXU dots; bf16 when activations and scales are bf16, which is exact, float32 at
``HIGHEST`` otherwise; the roundings of the format by converts, ``rounding="convert"``, or as bf16 VPU ops
with ``rounding="native"`` on chips that have them, untested). The batch pads to a multiple of 16 (bf16
sublane packing), ``BB <= 256``. As the
kernels reference notes, on TPU the vector unit (decode), not HBM, is the expected limit; int8 bit planes
on the MXU are the natural next step. Verified in TPU interpret mode only (no TPU was available).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fairy2i_jax.kernels import decode
from fairy2i_jax.kernels.base import PallasImplementation, Prepared, prepared_meta, runs_here, same_scale_dtype
from fairy2i_jax.kernels.layout import activation_halves, pad_axis, round_up, split_rows, stack_rows
from fairy2i_jax.kernels.xla import compute_dtype
from fairy2i_jax.packing import CODES_PER_WORD, PackedWidelyLinear

try:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    _IMPORT_ERROR = None
except Exception as e:  # pragma: no cover - a jaxlib without Mosaic
    pl = pltpu = None
    _IMPORT_ERROR = e

Array = Any
LANES = 128


def _kernel(words_ref, h_ref, x_ref, out_ref, acc_ref, *, T, bw, scale_dtype, dtype, unroll, rounding):
    """One (row block, batch block, K block) step: accumulate ``[2, BB, BN]`` partial sums over 16 slots."""
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    cols = [h_ref[:, j : j + 1] for j in range(4 * T)]
    h = [[cols[(mat * 2 + part) * T : (mat * 2 + part + 1) * T] for part in (0, 1)] for mat in (0, 1)]
    planes = [words_ref[p] for p in range(2 * T)]
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT

    def dot(xs, w):  # [BB, bw] x [BN, bw]^T -> [BB, BN]
        return jax.lax.dot_general(xs, w, (((1,), (1,)), ((), ())), precision=precision,
                                   preferred_element_type=jnp.float32)

    def slot_body(slot, acc):
        acc1, acc2 = acc
        tops = [decode.code_to_top(w, slot) for w in planes]
        blocks = decode.block_values(tops[:T], tops[T:], h, scale_dtype, rounding)
        a11, a12, a21, a22 = (v.astype(dtype) for v in blocks)
        lanes = pl.ds(slot * bw if isinstance(slot, int) else pl.multiple_of(slot * bw, bw), bw)
        xa, xb = x_ref[0, :, lanes], x_ref[1, :, lanes]
        return acc1 + dot(xa, a11) + dot(xb, a12), acc2 + dot(xa, a21) + dot(xb, a22)

    acc1, acc2 = decode.over_slots(slot_body, (acc_ref[0], acc_ref[1]), unroll)
    acc_ref[0] = acc1
    acc_ref[1] = acc2

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


@dataclasses.dataclass(frozen=True)
class PallasTpu(PallasImplementation):
    """Registry entry (module docstring). ``interpret=True`` runs it in TPU interpret mode on any backend."""

    name: str = "pallas_tpu"
    block_n: int = LANES
    block_words: int = LANES
    max_block_b: int = 256

    def __post_init__(self):
        super().__post_init__()
        if self.block_n % LANES or self.block_words % LANES:
            raise ValueError(f"PallasTpu block_n and block_words must be multiples of {LANES} (lanes), got "
                             f"{self.block_n}, {self.block_words}")
        if self.max_block_b % 16:
            raise ValueError(f"PallasTpu.max_block_b must be a multiple of 16, got {self.max_block_b}")

    def available(self) -> bool:
        return runs_here(_IMPORT_ERROR, self.interpret, "tpu")

    def prepare(self, layers: tuple[PackedWidelyLinear, ...]) -> Prepared:
        scale_dtype = same_scale_dtype(layers, self.name)
        T = layers[0].stages
        if 4 * T > LANES:
            raise NotImplementedError(f"{self.name} holds at most {LANES // 4} stages, got T={T}")
        words, h, offsets, rows = stack_rows(layers, self.block_n, self.block_words)
        h = pad_axis(h.reshape(4 * T, rows).T, 1, LANES)  # [R, 128]
        meta = prepared_meta(layers, offsets, rows, words, scale_dtype)
        return Prepared({"words": words, "h": h}, self, tuple(p.n for p in layers), layers[0].m, meta)

    def __call__(self, x: Array, prepared: Prepared) -> list[Array]:
        T, scale_dtype, offsets, rows, n_words = prepared.meta
        scale_dtype = np.dtype(scale_dtype)
        batch, bw, bn = x.shape[0], self.block_words, self.block_n
        dtype = compute_dtype(x.dtype, scale_dtype)
        bb = min(round_up(batch, 16), self.max_block_b)
        padded = round_up(batch, bb)
        k_positions = CODES_PER_WORD * bw
        halves = activation_halves(x, prepared.m, n_words * CODES_PER_WORD, padded, dtype)

        def body(*refs):
            return _kernel(*refs, T=T, bw=bw, scale_dtype=scale_dtype, dtype=dtype, unroll=self.unroll_slots,
                           rounding=self.rounding)

        grid = (rows // bn, padded // bb, n_words // bw)
        y = pl.pallas_call(
            body,
            out_shape=jax.ShapeDtypeStruct((2, padded, rows), x.dtype),
            grid=grid,
            in_specs=[
                pl.BlockSpec((2 * T, bn, bw), lambda i, b, k: (0, i, k)),
                pl.BlockSpec((bn, LANES), lambda i, b, k: (i, 0)),
                pl.BlockSpec((2, bb, k_positions), lambda i, b, k: (0, b, k)),
            ],
            out_specs=pl.BlockSpec((2, bb, bn), lambda i, b, k: (0, b, i)),
            scratch_shapes=[pltpu.VMEM((2, bb, bn), jnp.float32)],
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=pltpu.InterpretParams() if self.interpret else False,
            name="fairy2i_packed_tpu",
        )(prepared.arrays["words"], prepared.arrays["h"], halves)
        return split_rows(y[0, :batch], y[1, :batch], prepared.ns, offsets)
