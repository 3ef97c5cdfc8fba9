"""Evaluation: perplexity protocols and an lm-eval 0.4 adapter, both over a *logits function*.

A logits function maps `(input_ids int32[B, T], attention_mask int32[B, T])` to `float32[B, T, V]` logits (numpy);
`jax_logits_fn` builds one from an NNX model (jitted, shape-bucketed), `torch_logits_fn` from a transformers
model. `lm_eval_adapter` is imported lazily because lm-eval is an optional extra (`pip install .[eval]`).
"""

from fairy2i_jax.evaluation.logits import (
    JaxLogitsFn,
    LogitsFn,
    default_buckets,
    jax_logits_fn,
    score_sequences,
    token_logprobs,
    torch_logits_fn,
)
from fairy2i_jax.evaluation.perplexity import (
    PerplexityResult,
    Window,
    contiguous_ids,
    contiguous_perplexity,
    contiguous_windows,
    evaluate_perplexity,
    official_packed_chunks,
    official_perplexity,
    official_windows,
    wikitext_lines,
)

_LAZY = {"Fairy2iLM", "LogitsLM", "encode_official", "resolve_tasks", "evaluate_tasks"}


def __getattr__(name):
    """`LogitsLM`, `resolve_tasks`, ... from `lm_eval_adapter`, imported on first use (needs lm-eval)."""
    if name in _LAZY:
        from fairy2i_jax.evaluation import lm_eval_adapter

        return getattr(lm_eval_adapter, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
