"""One-time re-layouts of the canonical packed codes that the implementations' ``prepare`` build on.

Canonical (``fairy2i_jax.packing``): per matrix and stage a uint32 array ``[n, ceil(m/16)]``, code of position
``c`` at bits ``2 (c % 16)`` of word ``c // 16``; the tail word pads with code 0 (= +1).

* :func:`code_planes`: the 2T arrays stacked, ``plane = mat * T + t`` (U stages, then W stages).
* :func:`half_scales`: ``h = s / 2`` in float32, ``[2 (U, W), 2 (re, im), T, *scale dims]``.
* :func:`slot_major`: within each K-block of ``16 bw`` positions, word ``w`` of the block holds the positions
  ``i bw + w`` (``i`` = bit slot 0..15) instead of ``16 w + i``: slot ``i`` of a ``[rows, bw]`` word tile then
  decodes the *contiguous* positions ``[i bw, (i+1) bw)`` of the block, so a kernel pairs it with a contiguous
  slab of activations (no strided loads, no register reshapes). Same bytes as the canonical layout.
* :func:`stack_rows`: several layers sharing their input stacked along rows (fused projections), each padded
  to a multiple of ``row_multiple`` rows, with per-row halved scales (per-tensor scales broadcast to rows),
  so one kernel launch serves them all and each keeps its own scales; :func:`split_rows` cuts the fused
  output back into the layers' ``y``.
* :func:`activation_halves`: ``x [B, 2m]`` as ``[2, B, Mp]`` (``a``, ``b``), zero-padded (the padded codes
  are never trusted).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp

from fairy2i_jax.packing import CODES_PER_WORD, PackedWidelyLinear, pack_codes, unpack_codes

Array = Any


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints."""
    return -(-int(a) // int(b))


def round_up(a: int, b: int) -> int:
    """The smallest multiple of ``b`` that is ``>= a``."""
    return cdiv(a, b) * int(b)


def pad_axis(x: Array, axis: int, size: int, value: Any = 0) -> Array:
    """``x`` padded at the end of ``axis`` up to ``size`` entries with ``value`` (identity if already that size)."""
    extra = size - x.shape[axis]
    if extra < 0:
        raise ValueError(f"cannot pad axis {axis} of shape {tuple(x.shape)} down to {size}")
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def code_planes(packed: PackedWidelyLinear) -> Array:
    """uint32 ``[2T, n, ceil(m/16)]``: ``concat(u_words, w_words)``, plane ``mat * T + t``."""
    return jnp.concatenate([packed.u_words, packed.w_words], axis=0)


def half_scales(packed: PackedWidelyLinear) -> Array:
    """float32 ``[2, 2, T, *scale dims]``: ``h[mat, part, t] = s_part,t(mat) / 2`` (exact halving)."""
    h = [[jnp.asarray(s, jnp.float32) * 0.5 for s in scales] for scales in (packed.u_scales, packed.w_scales)]
    return jnp.stack([jnp.stack(pair) for pair in h])


def slot_major(words: Array, block_words: int) -> Array:
    """Canonical words ``[..., W]`` (``W`` a multiple of ``block_words = bw``) -> slot-major words, same shape.

    Output word ``kb bw + w``, bit slot ``i`` holds the code of position ``kb 16 bw + i bw + w``:
    ``out = pack(transpose(unpack(words).reshape(..., KB, 16, bw), (..., KB, bw, 16)))``.
    """
    n_words = words.shape[-1]
    if n_words % block_words:
        raise ValueError(f"slot_major needs a word count multiple of {block_words}, got shape {tuple(words.shape)}")
    lead = words.shape[:-1]
    codes = unpack_codes(words, n_words * CODES_PER_WORD)
    codes = codes.reshape(*lead, n_words // block_words, CODES_PER_WORD, block_words)
    codes = jnp.swapaxes(codes, -1, -2).reshape(*lead, n_words * CODES_PER_WORD)
    return pack_codes(codes)


def row_scales(packed: PackedWidelyLinear) -> Array:
    """float32 ``[2, 2, T, n]`` halved scales per output row (per-tensor scales broadcast to the n rows).

    Group scales vary along the contraction axis and have no per-row form: ``NotImplementedError``.
    """
    h = half_scales(packed)
    if packed.granularity == "tensor":
        return jnp.broadcast_to(h[..., None], (*h.shape, packed.n))
    if packed.granularity == "row":
        return h
    raise NotImplementedError(
        f"per-row scale tables serve tensor and row scales, not {packed.granularity} scales "
        f"(group_size={packed.group_size})"
    )


def stack_rows(layers: Sequence[PackedWidelyLinear], row_multiple: int, block_words: int):
    """Fuse layers sharing ``m`` along rows: ``(words, h, offsets, rows_padded)``.

    words: uint32 ``[2T, R, Wp]`` slot-major (:func:`slot_major`) with ``Wp = round_up(ceil(m/16), bw)``
    (extra words hold code 0, paired with zero activations); h: float32 ``[2, 2, T, R]`` per-row halved
    scales; layer ``l`` owns rows ``[offsets[l], offsets[l] + n_l)`` of a ``round_up(n_l, row_multiple)`` slot
    (padding rows have zero scales, so they decode to zero). All layers must have the same T.
    """
    stages = {p.stages for p in layers}
    if len(stages) != 1:
        raise NotImplementedError(f"fused layers need one stage count T, got {sorted(stages)}")
    n_words = round_up(cdiv(layers[0].m, CODES_PER_WORD), block_words)
    words, scales, offsets, row = [], [], [], 0
    for p in layers:
        rows = round_up(p.n, row_multiple)
        w = pad_axis(pad_axis(code_planes(p), 2, n_words), 1, rows)
        words.append(w)
        scales.append(pad_axis(row_scales(p), 3, rows))
        offsets.append(row)
        row += rows
    words = jnp.concatenate(words, axis=1) if len(words) > 1 else words[0]
    h = jnp.concatenate(scales, axis=3) if len(scales) > 1 else scales[0]
    return slot_major(words, block_words), h, tuple(offsets), row


def split_rows(y1: Array, y2: Array, ns: Sequence[int], offsets: Sequence[int]) -> list[Array]:
    """Per layer ``[B, 2 n_l] = concat(y1[:, rows_l], y2[:, rows_l])`` from the fused ``y1, y2 [B, R]``."""
    return [
        jnp.concatenate([y1[:, o : o + n], y2[:, o : o + n]], axis=-1) for n, o in zip(ns, offsets)
    ]


def activation_halves(x: Array, m: int, padded: int, batch: int, dtype: Any) -> Array:
    """``x [B, 2m]`` -> ``[2, batch, padded]`` in ``dtype``: the halves ``a = x[:, :m]``, ``b = x[:, m:]``,
    zero-padded to ``padded`` positions (the padded codes are never trusted) and ``batch`` rows."""
    halves = x.reshape(x.shape[0], 2, m).astype(dtype)
    halves = pad_axis(pad_axis(halves, 2, padded), 0, batch)
    return jnp.transpose(halves, (1, 0, 2))

