"""The GPU check (issue [L]): one command that measures every speed goal and checks the quantizer on a GPU.

    python -m benchmarks.gpu_check --out gpu_check_out            # on the GPU machine, at most ~8 minutes
    python -m benchmarks.gpu_check --out /tmp/smoke --smoke       # CPU, tiny shapes, seconds (the test suite)

Writes ``<out>/results.json`` (every part's status, seconds and numbers) and ``<out>/log.txt`` (every part's full
output). Each part runs in its own subprocess with its own time limit, so a crash, a hang or a missing feature
in one part loses nothing of the others; parts that would not fit the remaining ``--budget-s`` are skipped and
reported as such. The parts:

1. ``quantizer``: ``quantize_real_weight`` (jitted, ``bf16_exact`` and ``fp32``, T = 1..4) on matrices with
   planted phase ties (``|re| == |im|``, zeros, sign patterns) and random entries, on the accelerator against the
   CPU, bit for bit; then a tiny W2 QAT model's logits on the accelerator against the CPU, and the same model
   packed (:func:`fairy2i_jax.convert.to_packed`, the accelerator's packed kernels) against its QAT logits.
2. ``kernels``: :mod:`benchmarks.kernels` (every implementation vs XLA's bf16 dot; Llama-2-7B shapes incl. the
   fused qkv and gate/up; batch 1, 16, 64).
3. ``decode``: :mod:`benchmarks.decode` (the 7B-shaped W2 model vs bf16: tokens/s at batch 1 and 16, context 512).
4. ``train_step``: :mod:`benchmarks.train_step` (QAT vs plain bf16 step, ms/step and MFU) at the 1B shape and at
   the SmolLM2 shape.

It imports nothing the GPU machine lacks (no grain, lm-eval or tensorboardX: the parts import only jax, flax,
numpy and the project's model code). ``--smoke`` runs every part at tiny shapes on whatever backend there is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PARTS = ("quantizer", "kernels", "decode", "train_step")


def _commands(smoke: bool) -> dict[str, list[list[str]]]:
    """The benchmark command lines of each part (``python -m benchmarks.<module> ...``)."""
    if smoke:
        return {
            "kernels": [["benchmarks.kernels", "--small", "--shapes", "qkv", "--batches", "1", "--repeats", "1",
                         "--passes", "1", "--rotate-mb", "0.05"]],
            "decode": [["benchmarks.decode", "--tiny", "--batches", "1", "--context", "8", "--tokens", "2",
                        "--repeats", "1"]],
            "train_step": [["benchmarks.train_step", "--shape", "tiny", "--batch", "2", "--seq", "16",
                            "--repeats", "1"]],
        }
    return {
        "kernels": [["benchmarks.kernels", "--batches", "1,16,64"]],
        "decode": [["benchmarks.decode", "--batches", "1,16", "--context", "512", "--tokens", "64"]],
        "train_step": [["benchmarks.train_step", "--shape", "1b", "--batch", "8", "--seq", "2048", "--remat", "full"],
                       ["benchmarks.train_step", "--shape", "smollm2", "--batch", "16", "--seq", "2048"]],
    }


LIMITS = {"quantizer": 150, "kernels": 180, "decode": 150, "train_step": 180}  # seconds per part on an H200


# ------------------------------------------------------------------------------------------------ part 1


def planted_matrix(rows: int, cols: int, seed: int):
    """A float32 ``[rows, cols]`` matrix whose widely-linear planes hit every tie of the phase quantizer in its
    first quarter of rows: each 2x2 quartet ``A11 = A22 = re, A21 = im, A12 = -im`` gives ``U = re + i im`` (with
    ``|re| == |im|`` in every sign pattern, zeros, one-axis values) and ``W = 0`` (the ``(0, 0)`` tie); the rest is
    random normal with magnitudes spread over 1e-3..1."""
    import numpy as np

    rng = np.random.default_rng(seed)
    A = (rng.standard_normal((rows, cols)) * np.exp(rng.uniform(np.log(1e-3), 0, (rows, cols)))).astype(np.float32)
    n, m = rows // 2, cols // 2
    a = 0.375
    ties = [(a, a), (-a, a), (-a, -a), (a, -a), (0.0, 0.0), (a, 0.0), (0.0, a), (2.0 ** -7, -a)]
    for k in range((n // 4) * m):
        j, l = divmod(k, m)
        re, im = ties[k % len(ties)]
        A[j, l], A[n + j, m + l], A[n + j, l], A[j, m + l] = re, re, im, -im  # A11, A22, A21, A12
    return A


def check_quantizer(smoke: bool = False) -> dict:
    """Part 1 (module docstring): bit-for-bit quantizer on the accelerator vs the CPU, and model logits
    (``smoke``: one shape, T = 1 and 2)."""
    import jax
    import numpy as np
    from flax import nnx

    from fairy2i_jax import sources
    from fairy2i_jax.convert import convert, to_packed
    from fairy2i_jax.quant import QuantSpec, quantize_real_weight

    cpu, accel = jax.devices("cpu")[0], jax.devices()[0]
    out = {"accelerator": f"{accel.platform}: {accel.device_kind}", "quantizer": [], "logits": {}}
    shapes = ((64, 128),) if smoke else ((64, 128), (256, 512), (1024, 2048))
    for numerics in ("bf16_exact", "fp32"):
        for stages in (1, 2) if smoke else (1, 2, 3, 4):
            spec = QuantSpec("complex_phase", stages, numerics)
            fn = jax.jit(lambda A, s=spec: quantize_real_weight(A, spec=s))
            for seed, shape in enumerate(shapes):
                A = planted_matrix(*shape, seed)
                on_cpu = np.asarray(fn(jax.device_put(A, cpu)))
                on_accel = np.asarray(fn(jax.device_put(A, accel)))
                differ = int(np.sum(on_cpu.view(np.uint32 if on_cpu.dtype == np.float32 else np.uint16)
                                    != on_accel.view(np.uint32 if on_accel.dtype == np.float32 else np.uint16)))
                out["quantizer"].append({"numerics": numerics, "stages": stages, "shape": list(shape),
                                         "entries_that_differ": differ, "bit_identical": differ == 0})
    model = sources.load_model("random:tiny", compute_dtype="float32", seed=0)
    w2 = convert(model, "w2")
    ids = np.asarray(jax.random.randint(jax.random.key(0), (2, 48), 3, 256), np.int32)

    def logits(m, device):
        graphdef, state = nnx.split(m)
        state = jax.device_put(state, device)
        run = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
        return np.asarray(run(state, jax.device_put(ids, device)))

    ref = logits(w2, cpu)
    for name, (m, device) in {"qat_accelerator": (w2, accel), "packed_accelerator": (to_packed(w2), accel)}.items():
        got = logits(m, device)
        out["logits"][name] = {"max_abs_diff_vs_cpu_qat": float(np.abs(got - ref).max()),
                               "max_abs_logit": float(np.abs(ref).max()), "bit_identical": bool(np.array_equal(got, ref))}
    out["all_quantizer_bit_identical"] = all(r["bit_identical"] for r in out["quantizer"])
    return out


# ------------------------------------------------------------------------------------------------ driver


def _run_part(name: str, argvs: list[list[str]], limit: float, log) -> dict:
    """Run one part's subprocesses (``python -m ...``) within ``limit`` seconds; the outputs go to ``log``."""
    start, results = time.perf_counter(), []
    for argv in argvs:
        remaining = limit - (time.perf_counter() - start)
        if remaining < 5:
            results.append({"argv": argv, "status": "skipped (part time limit)"})
            continue
        cmd = [sys.executable, "-m", *argv]
        log.write(f"\n===== {name}: {' '.join(cmd)}\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=remaining,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            log.write(proc.stdout + proc.stderr)
            results.append({"argv": argv, "status": "ok" if proc.returncode == 0 else f"exit {proc.returncode}",
                            "stdout_tail": proc.stdout[-4000:], "stderr_tail": proc.stderr[-2000:]})
        except subprocess.TimeoutExpired as e:
            log.write(f"(timed out after {remaining:.0f} s)\n{e.stdout or ''}{e.stderr or ''}")
            results.append({"argv": argv, "status": f"timeout after {remaining:.0f} s"})
        log.flush()
    return {"seconds": round(time.perf_counter() - start, 1), "runs": results}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (results.json, log.txt)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, any backend (seconds)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--budget-s", type=float, default=480, help="total time budget (default 8 minutes)")
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: run part 1 in this process
    args = p.parse_args(argv)
    if args.part == "quantizer":
        print(json.dumps(check_quantizer(args.smoke)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commands = _commands(args.smoke)
    commands["quantizer"] = [["benchmarks.gpu_check", "--out", str(out), "--part", "quantizer",
                              *(["--smoke"] if args.smoke else [])]]
    report = {"command": " ".join(["python -m benchmarks.gpu_check", *(argv or sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d"), "smoke": args.smoke, "parts": {}}
    start = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        for name in [n.strip() for n in args.parts.split(",") if n.strip()]:
            if name not in PARTS:
                raise SystemExit(f"unknown part {name!r}; expected some of {', '.join(PARTS)}")
            left = args.budget_s - (time.perf_counter() - start)
            limit = left if args.smoke else min(LIMITS[name], left)  # smoke: any CPU, however loaded
            if limit < 10:
                report["parts"][name] = {"status": "skipped (total budget spent)"}
                continue
            part = _run_part(name, commands[name], limit, log)
            if name == "quantizer" and part["runs"][0]["status"] == "ok":
                part["result"] = json.loads(part["runs"][0]["stdout_tail"].strip().splitlines()[-1])
            report["parts"][name] = part
            (out / "results.json").write_text(json.dumps(report, indent=2))
    report["seconds"] = round(time.perf_counter() - start, 1)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({n: [r["status"] for r in p.get("runs", [p])] for n, p in report["parts"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
