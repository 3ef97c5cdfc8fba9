"""Test oracle: the official Fairy2i PyTorch quantizer arithmetic, written from the reference (sections B, C, K).

It follows the official code path: ``torch.angle`` on ``w_real + 1j * w_imag`` (complex64 for bf16 input), sector
masks with float32 thresholds, boolean-indexed means on the bf16 tensor, ``clamp(min=1e-6)``, scaled outputs in
the weight dtype, the residual recursion in that dtype, and the bf16 decomposition / recomposition of
``QATLinearComplexPhaseV*``. Used only by the tests, never by the package.
"""

import math

import torch


def official_phase(w_real: torch.Tensor, w_imag: torch.Tensor) -> torch.Tensor:
    """``torch.angle`` of the complex weight, as the official code computes it on CUDA.

    On CUDA (where the official models were trained) ``angle(a + ia)`` is exactly float32(pi/4), so Q1 ties go
    to +i (reference B.1, verified on H100). Torch's vectorized AVX-512 CPU atan2 returns one ulp less (measured
    here with torch 2.13), which would send Q1 ties to +1: the oracle therefore takes the angle in float64,
    where ties land exactly on the sector bounds as on CUDA, and non-tie bf16 pairs are at least ~1e-3 rad away
    from a bound, so no other entry can change sector.
    """
    return torch.angle(w_real.double() + 1j * w_imag.double())


def official_phase_quant(w_real: torch.Tensor, w_imag: torch.Tensor):
    phase = official_phase(w_real, w_imag)
    real_pos = (phase >= -math.pi / 4) & (phase < math.pi / 4)
    real_neg = (phase >= 3 * math.pi / 4) | (phase < -3 * math.pi / 4)
    imag_pos = (phase >= math.pi / 4) & (phase < 3 * math.pi / 4)
    imag_neg = (phase >= -3 * math.pi / 4) & (phase < -math.pi / 4)
    real_mask = real_pos | real_neg
    imag_mask = imag_pos | imag_neg
    real_scale = w_real[real_mask].abs().mean() if real_mask.any() else torch.tensor(0.0)
    imag_scale = w_imag[imag_mask].abs().mean() if imag_mask.any() else torch.tensor(0.0)
    real_scale = real_scale.clamp(min=1e-6)
    imag_scale = imag_scale.clamp(min=1e-6)
    qr = torch.zeros_like(w_real)
    qi = torch.zeros_like(w_imag)
    qr[real_pos] = real_scale.to(qr.dtype)
    qr[real_neg] = -real_scale.to(qr.dtype)
    qi[imag_pos] = imag_scale.to(qi.dtype)
    qi[imag_neg] = -imag_scale.to(qi.dtype)
    return qr, qi


def official_codes(w_real: torch.Tensor, w_imag: torch.Tensor):
    """Codes 0..3 (+1, +i, -1, -i) from the official sector masks."""
    phase = official_phase(w_real, w_imag)
    code = torch.zeros(phase.shape, dtype=torch.uint8)
    code[(phase >= math.pi / 4) & (phase < 3 * math.pi / 4)] = 1
    code[(phase >= 3 * math.pi / 4) | (phase < -3 * math.pi / 4)] = 2
    code[(phase >= -3 * math.pi / 4) & (phase < -math.pi / 4)] = 3
    return code


def official_residual(w_real, w_imag, stages):
    qr, qi = official_phase_quant(w_real, w_imag)
    acc_r, acc_i = qr, qi
    r_r, r_i = w_real - qr, w_imag - qi
    for _ in range(stages - 1):
        qr, qi = official_phase_quant(r_r, r_i)
        acc_r, acc_i = acc_r + qr, acc_i + qi
        r_r, r_i = r_r - qr, r_i - qi
    return acc_r, acc_i


def official_fake_quant(A: torch.Tensor, stages: int = 2) -> torch.Tensor:
    """``QATLinearComplexPhaseV{stages}`` forward weight: decompose, quantize U and W, recompose (A's dtype)."""
    n, m = A.shape[0] // 2, A.shape[1] // 2
    A11, A12, A21, A22 = A[:n, :m], A[:n, m:], A[n:, :m], A[n:, m:]
    U_re = 0.5 * (A11 + A22)
    U_im = 0.5 * (A21 - A12)
    W_re = 0.5 * (A11 - A22)
    W_im = 0.5 * (A12 + A21)
    U_re_q, U_im_q = official_residual(U_re, U_im, stages)
    W_re_q, W_im_q = official_residual(W_re, W_im, stages)
    A11_q = W_re_q + U_re_q
    A12_q = W_im_q - U_im_q
    A21_q = W_im_q + U_im_q
    A22_q = U_re_q - W_re_q
    return torch.cat([torch.cat([A11_q, A12_q], dim=1), torch.cat([A21_q, A22_q], dim=1)], dim=0)


def official_bitnet(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().mean()
    alpha = w.mean()
    return torch.where(w - alpha > 0, scale, -scale).to(w.dtype)


def official_ternary(w: torch.Tensor) -> torch.Tensor:
    gamma = w.abs().mean()
    return (torch.clamp(torch.round(w / (gamma + 1e-5)), -1, 1) * gamma).to(w.dtype)
