"""Generation with the KV cache (:mod:`fairy2i_jax.generate.engine`); ``python -m fairy2i_jax.generate`` is the
command line (:mod:`fairy2i_jax.generate.__main__`)."""

from fairy2i_jax.generate.engine import GREEDY, Sampling, generate, greedy_ids, sample_ids, select_tokens

__all__ = ["GREEDY", "Sampling", "generate", "greedy_ids", "sample_ids", "select_tokens"]
