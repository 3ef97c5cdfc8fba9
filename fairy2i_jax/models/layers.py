"""Decoder building blocks in HF layout: RMSNorm, GQA attention with RoPE, SwiGLU MLP, and the decoder layer.

Every module takes ``stack``: a leading shape (``(num_layers,)`` when the layers are scanned) given to all its
params, whose logical names then start with ``"layers"``. Inside ``jax.lax.scan`` the modules are merged from
one slice of the stacked state, so their forward never sees the leading axis.

Activations are constrained to their logical axes (:func:`fairy2i_jax.sharding.constrain`, a no-op without a
mesh): the residual stream at every layer boundary (:data:`RESIDUAL`), q / k / v per head, the attention output
and the MLP's inner activations (heads and ffn over ``tensor``), the KV cache (``cache_len``).

Numerics follow transformers: RMSNorm statistics in float32 (``x * rsqrt(mean(x^2) + eps)``, cast back to the
activation dtype, then times the weight), attention scores ``(q k^T) * head_dim^-0.5`` accumulated in float32,
masked, softmax in float32, probabilities cast to the compute dtype before ``p v``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fairy2i_jax.kernels import packed_matmul_fused
from fairy2i_jax.models.config import REMAT_POLICIES, ModelConfig
from fairy2i_jax.models.linear import REAL, Linear, LinearSpec
from fairy2i_jax.models.rope import apply_rope
from fairy2i_jax.sharding import constrain

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
LAYER_LINEARS = tuple(f"self_attn.{n}" for n in ATTENTION_LINEARS) + tuple(f"mlp.{n}" for n in MLP_LINEARS)
# Linears that share their input and can run as one fused packed matmul (prepared by CausalLM.inference_weights).
FUSED_LINEARS = {"self_attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "mlp.gate_up": ("mlp.gate_proj", "mlp.up_proj")}


def _fused(weights: Mapping, name: str, x: jax.Array, linears: Sequence[Linear]) -> list[jax.Array] | None:
    """The outputs of ``linears`` (biases added) from the fused prepared operand ``weights[name]``, or None."""
    if name not in weights:
        return None
    outs = packed_matmul_fused(x.astype(linears[0].compute_dtype), weights[name])
    return [lin.add_bias(y.astype(lin.compute_dtype)) for lin, y in zip(linears, outs)]
MASK_VALUE = float(jnp.finfo(jnp.float32).min)  # like transformers: a fully masked row stays finite (uniform)
# Logical axes of activations (fairy2i_jax.sharding): the residual stream [B, T, hidden]; attention and MLP
# interiors keep the whole sequence (seq None), their heads / ffn dims go over tensor.
RESIDUAL = ("batch", "seq", "act_embed")
Q_HEADS = ("batch", None, "heads", "head_dim")
KV_HEADS = ("batch", None, "kv_heads", "head_dim")
KV_CACHE = ("batch", "cache_len", "kv_heads", "head_dim")
ATTN_OUT = ("batch", None, "heads")
MLP_HIDDEN = ("batch", None, "mlp")


def _lead(stack: tuple[int, ...]) -> tuple[str, ...]:
    return ("layers",) * len(stack)


class RMSNorm(nnx.Module):
    """``weight * (x * rsqrt(mean(x^2, -1) + eps))``, the statistics in float32."""

    def __init__(self, size: int, eps: float, *, stack=(), param_dtype=jnp.float32, axis_name="norm", rngs=None):
        self.eps = float(eps)
        self.weight = nnx.Param(
            jnp.ones((*stack, size), param_dtype), out_sharding=(*_lead(stack), axis_name), eager_sharding=False
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight.get_value().astype(x.dtype) * normed.astype(x.dtype)


def _linear(cfg: ModelConfig, plan: Mapping[str, LinearSpec], name: str, n_in: int, n_out: int, axes, bias, stack,
            rngs):
    return Linear(
        n_in,
        n_out,
        spec=plan.get(name, REAL),
        use_bias=bias,
        axes=axes,
        stack=stack,
        param_dtype=cfg.param_dtype,
        compute_dtype=cfg.compute_dtype,
        rngs=rngs,
    )


def attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """Grouped-query attention. ``q [B, T, H, D]``, ``k, v [B, S, Hkv, D]``, ``allowed`` bool ``[B, T, S]``.

    Query head ``h`` reads key/value head ``h // (H / Hkv)`` (transformers' ``repeat_kv``). Returns ``[B, T, H, D]``.
    """
    batch, t_len, heads, dim = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(batch, t_len, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * (dim**-0.5)
    scores = jnp.where(allowed[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)
    return out.reshape(batch, t_len, heads, dim)


class Attention(nnx.Module):
    """Self-attention: q/k/v projections (+ optional biases, optional q/k RMSNorm over head_dim), RoPE, GQA, o_proj."""

    def __init__(self, cfg: ModelConfig, plan: Mapping[str, LinearSpec], *, stack=(), rngs: nnx.Rngs):
        d, h, kv, hidden = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, d
        bias = cfg.attention_bias
        self.q_proj = _linear(cfg, plan, "self_attn.q_proj", hidden, h * d, ("heads", "embed"), bias, stack, rngs)
        self.k_proj = _linear(cfg, plan, "self_attn.k_proj", hidden, kv * d, ("kv_heads", "embed"), bias, stack, rngs)
        self.v_proj = _linear(cfg, plan, "self_attn.v_proj", hidden, kv * d, ("kv_heads", "embed"), bias, stack, rngs)
        self.o_proj = _linear(cfg, plan, "self_attn.o_proj", h * d, hidden, ("embed", "heads"), cfg.o_bias, stack, rngs)
        if cfg.qk_norm:
            kw = dict(stack=stack, param_dtype=cfg.param_dtype, axis_name="head_dim")
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, **kw)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, **kw)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, cos, sin, allowed, *, weights=None, kv_cache=None, cache_start=None):
        """``x [B, T, hidden]`` -> ``(out [B, T, hidden], (k, v))``.

        Without ``kv_cache`` the keys are this call's own ``(k, v) [B, T, Hkv, D]``; with ``kv_cache = (k_cache,
        v_cache) [B, S, Hkv, D]`` the new keys are written at slots ``cache_start ..`` and the query attends over
        all ``S`` slots (``allowed [B, T, S]``); the returned pair is the updated cache.
        """
        w = weights or {}
        batch, t_len, _ = x.shape
        q, k, v = _fused(w, "self_attn.qkv", x, (self.q_proj, self.k_proj, self.v_proj)) or (
            self.q_proj(x, w.get("self_attn.q_proj")), self.k_proj(x, w.get("self_attn.k_proj")),
            self.v_proj(x, w.get("self_attn.v_proj")))
        q = constrain(q.reshape(batch, t_len, self.num_heads, self.head_dim), Q_HEADS)
        k = constrain(k.reshape(batch, t_len, self.num_kv_heads, self.head_dim), KV_HEADS)
        v = constrain(v.reshape(batch, t_len, self.num_kv_heads, self.head_dim), KV_HEADS)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            zero = jnp.zeros((), jnp.int32)
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (zero, cache_start, zero, zero))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (zero, cache_start, zero, zero))
            k, v = constrain(k, KV_CACHE), constrain(v, KV_CACHE)
        out = attend(q, k.astype(q.dtype), v.astype(q.dtype), allowed)
        out = constrain(out.reshape(batch, t_len, self.num_heads * self.head_dim), ATTN_OUT)
        out = self.o_proj(out, w.get("self_attn.o_proj"))
        return out, (k, v)


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig, plan: Mapping[str, LinearSpec], *, stack=(), rngs: nnx.Rngs):
        hidden, inter, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = _linear(cfg, plan, "mlp.gate_proj", hidden, inter, ("mlp", "embed"), bias, stack, rngs)
        self.up_proj = _linear(cfg, plan, "mlp.up_proj", hidden, inter, ("mlp", "embed"), bias, stack, rngs)
        self.down_proj = _linear(cfg, plan, "mlp.down_proj", inter, hidden, ("embed", "mlp"), bias, stack, rngs)

    def __call__(self, x, weights=None):
        w = weights or {}
        gate, up = _fused(w, "mlp.gate_up", x, (self.gate_proj, self.up_proj)) or (
            self.gate_proj(x, w.get("mlp.gate_proj")), self.up_proj(x, w.get("mlp.up_proj")))
        gate, up = constrain(gate, MLP_HIDDEN), constrain(up, MLP_HIDDEN)
        return self.down_proj(constrain(jax.nn.silu(gate) * up, MLP_HIDDEN), w.get("mlp.down_proj"))


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``h = x + attn(norm1(x))``, ``out = h + mlp(norm2(h))``.

    ``plan`` maps the layer-relative linear names of :data:`LAYER_LINEARS` to their :class:`LinearSpec`.
    """

    def __init__(self, cfg: ModelConfig, plan: Mapping[str, LinearSpec] | None = None, *, stack=(), rngs: nnx.Rngs):
        plan = plan or {}
        unknown = sorted(set(plan) - set(LAYER_LINEARS))
        if unknown:
            raise ValueError(f"unknown layer linear name(s) {unknown}; expected {LAYER_LINEARS}")
        norm_kw = dict(stack=stack, param_dtype=cfg.param_dtype, axis_name="norm")
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm_kw)
        self.self_attn = Attention(cfg, plan, stack=stack, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm_kw)
        self.mlp = MLP(cfg, plan, stack=stack, rngs=rngs)

    def linears(self) -> dict[str, Linear]:
        """The layer's linears by layer-relative name (``self_attn.q_proj``, ...)."""
        return {
            **{f"self_attn.{n}": getattr(self.self_attn, n) for n in ATTENTION_LINEARS},
            **{f"mlp.{n}": getattr(self.mlp, n) for n in MLP_LINEARS},
        }

    def __call__(self, x, cos, sin, allowed, *, weights=None, kv_cache=None, cache_start=None):
        attn_out, kv = self.self_attn(
            self.input_layernorm(x), cos, sin, allowed, weights=weights, kv_cache=kv_cache, cache_start=cache_start
        )
        h = constrain(x + attn_out, RESIDUAL)
        return constrain(h + self.mlp(self.post_attention_layernorm(h), weights), RESIDUAL), kv


REMAT_POLICY_FNS = {  # every name of models.config.RematPolicy but "none"
    "full": None,  # save nothing
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
assert set(REMAT_POLICY_FNS) | {"none"} == set(REMAT_POLICIES), "remat policy names out of sync"


def layer_apply_fn(graphdef: Any, remat: str):
    """A pure ``(state, x, cos, sin, allowed, weights, kv_cache, cache_start) -> (x, kv)`` for one layer, wrapped in
    ``jax.checkpoint`` with the named policy (``none``: no remat; ``full``: save nothing; ``dots``: save matmul
    outputs; ``dots_with_no_batch_dims``: save matmul outputs without batch dims)."""

    def apply(state, x, cos, sin, allowed, weights, kv_cache, cache_start):
        layer = nnx.merge(graphdef, state)
        return layer(x, cos, sin, allowed, weights=weights, kv_cache=kv_cache, cache_start=cache_start)

    if remat == "none":
        return apply
    return jax.checkpoint(apply, policy=REMAT_POLICY_FNS[remat])
