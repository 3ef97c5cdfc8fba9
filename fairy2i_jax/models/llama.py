"""``CausalLM``: the Flax NNX decoder for Llama 2/3/3.1+, Mistral, Qwen2/2.5 and Qwen3, in HF layout.

Param tree (mirrors the HF state dict minus the ``model.`` prefix; ``kernel`` is HF's ``weight`` of a linear):
``embed_tokens.embedding [vocab, hidden]``, ``layers.<i>.{input_layernorm, post_attention_layernorm}.weight``,
``layers.<i>.self_attn.{q,k,v,o}_proj.{kernel | U, W}[, bias]``, ``layers.<i>.self_attn.{q,k}_norm.weight``
(Qwen3), ``layers.<i>.mlp.{gate,up,down}_proj...``, ``norm.weight``, ``lm_head.{kernel | U, W}`` (absent when
tied). With ``config.scan_layers`` the ``<i>`` level is replaced by a leading ``layers`` axis of every layer param
(one ``DecoderLayer`` with stacked params, run under ``jax.lax.scan``); :mod:`fairy2i_jax.hf.keymap` maps both
layouts to the same HF names.

Call: ``model(input_ids [B, T], attention_mask=None, positions=None, segment_ids=None, cache=None, weights=None)``
returns float32 logits ``[B, T, vocab]``, or ``(logits, cache)`` when a :class:`KVCache` is passed.

* ``attention_mask [B, T]`` (1 = real token): keys at 0 are never attended to. Default positions are
  ``max(cumsum(mask) - 1, 0)`` (left padding works like HF ``generate``).
* ``segment_ids [B, T]`` (packed sequences): a token attends only to keys of its own segment and, unless
  ``positions`` is given, positions restart at 0 at each segment start.
* Causal by slot index, plus ``slot_q - slot_k < sliding_window`` when configured (transformers' rule).
* ``weights``: precomputed effective weights from :meth:`CausalLM.effective_weights` (quantize once per step).

Activations carry sharding constraints (:mod:`fairy2i_jax.sharding`; a no-op without a mesh): the embedding
output and every layer boundary ``("batch", "seq", "act_embed")``, the logits :data:`LOGITS`; the lookup reads
the embedding table with its hidden dim gathered (:data:`EMBED_LOOKUP`).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fairy2i_jax.models.config import ModelConfig
from fairy2i_jax.kernels import prepare
from fairy2i_jax.models.layers import FUSED_LINEARS, LAYER_LINEARS, RESIDUAL, DecoderLayer, RMSNorm, layer_apply_fn
from fairy2i_jax.models.linear import REAL, Linear, LinearSpec, prepare_weight
from fairy2i_jax.models.rope import rope_cos_sin
from fairy2i_jax.sharding import constrain

LOGITS = ("batch", "seq", "vocab")
EMBED_LOOKUP = ("vocab", None)  # the embedding table as the lookup reads it

LM_HEAD = "lm_head"


class KVCache(NamedTuple):
    """Static-size decoding cache. ``k, v [num_layers, B, max_len, num_kv_heads, head_dim]`` (compute dtype),
    ``valid`` bool ``[B, max_len]`` (slot holds a real token), ``end`` int32 scalar (slots written so far),
    ``next_position`` int32 ``[B]`` (position id of each row's next real token)."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    end: jax.Array
    next_position: jax.Array


def layer_linear_name(layer: int | None, name: str) -> str:
    """HF module name of a layer linear: ``model.layers.<layer>.<name>`` (``*`` for all scanned layers)."""
    return f"model.layers.{'*' if layer is None else layer}.{name}"


def _layer_plan(plan: Mapping[str, LinearSpec], layer: int) -> dict[str, LinearSpec]:
    return {name: plan.get(layer_linear_name(layer, name), REAL) for name in LAYER_LINEARS}


def _uniform_layer_plan(plan: Mapping[str, LinearSpec], num_layers: int) -> dict[str, LinearSpec]:
    """The common per-layer plan of a scanned model; raises if the layers' linear specs differ."""
    first = _layer_plan(plan, 0)
    for i in range(1, num_layers):
        other = _layer_plan(plan, i)
        if other != first:
            diff = [n for n in LAYER_LINEARS if other[n] != first[n]]
            raise ValueError(
                f"scanned layers must all have the same linear kinds, but layer {i} differs from layer 0 in {diff} "
                f"({other[diff[0]]} vs {first[diff[0]]}); use scan_layers=False for per-layer rules"
            )
    return first


class CausalLM(nnx.Module):
    """Decoder-only LM (module docstring). ``plan`` maps HF module names (``model.layers.3.self_attn.q_proj``,
    ``lm_head``) to :class:`LinearSpec`; absent names are ``real``."""

    def __init__(self, config: ModelConfig, *, plan: Mapping[str, LinearSpec] | None = None, rngs: nnx.Rngs):
        plan = dict(plan or {})
        self.config = config
        cfg = config
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, param_dtype=cfg.param_dtype, dtype=cfg.compute_dtype, rngs=rngs,
            embedding_init=nnx.initializers.normal(0.02),
            embedding_metadata={"out_sharding": ("vocab", "embed"), "eager_sharding": False},
        )
        if cfg.scan_layers:
            layer_plan = _uniform_layer_plan(plan, cfg.num_layers)
            self.layers = DecoderLayer(cfg, layer_plan, stack=(cfg.num_layers,), rngs=rngs)
        else:
            self.layers = nnx.List([DecoderLayer(cfg, _layer_plan(plan, i), rngs=rngs) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
        self.lm_head = Linear(
            cfg.hidden_size, cfg.vocab_size, spec=plan.get(LM_HEAD, REAL), axes=("vocab", "embed"),
            tied=cfg.tie_word_embeddings, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype, rngs=rngs,
        )

    # -- structure -------------------------------------------------------------------------------------------

    def named_linears(self) -> dict[str, Linear]:
        """Every linear by HF module name (``model.layers.*.<name>`` for a scanned model, then stacked)."""
        out: dict[str, Linear] = {}
        if self.config.scan_layers:
            out.update({layer_linear_name(None, n): lin for n, lin in self.layers.linears().items()})
        else:
            for i, layer in enumerate(self.layers):
                out.update({layer_linear_name(i, n): lin for n, lin in layer.linears().items()})
        out[LM_HEAD] = self.lm_head
        return out

    def linear_plan(self) -> dict[str, LinearSpec]:
        """The :class:`LinearSpec` of every linear by per-layer HF name (scanned layers expanded)."""
        plan = {}
        for name, lin in self.named_linears().items():
            if ".*." in name:
                for i in range(self.config.num_layers):
                    plan[name.replace(".*.", f".{i}.")] = lin.spec
            else:
                plan[name] = lin.spec
        return plan

    def effective_weights(self) -> dict[str, jax.Array]:
        """The matrix every linear multiplies by (fake-quantized for qat; tied head from the embedding), keyed by
        HF module name; pass it back as ``weights=`` to reuse one quantization across micro-batches."""
        table = self.embed_tokens.embedding.get_value()
        return {
            name: lin.effective_weight(table if lin.tied else None) for name, lin in self.named_linears().items()
        }

    def inference_weights(self) -> dict[str, Any]:
        """:meth:`effective_weights` ready for many forwards (generation, evaluation): packed layers as the
        kernels' prepared operands, and q/k/v and gate/up of packed layers with one spec as one fused operand each
        (``<layer>.self_attn.qkv``, ``<layer>.mlp.gate_up``: one kernel launch on the Pallas backends)."""
        weights = self.effective_weights()
        linears = self.named_linears()
        prefixes = {name.rsplit(".", 2)[0] for name in linears if name.startswith("model.layers.")}
        for prefix in prefixes:
            for fused, parts in FUSED_LINEARS.items():
                names = [f"{prefix}.{p}" for p in parts]
                specs = {linears[n].spec for n in names}
                if len(specs) == 1 and specs.pop().kind == "packed":
                    layers = [weights.pop(n) for n in names]
                    stacked = layers[0].u_words.ndim > 3
                    weights[f"{prefix}.{fused}"] = jax.vmap(lambda *ls: prepare(ls))(*layers) if stacked \
                        else prepare(layers)
        return {name: prepare_weight(w) for name, w in weights.items()}

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` rows and ``max_len`` slots (dtype: the compute dtype)."""
        cfg = self.config
        dtype = dtype or cfg.compute_dtype
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return KVCache(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, max_len), bool),
            end=jnp.zeros((), jnp.int32),
            next_position=jnp.zeros((batch,), jnp.int32),
        )

    # -- forward ---------------------------------------------------------------------------------------------

    def _mask_and_positions(self, input_ids, attention_mask, positions, segment_ids, cache):
        batch, t_len = input_ids.shape
        mask = jnp.ones((batch, t_len), bool) if attention_mask is None else attention_mask.astype(bool)
        window = self.config.sliding_window
        if cache is None:
            q_slot = jnp.arange(t_len)
            k_slot = q_slot
            key_valid = mask
            if positions is None:
                positions = _segment_positions(segment_ids) if segment_ids is not None else _mask_positions(mask)
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids are not supported together with a KV cache")
            q_slot = cache.end + jnp.arange(t_len)
            k_slot = jnp.arange(cache.valid.shape[1])
            key_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (jnp.zeros((), jnp.int32), cache.end))
            if positions is None:
                positions = cache.next_position[:, None] + _mask_positions(mask, clip=False)
                positions = jnp.maximum(positions, 0)
        allowed = (k_slot[None, :] <= q_slot[:, None])[None] & key_valid[:, None, :]
        if window is not None:
            allowed &= (q_slot[:, None] - k_slot[None, :] < window)[None]
        if segment_ids is not None:
            allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
        return mask, positions.astype(jnp.int32), key_valid, allowed

    def _embed(self, input_ids: jax.Array) -> jax.Array:
        """``nnx.Embed``'s lookup (the table in the compute dtype, ``jnp.take``) from a table whose hidden dim is
        gathered first (:data:`EMBED_LOOKUP`), as FSDP gathers every weight before use: the rows then come out
        sharded by batch, not by hidden."""
        table = self.embed_tokens.embedding.get_value().astype(self.config.compute_dtype)
        return jnp.take(constrain(table, EMBED_LOOKUP), input_ids, axis=0)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        weights: Mapping[str, jax.Array] | None = None,
    ):
        cfg = self.config
        mask, positions, key_valid, allowed = self._mask_and_positions(
            input_ids, attention_mask, positions, segment_ids, cache
        )
        cos, sin = rope_cos_sin(cfg, positions)
        x = constrain(self._embed(input_ids), RESIDUAL)
        start = None if cache is None else cache.end
        weights = weights or {}
        new_k = new_v = None
        if cfg.scan_layers:
            layer_w = _layer_weights(weights, None)
            graphdef, state = nnx.split(self.layers)
            apply = layer_apply_fn(graphdef, cfg.remat)

            def body(h, xs):
                layer_state, w, kv = xs
                return apply(layer_state, h, cos, sin, allowed, w, kv, start)

            kv_in = None if cache is None else (cache.k, cache.v)
            x, kv_out = jax.lax.scan(body, x, (state, layer_w, kv_in))
            if cache is not None:
                new_k, new_v = kv_out
        else:
            ks, vs = [], []
            for i, layer in enumerate(self.layers):
                layer_w = _layer_weights(weights, i)
                graphdef, state = nnx.split(layer)
                kv_in = None if cache is None else (cache.k[i], cache.v[i])
                x, (k, v) = layer_apply_fn(graphdef, cfg.remat)(state, x, cos, sin, allowed, layer_w, kv_in, start)
                ks.append(k)
                vs.append(v)
            if cache is not None:
                new_k, new_v = jnp.stack(ks), jnp.stack(vs)
        x = constrain(self.norm(x), RESIDUAL)
        table = self.embed_tokens.embedding.get_value() if self.lm_head.tied else None
        logits = constrain(self.lm_head(x, weights.get(LM_HEAD), master=table).astype(jnp.float32), LOGITS)
        if cache is None:
            return logits
        new_cache = KVCache(
            k=new_k,
            v=new_v,
            valid=key_valid,
            end=cache.end + input_ids.shape[1],
            next_position=cache.next_position + jnp.sum(mask, axis=1, dtype=jnp.int32),
        )
        return logits, new_cache


def _layer_weights(weights: Mapping[str, jax.Array], layer: int | None) -> dict[str, jax.Array]:
    """The precomputed weights of one layer (``layer=None``: the stacked weights of scanned layers), keyed by the
    layer-relative names of ``LAYER_LINEARS`` and ``FUSED_LINEARS``."""
    names = (*LAYER_LINEARS, *FUSED_LINEARS)
    return {n: weights[layer_linear_name(layer, n)] for n in names if layer_linear_name(layer, n) in weights}


def _mask_positions(mask: jax.Array, clip: bool = True) -> jax.Array:
    """``cumsum(mask) - 1`` per row (clipped at 0 when ``clip``): the position of each real token."""
    positions = jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1
    return jnp.maximum(positions, 0) if clip else positions


def _segment_positions(segment_ids: jax.Array) -> jax.Array:
    """``t - start(t)`` where ``start(t)`` is the first slot of the segment holding slot ``t``."""
    t_len = segment_ids.shape[1]
    slots = jnp.broadcast_to(jnp.arange(t_len), segment_ids.shape)
    is_start = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    starts = jax.lax.cummax(jnp.where(is_start, slots, 0), axis=1)
    return slots - starts


def init_model(config: ModelConfig, plan: Mapping[str, LinearSpec] | None = None, seed: int = 0) -> CausalLM:
    """A randomly initialised :class:`CausalLM` (normal(0.02) weights, unit norms, zero biases)."""
    return CausalLM(config, plan=plan, rngs=nnx.Rngs(seed))


def abstract_model(config: ModelConfig, plan: Mapping[str, LinearSpec] | None = None) -> CausalLM:
    """A :class:`CausalLM` whose params are ``jax.ShapeDtypeStruct`` (nothing allocated), to be filled by a loader."""
    return nnx.eval_shape(lambda: CausalLM(config, plan=plan, rngs=nnx.Rngs(0)))
