"""Exact decode of packed codes to the real 2x2 blocks, in plain jnp ops that XLA, Pallas Triton and Mosaic lower.

What a packed layer is worth. ``unpack_to_real`` defines the value of a layer: per matrix ``M`` in ``{U, W}``
and stage ``t`` the code ``k`` decodes by selection to ``Re M_t = s_re,t Re(i^k)``, ``Im M_t = s_im,t Im(i^k)``
(exact), the stages are summed in order in the scales' dtype ``d``,

    Re M = rnd_d(... rnd_d(rnd_d(Re M_1 + Re M_2) + Re M_3) ...)         (likewise Im M)

and the blocks are recomposed in ``d`` (``recompose_planes``):

    A11 = rnd_d(Re W + Re U)   A12 = rnd_d(Im W - Im U)   A21 = rnd_d(Im W + Im U)   A22 = rnd_d(Re U - Re W)

so ``y[:n] = A11 a + A12 b`` and ``y[n:] = A21 a + A22 b`` for ``x = [a; b]``. With ``d = bfloat16`` (the default
``bf16_exact`` numerics) the roundings are real: for W2 about a quarter of the positions differ from the
unrounded ``sum_t s_t i^k`` and ``y`` moves by ~2e-3 of ``max|y|``. Factoring the scales out of the sums
(``y = s_re (sum_{k=0} a - sum_{k=2} a) + ...``, one multiply per output and stage) is therefore NOT the value of
the layer; every implementation here reproduces the roundings instead, position by position, which is exact:
``rnd_d`` of a float32 sum of two ``d`` values equals the correctly rounded ``d`` sum (the float32 sum is exact
unless the exponents differ by more than 15, and then both round to the larger operand), which is what a
bfloat16 add computes, unless a compiler keeps the sum in float32 as excess precision (``block_values``).

Decoding two values per code from bits alone (the sign-bit identity of the kernels reference, on float32):
move the code's bits ``(b1, b0)`` to bits 31/30 of a word (``top = word << (30 - 2 slot)``); then

    float32 bits of (top & 0xC0000000)            = 2 Im(i^k)  in {+0, +2, -0, -2}   for k = 0, 1, 2, 3
    float32 bits of ((top ^ 0x40000000) & 0xC0000000) = 2 Re(i^k)  in {+2, +0, -2, -0}

(bit 31 is the float sign, bit 30 the exponent's top bit: 0x40000000 is 2.0). With halved scales
``h = s / 2`` (exact), ``2 Re(i^k) * h_re`` is ``Re M_t`` exactly (a signed zero where the code sits on the
other axis; signed zeros do not change any sum or product with finite activations). Four 32-bit logic ops
per code (shift, and; xor, and), no compare or select.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = Any

SIGN_BITS = 0xC0000000  # bits 31/30: float sign and exponent MSB
REAL_FLIP = 0x40000000  # flips b0 (imaginary axis <-> real axis)
U, W = 0, 1  # matrix index of the halved-scale tables
RE, IM = 0, 1  # part index


def code_to_top(words: Array, slot: int | Array) -> Array:
    """``words << (30 - 2 slot)``: the code in bits ``[2 slot, 2 slot + 1]`` of each uint32 lands on bits 31/30.

    Bits below 30 are left as garbage; :func:`twice_phase` masks them. ``slot`` in 0..15 (static or uint32).
    """
    if isinstance(slot, (int, np.integer)):
        return words << np.uint32(30 - 2 * int(slot))  # a literal: what kernels want
    return words << (np.uint32(30) - np.uint32(2) * slot.astype(jnp.uint32))


def twice_phase(top: Array) -> tuple[Array, Array]:
    """``(2 Re(i^k), 2 Im(i^k))`` as float32 for codes sitting on bits 31/30 of ``top`` (uint32).

    ``2 Im = bits(top & 0xC0000000)``, ``2 Re = bits((top ^ 0x40000000) & 0xC0000000)``, values in {0, +-2}.
    """
    mask = np.uint32(SIGN_BITS)
    im2 = jax.lax.bitcast_convert_type(top & mask, jnp.float32)
    re2 = jax.lax.bitcast_convert_type((top ^ np.uint32(REAL_FLIP)) & mask, jnp.float32)
    return re2, im2


ROUNDINGS = ("native", "convert", "bits")


def round_to(v: Array, dtype: Any, bitwise: bool = False) -> Array:
    """``rnd_dtype(v)`` kept in float32 (identity for float32).

    ``bitwise=False``: ``v.astype(dtype).astype(float32)`` (two converts).
    ``bitwise=True`` (bfloat16 only): round to nearest even on the float32 bits,
    ``bits(v) + 0x7FFF + (bits(v) >> 16 & 1)`` with the low 16 bits cleared: integer ops that an XLA pass
    allowed to keep excess precision (``xla_allow_excess_precision``) cannot drop as a convert pair.
    Both agree on every finite float32.
    """
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return v
    if not bitwise or dtype != np.dtype(jnp.bfloat16):
        return v.astype(dtype).astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(v, jnp.uint32)
    bits = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def check_rounding(owner: str, rounding: str) -> None:
    """ValueError naming ``owner`` (e.g. ``PallasGpu.rounding``) unless ``rounding`` is one of :data:`ROUNDINGS`."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"{owner} must be one of {ROUNDINGS}, got {rounding!r}")


def work_dtype(dtype: Any, rounding: str) -> Any:
    """The arithmetic dtype: ``dtype`` itself for ``native`` rounding, float32 for ``convert`` / ``bits``."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; expected one of {ROUNDINGS}")
    return np.dtype(dtype) if rounding == "native" else np.dtype(jnp.float32)


def rounded(v: Array, dtype: Any, rounding: str) -> Array:
    """``rnd_dtype`` of a fresh sum ``v``: implicit in ``native`` arithmetic (the op rounds), else
    :func:`round_to` (``bits`` on the bits, ``convert`` by converts)."""
    return v if rounding == "native" else round_to(v, dtype, rounding == "bits")


def stage_sum(parts: Sequence[Array], dtype: Any, rounding: str = "convert") -> Array:
    """``rnd(... rnd(rnd(p_1 + p_2) + p_3) ...)`` in ``dtype``: the stage order of ``decode_phase_codes``."""
    acc = parts[0]
    for p in parts[1:]:
        acc = rounded(acc + p, dtype, rounding)
    return acc


def plane_values(tops: Sequence[Array], h_re: Sequence[Array], h_im: Sequence[Array], dtype: Any,
                 rounding: str = "convert"):
    """``(Re M, Im M)`` of one matrix from its T stages: ``Re M = stage_sum_t(2 Re(i^k_t) * h_re,t)``.

    ``tops[t]``: codes on bits 31/30 (uint32); ``h_re[t]``, ``h_im[t]``: halved scales ``s / 2`` (exact in
    ``dtype``; broadcastable: scalars for per-tensor scales, ``[rows, 1]`` for row scales). Products are
    exact; values are in :func:`work_dtype` and exact in ``dtype``.
    """
    work = work_dtype(dtype, rounding)
    re_parts, im_parts = [], []
    for top, hr, hi in zip(tops, h_re, h_im):
        re2, im2 = twice_phase(top)
        re_parts.append(re2.astype(work) * jnp.asarray(hr).astype(work))
        im_parts.append(im2.astype(work) * jnp.asarray(hi).astype(work))
    return stage_sum(re_parts, dtype, rounding), stage_sum(im_parts, dtype, rounding)


def blocks_from_planes(u_re: Array, u_im: Array, w_re: Array, w_im: Array, dtype: Any, rounding: str = "convert"):
    """``(A11, A12, A21, A22) = rnd(Re W + Re U), rnd(Im W - Im U), rnd(Im W + Im U), rnd(Re U - Re W)``."""
    return (
        rounded(w_re + u_re, dtype, rounding),
        rounded(w_im - u_im, dtype, rounding),
        rounded(w_im + u_im, dtype, rounding),
        rounded(u_re - w_re, dtype, rounding),
    )


def block_values(u_tops: Sequence[Array], w_tops: Sequence[Array], h: Any, dtype: Any, rounding: str = "convert"):
    """The exact 2x2 block ``(A11, A12, A21, A22)`` of each position, in :func:`work_dtype`.

    ``u_tops[t]``, ``w_tops[t]``: the codes of U and W at stage ``t`` on bits 31/30 (:func:`code_to_top`);
    ``h[mat][part][t]``: halved scales (``mat`` in U, W; ``part`` in RE, IM), broadcastable against the tops;
    ``dtype``: the scales' dtype, in which the format rounds. Equals the entries of ``unpack_to_real`` at those
    positions bit for bit in every ``rounding`` (module docstring):

    * ``convert``: float32 arithmetic and ``astype`` round trips (the Pallas kernels' default: Triton and
      Mosaic lower them to truncf/extf, which no pass folds);
    * ``bits``: float32 arithmetic and integer round-to-nearest-even (the xla implementation: XLA's
      excess-precision passes may drop convert pairs);
    * ``native``: the arithmetic itself in ``dtype`` (each bf16 op rounds; on Hopper one bf16 ALU op, or
      half of one as bf16x2). Exact only where the compiler keeps per-op bf16 rounding: Triton and Mosaic
      do, but XLA does not always (XLA CPU fused bf16 chains in float32 here, so Pallas interpret mode,
      which runs on XLA, cannot validate it); an option of the Pallas kernels to try on the device.
    """
    u_re, u_im = plane_values(u_tops, h[U][RE], h[U][IM], dtype, rounding)
    w_re, w_im = plane_values(w_tops, h[W][RE], h[W][IM], dtype, rounding)
    return blocks_from_planes(u_re, u_im, w_re, w_im, dtype, rounding)


def over_slots(body, carry, unroll: bool):
    """``carry = body(slot, carry)`` for the 16 bit slots of a word: unrolled in Python (static shifts and
    offsets, what the compiled kernels want) or as a ``fori_loop`` (a 16x smaller program, e.g. for
    interpret-mode tests, where compile time dominates)."""
    if unroll:
        for slot in range(16):
            carry = body(slot, carry)
        return carry
    return jax.lax.fori_loop(0, 16, body, carry)
