"""fairy2i_jax.training.loop (``run``, what train.py calls): train.py as a subprocess on the debug config, killed
with -9 and SIGTERM mid-run, then the same command resumes and the loss sequence equals the uninterrupted
reference run (conftest.py) bit for bit; a corrupt checkpoint on resume; the finished run's export; the refusals
before a run starts and a diverging run; two processes as two hosts against one.

The subprocesses share a JAX persistent compilation cache (same executables, so the same bits) to save time,
and run on one CPU device (train_helpers.REFERENCE_ARGS).
"""

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from fairy2i_jax.config import ConfigError
from fairy2i_jax.training.config import load_train_config
from fairy2i_jax.training.loop import TrainingDiverged, run
from train_helpers import (
    DEBUG_CONFIG,
    REFERENCE_STEPS as STEPS,
    ROOT,
    finish_reference,
    logged_losses,
    reference_cmd,
    train_cmd,
    train_env,
)


def _start(run_dir: Path, cache: Path) -> subprocess.Popen:
    return subprocess.Popen(reference_cmd(run_dir), cwd=ROOT, env=train_env(cache=cache), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_lines(run_dir: Path, proc: subprocess.Popen, k: int, timeout: float = 240) -> None:
    path = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= k:
            return
        assert proc.poll() is None, "the run ended before it could be interrupted:\n" + proc.stdout.read()
        time.sleep(0.02)
    raise AssertionError(f"no {k} metrics lines after {timeout} s")


def test_kill_9_then_resume_is_bit_exact(tmp_path, jax_compile_cache, reference):
    _, want = reference
    run_dir = tmp_path / "run"
    k = random.Random(os.getpid()).randint(3, STEPS - 4)
    proc = _start(run_dir, jax_compile_cache)
    _wait_for_lines(run_dir, proc, k)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    logged = len(logged_losses(run_dir))
    assert k <= logged < STEPS, f"killed after {logged} steps"
    finish_reference(run_dir, jax_compile_cache)
    assert logged_losses(run_dir) == want


def test_sigterm_saves_exits_0_and_resumes_exactly(tmp_path, jax_compile_cache, reference):
    _, want = reference
    run_dir = tmp_path / "run"
    proc = _start(run_dir, jax_compile_cache)
    _wait_for_lines(run_dir, proc, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped by signal" in out
    stopped = max(logged_losses(run_dir))
    assert stopped < STEPS
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == stopped, (steps, stopped)
    finish_reference(run_dir, jax_compile_cache)
    assert logged_losses(run_dir) == want


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def test_corrupt_checkpoint_on_resume_is_a_clear_error_and_deletes_nothing(tmp_path, jax_compile_cache, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    latest = run_dir / "checkpoints" / str(STEPS)
    data_files = [p for p in (latest / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files
    for p in data_files:
        p.write_bytes(os.urandom(p.stat().st_size))
    before = _tree_digest(run_dir / "checkpoints")
    proc = subprocess.run(reference_cmd(run_dir, ["train.steps=20"]), cwd=ROOT,
                          env=train_env(cache=jax_compile_cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"checkpoint step {STEPS} in {run_dir / 'checkpoints'} cannot be read" in proc.stderr
    assert "Nothing was deleted" in proc.stderr
    assert _tree_digest(run_dir / "checkpoints") == before


def test_finished_run_exports_an_hf_dir_with_the_trained_logits(reference, monkeypatch, tmp_path):
    """The run's own export (``<run_dir>/hf``, dequantized bf16) loads in transformers; the CLI exports the same
    run as float32 dequantized (transformers) and as packed (ours) with the trained QAT model's logits."""
    import torch
    import transformers

    from fairy2i_jax.export import main as export_main
    from fairy2i_jax import sources
    from fairy2i_jax.hf.load import load_pretrained
    from model_helpers import jax_logits, qat_logits

    monkeypatch.chdir(ROOT)
    run_dir = reference[0]
    model = sources.load_model(str(run_dir))
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 24)).astype(np.int32)
    mask = np.ones_like(ids)
    want = qat_logits(model, ids, mask)

    def hf_logits(path):
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            return hf(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.numpy()

    assert np.abs(hf_logits(run_dir / "hf") - want).max() <= 0.05  # bf16 embeddings and norms
    assert export_main(["--from", str(run_dir), "--out", str(tmp_path / "f32"), "--dtype", "float32",
                        "--no-progress"]) == 0
    assert np.abs(hf_logits(tmp_path / "f32") - want).max() <= 1e-4
    assert export_main(["--from", str(run_dir), "--out", str(tmp_path / "packed"), "--format", "packed",
                        "--dtype", "float32", "--no-progress"]) == 0
    packed = load_pretrained(tmp_path / "packed", compute_dtype=model.config.compute_dtype)
    assert np.abs(jax_logits(packed, ids, mask) - want).max() <= 1e-4


# -- refusals before a run starts, and a diverging run (in process) ---------------------------------------------


def _debug(tmp_path, *overrides):
    """The debug config in ``tmp_path`` without the final export."""
    return load_train_config(DEBUG_CONFIG, [f"train.run_dir={tmp_path / 'run'}", "export.format=none", *overrides])


def test_empty_corpus_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n   \n")
    with pytest.raises(ValueError, match=r"empty corpus: .*empty\.txt gave no tokens"):
        run(_debug(tmp_path, f"data.train=[{empty}]"))


def test_seq_len_above_the_model_positions_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="data.seq_len = 2048 exceeds the model's max_position_embeddings = 1024"):
        run(_debug(tmp_path, "data.seq_len=2048"))


def test_diverging_run_stops_naming_the_step_and_param_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = _debug(tmp_path, "optimizer.name=sgd", "optimizer.lr=1e12", "optimizer.clip_norm=0",
                 "optimizer.warmup_steps=0", "train.checkpoint_every=1", "train.steps=6", "train.grad_accum=1",
                 "data.eval=[]", "mesh.data=1")
    with pytest.raises(TrainingDiverged) as e:
        run(cfg)
    message = str(e.value)
    assert message.startswith("step 2: non-finite loss")
    assert "first non-finite gradient: embed_tokens.embedding" in message
    assert f"the last good checkpoint is 1 in {tmp_path / 'run' / 'checkpoints'}" in message
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["1"]


# -- two hosts ---------------------------------------------------------------------------------------------------

# Two CPU processes on loopback as two hosts (4 fake devices each, jax.distributed over 127.0.0.1) train 3 steps
# of the debug config and match one process with 8 devices. Each host reads only its own rows of every global
# batch (a contiguous block); the global array is assembled with ``jax.make_array_from_process_local_data`` and
# holds the same rows on the same devices as the one-process run, but the gradient sums are reduced across
# processes (gloo) in another order than within one: losses agree to float32 rounding (relative 1e-5), not bit
# for bit.
MULTIHOST_ARGS = ["train.steps=3", "train.checkpoint_every=0", "train.eval_batches=1", "data.global_batch=16",
                  "train.grad_accum=1", "mesh.data=-1", "mesh.fsdp=1", "export.format=none"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loss_list(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x and "event" not in x]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    one = tmp_path / "one"
    proc = subprocess.run(train_cmd(one, *MULTIHOST_ARGS), cwd=ROOT, env=train_env(8), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    two = tmp_path / "two"
    port = _free_port()
    hosts = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id"]
    cmd = train_cmd(two, *MULTIHOST_ARGS)
    procs = [subprocess.Popen(cmd[:2] + [*hosts, str(i)] + cmd[2:], cwd=ROOT, env=train_env(4),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    assert (two / "checkpoints" / "3").is_dir()
    want, got = _loss_list(one), _loss_list(two)
    assert len(want) == len(got) == 3
    for a, b in zip(want, got):
        assert abs(a - b) <= 1e-5 * abs(a), (want, got)
