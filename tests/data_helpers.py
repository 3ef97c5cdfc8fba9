"""Shared pieces of the data tests: the Austen files, a real BPE tokenizer trained on Persuasion, small text files.

Import the fixtures into a test module (``from data_helpers import files, paras, tok``) to use them there.
"""

from __future__ import annotations

import gzip
import os
import resource

import numpy as np
import pytest

from fairy2i_jax import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUSTEN_DIR = os.path.join(ROOT, "data", "austen")
AUSTEN_TRAIN = os.path.join(AUSTEN_DIR, "train")
PERSUASION = os.path.join(AUSTEN_DIR, "test", "persuasion.txt.gz")
PAD, BOS, EOS = 0, 1, 2


def persuasion_paragraphs() -> list[str]:
    """The blank-line separated paragraphs of Persuasion."""
    with gzip.open(PERSUASION, "rt", encoding="utf-8") as f:
        return data.split_text(f.read(), "paragraph")


def bpe_tokenizer(texts: list[str]):
    """Byte-level BPE, vocab 300, <pad>=0 <bos>=1 <eos>=2; adds <bos> when asked for special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    t.train_from_iterator(texts, trainer)
    t.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    assert (fast.pad_token_id, fast.bos_token_id, fast.eos_token_id) == (PAD, BOS, EOS)
    assert fast.encode("Anne")[0] == BOS  # the default path would add BOS: the pipeline must not
    return fast


@pytest.fixture(scope="module")
def paras():
    return persuasion_paragraphs()


@pytest.fixture(scope="module")
def tok(paras):
    return bpe_tokenizer(paras[:60])


@pytest.fixture(scope="module")
def files(tmp_path_factory, paras):
    """Three text files of 25 paragraphs each: plain, gzip, plain (paragraphs separated by blank lines)."""
    d = tmp_path_factory.mktemp("txt")
    out = []
    for i, name in enumerate(["a.txt", "b.txt.gz", "c.txt"]):
        path = d / name
        text = "\n\n".join(paras[20 + 25 * i: 45 + 25 * i]) + "\n"
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "wt", encoding="utf-8") as f:
            f.write(text)
        out.append(str(path))
    return out


def expected_tokens(docs, tok) -> np.ndarray:
    """The corpus rule by hand: ``encode(doc) + [EOS]`` per document, concatenated."""
    return np.concatenate([tok.encode(d, add_special_tokens=False) + [EOS] for d in docs]).astype(np.int32)


def take(ds, n):
    """The first ``n`` elements of a grain dataset."""
    it = iter(ds)
    return [next(it) for _ in range(n)]


def stack(batches, key="input_ids"):
    return np.concatenate([b[key] for b in batches])


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def rss_anon_bytes() -> int:
    """Anonymous resident memory of this process (``RssAnon`` of /proc/self/status): heap and copies, not the
    file pages a memory map brings in."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
