"""The refusals a careless user can meet (docs/refusals.md), one test each: data that must survive is compared byte
for byte, a wrong result is refused instead of reported, and every refusal is one line with exit code 2.

Training runs use the debug config (a random tiny Llama over bytes) in-process; the full-disk cases run a
subprocess whose file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes writes fail with a real OSError.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from fairy2i_jax import load_pretrained
from fairy2i_jax.evaluation.cli import finite_json
from fairy2i_jax.evaluation.cli import main as eval_main
from fairy2i_jax.export import main as export_main
from fairy2i_jax.train import main as train_main
from model_helpers import checkpoint

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")
QUICK = ["train.steps=2", "train.checkpoint_every=1", "data.eval=[]", "train.eval_batches=0",
         "eval.ppl_max_tokens=0", "train.progress=false"]


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def _train(run_dir: Path, *extra: str) -> int:
    return train_main(["--config", DEBUG, f"train.run_dir={run_dir}", *QUICK, *extra])


@pytest.fixture(scope="module", autouse=True)
def _built():
    """The tiny test checkpoint, built (and its progress bars printed) before any test captures stderr."""
    checkpoint("llama")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 2-step debug run (checkpoints 1 and 2, its export in <run>/hf)."""
    run = tmp_path_factory.mktemp("refusals") / "run"
    assert _train(run) == 0
    return run


# ---------------------------------------------------------------------------------------------- never lose data


def test_export_into_a_run_or_its_checkpoints_is_refused_and_nothing_changes(run_dir, capsys, tmp_path):
    before = _digest(run_dir)
    for out in (run_dir / "checkpoints", run_dir, run_dir / "checkpoints" / "1", run_dir / "hf", tmp_path / "x"):
        source = str(run_dir) if out.parent != tmp_path else str(checkpoint("llama"))
        if out.parent == tmp_path:  # a directory holding a run dir
            shutil.copytree(run_dir, out / "run")
        code = export_main(["--from", source, "--out", str(out), "--overwrite", "--no-progress",
                            *(["--quant", "w2"] if source != str(run_dir) else [])])
        line = _one_line(capsys)
        assert code == 2 and str(out) in line and ("run" in line or "source" in line), line
    assert _digest(run_dir) == before


def test_export_onto_its_source_or_a_foreign_directory_is_refused(tmp_path, capsys):
    source = tmp_path / "model"
    shutil.copytree(checkpoint("llama"), source)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.txt").write_text("years of work")
    before, notes = _digest(source), _digest(tmp_path / "notes")
    for out, why in ((source, "is the export's source"), (source / "sub", "lies inside the export's source"),
                     (tmp_path, "contains the export's source"), (tmp_path / "notes", "not an earlier export")):
        code = export_main(["--from", str(source), "--quant", "w2", "--out", str(out), "--overwrite",
                            "--no-progress"])
        assert code == 2 and why in _one_line(capsys)
    assert _digest(source) == before and _digest(tmp_path / "notes") == notes


def test_train_export_dir_onto_the_model_source_is_refused_before_training(tmp_path, capsys):
    source = tmp_path / "model"
    shutil.copytree(checkpoint("llama"), source)
    before = _digest(source)
    code = _train(tmp_path / "run", f"model.path={source}", f"export.dir={source}")
    assert code == 2 and "is the export's source" in _one_line(capsys)
    assert _digest(source) == before and not (tmp_path / "run").exists()


def test_resume_without_config_yaml_checks_the_checkpoint_config(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "config.yaml").unlink()
    before = _digest(run / "checkpoints")
    code = _train(run, "quant.preset=w1", "optimizer.lr=0.1", "train.steps=3")
    line = _one_line(capsys)
    assert code == 2 and "checkpoints/2 was saved by a run with a different config" in line
    assert "optimizer.lr" in line and "quant.preset" in line
    assert _digest(run / "checkpoints") == before and not (run / "config.yaml").exists()


@pytest.mark.parametrize("override, message", [
    ("data.seq_len=4096", "data.seq_len = 4096 exceeds the model's max_position_embeddings = 1024"),
    ("data.train=[/no/such/corpus.txt]", "data file '/no/such/corpus.txt' does not exist"),
    ("model.path=/no/such/model", "model source '/no/such/model' does not exist"),
    ("data.global_batch=1000000", "one global batch of 1000000 x 64 needs"),
])
def test_a_rejected_command_writes_nothing(tmp_path, capsys, override, message):
    run = tmp_path / "run"
    assert _train(run, override) == 2
    assert message in _one_line(capsys)
    assert not run.exists()


def test_a_pickled_model_is_refused_and_never_opened(tmp_path, capsys):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(checkpoint("llama") / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not even opened")
    assert _train(tmp_path / "run", f"model.path={pickled}") == 2
    assert "pickled checkpoints are never loaded" in _one_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_run_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "run"
    target.write_text("a file")
    assert _train(target) == 2 and "exists and is not a directory" in _one_line(capsys)
    assert target.read_text() == "a file"


# ---------------------------------------------------------------------------------------------- never a wrong result


def test_eval_refuses_a_window_past_the_model_positions(capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged.")
    code = eval_main(["--model", "random:tiny", "--ppl-files", str(text), "--seqlen", "2048", "--no-progress"])
    assert code == 2 and "--seqlen 2048 exceeds the max_position_embeddings = 1024 of random:tiny" in _one_line(capsys)


def _with_big_tokenizer(tmp_path: Path) -> Path:
    """The tiny test model (vocab 256) next to a tokenizer of 300 tokens: ids past the embedding table."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path / "mismatch"
    shutil.copytree(checkpoint("llama"), path)
    vocab = {f"w{i}": i for i in range(300)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w2", unk_token="w0").save_pretrained(path)
    return path


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_everywhere(tmp_path, capsys):
    model = _with_big_tokenizer(tmp_path)
    text = tmp_path / "t.txt"
    text.write_text("w5 w299 w7")
    message = "the tokenizer has 300 tokens but the model's vocabulary has 256 entries"
    assert eval_main(["--model", str(model), "--ppl-files", str(text), "--seqlen", "8", "--no-progress"]) == 2
    assert message in _one_line(capsys)
    assert _train(tmp_path / "run", f"model.path={model}", f"data.train=[{text}]", "data.global_batch=1",
                  "train.grad_accum=1", "data.seq_len=2") == 2
    assert message in _one_line(capsys) and not (tmp_path / "run").exists()


def test_eval_json_is_strict_json():
    clean, bad = finite_json({"rows": [{"ppl": float("nan"), "ok": 1.5, "t": [float("inf"), 2]}]})
    assert clean == {"rows": [{"ppl": None, "ok": 1.5, "t": [None, 2]}]} and bad == ["rows[0].ppl", "rows[0].t[0]"]
    json.dumps(clean, allow_nan=False)


def test_export_of_a_non_finite_weight_is_refused_naming_the_tensor(tmp_path, capsys):
    source = tmp_path / "model"
    shutil.copytree(checkpoint("llama"), source)
    tensors = load_file(str(source / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert export_main(["--from", str(source), "--format", "master", "--out", str(out), "--no-progress"]) == 2
    line = _one_line(capsys)
    assert "tensor model.layers.1.mlp.up_proj.weight holds 1 non-finite value" in line
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_an_integer_weight_is_refused_not_cast(tmp_path):
    from fairy2i_jax.errors import CheckpointError

    source = tmp_path / "model"
    shutil.copytree(checkpoint("llama"), source)
    tensors = load_file(str(source / "model.safetensors"))
    tensors["model.norm.weight"] = np.ones(64, np.int32)
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="tensor 'model.norm.weight' is stored as int32"):
        load_pretrained(source, compute_dtype=jnp.float32)


def test_lr_zero_warns_while_the_inputs_are_checked(tmp_path, capsys):
    """The warning comes from the checks before anything is written (training itself would run as usual)."""
    from fairy2i_jax.training import load_train_config
    from fairy2i_jax.training.loop import prepare

    prepare(load_train_config(DEBUG, [f"train.run_dir={tmp_path / 'run'}", *QUICK, "optimizer.lr=0"]))
    assert "warning: optimizer.lr = 0: the steps run but no weight changes" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- one line each


def _corpus(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name, data, message", [
    ("latin1.txt", "caf\xe9 au lait. ".encode("latin-1") * 50, "latin1.txt: not UTF-8 text"),
    ("fake.txt.gz", b"plain text, not gzip " * 50, "fake.txt.gz: not a readable gzip file"),
])
def test_unreadable_corpus_files_are_named(tmp_path, capsys, name, data, message):
    corpus = _corpus(tmp_path, name, data)
    assert _train(tmp_path / "run", f"data.train=[{corpus}]") == 2
    assert message in _one_line(capsys) and not (tmp_path / "run").exists()


def test_a_garbled_run_config_is_named_by_every_command(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "config.yaml").write_text("model: [unclosed\n")
    assert _train(run) == 2
    assert "config.yaml: the run's config is not valid YAML" in _one_line(capsys)
    assert export_main(["--from", str(run), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "config.yaml: the run's config is not valid YAML" in _one_line(capsys)


def test_export_from_a_run_with_a_corrupt_latest_checkpoint_is_one_line(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    for p in (run / "checkpoints" / "2" / "state").rglob("*"):
        if p.is_file() and p.parent.name == "d":
            p.write_bytes(os.urandom(p.stat().st_size))
    before = _digest(run / "checkpoints")
    assert export_main(["--from", str(run), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "checkpoint step 2 in" in _one_line(capsys)
    assert _digest(run / "checkpoints") == before


_LIMITED = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
sys.argv = {argv!r}
runpy.run_module({module!r}, run_name="__main__")
"""


def _run_limited(module: str, argv: list[str], limit: int) -> subprocess.CompletedProcess:
    """``python -m module argv`` with every file write capped at ``limit`` bytes (a full disk, for this process)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    code = _LIMITED.format(limit=limit, argv=[module, *argv], module=module)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    proc = _run_limited("fairy2i_jax.export", ["--from", str(checkpoint("llama")), "--quant", "w2", "--out",
                                                str(out), "--format", "master", "--no-progress"], 20_000)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and err.count("\n") == 0 and "failed while writing" in err, proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_full_disk_during_training_is_one_line(tmp_path):
    run = tmp_path / "run"
    proc = _run_limited("fairy2i_jax.train", ["--config", DEBUG, f"train.run_dir={run}", *QUICK], 60_000)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]  # orbax's threads log too
    assert proc.returncode == 2 and len(ours) == 1, proc.stderr[-3000:]
    assert "CheckpointWriteError" in ours[0] and "could not be written to" in ours[0]
    assert str(run / "checkpoints") in ours[0] and "File too large" in ours[0]
