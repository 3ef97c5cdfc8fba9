"""Tiny real models for the evaluation tests: a BPE tokenizer trained on Persuasion and a random torch Llama;
Austen text and gzipped JSON-lines files.

Shared by the evaluation tests (`test_perplexity.py`, `test_logits.py`, `test_lm_eval_adapter.py`, the eval CLI);
everything is built offline in about a second. The fixtures `tok` and `model` (the tokenizer and a Llama over its
vocabulary, once per test module) are imported by the test modules that use them.
"""

import gzip
import json
import os

import numpy as np
import pytest

AUSTEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "austen", "test", "persuasion.txt.gz")
_REPO_DATA = os.path.join(os.path.dirname(__file__), "data")


def austen_paragraphs(n: int = 40, skip: int = 10) -> list[str]:
    """`n` non-empty paragraphs of Persuasion (line breaks inside a paragraph joined with spaces)."""
    with gzip.open(AUSTEN, "rt", encoding="utf-8") as f:
        text = f.read()
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    paras = [p for p in paras if len(p) > 40]
    return paras[skip: skip + n]


def tiny_tokenizer(vocab_size: int = 320):
    """Byte-level BPE (pad=0, BOS=1, EOS=2) that prepends BOS with the default special tokens, like Llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(austen_paragraphs(200, skip=0), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    assert (fast.pad_token_id, fast.bos_token_id, fast.eos_token_id) == (0, 1, 2)
    return fast


def tiny_llama(vocab_size: int, seed: int = 0, max_positions: int = 512):
    """A random fp32 `LlamaForCausalLM`: hidden 64, 2 layers, 4 heads (2 KV heads); peaked logits (init 0.2)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2,
                         tie_word_embeddings=False)
    # one thread: for a model this small, thread hand-off costs 30x the work on a busy 2-core machine
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tok():
    """`tiny_tokenizer()`, once per test module that imports this fixture."""
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    """`tiny_llama` (seed 0) over the vocabulary of `tok`, once per test module that imports this fixture."""
    return tiny_llama(len(tok))


def torch_logprobs(model, ids) -> np.ndarray:
    """float64 log-softmax of the torch model's logits for one unpadded sequence: [L, V]."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(ids)], dtype=torch.long)).logits[0]
    return torch.log_softmax(logits.double(), dim=-1).numpy()


def austen_sentences(n: int = 40, skip: int = 10) -> list[str]:
    """`n` sentences of Persuasion (paragraphs split after '. ', '; ' and '? '), the short items of a corpus."""
    import re

    out = []
    for para in austen_paragraphs(200, skip):
        out.extend(s for s in re.split(r"(?<=[.;?]) ", para) if s)
    return out[:n]


def write_jsonl_gz(path, records) -> str:
    """`records` (dicts) as gzipped JSON lines at `path` (how the hub stores C4); the path as a string."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)
