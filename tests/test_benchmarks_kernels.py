"""Smoke test of benchmarks/kernels.py (the script the GPU check runs): a tiny --small run, its JSON report."""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks import kernels as bench  # noqa: E402


def test_small_run_reports_the_implementations_against_bf16(tmp_path):
    """One shape at batch 16 (the fused shapes take the same code path with more layers); ``reference``
    serves as the error oracle of every row (timing it too would only add compile time here)."""
    out = tmp_path / "kernels.json"
    rows = bench.main(["--small", "--shapes", "o_proj", "--batches", "16", "--implementations", "xla",
                       "--repeats", "1", "--rotate-mb", "0.05", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["rows"] == json.loads(json.dumps(rows)) and report["meta"]["backend"] == "cpu"
    assert [(r["batch"], r["implementation"]) for r in rows] == [(16, "bf16"), (16, "xla")]
    for r in rows:
        assert r["seconds"] > 0 and r["bytes"] > 0 and r["copies"] >= 1
        assert (r["shape"], r["out"], r["in"]) == ("o_proj", 256, 256)
        if r["implementation"] == "bf16":
            assert r["speedup_vs_bf16"] == 1.0 and r["bytes"] == r["out"] * r["in"] * 2 + r["batch"] * r["in"] * 2
        else:
            assert r["rel_err"] <= 2.0**-7, r  # bf16 outputs of the same exact products: at most one bf16 ulp
            assert r["rel_err_f32"] <= 1e-5, r  # float32 activations: exact up to summation order
            assert r["bytes"] < r["out"] * r["in"] * 2 / 4  # 2 bits per weight (+ scales) vs 16
    assert bench.copies_for(1_000_000, 128) == 128 and bench.copies_for(10**9, 128) == 1
    variant = bench.parse_implementation("pallas_gpu:rounding=native:gemv_block_n=64:unroll_slots=false")
    got = (variant.name, variant.rounding, variant.gemv_block_n, variant.unroll_slots)
    assert got == ("pallas_gpu", "native", 64, False)


def test_cli_refuses_unknown_or_unavailable_implementations(capsys):
    import pytest

    for arg, msg in [("triton", "unknown implementation 'triton'"), ("pallas_gpu", "do not run on backend 'cpu'"),
                     ("xla:block=3", "xla has no option 'block'")]:
        with pytest.raises(SystemExit):
            bench.main(["--small", "--implementations", arg])
        assert msg in capsys.readouterr().err
