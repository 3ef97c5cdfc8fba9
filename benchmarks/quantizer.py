"""Cost of the Fairy2i fake quantizer next to one bf16 matmul of the same layer (issue [A]).

Times, on the default JAX device, each as the median over ``--repeats`` calls of a jitted, warmed-up function
(host timer around ``block_until_ready``; every timed call is milliseconds or more, so dispatch is a small
share; use a profiler for sub-millisecond accelerator timings):

* ``quantize_real_weight(A)``: W2 (T = 2), ``bf16_exact``, real weight ``A[out, in]`` in ``--weight-dtype``;
* ``quantize_widely_linear(U, W)``: the same from complex64 masters ``U, W [out/2, in/2]`` (bf16 result);
* the matmul ``x[tokens, in] @ A[out, in]^T`` in bf16 (float32 accumulation by XLA's default).

Prints a markdown table row with the device, the JAX version, the three times and the ratios quantizer / matmul.
Usage (from the repository root): ``python -m benchmarks.quantizer --tokens 4096 --out 4096 --in 11008 --repeats 5``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp

from fairy2i_jax.quant import QuantSpec, quantize_real_weight, quantize_widely_linear


def device_name() -> str:
    """The accelerator kind, or for CPU the model name from /proc/cpuinfo and the core count."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        return dev.device_kind
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def median_seconds(fn, args, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` over ``repeats`` calls, after one warm-up call (which compiles)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="activation rows of the matmul")
    parser.add_argument("--out", type=int, default=4096, help="out features (even)")
    parser.add_argument("--in", dest="in_dim", type=int, default=11008, help="in features (even)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per function (median)")
    parser.add_argument("--stages", type=int, default=2, help="residual stages T (2 = Fairy2i-W2)")
    parser.add_argument("--weight-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args(argv)

    key_a, key_x, key_u, key_w = jax.random.split(jax.random.key(0), 4)
    A = (0.02 * jax.random.normal(key_a, (args.out, args.in_dim), jnp.float32)).astype(args.weight_dtype)
    x = jax.random.normal(key_x, (args.tokens, args.in_dim), jnp.bfloat16)
    half = (args.out // 2, args.in_dim // 2)
    U = 0.02 * jax.random.normal(key_u, half, jnp.complex64)
    W = 0.02 * jax.random.normal(key_w, half, jnp.complex64)
    spec = QuantSpec(stages=args.stages, numerics="bf16_exact")

    fq_real = jax.jit(lambda a: quantize_real_weight(a, spec=spec))
    fq_wl = jax.jit(lambda u, w: quantize_widely_linear(u, w, spec))
    matmul = jax.jit(lambda x, a: x @ a.astype(jnp.bfloat16).T)

    t_real = median_seconds(fq_real, (A,), args.repeats)
    t_wl = median_seconds(fq_wl, (U, W), args.repeats)
    t_mm = median_seconds(matmul, (x, A), args.repeats)

    print("| device | jax | layer [out x in] | tokens | quantize_real_weight (ms) | quantize_widely_linear (ms) "
          "| bf16 matmul (ms) | real / matmul | widely_linear / matmul |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {device_name()} | {jax.__version__} | {args.out} x {args.in_dim} ({args.weight_dtype}, T={args.stages}) "
          f"| {args.tokens} | {1e3 * t_real:.1f} | {1e3 * t_wl:.1f} | {1e3 * t_mm:.1f} "
          f"| {t_real / t_mm:.3f} | {t_wl / t_mm:.3f} |")


if __name__ == "__main__":
    main()
