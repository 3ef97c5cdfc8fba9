"""Corpora and the grain pipeline (layer 8): documents -> tokens -> packed blocks with EOS-aware labels -> batches.

* :mod:`~fairy2i_jax.data.documents`: local text / jsonl / parquet files, ``hf:`` datasets, config entries;
* :mod:`~fairy2i_jax.data.corpus`: the tokenization rule and :class:`TokenizedCorpus` (in memory);
* :mod:`~fairy2i_jax.data.store`: the token store on disk (memory-mapped tokens, manifest, tokenizer identity);
* :mod:`~fairy2i_jax.data.tokenize`: config entries -> a corpus (:func:`load_corpus`) or a store
  (:func:`tokenize_to_store`, in parallel);
* :mod:`~fairy2i_jax.data.pipeline`: blocks, labels, shuffling, host sharding, iterator state;
* ``python -m fairy2i_jax.data tokenize --config CFG --out DIR``: :mod:`fairy2i_jax.data.__main__`.

Everything is re-exported here, so ``from fairy2i_jax.data import train_dataset`` works.
"""

from fairy2i_jax.data.corpus import (
    TokenizedCorpus,
    check_seq_len,
    encode_documents,
    epochs_for_budget,
    tokenize_documents,
)
from fairy2i_jax.data.documents import (
    DOC_SPLITS,
    HF_PREFIX,
    OFFLINE_VARIABLES,
    STORE_PREFIX,
    SUPPORTED_EXTENSIONS,
    DataError,
    DocSplit,
    dataset_texts,
    entry_documents,
    expand_paths,
    hf_documents,
    is_store_entry,
    load_hf_dataset,
    parse_hf_entry,
    read_documents,
    split_text,
    store_entry_path,
)
from fairy2i_jax.data.pipeline import (
    IGNORE_INDEX,
    check_fits_one_batch,
    eval_dataset,
    local_batch_size,
    make_labels,
    num_eval_batches,
    train_dataset,
)
from fairy2i_jax.data.store import (
    StoreError,
    StoreMismatch,
    StoreWriter,
    TokenizerIdentity,
    is_store,
    open_store,
    read_manifest,
)
from fairy2i_jax.data.tokenize import TokenizeResult, load_corpus, tokenize_to_store

__all__ = [
    "DOC_SPLITS", "HF_PREFIX", "IGNORE_INDEX", "OFFLINE_VARIABLES", "STORE_PREFIX", "SUPPORTED_EXTENSIONS", "DataError", "DocSplit",
    "StoreError", "StoreMismatch", "StoreWriter", "TokenizeResult", "TokenizedCorpus", "TokenizerIdentity",
    "check_fits_one_batch", "check_seq_len", "dataset_texts", "encode_documents", "entry_documents", "epochs_for_budget", "eval_dataset",
    "expand_paths", "hf_documents", "is_store", "is_store_entry", "load_corpus", "load_hf_dataset",
    "local_batch_size", "make_labels", "num_eval_batches", "open_store", "parse_hf_entry", "read_documents",
    "read_manifest", "split_text", "store_entry_path", "tokenize_documents", "tokenize_to_store", "train_dataset",
]
