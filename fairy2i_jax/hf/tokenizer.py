"""One entry point for tokenizers: an HF directory, a Llama-2 style `tokenizer.model`, or a GGUF file.

`load_tokenizer(path)` picks, in this order:

1. `path` is a `.gguf` file -> the tokenizer embedded in it (`fairy2i_jax.hf.gguf.gguf_tokenizer`);
2. `path` is a sentencepiece `.model` file, or a directory with `tokenizer.model` but no `tokenizer.json`
   -> `SentencePieceTokenizer` (a thin wrapper over `sentencepiece.SentencePieceProcessor`);
3. a directory with `tokenizer.json`, `tokenizer_config.json` or `vocab.json` -> `transformers.AutoTokenizer`.

Why a wrapper for (2): with transformers 5.23, `LlamaTokenizer(vocab_file=...)` encodes every text to `[]`,
and `AutoTokenizer` on a directory holding only `tokenizer.model` converts the model to a `tokenizers` BPE
that neither prepends BOS nor reproduces sentencepiece's ids (measured on a model trained in the tests).
The sentencepiece library itself is the reference for those files, so it is used directly.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from fairy2i_jax.errors import Fairy2iError

# The files `load_tokenizer` looks for in a directory, in the order it tries them.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
SENTENCEPIECE_FILE = "tokenizer.model"


def _special_id(i: int) -> int | None:
    """A sentencepiece special-token id, or None for its -1 ('no such token')."""
    return None if i < 0 else int(i)


class SentencePieceTokenizer:
    """A minimal HF-like tokenizer over a sentencepiece model (Llama-2 convention: BOS prepended, no EOS)."""

    def __init__(self, model_file: str, add_bos_token: bool = True, add_eos_token: bool = False):
        import sentencepiece

        self.name_or_path = model_file
        self.sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token

    bos_token_id = property(lambda self: _special_id(self.sp.bos_id()), doc="BOS id, None when the model has none")
    eos_token_id = property(lambda self: _special_id(self.sp.eos_id()), doc="EOS id, None when the model has none")
    pad_token_id = property(lambda self: _special_id(self.sp.pad_id()), doc="PAD id, None when the model has none")
    unk_token_id = property(lambda self: _special_id(self.sp.unk_id()), doc="UNK id, None when the model has none")

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS (and EOS if configured) are added."""
        ids = list(self.sp.encode(text))
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None:
                ids = [self.bos_token_id] + ids
            if self.add_eos_token and self.eos_token_id is not None:
                ids = ids + [self.eos_token_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list or 1-D array); control tokens (BOS/EOS/PAD) never print text in sentencepiece."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if not (self.sp.is_control(i) or self.sp.is_unknown(i))]
        return self.sp.decode(ids)

    def batch_decode(self, batch, skip_special_tokens: bool = False) -> list[str]:
        """`decode` over a batch of id sequences."""
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    def convert_ids_to_tokens(self, ids) -> list[str]:
        """The sentencepiece pieces of `ids`."""
        return [self.sp.id_to_piece(int(i)) for i in ids]

    def __call__(self, text, add_special_tokens: bool = True) -> dict[str, Any]:
        """`{"input_ids": ...}` for one text (a list of ids) or a list of texts (a list of lists)."""
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        return {"input_ids": [self.encode(t, add_special_tokens) for t in text]}

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.name_or_path!r}, vocab_size={self.vocab_size})"


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0..255) plus EOS 256, BOS 257, PAD 258 (vocab 260, one spare id): the tokenizer
    of the ``random:`` model sources (:mod:`fairy2i_jax.sources`), a real tokenizer small enough for tests."""

    eos_token_id, bos_token_id, pad_token_id = 256, 257, 258
    vocab_size = 260
    name_or_path = "bytes"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def __call__(self, texts, add_special_tokens: bool = True):
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts, add_special_tokens)}
        return {"input_ids": [self.encode(t, add_special_tokens) for t in texts]}

    def __len__(self) -> int:
        return self.vocab_size

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS, else 0 (padded positions are
    always masked, so only the id's range matters). The one home of this fallback."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


def _special_flags(directory: str) -> dict[str, bool]:
    """`add_bos_token` / `add_eos_token` from a `tokenizer_config.json` next to `tokenizer.model`, if any."""
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(cfg_path):
        return {}
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    return {k: bool(cfg[k]) for k in ("add_bos_token", "add_eos_token") if k in cfg}


class TokenizerNotFound(Fairy2iError, FileNotFoundError):
    """A path that holds no usable tokenizer (the message names every file looked for)."""


def _not_found(path: str, why: str) -> TokenizerNotFound:
    """The one error for a path that holds no usable tokenizer, naming every file looked for."""
    looked = ", ".join((*HF_TOKENIZER_FILES, SENTENCEPIECE_FILE))
    return TokenizerNotFound(f"no tokenizer at {path!r}: {why}; looked for a .gguf or .model file, "
                             f"or a directory with one of: {looked}")


def load_tokenizer(path: str | os.PathLike):
    """A tokenizer for `path` (HF dir, sentencepiece `tokenizer.model` dir or file, or `.gguf` file)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            from fairy2i_jax.hf.gguf import gguf_tokenizer

            return gguf_tokenizer(path)
        if path.endswith(".model"):
            return SentencePieceTokenizer(path, **_special_flags(os.path.dirname(path) or "."))
        raise _not_found(path, "it is a file that is neither .gguf nor a sentencepiece .model")
    if not os.path.isdir(path):
        raise _not_found(path, "the path does not exist")
    has = {name for name in (*HF_TOKENIZER_FILES, SENTENCEPIECE_FILE) if os.path.isfile(os.path.join(path, name))}
    if SENTENCEPIECE_FILE in has and "tokenizer.json" not in has:
        return SentencePieceTokenizer(os.path.join(path, SENTENCEPIECE_FILE), **_special_flags(path))
    if has & set(HF_TOKENIZER_FILES):
        import transformers

        return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)  # never run code (or ask)
    raise _not_found(path, "the directory has none of the tokenizer files")
