"""fairy2i_jax.models.llama (CausalLM): logits against transformers' torch models for every family, and the
decoder's own invariants (padding, scan, remat, KV cache, segments, precomputed weights, plans)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fairy2i_jax import load_pretrained
from fairy2i_jax.models import LinearSpec, ModelConfig
from fairy2i_jax.models.llama import abstract_model
from model_helpers import (
    FAMILIES,
    batch,
    checkpoint,
    jax_logits,
    max_diff_on_tokens,
    model_cls_copy,
    qat_logits,
    torch_logits,
    torch_model,
)

FP32_TOL = 1e-4
# bf16 compute (fp32 params) vs the fp32 torch oracle, measured over all 8 families on this batch (logits of
# magnitude ~0.6-1.0): max 0.0060 (llama_llama3), where torch's own bf16 model is off by up to 0.0058. Tolerance
# 0.012 = 2x the measured maximum, and our error may be at most 2x torch's own bf16 error on the same batch.
BF16_TOL = 0.012


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(family):
    ids, mask = batch()
    reference = torch_logits(torch_model(family), ids, mask)
    model = load_pretrained(checkpoint(family), compute_dtype=jnp.float32)
    assert max_diff_on_tokens(jax_logits(model, ids, mask), reference, mask) <= FP32_TOL

    bf16_model = load_pretrained(checkpoint(family), compute_dtype=jnp.bfloat16)
    ours = max_diff_on_tokens(jax_logits(bf16_model, ids, mask), reference, mask)
    theirs = max_diff_on_tokens(torch_logits(model_cls_copy(family).to(torch.bfloat16), ids, mask), reference, mask)
    assert ours <= BF16_TOL, ours
    assert ours <= 2 * theirs, (ours, theirs)


def test_left_padding_equals_unpadded_rows():
    model = load_pretrained(checkpoint("qwen2"), compute_dtype=jnp.float32)
    ids, _ = batch(length=8, pad=0)
    padded = np.concatenate([np.zeros((2, 3), np.int32), ids], axis=1)
    mask = np.concatenate([np.zeros((2, 3), np.int32), np.ones_like(ids)], axis=1)
    mask[0, :3] = 1  # row 0: 3 extra real tokens in front, row 1: left padded
    padded[0, :3] = [5, 6, 7]
    out = jax_logits(model, padded, mask)
    alone = jax_logits(model, ids[1:2])
    np.testing.assert_allclose(out[1, 3:], alone[0], atol=1e-5)


def test_scan_and_remat_do_not_change_logits_or_grads():
    ids, mask = batch()
    base = load_pretrained(checkpoint("qwen3"), compute_dtype=jnp.float32)
    expected = jax_logits(base, ids, mask)
    scanned = load_pretrained(checkpoint("qwen3"), compute_dtype=jnp.float32, scan_layers=True)
    assert scanned.layers.self_attn.q_proj.kernel.get_value().shape == (2, 64, 64)
    np.testing.assert_allclose(jax_logits(scanned, ids, mask), expected, atol=1e-5)

    def grads(model):
        graphdef, params = nnx.split(model)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(jnp.asarray(ids), jnp.asarray(mask)) ** 2)
        return jax.jit(jax.grad(loss))(params)

    remat_cfg = scanned.config.replace(remat="full")
    remat_model = _with_config(scanned, remat_cfg)
    np.testing.assert_allclose(jax_logits(remat_model, ids, mask), expected, atol=1e-5)
    g_plain, g_remat = grads(scanned), grads(remat_model)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        # same math, re-fused by XLA under remat: equal to float32 rounding
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
    dots = _with_config(base, base.config.replace(remat="dots"))
    np.testing.assert_allclose(jax_logits(dots, ids, mask), expected, atol=1e-6)


def _with_config(model, config):
    """A copy of ``model`` (same param arrays) with its static config replaced."""
    clone = nnx.merge(*nnx.split(model))
    clone.config = config
    return clone


def test_kv_cache_prefill_then_decode_equals_full_forward():
    model = load_pretrained(checkpoint("mistral"), compute_dtype=jnp.float32)  # sliding window 4 < length 9
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 256, size=(2, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # row 1 left padded
    full = jax_logits(model, ids, mask)

    step_fn = nnx.jit(lambda m, ids, mask, cache: m(ids, mask, cache=cache))
    cache = model.init_cache(batch=2, max_len=12)
    logits, cache = step_fn(model, jnp.asarray(ids[:, :6]), jnp.asarray(mask[:, :6]), cache)
    np.testing.assert_allclose(np.asarray(logits)[mask[:, :6] == 1], full[:, :6][mask[:, :6] == 1], atol=1e-5)
    for t in range(6, 9):
        step, cache = step_fn(model, jnp.asarray(ids[:, t:t + 1]), jnp.ones((2, 1), jnp.int32), cache)
        np.testing.assert_allclose(np.asarray(step)[:, 0], full[:, t], atol=1e-5)
    assert int(cache.end) == 9 and cache.next_position.tolist() == [9, 7]


def test_segment_ids_isolate_packed_sequences():
    model = load_pretrained(checkpoint("qwen2"), compute_dtype=jnp.float32)
    rng = np.random.default_rng(4)
    first, second = rng.integers(3, 256, size=5), rng.integers(3, 256, size=5)  # one length: one compile below
    packed = jnp.asarray(np.concatenate([first, second])[None].astype(np.int32))
    segments = jnp.asarray(np.array([[1] * 5 + [2] * 5], np.int32))
    out = np.asarray(model(packed, segment_ids=segments))
    np.testing.assert_allclose(out[0, :5], jax_logits(model, first[None].astype(np.int32))[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 5:], jax_logits(model, second[None].astype(np.int32))[0], atol=1e-5)


def test_effective_weights_can_be_passed_back():
    from fairy2i_jax import convert

    ids, mask = batch()
    model = convert(load_pretrained(checkpoint("llama_tied"), compute_dtype=jnp.float32), "w2")
    weights = model.effective_weights()
    assert set(weights) == set(model.linear_plan()) and weights["lm_head"].shape == (256, 64)
    default = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))  # eager: quantizes inside the forward
    np.testing.assert_allclose(qat_logits(model, ids, mask, weights), default, atol=1e-6)
    zeroed = dict(weights, lm_head=jnp.zeros_like(weights["lm_head"]))
    assert not np.any(qat_logits(model, ids, mask, zeroed))  # the passed weight is what is used


def _tiny(**changes) -> ModelConfig:
    return ModelConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                       num_kv_heads=1, compute_dtype=jnp.float32, **changes)


def test_abstract_model_allocates_nothing():
    """Every param a ``jax.ShapeDtypeStruct`` of the HF ``[out, in]`` shape (GQA: k_proj has kv_heads * head_dim
    rows), in the param dtype; scanned: a leading ``layers`` axis."""
    model = abstract_model(_tiny(param_dtype=jnp.bfloat16))
    params = nnx.to_pure_dict(nnx.state(model))
    assert all(isinstance(x, jax.ShapeDtypeStruct) and x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    assert params["embed_tokens"]["embedding"].shape == params["lm_head"]["kernel"].shape == (32, 8)
    attn = params["layers"][1]["self_attn"]
    assert attn["q_proj"]["kernel"].shape == (8, 8) and attn["k_proj"]["kernel"].shape == (4, 8)
    assert params["norm"]["weight"].shape == (8,) and params["layers"][0]["mlp"]["down_proj"]["kernel"].shape == (8, 16)
    scanned = nnx.to_pure_dict(nnx.state(abstract_model(_tiny(scan_layers=True))))
    assert scanned["layers"]["self_attn"]["k_proj"]["kernel"].shape == (2, 4, 8)


def test_plans_per_layer_and_scanned():
    wl = LinearSpec("widely_linear")
    model = abstract_model(_tiny(), {"model.layers.1.mlp.up_proj": wl, "lm_head": wl})
    plan = model.linear_plan()
    assert len(plan) == 2 * 7 + 1 and plan["model.layers.1.mlp.up_proj"] == plan["lm_head"] == wl
    assert plan["model.layers.0.mlp.up_proj"] == LinearSpec()
    assert model.layers[1].mlp.up_proj.U.get_value().shape == (8, 4)
    with pytest.raises(ValueError, match=r"layer 1 differs from layer 0 in \['mlp.up_proj'\]"):
        abstract_model(_tiny(scan_layers=True), {"model.layers.1.mlp.up_proj": wl})
    both = {f"model.layers.{i}.mlp.up_proj": wl for i in range(2)}
    scanned = abstract_model(_tiny(scan_layers=True), both)
    assert "model.layers.*.mlp.up_proj" in scanned.named_linears()
    assert scanned.layers.mlp.up_proj.U.get_value().shape == (2, 8, 4)
    assert scanned.linear_plan() == abstract_model(_tiny(), both).linear_plan()


def test_segment_ids_and_a_kv_cache_are_refused_together():
    model = abstract_model(_tiny())
    ids = jnp.ones((1, 3), jnp.int32)
    with pytest.raises(ValueError, match="segment_ids are not supported together with a KV cache"):
        model(ids, segment_ids=jnp.ones((1, 3), jnp.int32), cache=model.init_cache(batch=1, max_len=4))
