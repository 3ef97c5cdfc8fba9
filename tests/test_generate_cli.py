"""`python -m fairy2i_jax.generate` (fairy2i_jax.generate.__main__): streamed text equal to the library's
tokens, PTQ onto the packed kernels, a batch from a file, and one line for every bad input."""

import pytest

from fairy2i_jax import convert, sources
from fairy2i_jax.convert import to_packed
from fairy2i_jax.generate.__main__ import main
from fairy2i_jax.generate.engine import greedy_ids

PROMPT = "Emma Woodhouse, handsome, clever, and rich"


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["--model", "random:tiny", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_streams_the_greedy_text_of_the_packed_ptq_model(capsys):
    code, out, err = _run(capsys, "--prompt", PROMPT, "--quant", "w2", "--max-new-tokens", "10")
    assert code == 0 and "packed weights" in err and "time to first token" in err and "tokens/s" in err
    loaded = sources.load("random:tiny", compute_dtype="float32")
    tok = loaded.tokenizer
    packed = to_packed(convert(loaded.model, "w2"))
    want = greedy_ids(packed, [tok(PROMPT)["input_ids"]], 10, eos_id=tok.eos_token_id)[0]
    assert out == tok.decode(want, skip_special_tokens=True) + "\n"


def test_a_prompts_file_is_one_batch_and_sampling_follows_the_seed(capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("It is a truth\n\nuniversally acknowledged\n")
    argv = ["--prompts-file", str(prompts), "--max-new-tokens", "6", "--temperature", "1.0", "--seed", "5"]
    code, first, _ = _run(capsys, *argv)
    assert code == 0 and first.startswith("[0] It is a truth\n") and "[1] universally acknowledged\n" in first
    assert _run(capsys, *argv)[1] == first


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "  "], "an empty prompt"),
    ([], "no prompt: give --prompt TEXT or --prompts-file FILE"),
    (["--prompt", "x", "--max-new-tokens", "5000"], "exceeds the model's max_position_embeddings = 1024"),
    (["--prompt", "x", "--chat"], "has no chat template"),
    (["--prompt", "x", "--top-p", "0"], "0 < top_p <= 1"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    code, _, err = _run(capsys, *argv)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_an_unknown_source_is_one_line(capsys, tmp_path):
    code = main(["--model", str(tmp_path / "nowhere"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and err.count("\n") == 1
