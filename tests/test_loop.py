"""train.py as a subprocess on the debug config: kill -9 and SIGTERM mid-run, then the same command resumes and
the loss sequence equals the uninterrupted run bit for bit. Plus a corrupt checkpoint on resume.

The subprocesses share a JAX persistent compilation cache (same executables, so the same bits) to save time,
and run on one CPU device; global batch 64 x 128 tokens makes a step slow enough (~0.2 s) to be interrupted.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 16
ARGS = [f"train.steps={STEPS}", "train.checkpoint_every=2", "train.keep_checkpoints=3", "data.global_batch=64",
        "data.seq_len=128", "train.grad_accum=2", "train.eval_batches=0", "data.eval=[]"]


def _env(cache: Path, devices: int = 1) -> dict:
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2",
               PYTHONPATH=str(ROOT))
    return env


def _cmd(run_dir: Path, extra=()) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "debug.yaml"),
            f"train.run_dir={run_dir}", *ARGS, *extra]


def _start(run_dir: Path, cache: Path) -> subprocess.Popen:
    return subprocess.Popen(_cmd(run_dir), cwd=ROOT, env=_env(cache), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(run_dir: Path, cache: Path) -> str:
    proc = subprocess.run(_cmd(run_dir), cwd=ROOT, env=_env(cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a step logged twice (before and after a restart) must agree exactly."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "loss" not in entry or "event" in entry:
            continue
        step = entry["step"]
        assert out.get(step, entry["loss"]) == entry["loss"], f"step {step} logged with two different losses"
        out[step] = entry["loss"]
    return out


def _wait_for_lines(run_dir: Path, proc: subprocess.Popen, k: int, timeout: float = 240) -> None:
    path = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= k:
            return
        assert proc.poll() is None, "the run ended before it could be interrupted:\n" + proc.stdout.read()
        time.sleep(0.02)
    raise AssertionError(f"no {k} metrics lines after {timeout} s")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    _finish(run_dir, cache)
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return run_dir, losses


def test_kill_9_then_resume_is_bit_exact(tmp_path, cache, reference):
    _, want = reference
    run_dir = tmp_path / "run"
    k = random.Random(os.getpid()).randint(3, STEPS - 4)
    proc = _start(run_dir, cache)
    _wait_for_lines(run_dir, proc, k)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    logged = len(_losses(run_dir))
    assert k <= logged < STEPS, f"killed after {logged} steps"
    _finish(run_dir, cache)
    assert _losses(run_dir) == want


def test_sigterm_saves_exits_0_and_resumes_exactly(tmp_path, cache, reference):
    _, want = reference
    run_dir = tmp_path / "run"
    proc = _start(run_dir, cache)
    _wait_for_lines(run_dir, proc, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped by signal" in out
    stopped = max(_losses(run_dir))
    assert stopped < STEPS
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == stopped, (steps, stopped)
    _finish(run_dir, cache)
    assert _losses(run_dir) == want


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def test_corrupt_checkpoint_on_resume_is_a_clear_error_and_deletes_nothing(tmp_path, cache, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    latest = run_dir / "checkpoints" / str(STEPS)
    data_files = [p for p in (latest / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files
    for p in data_files:
        p.write_bytes(os.urandom(p.stat().st_size))
    before = _tree_digest(run_dir / "checkpoints")
    proc = subprocess.run(_cmd(run_dir, ["train.steps=20"]), cwd=ROOT, env=_env(cache), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"checkpoint step {STEPS} in {run_dir / 'checkpoints'} cannot be read" in proc.stderr
    assert "Nothing was deleted" in proc.stderr
    assert _tree_digest(run_dir / "checkpoints") == before


def test_a_run_dir_source_gives_the_trained_model(reference, monkeypatch):
    from fairy2i_jax import sources
    from fairy2i_jax.runs import RunDirError

    monkeypatch.chdir(ROOT)
    run_dir = reference[0]
    loaded = sources.load(str(run_dir))
    earlier = sources.load(str(run_dir), step=STEPS - 2).model
    assert loaded.source.kind == "run" and loaded.tokenizer.eos_token_id == 256
    u_last, u_earlier = loaded.model.lm_head.U.get_value(), earlier.lm_head.U.get_value()
    assert u_last.dtype == np.complex64 and not np.array_equal(np.asarray(u_last), np.asarray(u_earlier))
    with pytest.raises(RunDirError, match=rf"no checkpoint 7 in .* \(available: \[{STEPS - 4}, {STEPS - 2}, {STEPS}\]\)"):
        sources.load(str(run_dir), step=7)


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
