"""Packed W2 matmul implementations against XLA's bf16 dot of the same shape (issue [F], point 7).

For every shape (Llama-2-7B projections, real ``[out, in]``; ``--small`` divides each dim by 16 for CPU)
and batch, in one run:

* ``bf16``: ``x @ W.T`` with bf16 ``W`` and ``x`` (float32 accumulation, bf16 out), XLA's dot; the fused
  shapes (qkv, gate/up) are one dot over the concatenated weight, as a model would run them;
* each packed implementation (``--implementations``, default: all available on this backend) through
  ``packed_matmul_fused`` on operands from ``prepare`` (the load-time re-layout, not timed).

Timing: one jitted program runs ``--passes`` passes of a ``lax.scan`` over ``copies`` distinct weight sets
(random codes and positive random bf16 scales, W2 by default; random bf16 for the baseline), with
``copies`` chosen so one pass reads at least ``--rotate-mb`` MB of weights (default 128 MB: more than the
H200's 60 MB L2, so HBM is measured, not L2; 1 MB with ``--small``). Each call's output is reduced into
the scan carry, so nothing is dead code. The time per call is the program's wall time (host timer around
``block_until_ready``, after a warm-up run) over ``passes * copies``; the median over ``--repeats``
programs is reported.

Reported per (shape, batch, implementation): microseconds per call, effective TB/s on the bytes actually
read per call (the prepared operand's arrays, i.e. codes incl. padding + scales, plus the activations; bf16:
weight + activations), the speed-up over bf16 in the same run, and the relative errors ``max|y - ref| /
max|y_ref|`` of copy 0 against the ``reference`` implementation: with the bf16 activations (both sides
round float32 sums, in different orders, to bf16: expect <= 2^-7 = one bf16 ulp) and with the same
activations in float32 (the exactness check: expect <= 1e-5; a decode that misses a rounding of the
format shows as ~1e-3; so would a reference whose bf16 roundings XLA dropped as excess precision: rerun
with ``XLA_FLAGS=--xla_allow_excess_precision=false`` to tell the two apart).

``--implementations`` takes registry names, or ``name:field=value:...`` to try variants of an
implementation's options in the same run, e.g. ``pallas_gpu,pallas_gpu:rounding=native:gemv_block_n=64``.

Usage (repository root): ``python -m benchmarks.kernels [--small] [--json OUT] [--implementations a,b]
[--batches 1,16,64] [--shapes qkv,gate_up] [--repeats 5] [--passes 2] [--rotate-mb 128]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.quantizer import device_name
from fairy2i_jax import kernels
from fairy2i_jax.packing import PackedWidelyLinear, num_words

# name -> layers sharing the input, real [out, in] (Llama-2-7B: hidden 4096, ffn 11008, MHA so q = k = v)
SHAPES = {
    "o_proj": [(4096, 4096)],
    "up": [(11008, 4096)],
    "down": [(4096, 11008)],
    "qkv": [(4096, 4096)] * 3,
    "gate_up": [(11008, 4096)] * 2,
}
SMALL_DIVISOR = 16


def random_layer(key, out_dim: int, in_dim: int, stages: int) -> PackedWidelyLinear:
    """A packed layer with uniformly random codes and per-tensor bf16 scales in [0.01, 0.05) (never zeros)."""
    n, m = out_dim // 2, in_dim // 2
    k_u, k_w, k_s = jax.random.split(key, 3)
    shape = (stages, n, num_words(m))
    scales = jax.random.uniform(k_s, (4, stages), jnp.float32, 0.01, 0.05).astype(jnp.bfloat16)
    return PackedWidelyLinear(
        u_words=jax.random.bits(k_u, shape, jnp.uint32), w_words=jax.random.bits(k_w, shape, jnp.uint32),
        u_scales=(scales[0], scales[1]), w_scales=(scales[2], scales[3]), n=n, m=m, stages=stages,
    )


def nbytes(tree) -> int:
    return int(sum(np.dtype(a.dtype).itemsize * math.prod(a.shape) for a in jax.tree_util.tree_leaves(tree)))


def stack(trees):
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)


def copies_for(bytes_per_copy: int, rotate_mb: float) -> int:
    """Distinct weight copies so one pass reads at least ``rotate_mb`` MB (at least 1)."""
    return max(1, math.ceil(rotate_mb * 1e6 / max(bytes_per_copy, 1)))


def timed_program(call, operands, x, passes: int):
    """``passes`` scans over the stacked ``operands``; each step's output summed into the carry."""

    def step(carry, op):
        ys = call(x, op)
        return carry + sum(jnp.sum(y.astype(jnp.float32)) for y in ys), None

    def one_pass(carry, _):
        return jax.lax.scan(step, carry, operands)[0], None

    return jax.jit(lambda: jax.lax.scan(one_pass, jnp.float32(0), None, length=passes)[0])


def median_seconds(program, repeats: int) -> float:
    jax.block_until_ready(program())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(program())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rel_err(y, ref) -> float:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


def bench_bf16(layers, x, args) -> dict:
    out_total, in_dim = sum(o for o, _ in layers), layers[0][1]
    per_copy = out_total * in_dim * 2
    copies = copies_for(per_copy, args.rotate_mb)
    weights = jax.random.normal(jax.random.key(1), (copies, out_total, in_dim), jnp.bfloat16)

    def call(x, w):
        y = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return [y.astype(x.dtype)]

    seconds = median_seconds(timed_program(call, weights, x, args.passes), args.repeats) / (args.passes * copies)
    return dict(implementation="bf16", seconds=seconds, bytes=per_copy + nbytes(x), copies=copies, rel_err=None,
                rel_err_f32=None)


def errors(prep, canon, x) -> tuple[float, float]:
    """``(bf16, f32)``: relative errors of ``prep`` against ``reference`` for ``x`` and for ``x`` in float32
    (the exactness check: <= 1e-5 unless the decode misses a rounding of the format, which shows as ~1e-3)."""
    out = []
    for xs in (x, x.astype(jnp.float32)):
        ys = kernels.packed_matmul_fused(xs, prep)
        refs = kernels.packed_matmul_fused(xs, canon, implementation="reference")
        out.append(max(rel_err(y, r) for y, r in zip(ys, refs)))
    return out[0], out[1]


def bench_packed(label, impl, layers, x, args) -> dict:
    canon = [random_layer(jax.random.key(i), o, k, args.stages) for i, (o, k) in enumerate(layers)]
    prep0 = kernels.prepare(canon, impl)
    per_copy = nbytes(prep0.arrays)
    copies = copies_for(per_copy, args.rotate_mb)
    def copy(c):
        return [random_layer(jax.random.key(1000 * c + i), o, k, args.stages) for i, (o, k) in enumerate(layers)]

    preps = [prep0] + [kernels.prepare(copy(c), impl) for c in range(1, copies)]
    err, err_f32 = errors(prep0, canon, x)
    program = timed_program(lambda x, op: kernels.packed_matmul_fused(x, op), stack(preps), x, args.passes)
    seconds = median_seconds(program, args.repeats) / (args.passes * copies)
    return dict(implementation=label, seconds=seconds, bytes=per_copy + nbytes(x), copies=copies, rel_err=err,
                rel_err_f32=err_f32)


def parse_implementation(spec: str):
    """``name`` or ``name:field=value:...`` (a registry entry with some fields replaced, e.g.
    ``pallas_gpu:rounding=native:gemv_block_n=64``) -> the implementation object; ``ValueError`` if unknown."""
    name, *options = spec.split(":")
    if name not in kernels.IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {name!r}; known: {sorted(kernels.IMPLEMENTATIONS)}")
    impl = kernels.IMPLEMENTATIONS[name]
    for option in options:
        key, _, value = option.partition("=")
        if not dataclasses.is_dataclass(impl) or key not in {f.name for f in dataclasses.fields(impl)}:
            raise ValueError(f"{name} has no option {key!r}")
        kind = type(getattr(impl, key))
        impl = dataclasses.replace(impl, **{key: value.lower() in ("1", "true") if kind is bool else kind(value)})
    return impl


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help=f"CPU-sized shapes (each dim / {SMALL_DIVISOR})")
    p.add_argument("--json", dest="json_out", help="write the rows and metadata to this JSON file")
    p.add_argument("--implementations", help="comma-separated packed implementations (default: all available)")
    p.add_argument("--shapes", help=f"comma-separated subset of {list(SHAPES)}")
    p.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes")
    p.add_argument("--stages", type=int, default=2, help="residual stages T (2 = W2)")
    p.add_argument("--repeats", type=int, default=None, help="timed programs per row, median (default 5; 3 --small)")
    p.add_argument("--passes", type=int, default=None, help="passes over the copies per program (default 2; 1 --small)")
    p.add_argument("--rotate-mb", type=float, default=None, help="weight MB per pass (default 128; 1 --small)")
    args = p.parse_args(argv)
    for name, full, small in (("repeats", 5, 3), ("passes", 2, 1), ("rotate_mb", 128.0, 1.0)):
        if getattr(args, name) is None:
            setattr(args, name, small if args.small else full)
    specs = args.implementations.split(",") if args.implementations else list(kernels.available_implementations())
    try:
        args.impls = {spec: parse_implementation(spec) for spec in specs}
    except ValueError as e:
        p.error(str(e))
    unavailable = [spec for spec, impl in args.impls.items() if not impl.available()]
    if unavailable:
        p.error(f"{unavailable} do not run on backend {jax.default_backend()!r}; available: "
                f"{kernels.available_implementations()}")
    shapes = args.shapes.split(",") if args.shapes else list(SHAPES)
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        p.error(f"unknown shapes {bad}; known: {list(SHAPES)}")
    div = SMALL_DIVISOR if args.small else 1
    args.shape_list = {s: [(o // div, k // div) for o, k in SHAPES[s]] for s in shapes}
    args.batch_list = [int(b) for b in args.batches.split(",")]
    return args


def format_row(r) -> str:
    err, err32 = ("-" if r[k] is None else f"{r[k]:.1e}" for k in ("rel_err", "rel_err_f32"))
    return (f"| {r['shape']} | {r['out']}x{r['in']} | {r['batch']} | {r['implementation']} | {r['us']:.1f} | "
            f"{r['tb_s']:.3g} | {r['speedup_vs_bf16']:.2f} | {err} | {err32} | {r['copies']} |")


def main(argv=None) -> list[dict]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    command = "python -m benchmarks.kernels " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = dict(date=datetime.date.today().isoformat(), device=device_name(), backend=jax.default_backend(),
                jax=jax.__version__, command=command, stages=args.stages, rotate_mb=args.rotate_mb,
                passes=args.passes, repeats=args.repeats)
    print(f"# {meta['device']}, backend {meta['backend']}, jax {meta['jax']}, W{args.stages}, "
          f">= {args.rotate_mb} MB of weights per pass", flush=True)
    header = "| shape | out x in | batch | implementation | us/call | TB/s | vs bf16 | err bf16 | err f32 | copies |"
    print(header + "\n|" + "---|" * 10, flush=True)
    rows = []
    for shape, layers in args.shape_list.items():
        for batch in args.batch_list:
            x = jax.random.normal(jax.random.key(batch), (batch, layers[0][1]), jnp.bfloat16)
            results = [bench_bf16(layers, x, args)] + [
                bench_packed(spec, impl, layers, x, args) for spec, impl in args.impls.items()]
            base = results[0]["seconds"]
            for r in results:
                r.update(shape=shape, out=sum(o for o, _ in layers), batch=batch, us=r["seconds"] * 1e6,
                         tb_s=r["bytes"] / r["seconds"] / 1e12, speedup_vs_bf16=base / r["seconds"])
                r["in"] = layers[0][1]
                rows.append(r)
                print(format_row(r), flush=True)
            if args.json_out:  # rewritten after every shape/batch, so a cut-off run keeps what it measured
                with open(args.json_out, "w") as f:
                    json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
