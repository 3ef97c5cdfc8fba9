"""fairy2i_jax: Fairy2i (widely-linear complex conversion + phase QAT) for JAX/Flax.

Layering. Each module imports only from its own layer or the layers above it in this list (lower = more basic);
``tests/test_layering.py`` checks every import of every module, including imports inside functions:

1. ``errors``, ``config``, ``jsonl``: the error base class, the generic config loader, JSON Lines reading
2. ``widely_linear``, ``quant``, ``packing``: the math
3. ``kernels``: packed matmuls (only the math below them)
4. ``sharding``, ``models``: the mesh and logical axes; the Flax NNX decoder and its linear kinds
5. ``convert``, ``runs``: model surgery (presets, plans, conversion, frozen and teacher weights); a training run
   directory on disk (layout, checkpoints, summary)
6. ``hf``: Hugging Face import and export (safetensors, GGUF, tokenizers, packed format)
7. ``runs``, ``sources``: a training run directory on disk; every model source a command accepts
8. ``data``: documents, tokenization, the token store, the grain pipeline
9. ``generate``, ``evaluation``: decoding, perplexity, lm-eval
10. ``training``: config, optimizer, train state and step, loop, metrics
11. the command lines: ``train``, ``export``, ``generate.__main__``, ``evaluation.cli``, ``evaluation.lm_eval_cli``,
    ``training.plot``, ``training.plan``, ``data.__main__`` (and the top-level ``train.py`` / ``eval.py``; this
    package's ``__init__`` re-exports the public API)
"""

from fairy2i_jax.convert import convert, to_real
from fairy2i_jax.errors import CheckpointError, Fairy2iError
from fairy2i_jax.hf.export import iter_real_state, to_real_state
from fairy2i_jax.hf.load import load_pretrained
from fairy2i_jax.hf.tokenizer import load_tokenizer
from fairy2i_jax.models import CausalLM, KVCache, Linear, LinearSpec, ModelConfig, RopeScaling
from fairy2i_jax.quant import (
    QuantSpec,
    decode_phase_codes,
    quantize_complex_planes,
    quantize_real_weight,
    quantize_widely_linear,
    residual_phase_encode,
    residual_phase_quantize,
)
from fairy2i_jax.sharding import make_mesh, shard_like_params
from fairy2i_jax.widely_linear import from_widely_linear, to_widely_linear, widely_linear_apply

__version__ = "0.1.0"

__all__ = [
    "CausalLM", "CheckpointError", "Fairy2iError", "KVCache", "Linear", "LinearSpec", "ModelConfig", "QuantSpec",
    "RopeScaling", "convert", "decode_phase_codes", "from_widely_linear", "iter_real_state", "load_pretrained",
    "load_tokenizer", "make_mesh", "quantize_complex_planes", "quantize_real_weight", "quantize_widely_linear",
    "residual_phase_encode", "residual_phase_quantize", "shard_like_params", "to_real", "to_real_state",
    "to_widely_linear", "widely_linear_apply",
]
