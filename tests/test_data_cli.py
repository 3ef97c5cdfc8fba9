"""``python -m fairy2i_jax.data`` (fairy2i_jax.data.__main__): tokenize a config's data into stores, the one-line
refusals, ``info``, and a training run whose train / eval / test data are stores: the same losses, held-out loss
and perplexity as the run that tokenizes the files at start-up."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from fairy2i_jax import data
from fairy2i_jax.data.__main__ import main
from fairy2i_jax.hf.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The debug config's train / eval / test data as stores (random:tiny: the byte tokenizer)."""
    d = tmp_path_factory.mktemp("stores")
    for split in ("train", "eval", "test"):
        assert main(["tokenize", "--config", DEBUG, "--out", str(d / split), "--split", split, "--no-progress"]) == 0
    return d


def test_tokenize_writes_what_the_config_reads(stores, capsys):
    c = data.open_store(stores / "train")
    memory = data.load_corpus([str(ROOT / "data/austen/train/prideprejudice.txt.gz")], ByteTokenizer(),
                              doc_split="paragraph")
    np.testing.assert_array_equal(c.tokens[:], memory.tokens)
    m = data.read_manifest(stores / "train")
    assert m.tokenizer.source == "random:tiny" and m.tokenizer.kind == "ByteTokenizer" and m.dtype == "uint16"
    assert main(["info", str(stores / "train")]) == 0
    assert json.loads(capsys.readouterr().out)["num_tokens"] == memory.num_tokens


def test_refusals_are_one_line(stores, tmp_path, capsys):
    cases = [
        (["--out", str(stores / "train")], "exists: pass --overwrite"),
        (["--out", str(tmp_path / "x"), "data.train=[hf:allenai/c4:en]"], "offline"),
        (["--out", str(tmp_path / "x"), f"data.train=[store:{stores / 'train'}]"], "already a token store"),
        (["--out", str(tmp_path / "x"), "--num-proc", "0"], "--num-proc must be >= 1"),
        (["--out", str(tmp_path / "x"), "data.train=[nope.txt]"], "does not exist"),
    ]
    for extra, match in cases:
        assert main(["tokenize", "--config", DEBUG, "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, err
    assert main(["info", str(tmp_path)]) == 2 and "is not a token store" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x and "event" not in x]


def _store_overrides(stores: Path) -> list[str]:
    return [f"data.{s}=[store:{stores / s}]" for s in ("train", "eval", "test")]


def test_a_run_prepares_its_inputs_from_stores(stores, tmp_path):
    """train.py's inputs (loop.prepare) from stores equal those tokenized from the files: the same tokens, and
    the test documents as the ids the perplexity report would encode from the texts."""
    from fairy2i_jax.evaluation.perplexity import official_packed_chunks
    from fairy2i_jax.training import load_train_config
    from fairy2i_jax.training.loop import prepare

    common = ["eval.ppl_max_tokens=256", f"train.run_dir={tmp_path / 'run'}"]
    files = prepare(load_train_config(DEBUG, common))
    on_stores = prepare(load_train_config(DEBUG, [*common, *_store_overrides(stores)]))
    np.testing.assert_array_equal(on_stores.train_corpus.tokens[:], files.train_corpus.tokens)
    np.testing.assert_array_equal(on_stores.held_out.tokens[:], files.held_out.tokens)
    assert len(on_stores.test_docs) == len(files.test_docs)
    a = official_packed_chunks(files.test_docs, files.tokenizer, 64)
    b = official_packed_chunks(on_stores.test_docs, on_stores.tokenizer, 64)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not (tmp_path / "run").exists()  # prepare writes nothing


@pytest.mark.slow
def test_training_on_stores(stores, tmp_path):
    """A short run whose train / eval / test data are stores: losses, the held-out loss, the perplexity report
    and a checkpoint (the batches equal the in-memory ones: tests/test_store.py)."""
    from fairy2i_jax.training import load_train_config, run

    result = run(load_train_config(DEBUG, [
        "train.steps=2", "train.checkpoint_every=0", "train.eval_batches=1", "eval.ppl_max_tokens=256",
        "eval.ppl_seq_len=64", "eval.ppl_before=false", "export.format=none", "train.grad_accum=1", "mesh.data=1",
        f"train.run_dir={tmp_path / 'run'}", *_store_overrides(stores)]))
    losses = _losses(tmp_path / "run")
    assert len(losses) == 2 and all(np.isfinite(losses)) and np.isfinite(result.eval_loss)
    assert set(result.ppl) == {"trained"} and os.path.isdir(tmp_path / "run" / "checkpoints" / "2")
