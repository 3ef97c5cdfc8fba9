"""Two CPU processes on loopback as two hosts (4 fake devices each, jax.distributed over 127.0.0.1) train 3 steps
of the debug config and match one process with 8 devices.

Each host reads only its own rows of every global batch (a contiguous block); the global array is assembled with
``jax.make_array_from_process_local_data`` and holds the same rows on the same devices as the one-process run,
but the gradient sums are reduced across processes (gloo) in another order than within one: losses agree to
float32 rounding (relative 1e-5), not bit for bit.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["train.steps=3", "train.checkpoint_every=0", "train.eval_batches=1", "data.global_batch=16",
        "train.grad_accum=1", "mesh.data=-1", "mesh.fsdp=1", "export.format=none"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    return env


def _cmd(run_dir: Path, extra=()) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "debug.yaml"),
            f"train.run_dir={run_dir}", *ARGS, *extra]


def _losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x and "event" not in x]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    one = tmp_path / "one"
    proc = subprocess.run(_cmd(one), cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    two = tmp_path / "two"
    port = _free_port()
    hosts = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id"]
    procs = [subprocess.Popen(_cmd(two)[:2] + [*hosts, str(i)] + _cmd(two)[2:], cwd=ROOT, env=_env(4),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    assert (two / "checkpoints" / "3").is_dir()
    want, got = _losses(one), _losses(two)
    assert len(want) == len(got) == 3
    for a, b in zip(want, got):
        assert abs(a - b) <= 1e-5 * abs(a), (want, got)
