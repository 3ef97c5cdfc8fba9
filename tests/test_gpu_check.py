"""benchmarks/gpu_check.py --smoke on the CPU (the GPU check cannot rot between GPU sessions): every part runs
in its own subprocess, the quantizer part compares the "accelerator" (here the CPU again) bit for bit, and the
report names each part's status; a part that cannot run is reported, not fatal."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_its_parts(tmp_path):
    """Every part but ``kernels``, whose command line (benchmarks.kernels main) tests/test_benchmarks_kernels.py
    runs in process: one subprocess less here."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path), "--smoke",
                           "--parts", "quantizer,decode,train_step", "--budget-s", "850"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert set(report["parts"]) == {"quantizer", "decode", "train_step"}
    for name, part in report["parts"].items():
        assert [r["status"] for r in part["runs"]] == ["ok"] * len(part["runs"]), (name, part)
    quant = report["parts"]["quantizer"]["result"]
    assert quant["all_quantizer_bit_identical"] and len(quant["quantizer"]) == 4
    assert quant["logits"]["qat_accelerator"]["bit_identical"]
    packed = quant["logits"]["packed_accelerator"]
    assert packed["max_abs_diff_vs_cpu_qat"] <= 1e-5 * packed["max_abs_logit"]
    log = (tmp_path / "log.txt").read_text()
    assert "packed W2 tok/s" in log and "===== train_step" in log


def test_planted_matrix_hits_every_tie():
    from benchmarks.gpu_check import planted_matrix
    from fairy2i_jax.widely_linear import decompose_planes

    u_re, u_im, w_re, w_im = (np.asarray(p) for p in decompose_planes(planted_matrix(16, 32, 0)))
    first = slice(0, 2)  # the first quarter of the 8 complex rows
    assert np.any((np.abs(u_re[first]) == np.abs(u_im[first])) & (u_re[first] != 0))
    assert np.any((u_re[first] == 0) & (u_im[first] == 0)) and np.all(w_re[first] == 0) and np.all(w_im[first] == 0)
