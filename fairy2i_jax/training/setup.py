"""Building what a run needs from its config: mesh, model source, converted model, corpora.

The model comes from ``model.path`` through :mod:`fairy2i_jax.sources` (every source kind the other commands
accept); this module only adds what is specific to training: the mesh from the ``mesh`` section, the model
converted to ``quant`` (or its abstract form, the restore target of a resume), and the tokenized corpora.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from fairy2i_jax import sources
from fairy2i_jax.config import ConfigError
from fairy2i_jax.convert import convert, resolve_plan
from fairy2i_jax.data import TokenizedCorpus, check_fits_one_batch, entry_documents, load_corpus, store_entry_path
from fairy2i_jax.models.config import ModelConfig
from fairy2i_jax.models.llama import CausalLM, abstract_model
from fairy2i_jax.sharding import make_mesh
from fairy2i_jax.training.config import TrainConfig


def build_mesh(cfg: TrainConfig) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh over all devices (-1 resolved)."""
    data, fsdp, tensor = cfg.mesh.resolve(jax.device_count())
    return make_mesh(data, fsdp, tensor)


def model_source(cfg: TrainConfig) -> sources.ModelSource:
    """The resolved ``model.path`` (:class:`~fairy2i_jax.sources.SourceError` when it does not exist)."""
    return sources.resolve(cfg.model.path)


def load_real_model(cfg: TrainConfig, mesh: Mesh) -> CausalLM:
    """The pretrained model of ``model.path`` (a random one is seeded by ``train.seed``), params on ``mesh``."""
    return sources.load_model(model_source(cfg), **cfg.model.layout(), mesh=mesh, seed=cfg.train.seed,
                              progress=cfg.train.progress)


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The architecture without loading any weight."""
    return sources.model_config(model_source(cfg), **cfg.model.layout())


def convert_for_training(cfg: TrainConfig, real: CausalLM) -> CausalLM:
    """The real model converted to ``quant.preset`` (complex masters for w1..w4 / fp)."""
    return convert(real, cfg.quant.preset, progress=cfg.train.progress, **cfg.quant.convert_kwargs())


def abstract_training_model(cfg: TrainConfig, mc: ModelConfig | None = None) -> CausalLM:
    """The converted model with abstract params (shapes only): the target of a checkpoint restore."""
    mc = mc or model_config(cfg)
    return abstract_model(mc, resolve_plan(abstract_model(mc), cfg.quant.preset, **cfg.quant.convert_kwargs()))


def check_seq_len(cfg: TrainConfig, mc: ModelConfig) -> None:
    """ConfigError when ``data.seq_len`` exceeds the model's ``max_position_embeddings``."""
    if cfg.data.seq_len > mc.max_position_embeddings:
        raise ConfigError(f"data.seq_len = {cfg.data.seq_len} exceeds the model's max_position_embeddings = "
                          f"{mc.max_position_embeddings} ({cfg.model.path})")


def _load(cfg: TrainConfig, entries, tokenizer) -> TokenizedCorpus:
    d = cfg.data
    return load_corpus(list(entries), tokenizer, doc_split=d.doc_split, text_key=d.text_key, source=cfg.model.path,
                       progress=cfg.train.progress)


def load_corpora(cfg: TrainConfig, tokenizer) -> tuple[TokenizedCorpus, TokenizedCorpus | None]:
    """``(train corpus, held-out corpus or None)``: tokenized in memory, or token stores opened memory-mapped
    (``store:DIR``, checked against ``tokenizer``); DataError naming the entries when one is empty."""
    return _load(cfg, cfg.data.train, tokenizer), _load(cfg, cfg.data.eval, tokenizer) if cfg.data.eval else None


def check_corpus_fits(cfg: TrainConfig, corpus: TokenizedCorpus) -> None:
    """:class:`~fairy2i_jax.data.DataError` unless the training corpus holds one global batch."""
    check_fits_one_batch(corpus, seq_len=cfg.data.seq_len, global_batch=cfg.data.global_batch)


def test_documents(cfg: TrainConfig, tokenizer) -> list:
    """The documents of ``data.test`` for the perplexity report: texts, or for a token store the token ids of
    its documents without their EOS (what the report's packing takes instead of texts); [] when none is
    configured or the report is off."""
    d = cfg.data
    if not d.test or cfg.eval.ppl_max_tokens == 0:
        return []
    if store_entry_path(list(d.test), "data.test") is None:
        return list(entry_documents(list(d.test), doc_split=d.doc_split, text_key=d.text_key))
    return [doc[:-1] for doc in _load(cfg, d.test, tokenizer).documents()]
