"""fairy2i_jax.evaluation.cli (`eval.py`) on a tiny saved Llama + BPE tokenizer: its perplexities against the
transformers torch model on chunks built here independently, PTQ rows against the unfrozen converted model, the
local lm-eval task, the JSON report, a real subprocess run, a training run directory, the one-line errors (exit
code 2), and `--ppl-datasets` (local datasets through the hub path) equal to `--ppl-files` on the same text."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from eval_helpers import austen_sentences, tiny_llama, tiny_tokenizer, write_jsonl_gz
from fairy2i_jax.evaluation.cli import main
from fairy2i_jax.evaluation.ppl_datasets import PPL_DATASETS, PplDataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK_DIR = os.path.join(REPO, "tests", "data", "tiny_mc")
SEQLEN, MAX_TOKENS = 96, 1200
REL = 1e-4


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model dir with tokenizer, text file, torch model, tokenizer): the text is 80 Austen sentences, one
    paragraph each, the 6th with a line break inside."""
    tok = tiny_tokenizer()
    oracle = tiny_llama(len(tok), seed=1)
    root = tmp_path_factory.mktemp("eval_cli")
    oracle.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    sentences = austen_sentences(80)
    sentences[5] = sentences[5].replace(" ", "\n", 1)
    text = root / "persuasion_part.txt"
    text.write_text("\n\n".join(sentences) + "\n", encoding="utf-8")
    return str(root / "tiny"), str(text), oracle, tok


def torch_nll(model, ids, scored):
    """Sum of -log p over the scored targets of one window (`scored[t]`: target ids[t + 1] counts)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
    return -float(logp[np.asarray(scored)].sum())


def oracle_official(model, tok, paragraphs):
    """Official packing written out here: [BOS] + items (+EOS) while <= SEQLEN, first chunks up to MAX_TOKENS;
    targets after EOS masked. -> (ppl per scored target, ppl with the paper's denominator)."""
    chunks, current = [], [tok.bos_token_id]
    for p in paragraphs:
        item = tok.encode(p, add_special_tokens=False) + [tok.eos_token_id]
        if len(item) > SEQLEN - 1:
            continue
        if len(current) + len(item) > SEQLEN:
            chunks.append(current)
            current = [tok.bos_token_id]
        current = current + item
    chunks.append(current)
    kept, total = [], 0
    for c in chunks:
        if total + len(c) > MAX_TOKENS:
            break
        kept.append(c)
        total += len(c)
    nll = scored = positions = 0
    for c in kept:
        mask = [c[t] != tok.eos_token_id for t in range(len(c) - 1)]
        nll += torch_nll(model, c, mask)
        scored, positions = scored + sum(mask), positions + len(c) - 1
    assert 1 < len(kept) < len(chunks) and scored < positions
    return np.exp(nll / scored), np.exp(nll / positions)


def oracle_contiguous(model, tok, text):
    """The whole text tokenized once (BOS first), first MAX_TOKENS tokens, full windows of SEQLEN."""
    ids = tok(text)["input_ids"][:MAX_TOKENS]
    windows = [ids[s: s + SEQLEN] for s in range(0, len(ids) - SEQLEN + 1, SEQLEN)]
    nll = sum(torch_nll(model, w, [True] * (SEQLEN - 1)) for w in windows)
    return np.exp(nll / (len(windows) * (SEQLEN - 1)))


def _args(saved, out, *extra):
    model_dir, text, _, _ = saved
    return ["--model", model_dir, "--ppl-files", text, "--seqlen", str(SEQLEN), "--max-tokens", str(MAX_TOKENS),
            "--batch-size", "3", "--no-progress", "--json", str(out), *extra]


def test_fp_and_w2_rows_equal_oracles(saved, tmp_path, capsys, monkeypatch):
    from fairy2i_jax import convert, load_pretrained
    from fairy2i_jax.evaluation import jax_logits_fn, torch_logits_fn
    from fairy2i_jax.evaluation.cli import TextFile, perplexity_windows
    from fairy2i_jax.evaluation.lm_eval_adapter import LogitsLM, evaluate_tasks
    from fairy2i_jax.evaluation.perplexity import evaluate_perplexity

    model_dir, text, oracle, tok = saved
    monkeypatch.chdir(REPO)  # tiny_mc's data_files path is relative to the repository root
    out = tmp_path / "report.json"
    code = main(_args(saved, out, "--quant", "fp,w2", "--tasks", "tiny_mc", "--tasks-include", TASK_DIR))
    stdout = capsys.readouterr().out
    assert code == 0
    assert "| tiny | fp | float32 |" in stdout and "| tiny | w2 | float32 |" in stdout and "tiny_mc acc" in stdout
    report = json.loads(out.read_text())
    fp, w2 = report["rows"]
    name = "persuasion_part"
    paragraphs = open(text, encoding="utf-8").read().strip().split("\n\n")
    want_scored, want_paper = oracle_official(oracle, tok, paragraphs)
    assert fp["ppl"][name]["official"]["ppl"] == pytest.approx(want_scored, rel=REL)
    assert fp["ppl"][name]["official"]["ppl_official_denominator"] == pytest.approx(want_paper, rel=REL)
    want_contig = oracle_contiguous(oracle, tok, open(text, encoding="utf-8").read().strip())
    assert fp["ppl"][name]["contiguous"]["ppl"] == pytest.approx(want_contig, rel=REL)
    assert fp["ppl"][name]["contiguous"]["scored"] == (MAX_TOKENS // SEQLEN) * (SEQLEN - 1)

    # w2 row: the frozen-weight model equals the converted model quantizing inside its own forward
    qat = convert(load_pretrained(model_dir, compute_dtype="float32"), "w2")
    args = type("A", (), dict(seqlen=SEQLEN, max_tokens=MAX_TOKENS, stride=None))
    wins = perplexity_windows(TextFile(text, name, paragraphs, ""), tok, "official", args)
    direct = evaluate_perplexity(jax_logits_fn(qat, buckets=(SEQLEN,), batch_size=3), wins, 3, progress=False)
    assert w2["ppl"][name]["official"]["ppl"] == pytest.approx(direct.ppl, rel=1e-5)
    assert abs(np.log(w2["ppl"][name]["official"]["ppl"] / want_scored)) > 0.01  # quantization shows

    # tiny_mc through the adapter: the same acc as the torch model under the same adapter
    torch_lm = LogitsLM(torch_logits_fn(oracle), tok, max_length=2048, batch_size=3, progress=False)
    want_acc = evaluate_tasks(torch_lm, ["tiny_mc"], TASK_DIR, include_defaults=False)["results"]["tiny_mc"]
    assert fp["tasks"]["tiny_mc"]["acc"] == pytest.approx(want_acc["acc,none"], abs=1e-12)
    assert report["command"].startswith("python eval.py --model") and report["rows"][0]["quant"] == "fp"


def test_subprocess_run(saved, tmp_path):
    out = tmp_path / "sub.json"
    args = _args(saved, out, "--quant", "fp", "--protocol", "contiguous")
    proc = subprocess.run([sys.executable, "eval.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    row = json.loads(out.read_text())["rows"][0]
    _, text, oracle, tok = saved
    want = oracle_contiguous(oracle, tok, open(text, encoding="utf-8").read().strip())
    assert row["ppl"]["persuasion_part"]["contiguous"]["ppl"] == pytest.approx(want, rel=REL)
    assert "| tiny | fp | float32 |" in proc.stdout and "official" not in row["ppl"]["persuasion_part"]


def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("eval.py: error:")]
    assert len(lines) == 1
    return lines[0]


def test_errors_are_one_line_exit_2(saved, tmp_path, capsys):
    model_dir, text, _, _ = saved
    base = ["--model", model_dir, "--no-progress"]
    missing = str(tmp_path / "missing.txt")
    assert f"perplexity file {missing!r} does not exist" in _error(capsys, base + ["--ppl-files", missing])
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n  \n")
    assert "holds no text" in _error(capsys, base + ["--ppl-files", str(empty)])
    line = _error(capsys, base + ["--tasks", "tiny_mcq", "--tasks-include", TASK_DIR, "--no-builtin-tasks"])
    assert "unknown lm-eval task(s) ['tiny_mcq']" in line and "did you mean ['tiny_mc']" in line
    line = _error(capsys, ["--model", str(tmp_path / "nope.gguf"), "--ppl-files", text])
    assert "does not exist" in line
    assert "unknown --quant 'w9'" in _error(capsys, base + ["--ppl-files", text, "--quant", "fp,w9"])


def test_training_run_dir(tmp_path, capsys):
    """A 1-step W2 QAT run of the debug config: `trained` equals the run's own QAT forward, and equals `w2` PTQ
    of its masters (same quantizer, same numerics); `fp` (masters unquantized) differs."""
    from fairy2i_jax import sources
    from fairy2i_jax.evaluation import jax_logits_fn
    from fairy2i_jax.evaluation.perplexity import contiguous_perplexity
    from fairy2i_jax.training import load_train_config, run

    run_dir = tmp_path / "run"
    cfg = load_train_config(os.path.join(REPO, "configs", "debug.yaml"), [
        f"train.run_dir={run_dir}", "train.steps=1", "train.checkpoint_every=1", "data.eval=[]",
        "train.eval_batches=0", "export.format=none", "eval.ppl_max_tokens=256", "eval.ppl_seq_len=128"])
    assert cfg.quant.preset == "w2" and cfg.quant.numerics == "bf16_exact"
    capsys.readouterr()
    result = run(cfg)
    printed = capsys.readouterr().out  # the run's own perplexity reports (official protocol on data.test)
    for name in ("fp", "ptq"):
        assert f"perplexity before training ({name}, data.test" in printed
        assert np.isfinite(result.ppl[name])
    assert f"perplexity after training (w2, data.test): {result.ppl['trained']:.3f}" in printed
    text = tmp_path / "austen.txt"
    text.write_text("\n\n".join(austen_sentences(60)), encoding="utf-8")
    out = tmp_path / "run.json"
    capsys.readouterr()
    assert main(["--model", str(run_dir), "--quant", "trained,fp,w2", "--ppl-files", str(text), "--protocol",
                 "contiguous", "--seqlen", "256", "--max-tokens", "1024", "--no-progress", "--json", str(out)]) == 0
    trained, fp, w2 = (r["ppl"]["austen"]["contiguous"]["ppl"] for r in json.loads(out.read_text())["rows"])
    loaded = sources.load(str(run_dir))
    model, tok = loaded.model, loaded.tokenizer
    direct = contiguous_perplexity(jax_logits_fn(model, buckets=(256,), batch_size=4), text.read_text()[:1200],
                                   tok, seqlen=256, batch_size=4, progress=False)
    assert direct.num_scored == 4 * 255  # 1200 bytes hold the first 1024 tokens of the byte tokenizer
    assert trained == pytest.approx(direct.ppl, rel=1e-5) and w2 == pytest.approx(trained, rel=1e-6)
    assert abs(np.log(fp / trained)) > 1e-3


# -- --ppl-datasets (local files through the same load_dataset path as wikitext2 and c4; no network here) --------


@pytest.fixture
def hf_datasets_cache(tmp_path, monkeypatch):
    """`datasets` (the test is skipped without it), its `load_dataset` writing its arrow files under tmp_path."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def test_cli_dataset_errors_exit_2(saved, hf_datasets_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = ["--model", saved[0], "--no-progress"]
    line = _error(capsys, base + ["--ppl-datasets", "wikitext2"])
    assert "cannot load perplexity dataset 'wikitext2' (Salesforce/wikitext" in line
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in line and "local copy of its text with --ppl-files" in line

    line = _error(capsys, base + ["--ppl-datasets", "wikitext2,wikitext103"])
    assert "unknown perplexity dataset(s) ['wikitext103']; known: wikitext2, c4" in line

    empty = write_jsonl_gz(tmp_path / "empty.json.gz", [{"text": ""}, {"text": ""}])
    monkeypatch.setitem(PPL_DATASETS, "emptylocal", PplDataset("emptylocal", "json", data_files=(empty,)))
    line = _error(capsys, base + ["--ppl-datasets", "emptylocal"])
    assert "perplexity dataset 'emptylocal'" in line and "holds no text" in line


def test_cli_dataset_perplexity_equals_ppl_files(saved, hf_datasets_cache, tmp_path, capsys, monkeypatch):
    """The same sentences as a text file (one per line, --doc-split line), as a c4-like JSON dataset (one
    record each) and as a wikitext-like parquet dataset (lines, with empty records between): every protocol
    gives the very same numbers, so a dataset goes through exactly the path of a --ppl-files file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sentences = austen_sentences(60)
    text = tmp_path / "sentences.txt"
    text.write_text("\n\n".join(sentences) + "\n", encoding="utf-8")
    c4_file = write_jsonl_gz(tmp_path / "c4like.json.gz", [{"text": s} for s in sentences])
    wiki_records = [r for s in sentences for r in (s + "\n", "", "\n")]
    pq.write_table(pa.table({"text": wiki_records}), tmp_path / "wikilike.parquet")
    monkeypatch.setitem(PPL_DATASETS, "c4like", PplDataset("c4like", "json", split="validation",
                                                           data_files=(c4_file,)))
    monkeypatch.setitem(PPL_DATASETS, "wikilike", PplDataset(
        "wikilike", "parquet", data_files=(str(tmp_path / "wikilike.parquet"),), documents="lines"))
    out = tmp_path / "report.json"
    code = main(["--model", saved[0], "--ppl-files", str(text), "--doc-split", "line",
                 "--ppl-datasets", "c4like,wikilike", "--seqlen", "128", "--max-tokens", "1500",
                 "--batch-size", "4", "--no-progress", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "[eval] loading dataset c4like: json, split validation, files " in captured.err
    assert "c4like official PPL" in captured.out and "wikilike contiguous PPL" in captured.out
    ppl = json.loads(out.read_text())["rows"][0]["ppl"]
    assert list(ppl) == ["sentences", "c4like", "wikilike"]
    file_numbers = ppl["sentences"]
    assert file_numbers["official"]["chunks"] > 1 and file_numbers["contiguous"]["scored"] == 11 * 127
    assert file_numbers["official"]["scored"] < file_numbers["official"]["positions"]
    assert ppl["c4like"] == file_numbers and ppl["wikilike"] == file_numbers


def test_a_packed_dir_is_evaluated_on_the_kernels(saved, tmp_path, capsys):
    """eval.py on a packed export (its linears on the packed kernels) gives the dequantized export's perplexity
    (fp32 activations: the same A_q summed in another order, within 1e-5); "fp" of a packed dir is refused."""
    import jax.numpy as jnp

    from fairy2i_jax import convert, load_pretrained
    from fairy2i_jax.hf.export import export_model

    model_dir, text, _, _ = saved
    w2 = convert(load_pretrained(model_dir, compute_dtype=jnp.float32), "w2")
    for fmt in ("packed", "dequantized"):
        export_model(w2, tmp_path / fmt, fmt, dtype="float32", tokenizer_from=model_dir, progress=False)
    rows = {}
    for fmt in ("packed", "dequantized"):
        out = tmp_path / f"{fmt}.json"
        assert main(_args((str(tmp_path / fmt), text, None, None), out, "--quant", "trained", "--protocol",
                          "contiguous")) == 0
        rows[fmt] = json.loads(out.read_text())["rows"][0]["ppl"]
    capsys.readouterr()
    (name,) = rows["packed"]
    got, want = rows["packed"][name]["contiguous"], rows["dequantized"][name]["contiguous"]
    assert got["scored"] == want["scored"] and got["ppl"] == pytest.approx(want["ppl"], rel=1e-5)
    assert main(_args((str(tmp_path / "packed"), text, None, None), tmp_path / "fp.json", "--quant", "fp")) == 2
    assert "a packed model has only its 2-bit codes" in capsys.readouterr().err
