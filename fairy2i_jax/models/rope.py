"""Rotary position embeddings as transformers computes them (HF rotate-half layout; nothing folded into weights).

Inverse frequencies for ``head_dim = d`` and ``j = 0, 2, ..., d - 2``:

* default: ``inv_freq_j = 1 / theta^(j / d)``
* linear: ``inv_freq_j / factor``
* llama3 (Llama 3.1): with ``wavelen = 2 pi / inv_freq``, ``lo = L / low_freq_factor``, ``hi = L / high_freq_factor``
  (``L = original_max_position_embeddings``): ``wavelen < hi`` -> unchanged; ``wavelen > lo`` -> ``/ factor``;
  otherwise ``(1 - s) inv_freq / factor + s inv_freq`` with ``s = (L / wavelen - low_freq_factor) /
  (high_freq_factor - low_freq_factor)``.
* dynamic (NTK): with ``S = max(max position + 1, max_position_embeddings)`` over the batch, the base becomes
  ``theta * (factor S / max_position_embeddings - (factor - 1))^(d / (d - 2))`` (equals default while
  ``S <= max_position_embeddings``). transformers caches the grown frequencies across calls; here they are a pure
  function of the positions of the current call.

Angles ``emb = concat(p * inv_freq, p * inv_freq)`` (float32), ``cos = cos(emb)``, ``sin = sin(emb)``, and
``rope(x) = x * cos + rotate_half(x) * sin`` with ``rotate_half([x1, x2]) = [-x2, x1]`` (halves of the last dim).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from fairy2i_jax.models.config import ModelConfig, RopeScaling


def default_inv_freq(theta: float, head_dim: int) -> np.ndarray:
    """``1 / theta^(j / d)`` for ``j = 0, 2, ..., d - 2`` as float32 (exponent formed in float32 like torch)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (1.0 / (float(theta) ** exponent.astype(np.float64))).astype(np.float32)


def llama3_inv_freq(inv_freq: np.ndarray, scaling: RopeScaling) -> np.ndarray:
    """Llama 3.1 wavelength-dependent scaling of ``inv_freq`` (formula in the module docstring), in float32."""
    inv_freq = inv_freq.astype(np.float32)
    factor = np.float32(scaling.factor)
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    context = scaling.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = context / low, context / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((context / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def static_inv_freq(config: ModelConfig) -> np.ndarray:
    """The position-independent inverse frequencies of ``config`` (default / linear / llama3; dynamic's base)."""
    inv_freq = default_inv_freq(config.rope_theta, config.head_dim)
    scaling = config.rope_scaling
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    if scaling.rope_type == "llama3":
        return llama3_inv_freq(inv_freq, scaling)
    return inv_freq


def dynamic_inv_freq(config: ModelConfig, positions: jnp.ndarray) -> jnp.ndarray:
    """Dynamic-NTK inverse frequencies for the longest sequence in ``positions`` (module docstring), float32."""
    d = config.head_dim
    seq_len = jnp.maximum(jnp.max(positions) + 1, config.max_position_embeddings).astype(jnp.float32)
    factor = config.rope_scaling.factor
    base = config.rope_theta * (factor * seq_len / config.max_position_embeddings - (factor - 1)) ** (d / (d - 2))
    exponent = jnp.arange(0, d, 2, dtype=jnp.float32) / d
    return 1.0 / (base ** exponent)


def rope_cos_sin(config: ModelConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``cos, sin`` of shape ``[..., head_dim]`` (float32) for integer ``positions [...]``."""
    if config.rope_scaling.rope_type == "dynamic":
        inv_freq = dynamic_inv_freq(config, positions)
    else:
        inv_freq = jnp.asarray(static_inv_freq(config))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
    """``[x1, x2] -> [-x2, x1]`` over the two halves of the last dim."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """``x * cos + rotate_half(x) * sin`` for ``x [B, T, heads, head_dim]`` and ``cos, sin [B, T, head_dim]``.

    cos / sin are cast to ``x.dtype`` first, as transformers does.
    """
    cos = cos[..., None, :].astype(x.dtype)
    sin = sin[..., None, :].astype(x.dtype)
    return x * cos + rotate_half(x) * sin
