"""Weight quantizers: the Fairy2i phase quantizer with residual stages, the real baselines, and the STE.

Phase quantizer (one stage, reference B.1/B.2, K.1). For a complex tensor with planes ``(re, im)``:

* axis: imaginary if ``|im| > |re|`` or (``|im| == |re| != 0`` and ``re``, ``im`` have the same sign), else real
  (so (0, 0) is real). This atan2-free rule reproduces the official ``torch.angle`` sectors, ties included:
  (a, a) -> +i, (-a, a) -> -1, (-a, -a) -> -i, (a, -a) -> +1, (0, 0) -> +1.
* code ``k`` in 0..3 with value ``i^k``: real axis -> 0 (+1) if ``re >= 0`` else 2 (-1); imaginary axis -> 1 (+i)
  if ``im >= 0`` else 3 (-i). Bit 0 of the code selects the imaginary axis, bit 1 negates.
* scales: ``s_re = max(sum(|re| [real axis]) / max(#real axis, 1), 1e-6)``, ``s_im`` likewise over the
  imaginary-axis entries; the sums accumulate in float32 over the statistics group (per tensor = the last two
  dims; leading dims are independent tensors), the mean is rounded to the working dtype.
* value: ``q = s_re * (+-1)`` or ``i * s_im * (+-1)``: the real part of an entry sent to +-i is dropped, and
  vice versa.

Residual stages (C.1, K.2): ``q_1 = Q(w), r_1 = w - q_1, q_2 = Q(r_1), ..., w_q = q_1 + ... + q_T``, with fresh
scales per stage; ``T = 2`` is Fairy2i-W2.

Numerics. ``numerics="bf16_exact"`` (the default) casts the input to bfloat16 and does every elementwise step
in bfloat16 arithmetic (means accumulated in float32 and rounded to bfloat16), which reproduces the official
PyTorch code bit for bit (reference K, L); it is the default because faithfulness is this project's first
rule and because the official models were trained and evaluated that way (it is also the cheaper mode on
accelerators). ``numerics="fp32"`` does everything in float32 (slightly different scales, a few flipped
stage-2 codes: reference L).

STE. :func:`quantize_real_weight` and :func:`quantize_widely_linear` are ``jax.custom_vjp`` functions whose
backward pass returns the cotangent unchanged (official semantics: ``dL/dA = dL/dA_q``); scales get no gradient.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fairy2i_jax.widely_linear import check_even_shape, decompose_planes, recompose_planes

Array = Any

Method = Literal["complex_phase", "binary", "ternary", "none"]
Numerics = Literal["bf16_exact", "fp32"]
Granularity = Literal["tensor", "row", "group"]
METHODS: tuple[str, ...] = typing.get_args(Method)
NUMERICS: tuple[str, ...] = typing.get_args(Numerics)
GRANULARITIES: tuple[str, ...] = typing.get_args(Granularity)
SCALE_MIN = 1e-6  # official clamp of every scale (reference B.2)
TERNARY_EPS = 1e-5  # BitNet b1.58 absmean denominator epsilon
CODE_POS_REAL, CODE_POS_IMAG, CODE_NEG_REAL, CODE_NEG_IMAG = 0, 1, 2, 3  # code k stands for i^k
_DEFAULT_STAGES = {"complex_phase": 2, "binary": 1, "ternary": 1, "none": 1}


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How to quantize one weight.

    method: ``complex_phase`` (Fairy2i), ``binary`` (official ``bitnet``: ``mean|w| * sign(w - mean w)``),
        ``ternary`` (BitNet b1.58 absmean), ``none`` (identity).
    stages: residual stages T >= 1 (W1 = 1, W2 = 2, ...); ``None`` = the method's default (2 for complex_phase,
        1 for the real baselines, where more stages is a residual extension not in the official code).
    numerics: ``bf16_exact`` (default, official arithmetic) or ``fp32``.
    granularity: ``tensor`` (official, one scale pair per tensor and stage), ``row`` (one per output row of U/W
        or of the real matrix) or ``group`` (per ``group_size`` consecutive input entries of a row).
    """

    method: str = "complex_phase"
    stages: int | None = None
    numerics: str = "bf16_exact"
    granularity: str = "tensor"
    group_size: int = 128

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method {self.method!r}; expected one of {METHODS}")
        if self.stages is None:
            object.__setattr__(self, "stages", _DEFAULT_STAGES[self.method])
        if isinstance(self.stages, bool) or not isinstance(self.stages, (int, np.integer)) or self.stages < 1:
            raise ValueError(f"stages must be an integer >= 1, got {self.stages!r}")
        object.__setattr__(self, "stages", int(self.stages))
        if self.numerics not in NUMERICS:
            raise ValueError(f"unknown numerics {self.numerics!r}; expected one of {NUMERICS}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown scale granularity {self.granularity!r}; expected one of {GRANULARITIES}")
        if self.granularity == "group" and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")

    @property
    def work_dtype(self) -> np.dtype:
        """The arithmetic dtype: bfloat16 for ``bf16_exact``, float32 for ``fp32``."""
        return np.dtype(jnp.bfloat16) if self.numerics == "bf16_exact" else np.dtype(jnp.float32)


class PhaseCodes(NamedTuple):
    """Residual phase codes of one complex tensor ``[..., n, m]`` with T stages.

    codes: uint8 ``[T, ..., n, m]`` in 0..3 (value ``i^k``); s_re, s_im: ``[T, ...]`` (tensor),
    ``[T, ..., n]`` (row) or ``[T, ..., n, m // group_size]`` (group), in the working dtype.
    """

    codes: Array
    s_re: Array
    s_im: Array


# ----------------------------------------------------------------------------------------------------------
# statistics groups


def _stat_axes(granularity: str) -> tuple[int, ...]:
    return (-2, -1) if granularity == "tensor" else (-1,)


def _group_view(x: Array, granularity: str, group_size: int) -> Array:
    """``[..., n, m]`` -> ``[..., n, m // g, g]`` for group scales (statistics over the last axis), else ``x``."""
    if granularity != "group":
        return x
    m = x.shape[-1]
    if m % group_size:
        raise ValueError(f"group scales need the input dim {m} to be a multiple of group_size={group_size}")
    return x.reshape(*x.shape[:-1], m // group_size, group_size)


def _masked_mean(values: Array, mask: Array, axes: tuple[int, ...], dtype: np.dtype) -> Array:
    """``sum(values * mask) / max(sum(mask), 1)`` over ``axes``, accumulated in float32, rounded to ``dtype``.

    For a float32 result (``fp32`` numerics) one correction pass ``mean += sum((values - mean) * mask) / count``
    removes the float32 accumulation error (tens of ulps for some shapes on CPU), so the mean of equal values is
    that value exactly and a quantized tensor re-quantizes to itself. bf16 results keep the single pass of the
    official arithmetic (there the float32 error is far below one bf16 ulp).
    """
    v = values.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(mask, axis=axes, dtype=jnp.float32), 1.0)
    mean = jnp.sum(jnp.where(mask, v, 0.0), axis=axes, dtype=jnp.float32) / count
    if np.dtype(dtype) == np.float32:
        dev = jnp.where(mask, v - jnp.expand_dims(mean, axes), 0.0)
        mean = mean + jnp.sum(dev, axis=axes, dtype=jnp.float32) / count
    return mean.astype(dtype)


def _clamp_scale(s: Array) -> Array:
    """``max(s, 1e-6)`` in the dtype of ``s`` (the official ``clamp(min=1e-6)``)."""
    return jnp.maximum(s, jnp.asarray(SCALE_MIN, s.dtype))


def _expand_scale(s: Array, granularity: str, group_size: int) -> Array:
    """Broadcast a stored scale (shapes of :class:`PhaseCodes`) against ``[..., n, m]``."""
    if granularity == "tensor":
        return s[..., None, None]
    if granularity == "row":
        return s[..., None]
    return jnp.repeat(s, group_size, axis=-1)


# ----------------------------------------------------------------------------------------------------------
# phase quantizer


def phase_axis_is_imag(re: Array, im: Array) -> Array:
    """The official axis rule: ``|im| > |re|`` or ``(|im| == |re| != 0 and sign(re) == sign(im))``."""
    a_re, a_im = jnp.abs(re), jnp.abs(im)
    same_sign = (re >= 0) == (im >= 0)
    return (a_im > a_re) | ((a_im == a_re) & (a_re != 0) & same_sign)


def phase_code(re: Array, im: Array) -> Array:
    """Code ``k`` (uint8, value ``i^k``) of each entry: 0 = +1, 1 = +i, 2 = -1, 3 = -i (official tie rule)."""
    to_im = phase_axis_is_imag(re, im)
    real_code = jnp.where(re >= 0, CODE_POS_REAL, CODE_NEG_REAL)
    imag_code = jnp.where(im >= 0, CODE_POS_IMAG, CODE_NEG_IMAG)
    return jnp.where(to_im, imag_code, real_code).astype(jnp.uint8)


def phase_stage(re: Array, im: Array, granularity: str = "tensor", group_size: int = 128):
    """One phase-quantizer stage on planes in the working dtype -> ``(code, s_re, s_im)``.

    ``s_re = max(mean(|re| over real-axis entries), 1e-6)``, ``s_im = max(mean(|im| over imaginary-axis
    entries), 1e-6)`` per statistics group; scales have the shapes documented in :class:`PhaseCodes`.
    """
    code = phase_code(re, im)
    to_im = (code & 1).astype(bool)
    axes = _stat_axes(granularity)
    view = functools.partial(_group_view, granularity=granularity, group_size=group_size)
    s_re = _clamp_scale(_masked_mean(view(jnp.abs(re)), ~view(to_im), axes, re.dtype))
    s_im = _clamp_scale(_masked_mean(view(jnp.abs(im)), view(to_im), axes, im.dtype))
    return code, s_re, s_im


def phase_decode(code: Array, s_re: Array, s_im: Array, granularity: str = "tensor", group_size: int = 128):
    """Planes of one stage: ``re = +-s_re`` where code is 0 / 2, ``im = +-s_im`` where code is 1 / 3, else 0."""
    s_re = _expand_scale(s_re, granularity, group_size)
    s_im = _expand_scale(s_im, granularity, group_size)
    zero = jnp.zeros((), s_re.dtype)
    re = jnp.where(code == CODE_POS_REAL, s_re, jnp.where(code == CODE_NEG_REAL, -s_re, zero))
    im = jnp.where(code == CODE_POS_IMAG, s_im, jnp.where(code == CODE_NEG_IMAG, -s_im, zero))
    return re, im


def _phase_stages(re: Array, im: Array, spec: QuantSpec):
    """Run the T residual stages; yields ``(code, s_re, s_im, q_re, q_im)`` per stage (working dtype)."""
    r_re, r_im = re.astype(spec.work_dtype), im.astype(spec.work_dtype)
    for _ in range(spec.stages):
        code, s_re, s_im = phase_stage(r_re, r_im, spec.granularity, spec.group_size)
        q_re, q_im = phase_decode(code, s_re, s_im, spec.granularity, spec.group_size)
        yield code, s_re, s_im, q_re, q_im
        r_re, r_im = r_re - q_re, r_im - q_im


def residual_phase_quantize(re: Array, im: Array, spec: QuantSpec | None = None, **kw) -> tuple[Array, Array]:
    """Fake-quantized planes ``sum_t q_t`` (working dtype) of a complex tensor given as planes ``(re, im)``."""
    spec = spec or QuantSpec(**kw)
    acc_re = acc_im = None
    for _, _, _, q_re, q_im in _phase_stages(re, im, spec):
        acc_re = q_re if acc_re is None else acc_re + q_re
        acc_im = q_im if acc_im is None else acc_im + q_im
    return acc_re, acc_im


def residual_phase_encode(re: Array, im: Array, spec: QuantSpec | None = None, **kw) -> PhaseCodes:
    """Codes and scales of every stage (what the packed format stores); :func:`decode_phase_codes` inverts it."""
    spec = spec or QuantSpec(**kw)
    stages = list(_phase_stages(re, im, spec))
    return PhaseCodes(
        codes=jnp.stack([s[0] for s in stages]),
        s_re=jnp.stack([s[1] for s in stages]),
        s_im=jnp.stack([s[2] for s in stages]),
    )


def decode_phase_codes(pc: PhaseCodes, granularity: str = "tensor", group_size: int = 128) -> tuple[Array, Array]:
    """``sum_t decode(stage t)`` in the scales' dtype, summed in stage order (equals :func:`residual_phase_quantize`)."""
    acc_re = acc_im = None
    for t in range(pc.codes.shape[0]):
        q_re, q_im = phase_decode(pc.codes[t], pc.s_re[t], pc.s_im[t], granularity, group_size)
        acc_re = q_re if acc_re is None else acc_re + q_re
        acc_im = q_im if acc_im is None else acc_im + q_im
    return acc_re, acc_im


# ----------------------------------------------------------------------------------------------------------
# real baselines


def _mean(x: Array, granularity: str, group_size: int) -> Array:
    """Mean over the statistics group, accumulated in float32, rounded to ``x.dtype``, kept for broadcasting."""
    v = _group_view(x, granularity, group_size)
    mean = jnp.mean(v.astype(jnp.float32), axis=_stat_axes(granularity), keepdims=True).astype(x.dtype)
    return jnp.broadcast_to(mean, v.shape).reshape(x.shape)


def binary_stage(w: Array, granularity: str = "tensor", group_size: int = 128) -> Array:
    """Official ``bitnet`` (BitNet v1 binary): ``mean|w| * (+1 if w - mean(w) > 0 else -1)``."""
    scale = _mean(jnp.abs(w), granularity, group_size)
    alpha = _mean(w, granularity, group_size)
    return jnp.where(w - alpha > 0, scale, -scale)


def ternary_stage(w: Array, granularity: str = "tensor", group_size: int = 128) -> Array:
    """BitNet b1.58 absmean ternary: ``gamma = mean|w|``, ``clip(round(w / (gamma + 1e-5)), -1, 1) * gamma``."""
    gamma = _mean(jnp.abs(w), granularity, group_size)
    return jnp.clip(jnp.round(w / (gamma + jnp.asarray(TERNARY_EPS, w.dtype))), -1, 1) * gamma


def _residual_real(w: Array, stage_fn, stages: int, granularity: str, group_size: int) -> Array:
    """``q_1 = f(w), q_2 = f(w - q_1), ...``; returns ``sum_t q_t`` in ``w``'s dtype."""
    acc, r = None, w
    for _ in range(stages):
        q = stage_fn(r, granularity, group_size)
        acc = q if acc is None else acc + q
        r = r - q
    return acc


# ----------------------------------------------------------------------------------------------------------
# public fake-quantizers with the straight-through estimator


def _check_real_weight(A: Array, spec: QuantSpec) -> None:
    dtype = np.dtype(A.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"quantize_real_weight needs a real floating-point weight, got dtype {dtype}"
            + (" (use quantize_widely_linear for complex U, W)" if jnp.issubdtype(dtype, jnp.complexfloating) else "")
        )
    if A.ndim < 2:
        raise ValueError(f"quantize_real_weight needs a weight [..., out, in], got shape {tuple(A.shape)}")
    if spec.method == "complex_phase":
        check_even_shape(A.shape)
    if spec.granularity == "group" and A.shape[-1] % (2 * spec.group_size if spec.method == "complex_phase" else spec.group_size):
        raise ValueError(
            f"weight of shape {tuple(A.shape)}: the input dim must be a multiple of "
            f"{'2 * ' if spec.method == 'complex_phase' else ''}group_size={spec.group_size} for group scales"
        )


def _fake_quant_real(A: Array, spec: QuantSpec) -> Array:
    """The fake-quantized real matrix (no STE), computed in ``spec.work_dtype``, returned in ``A.dtype``."""
    if spec.method == "none":
        return A
    x = A.astype(spec.work_dtype)
    if spec.method == "complex_phase":
        u_re, u_im, w_re, w_im = decompose_planes(x)
        uq = residual_phase_quantize(u_re, u_im, spec)
        wq = residual_phase_quantize(w_re, w_im, spec)
        out = recompose_planes(*uq, *wq)
    else:
        stage_fn = binary_stage if spec.method == "binary" else ternary_stage
        out = _residual_real(x, stage_fn, spec.stages, spec.granularity, spec.group_size)
    return out.astype(A.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ste_real(A: Array, spec: QuantSpec) -> Array:
    return _fake_quant_real(A, spec)


def _ste_real_fwd(A, spec):
    return _fake_quant_real(A, spec), None


def _ste_real_bwd(spec, _, ct):
    return (ct,)


_ste_real.defvjp(_ste_real_fwd, _ste_real_bwd)


def quantize_real_weight(
    A: Array,
    method: str = "complex_phase",
    stages: int | None = None,
    *,
    numerics: str = "bf16_exact",
    granularity: str = "tensor",
    group_size: int = 128,
    spec: QuantSpec | None = None,
) -> Array:
    """Fake-quantized real weight ``A_q`` (same shape and dtype as ``A[..., out, in]``), with the STE.

    ``complex_phase``: ``A_q = from_widely_linear(Q_T(U), Q_T(W))`` with ``(U, W) = to_widely_linear(A)``, all in
    the working arithmetic of ``numerics``. ``binary`` / ``ternary``: the real baselines on ``A`` itself.
    ``none``: ``A``. Backward: ``dL/dA = dL/dA_q`` (straight through). Statistics are per tensor over the last
    two dims unless ``granularity`` says otherwise. Raises ``ValueError`` for a non-float dtype, odd dims
    (complex_phase), ``stages < 1`` or an unknown method.
    """
    spec = spec or QuantSpec(method, stages, numerics, granularity, group_size)
    _check_real_weight(A, spec)
    return _ste_real(jnp.asarray(A), spec)


def _fake_quant_planes(re: Array, im: Array, spec: QuantSpec) -> tuple[Array, Array]:
    q_re, q_im = residual_phase_quantize(re, im, spec)
    return q_re.astype(re.dtype), q_im.astype(im.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _ste_planes(re: Array, im: Array, spec: QuantSpec) -> tuple[Array, Array]:
    return _fake_quant_planes(re, im, spec)


def _ste_planes_fwd(re, im, spec):
    return _fake_quant_planes(re, im, spec), None


def _ste_planes_bwd(spec, _, cts):
    return cts


_ste_planes.defvjp(_ste_planes_fwd, _ste_planes_bwd)


def quantize_complex_planes(re: Array, im: Array, spec: QuantSpec) -> tuple[Array, Array]:
    """Phase fake quantization of one complex tensor given as real planes, with the STE (identity backward).

    Returns the planes of ``Q_T(re + i im)`` in the input dtype (the values are exact in the working dtype).
    """
    if spec.method != "complex_phase":
        raise ValueError(f"quantize_complex_planes needs method='complex_phase', got {spec.method!r}")
    return _ste_planes(re, im, spec)


def quantize_widely_linear(U: Array, W: Array, spec: QuantSpec | None = None, **kw) -> Array:
    """Real fake-quantized matrix ``A_q[..., 2n, 2m] = recompose(Q_T(U), Q_T(W))`` from complex masters, with the STE.

    ``U``, ``W``: complex ``[..., n, m]`` (complex64 masters). The recomposition runs in ``spec.work_dtype``
    (bf16 for ``bf16_exact``), so the result equals ``quantize_real_weight(from_widely_linear(U, W))`` when the
    masters came from a weight exactly representable in that dtype. ``method="none"`` recomposes unquantized.
    The gradient with respect to ``U`` and ``W`` is that of the recomposition (straight through the quantizer).
    """
    spec = spec or QuantSpec(**kw)
    if spec.method not in ("complex_phase", "none"):
        raise ValueError(f"quantize_widely_linear supports complex_phase or none, got {spec.method!r}")
    planes = [jnp.real(U), jnp.imag(U), jnp.real(W), jnp.imag(W)]
    if spec.method == "complex_phase":
        planes = [*quantize_complex_planes(planes[0], planes[1], spec), *quantize_complex_planes(planes[2], planes[3], spec)]
    return recompose_planes(*(p.astype(spec.work_dtype) for p in planes))
