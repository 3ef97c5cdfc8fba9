"""HF tensor names <-> :class:`~fairy2i_jax.models.llama.CausalLM` param paths (names only: our params are in HF
``[out, in]`` layout, so nothing is transposed, reshaped or folded).

``("embed_tokens", "embedding")`` <-> ``model.embed_tokens.weight``; ``("layers", i, ..., "kernel")`` <->
``model.layers.<i>....weight``; ``(..., "bias")`` <-> ``....bias``; ``(..., <norm>, "weight")`` <->
``....weight``; ``("norm", "weight")`` <-> ``model.norm.weight``; ``("lm_head", "kernel")`` <-> ``lm_head.weight``.
A scanned model has paths ``("layers", ..., leaf)`` without the layer index; their values stack the per-layer
tensors ``model.layers.0...``, ``model.layers.1...`` along a leading axis. Complex masters (``U``, ``W``) have no
HF tensor: :func:`fairy2i_jax.convert.to_real_state` recomposes them into ``....weight``.
"""

from __future__ import annotations

from typing import Sequence

from fairy2i_jax.packing import PACKED_SUFFIXES

LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "weight": "weight", "bias": "bias",
              **{suffix: suffix for suffix in PACKED_SUFFIXES}}  # a packed layer's codes and scales keep their names
# buffers some checkpoints carry that are recomputed, never loaded
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_names(path: Sequence, scanned: bool, num_layers: int) -> list[str]:
    """The HF tensor name(s) of the param at ``path`` (one per layer, in order, for a scanned layer param)."""
    *parents, leaf = [str(p) for p in path]
    if leaf not in LEAF_TO_HF:
        raise KeyError(f"param {'.'.join(map(str, path))} has no HF tensor (complex masters are exported recomposed)")
    name = ".".join([*parents, LEAF_TO_HF[leaf]])
    prefix = "" if parents and parents[0] == "lm_head" else "model."
    if scanned and parents and parents[0] == "layers":
        rest = ".".join([*parents[1:], LEAF_TO_HF[leaf]])
        return [f"model.layers.{i}.{rest}" for i in range(num_layers)]
    return [prefix + name]


def is_ignored(name: str) -> bool:
    """True for checkpoint entries that are buffers, not weights (e.g. ``rotary_emb.inv_freq``)."""
    return name.endswith(IGNORED_SUFFIXES)
