"""`load_tokenizer`: an HF tokenizer directory, a sentencepiece `tokenizer.model` directory, and clear errors."""

import gzip
import json
import os

import pytest

from fairy2i_jax.hf.tokenizer import SentencePieceTokenizer, load_tokenizer

AUSTEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "austen", "test", "persuasion.txt.gz")
FALLBACK_LINES = [f"Line {i}: the quick brown fox jumps over the lazy dog, said Anne to Captain Wentworth."
                  for i in range(300)]


def _corpus_lines(n: int = 400) -> list[str]:
    """A few hundred English lines: Persuasion when the shared data is present, else generated sentences."""
    if os.path.isfile(AUSTEN):
        with gzip.open(AUSTEN, "rt", encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        return lines[200:200 + n]
    return FALLBACK_LINES


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    """A directory holding only a Llama-2 style sentencepiece `tokenizer.model` (BPE, vocab 200)."""
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus_lines()), model_prefix=str(d / "tokenizer"),
                                   vocab_size=200, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    os.remove(d / "tokenizer.vocab")
    return d


def test_sentencepiece_dir_round_trip_and_bos(spm_dir):
    import sentencepiece

    tok = load_tokenizer(spm_dir)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, None, 0)
    assert len(tok) == tok.vocab_size == 200
    text = "Anne Elliot was walking to the house."
    reference = sentencepiece.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model")).encode(text)
    ids = tok.encode(text)
    assert ids == [1] + reference  # BOS prepended, no EOS (Llama-2 convention)
    assert tok.encode(text, add_special_tokens=False) == reference
    assert tok(text)["input_ids"] == ids
    assert tok([text, "Captain Wentworth"])["input_ids"][0] == ids
    assert tok.decode(ids) == text
    assert tok.decode(ids + [2], skip_special_tokens=True) == text
    assert tok.batch_decode([ids]) == [text]


def test_sentencepiece_flags_from_tokenizer_config(spm_dir, tmp_path):
    """`add_bos_token` / `add_eos_token` in a tokenizer_config.json next to tokenizer.model are honoured."""
    d = tmp_path / "flags"
    d.mkdir()
    (d / "tokenizer.model").write_bytes((spm_dir / "tokenizer.model").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "add_eos_token": True}))
    tok = load_tokenizer(d)
    assert isinstance(tok, SentencePieceTokenizer)
    ids = tok.encode("the house")
    assert ids[0] != 1 and ids[-1] == 2
    direct = load_tokenizer(d / "tokenizer.model")  # the .model file itself works too
    assert direct.encode("the house") == ids


def test_hf_dir_round_trip(tmp_path):
    """A tokenizer.json directory (tiny BPE trained offline) loads through AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_corpus_lines(100), trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()

    tok = load_tokenizer(tmp_path)
    text = "Anne Elliot was walking to the house."
    ids = tok(text)["input_ids"]
    assert ids == bpe.encode(text).ids
    assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)


def test_missing_or_empty_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent.*does not exist.*tokenizer\.json.*tokenizer\.model"):
        load_tokenizer(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"empty.*none of the tokenizer files.*tokenizer_config\.json"):
        load_tokenizer(empty)
    with pytest.raises(FileNotFoundError, match=r"config\.json.*neither \.gguf nor"):
        load_tokenizer(empty / "config.json")
