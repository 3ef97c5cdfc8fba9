"""Portable XLA implementation: decode a K-chunk of codes to its exact 2x2 blocks, contract, loop over chunks.

Per layer, with ``x = [a; b]`` zero-padded to ``Mp = 16 Wp`` positions and the canonical words padded to
``Wp = nc * kw`` words (code 0 there, multiplied by zero activations), chunk ``c`` covers positions
``[c C, (c+1) C)``, ``C = 16 kw``:

    tops[p, j, 16 w + i] = words[p, j, c kw + w] << (30 - 2 i)                 (p = mat * T + t, i = bit slot)
    (A11, A12, A21, A22)[j, l] = block_values(tops, h)                          (decode.py: exact, in f32)
    y1 += a_c A11^T + b_c A12^T,   y2 += a_c A21^T + b_c A22^T              (a_c, b_c: the chunk of a, b)

so ``y = x @ unpack_to_real(packed).T`` up to float32 summation order: the blocks equal the dequantized
weights bit for bit (decode.py) and the products are the reference's own (bf16 x bf16, exact in float32,
when activations and scales are bfloat16; else float32 x float32 at ``Precision.HIGHEST``). The bf16
roundings of the format are done on the bits (``rounding="bits"`` of decode.py), so XLA's excess-precision
passes cannot drop them. Only one chunk of decoded blocks (``4 n C`` values, ``chunk_positions = n C``
bounded, 2^19 by default) exists at a time: XLA never holds the whole dense ``[2n, 2m]`` weight, and on GPU
it may fuse the elementwise decode into the dot's operand.

Scales: ``h = s / 2`` per (matrix, part, stage), broadcast as scalars (tensor), ``[n, 1]`` (row) or gathered
per position ``h[..., (c C + l) // group_size]`` (group; positions past ``m`` clip to the last group, where
the activations are zero). Serves every case the format has (T >= 1, tensor / row / group scales, any float
activations); fused layers are a loop over layers (one launch each).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fairy2i_jax.kernels import decode
from fairy2i_jax.kernels.base import Implementation, Prepared
from fairy2i_jax.kernels.layout import cdiv, code_planes, half_scales, pad_axis
from fairy2i_jax.packing import CODES_PER_WORD, PackedWidelyLinear, num_words

Array = Any


@dataclasses.dataclass(frozen=True)
class LayerMeta:
    """Static layout of one prepared layer: stages, scale form, scale dtype, chunk words ``kw``, chunks ``nc``."""

    n: int
    stages: int
    granularity: str
    group_size: int
    scale_dtype: str
    chunk_words: int
    num_chunks: int


def chunking(n: int, m: int, chunk_positions: int) -> tuple[int, int]:
    """``(kw, nc)``: ``nc = ceil(W / kw0)`` chunks with ``kw0 = clamp(chunk_positions // (16 n), 1, W)``, then
    ``kw = ceil(W / nc)`` (balanced, so padding stays under one word per chunk); ``W = ceil(m / 16)``."""
    words = num_words(m)
    kw0 = int(np.clip(chunk_positions // (CODES_PER_WORD * max(n, 1)), 1, words))
    nc = cdiv(words, kw0)
    return cdiv(words, nc), nc


def compute_dtype(x_dtype: Any, scale_dtype: Any) -> Any:
    """bf16 operands when both are bf16 (the blocks are then exact in bf16), else float32."""
    if np.dtype(x_dtype) == np.dtype(jnp.bfloat16) and np.dtype(scale_dtype) == np.dtype(jnp.bfloat16):
        return jnp.bfloat16
    return jnp.float32


def chunk_scales(h: Array, meta: LayerMeta, start: Array, size: int) -> Array:
    """Halved scales of positions ``[start, start + size)``, shaped to broadcast against ``[n, size]`` tops."""
    if meta.granularity == "tensor":
        return h
    if meta.granularity == "row":
        return h[..., None]
    groups = (start + jnp.arange(size)) // meta.group_size
    return jnp.take(h, groups, axis=-1, mode="clip")


def chunk_blocks(words: Array, h: Array, meta: LayerMeta, chunk: Array, dtype: Any,
                 rounding: str = "bits") -> tuple[Array, ...]:
    """Decoded blocks ``(A11, A12, A21, A22)`` of chunk ``chunk``, each ``[n, C]`` in ``dtype`` (exact values;
    ``rounding`` as in ``decode.block_values``)."""
    kw, T = meta.chunk_words, meta.stages
    w = jax.lax.dynamic_slice_in_dim(words, chunk * kw, kw, axis=2)
    slots = jnp.arange(CODES_PER_WORD, dtype=jnp.uint32)
    tops = decode.code_to_top(w[..., None], slots).reshape(*w.shape[:2], kw * CODES_PER_WORD)
    hc = chunk_scales(h, meta, chunk * kw * CODES_PER_WORD, kw * CODES_PER_WORD)
    blocks = decode.block_values(
        [tops[t] for t in range(T)], [tops[T + t] for t in range(T)], hc, np.dtype(meta.scale_dtype), rounding
    )
    return tuple(b.astype(dtype) for b in blocks)


def layer_matmul(x: Array, words: Array, h: Array, meta: LayerMeta) -> Array:
    """``x [B, 2m] -> [B, 2n]`` for one prepared layer (module docstring), float32 accumulation, x's dtype."""
    m = x.shape[1] // 2
    kw, nc = meta.chunk_words, meta.num_chunks
    dtype = compute_dtype(x.dtype, meta.scale_dtype)
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    size = kw * CODES_PER_WORD
    xa, xb = (pad_axis(half.astype(dtype), 1, nc * size) for half in (x[:, :m], x[:, m:]))  # [B, Mp] each

    def dot(xs, w):  # [B, C] x [n, C]^T -> [B, n], four plain 2-D dots (a 4-D contraction is 5x slower on CPU)
        return jax.lax.dot_general(xs, w, (((1,), (1,)), ((), ())), precision=precision,
                                   preferred_element_type=jnp.float32)

    def contract(chunk):
        a11, a12, a21, a22 = chunk_blocks(words, h, meta, chunk, dtype)
        xa_c, xb_c = (jax.lax.dynamic_slice_in_dim(v, chunk * size, size, axis=1) for v in (xa, xb))
        return dot(xa_c, a11) + dot(xb_c, a12), dot(xa_c, a21) + dot(xb_c, a22)

    if nc == 1:
        y1, y2 = contract(0)
    else:
        y1, y2 = jax.lax.fori_loop(1, nc, lambda c, acc: jax.tree_util.tree_map(jnp.add, acc, contract(c)), contract(0))
    return jnp.concatenate([y1, y2], axis=-1).astype(x.dtype)


def prepare_layer(packed: PackedWidelyLinear, chunk_positions: int) -> tuple[dict, LayerMeta]:
    """Planes ``[2T, n, nc kw]`` (canonical bit order, zero words appended) and halved scales of one layer."""
    kw, nc = chunking(packed.n, packed.m, chunk_positions)
    words = pad_axis(code_planes(packed), 2, kw * nc)
    meta = LayerMeta(
        n=packed.n,
        stages=packed.stages,
        granularity=packed.granularity,
        group_size=packed.group_size,
        scale_dtype=str(np.dtype(packed.u_scales[0].dtype)),
        chunk_words=kw,
        num_chunks=nc,
    )
    return {"words": words, "h": half_scales(packed)}, meta


@dataclasses.dataclass(frozen=True)
class Xla(Implementation):
    """Registry entry: runs on every backend and serves every case; ``chunk_positions`` bounds ``n C``."""

    name: str = "xla"
    chunk_positions: int = 1 << 19

    def available(self) -> bool:
        return True

    def prepare(self, layers: tuple[PackedWidelyLinear, ...]) -> Prepared:
        arrays, metas = zip(*(prepare_layer(p, self.chunk_positions) for p in layers))
        return Prepared(tuple(arrays), self, tuple(p.n for p in layers), layers[0].m, tuple(metas))

    def __call__(self, x: Array, prepared: Prepared) -> list[Array]:
        return [layer_matmul(x, a["words"], a["h"], meta) for a, meta in zip(prepared.arrays, prepared.meta)]
