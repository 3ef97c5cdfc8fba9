"""Bit packing of Fairy2i phase codes: 16 two-bit codes per ``uint32`` word along the contraction axis.

Codes. A phase code ``k`` in 0..3 stands for ``i^k``: 0 = +1, 1 = +i, 2 = -1, 3 = -i
(:func:`fairy2i_jax.quant.residual_phase_encode` gives them as uint8 ``[T, ..., n, m]``).

Bit order. The last axis (``m``, the complex input dim = the contraction axis of ``y = U z + W conj(z)``) is cut
into words of 16 codes; code ``j`` of word ``w`` sits at bits ``[2j, 2j+1]``, lowest bits first::

    word[..., w] = sum_{j=0..15} code[..., 16 w + j] << 2j          (packed shape [..., ceil(m/16)], uint32)
    code[..., c] = (word[..., c // 16] >> 2 (c % 16)) & 3

e.g. codes ``[1, 2, 3, 0, 0, ...]`` -> ``1 | 2 << 2 | 3 << 4 = 0b11_10_01 = 57``.

Padding. When ``m`` is not a multiple of 16 the tail word is filled with code 0 (= +1, not zero!), so the true
``m`` must be passed to :func:`unpack_codes`, and a kernel that reads whole words must multiply the padded
positions by zero activations (pad the activations with zeros up to ``16 * ceil(m/16)``), never rely on the
code value there.

Why this layout.

* Per plane, per stage: each (matrix, stage) is its own ``[n, ceil(m/16)]`` word array, so any number of
  residual stages T packs the same way (W1, W2, W3 ...) and the scales stay outside the codes.
* Along the contraction axis: a K-block of ``16 k`` codes is exactly ``k`` consecutive words, so a kernel's
  K-block of words maps to the same K-block of activations with no cross-block bookkeeping.
* ``uint32`` with lowest bits first is what ``pltpu.unpack_elementwise`` expects on TPU (Mosaic shifts only
  32-bit vectors); a TPU block should keep its packed minor dim a multiple of 128 words = 2048 codes.
  GPU kernels unpack with shift/mask (``(w >> 2j) & 3``) or a byte-wise lookup table (byte = 4 codes).
* Per-tensor scales: a stage's value set is only ``{+-s_re, +-i s_im}``, so the 4 codes of one complex
  position for W2 (U and W, 2 stages: the same bit pair of 4 word arrays) form a byte that indexes a
  256-entry per-layer table of the 4 real weights at that position (the table trick of the performance
  reference), exact at 2 bits per real parameter; and a byte of one word (4 consecutive codes of one plane)
  can index a per-token table of partial sums over 4 activations (LUT kernels), the scale applied once per
  output. Row/group scales pack the same codes but the per-layer table no longer exists.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fairy2i_jax import quant
from fairy2i_jax.widely_linear import check_even_shape, decompose_planes, recompose_planes

Array = Any

BITS_PER_CODE = 2
CODES_PER_WORD = 16  # 32 bits / 2 bits
_CODE_MASK = 3


def _xp(x: Array):
    return np if isinstance(x, np.ndarray) else jnp


def num_words(m: int) -> int:
    """Words per row for ``m`` codes: ``ceil(m / 16)``."""
    return -(-int(m) // CODES_PER_WORD)


def _check_codes(codes: Array) -> None:
    """Integer dtype always; values in 0..3 when they are concrete (numpy or a non-traced JAX array)."""
    dtype = np.dtype(codes.dtype)
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"phase codes must be an integer array with values 0..3 (uint8), got dtype {dtype}")
    if codes.ndim < 1:
        raise ValueError(f"phase codes need at least one axis [..., m], got shape {tuple(codes.shape)}")
    if isinstance(codes, jax.core.Tracer) or codes.size == 0:
        return  # traced values cannot be checked; pack_codes masks them with & 3 so no code spills over
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi > _CODE_MASK:
        raise ValueError(f"phase codes must lie in 0..3 (value i^k), got values in [{lo}, {hi}]")


def pack_codes(codes: Array) -> Array:
    """uint8 codes ``[..., m]`` -> uint32 words ``[..., ceil(m/16)]``, ``word = sum_j code[16w + j] << 2j``.

    numpy in -> numpy out; JAX in -> JAX out (jit-able). The tail of the last word is padded with code 0.
    Raises ``ValueError`` for a non-integer dtype or (concrete input) a value outside 0..3.
    """
    _check_codes(codes)
    xp = _xp(codes)
    m = codes.shape[-1]
    words = num_words(m)
    c = codes.astype(xp.uint32) & xp.uint32(_CODE_MASK)
    pad = words * CODES_PER_WORD - m
    if pad:
        c = xp.pad(c, [(0, 0)] * (c.ndim - 1) + [(0, pad)])
    c = c.reshape(*c.shape[:-1], words, CODES_PER_WORD)
    shifts = xp.arange(CODES_PER_WORD, dtype=xp.uint32) * xp.uint32(BITS_PER_CODE)
    return xp.sum(c << shifts, axis=-1, dtype=xp.uint32)  # disjoint bit fields: sum == bitwise or


def unpack_codes(words: Array, m: int) -> Array:
    """uint32 words ``[..., ceil(m/16)]`` -> uint8 codes ``[..., m]``, ``code[c] = (word[c//16] >> 2(c%16)) & 3``.

    The exact inverse of :func:`pack_codes`; ``m`` is the true (unpadded) length. numpy or JAX (jit-able).
    """
    dtype = np.dtype(words.dtype)
    if dtype != np.uint32:
        raise ValueError(f"packed words must be uint32, got dtype {dtype}")
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 0:
        raise ValueError(f"m (codes per row) must be a non-negative integer, got {m!r}")
    if words.ndim < 1 or words.shape[-1] != num_words(m):
        raise ValueError(
            f"packed words of shape {tuple(words.shape)} do not hold m={m} codes per row: "
            f"expected a last dim of ceil(m/16) = {num_words(m)}"
        )
    xp = _xp(words)
    shifts = xp.arange(CODES_PER_WORD, dtype=xp.uint32) * xp.uint32(BITS_PER_CODE)
    codes = ((words[..., None] >> shifts) & xp.uint32(_CODE_MASK)).astype(xp.uint8)
    return codes.reshape(*words.shape[:-1], words.shape[-1] * CODES_PER_WORD)[..., :m]


@dataclasses.dataclass(frozen=True)
class PackedWidelyLinear:
    """One layer in packed form (a JAX pytree: the arrays are leaves, the ints and strings static).

    u_words, w_words: uint32 ``[T, ..., n, ceil(m/16)]`` (codes of U and W, stage-major);
    u_scales, w_scales: ``(s_re, s_im)``, each ``[T, ...]`` for per-tensor scales (``[T, ..., n]`` row,
    ``[T, ..., n, m // group_size]`` group), in the quantizer's working dtype;
    n, m: complex out / in dims (the real layer is ``[..., 2n, 2m]``); stages: T.
    """

    u_words: Array
    w_words: Array
    u_scales: tuple[Array, Array]
    w_scales: tuple[Array, Array]
    n: int
    m: int
    stages: int
    granularity: str = "tensor"
    group_size: int = 128


jax.tree_util.register_dataclass(
    PackedWidelyLinear,
    data_fields=["u_words", "w_words", "u_scales", "w_scales"],
    meta_fields=["n", "m", "stages", "granularity", "group_size"],
)


def _pack_planes(u_planes: tuple[Array, Array], w_planes: tuple[Array, Array], spec: quant.QuantSpec,
                 n: int, m: int) -> PackedWidelyLinear:
    """``residual_phase_encode`` the planes of U and of W (each ``(re, im)``) and pack their codes."""
    pu = quant.residual_phase_encode(*u_planes, spec)
    pw = quant.residual_phase_encode(*w_planes, spec)
    return PackedWidelyLinear(
        u_words=pack_codes(pu.codes),
        w_words=pack_codes(pw.codes),
        u_scales=(pu.s_re, pu.s_im),
        w_scales=(pw.s_re, pw.s_im),
        n=n,
        m=m,
        stages=spec.stages,
        granularity=spec.granularity,
        group_size=spec.group_size,
    )


def _check_phase_spec(spec: quant.QuantSpec, fn: str) -> None:
    if spec.method != "complex_phase":
        raise ValueError(f"{fn} needs method='complex_phase', got {spec.method!r}")


def pack_widely_linear(U: Array, W: Array, spec: quant.QuantSpec | None = None, **kw) -> PackedWidelyLinear:
    """Complex ``U, W [..., n, m]`` -> :class:`PackedWidelyLinear`: ``residual_phase_encode`` each, pack codes.

    ``spec`` (or ``QuantSpec(**kw)``) must use ``method="complex_phase"``; its numerics decide the scales' dtype.
    ``unpack_to_real`` of the result equals ``quantize_widely_linear(U, W, spec)`` bit for bit.
    """
    spec = spec or quant.QuantSpec(**kw)
    _check_phase_spec(spec, "pack_widely_linear")
    for name, x in (("U", U), ("W", W)):
        if not np.issubdtype(np.dtype(x.dtype), np.complexfloating) or x.ndim < 2:
            raise ValueError(f"{name} must be a complex array [..., n, m], got {np.dtype(x.dtype)} {tuple(x.shape)}")
    if U.shape != W.shape:
        raise ValueError(f"U and W must have the same shape, got {tuple(U.shape)} and {tuple(W.shape)}")
    xp = _xp(U)
    return _pack_planes((xp.real(U), xp.imag(U)), (xp.real(W), xp.imag(W)), spec, U.shape[-2], U.shape[-1])


def pack_real_weight(A: Array, spec: quant.QuantSpec) -> PackedWidelyLinear:
    """Codes and scales of ``quantize_real_weight(A, spec=spec)`` for a real ``A [..., 2n, 2m]``.

    The planes are formed as the quantizer forms them, ``decompose_planes(A.astype(work_dtype))`` (in bf16
    arithmetic for ``bf16_exact``), so ``unpack_to_real(pack_real_weight(A, spec))`` equals
    ``quantize_real_weight(A, spec=spec)`` bit for bit (in the working dtype).
    """
    _check_phase_spec(spec, "pack_real_weight")
    if not np.issubdtype(np.dtype(A.dtype), np.floating) or A.ndim < 2:
        raise ValueError(f"pack_real_weight needs a real matrix [..., out, in], got {np.dtype(A.dtype)} {tuple(A.shape)}")
    n, m = check_even_shape(A.shape, "weight")
    u_re, u_im, w_re, w_im = decompose_planes(A.astype(spec.work_dtype))
    return _pack_planes((u_re, u_im), (w_re, w_im), spec, n, m)


def unpack_to_real(packed: PackedWidelyLinear, dtype: Any = None) -> Array:
    """Dequantized real ``A_q [..., 2n, 2m]``: ``recompose(sum_t decode_t(U), sum_t decode_t(W))``.

    Decoding and recomposition run in the scales' dtype (bf16 for ``bf16_exact``), so the result equals
    ``quant.quantize_widely_linear(U, W, spec)`` bit for bit; cast to ``dtype`` afterwards if given.
    """
    planes = []
    for words, (s_re, s_im) in ((packed.u_words, packed.u_scales), (packed.w_words, packed.w_scales)):
        codes = quant.PhaseCodes(unpack_codes(words, packed.m), s_re, s_im)
        planes.extend(quant.decode_phase_codes(codes, packed.granularity, packed.group_size))
    A = recompose_planes(*planes)
    return A if dtype is None else A.astype(dtype)


def scale_group_shape(spec: quant.QuantSpec, n: int, m: int) -> tuple[int, ...]:
    """``G``, the scale shape per stage and plane: ``()`` tensor, ``(n,)`` row, ``(n, m // group_size)`` group."""
    if spec.granularity == "tensor":
        return ()
    if spec.granularity == "row":
        return (n,)
    return (n, m // spec.group_size)


def packed_shapes(out_features: int, in_features: int,
                  spec: quant.QuantSpec) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{suffix: (shape, dtype)}`` of the four arrays of one ``[out, in]`` layer (:func:`to_arrays`): codes
    ``[T, n, ceil(m/16)]`` uint32, scales ``[T, 2, *G]`` in the quantizer's working dtype."""
    n, m, t = out_features // 2, in_features // 2, spec.stages
    codes = ((t, n, num_words(m)), np.dtype(np.uint32))
    scales = ((t, 2, *scale_group_shape(spec, n, m)), np.dtype(spec.work_dtype))
    return {"u_codes": codes, "w_codes": codes, "u_scales": scales, "w_scales": scales}


PACKED_SUFFIXES = ("u_codes", "w_codes", "u_scales", "w_scales")  # the arrays of one layer (and its HF tensors)


def to_arrays(packed: PackedWidelyLinear) -> dict[str, Array]:
    """The four arrays of :data:`PACKED_SUFFIXES`: codes ``[..., T, n, ceil(m/16)]`` as they are, scales stacked
    ``(s_re, s_im)`` on the axis after the stage axis: ``[..., T, 2, *G]`` (the layout of :func:`packed_shapes`;
    numpy in -> numpy out, JAX in -> JAX out)."""
    xp = _xp(packed.u_words)
    stage_axis = packed.u_words.ndim - 3
    return {"u_codes": packed.u_words, "w_codes": packed.w_words,
            "u_scales": xp.stack(packed.u_scales, axis=stage_axis + 1),
            "w_scales": xp.stack(packed.w_scales, axis=stage_axis + 1)}


def from_arrays(arrays: dict[str, Array], n: int, m: int, spec: quant.QuantSpec) -> PackedWidelyLinear:
    """The inverse of :func:`to_arrays` for a layer of complex shape ``[n, m]`` quantized with ``spec`` (leading
    stack dims of the arrays are kept: a stack of layers)."""
    axis = arrays["u_codes"].ndim - 2  # the (re, im) axis sits right after the stage axis

    def split(s):
        return s.take(0, axis=axis), s.take(1, axis=axis)

    return PackedWidelyLinear(u_words=arrays["u_codes"], w_words=arrays["w_codes"], u_scales=split(arrays["u_scales"]),
                              w_scales=split(arrays["w_scales"]), n=n, m=m, stages=spec.stages,
                              granularity=spec.granularity, group_size=spec.group_size)


def packed_bits_per_weight(
    out_dim: int, in_dim: int, stages: int, scale_bytes: int = 2, scale_groups: int = 1
) -> float:
    """Storage bits per real weight of a packed ``[out, in]`` layer, scales included.

    ``(2 T n ceil(m/16) 32 + 2 T 2 G 8 scale_bytes) / (out in)`` with ``n, m = out/2, in/2``: U and W, T
    stages, 32-bit words; one ``(s_re, s_im)`` pair per matrix, stage and scale group (G = 1 per tensor,
    n per row, n m / group_size per group). ~T bits per weight for large layers.
    """
    n, m = check_even_shape((out_dim, in_dim), "layer")
    if stages < 1 or scale_bytes < 0 or scale_groups < 1:
        raise ValueError(
            f"need stages >= 1, scale_bytes >= 0, scale_groups >= 1; got {stages}, {scale_bytes}, {scale_groups}"
        )
    code_bits = 2 * stages * n * num_words(m) * 32
    scale_bits = 2 * stages * 2 * scale_groups * scale_bytes * 8
    return (code_bits + scale_bits) / (out_dim * in_dim)
