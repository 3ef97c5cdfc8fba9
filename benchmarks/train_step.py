"""Train-step cost of Fairy2i-W2 QAT next to the plain bf16 train step of the same model and mesh (issue [C]).

Both steps are the project's own jitted train step (:mod:`fairy2i_jax.training.step`: AdamW in real coordinates,
float32 masters and moments, bf16 compute, quantize once per step); they differ only in the linears:

* ``plain``: the real model (``convert(model, "none")``): real float32 kernels, bf16 matmuls;
* ``qat``: ``convert(model, "w2")``: complex64 masters ``U, W``, every linear (and the head) fake-quantized
  once per step with the phase quantizer (T = 2, ``bf16_exact``), STE back to the masters.

Random weights (the cost does not depend on the values). Times are medians over ``--repeats`` steps after two
warm-up steps (compilation), host timer around ``block_until_ready``. MFU = ``6 * N * tokens / time /
(peak * devices)`` with the peak from :data:`fairy2i_jax.training.metrics.PEAK_FLOPS` (n/a on CPU).

Usage (repository root): ``python -m benchmarks.train_step --shape small`` (CPU), ``--shape 1b`` (a ~1.2B
Llama-3.2-1B-shaped model, for a GPU), ``--batch``, ``--seq``, ``--grad-accum``, ``--remat``, ``--mesh 1,1,1``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.quantizer import device_name
from fairy2i_jax.convert import convert
from fairy2i_jax.models.config import ModelConfig
from fairy2i_jax.models.llama import init_model
from fairy2i_jax.sharding import make_mesh, shard_like_params
from fairy2i_jax.training.config import DistillSection, OptimizerSection
from fairy2i_jax.training.metrics import mfu
from fairy2i_jax.training.optim import make_optimizer
from fairy2i_jax.training.state import ParamLayout, init_state, param_count
from fairy2i_jax.training.step import jit_train_step, make_train_step

SHAPES = {
    # The smallest, for smoke runs (benchmarks/gpu_check.py --smoke).
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 tie_word_embeddings=False),
    # A small Llama that a 2-core CPU steps through in about a second.
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=4, num_heads=8,
                  num_kv_heads=4, tie_word_embeddings=False),
    # Llama-3.2-1B: 1.24B params, tied embeddings.
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
               num_kv_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
    # SmolLM2-135M (the project's default model): 135M params, tied embeddings.
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64, tie_word_embeddings=True, rope_theta=100000.0),
}


def build(shape: str, preset: str, remat: str, mesh):
    cfg = ModelConfig(**SHAPES[shape], max_position_embeddings=8192, param_dtype=jnp.float32,
                      compute_dtype=jnp.bfloat16, scan_layers=True, remat=remat)
    real = shard_like_params(init_model(cfg, seed=0), mesh)
    return convert(real, preset)


def time_step(model, mesh, batch: int, seq: int, grad_accum: int, repeats: int) -> tuple[float, int]:
    """Median seconds per optimizer step and the real parameter count."""
    opt = OptimizerSection(lr=1e-5, schedule="constant", warmup_steps=0, decay_stages=(), clip_norm=2.0)
    tx, schedule = make_optimizer(opt, 100)
    layout = ParamLayout(model)
    state, shardings = init_state(layout, model, tx, "real", 0, mesh)
    n_params = param_count(state.params)
    step = jit_train_step(make_train_step(layout, tx, schedule, coordinates="real", grad_accum=grad_accum,
                                          distill=DistillSection(), mesh=mesh), shardings, mesh, (batch, seq))
    key = jax.random.key(1)
    ids = jax.random.randint(key, (batch, seq), 0, model.config.vocab_size, dtype=jnp.int32)
    data = {"input_ids": ids, "labels": ids}
    for _ in range(2):
        state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return statistics.median(times), n_params


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences per optimizer step)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_with_no_batch_dims"])
    p.add_argument("--mesh", default=None, help="data,fsdp,tensor (default: all devices on data)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    sizes = tuple(int(x) for x in args.mesh.split(",")) if args.mesh else (jax.device_count(), 1, 1)
    mesh = make_mesh(*sizes)
    tokens = args.batch * args.seq
    results = {}
    for name, preset in (("plain", "none"), ("qat", "w2")):
        seconds, n = time_step(build(args.shape, preset, args.remat, mesh), mesh, args.batch, args.seq,
                               args.grad_accum, args.repeats)
        u = mfu(n, tokens / seconds, jax.devices()[0].device_kind, jax.device_count())
        results[name] = (seconds, n, u)
        print(f"{name}: {seconds * 1e3:.1f} ms/step, {tokens / seconds:.0f} tokens/s, params {n / 1e6:.1f}M, "
              f"MFU {'n/a' if u is None else f'{100 * u:.1f}%'}", flush=True)
    ratio = results["qat"][0] / results["plain"][0]
    fmt = lambda u: "n/a" if u is None else f"{100 * u:.1f}%"
    print(f"| {device_name()} | jax {jax.__version__} | {args.shape} ({results['plain'][1] / 1e6:.1f}M) | "
          f"{args.batch}x{args.seq}, accum {args.grad_accum}, remat {args.remat}, mesh {sizes} | "
          f"{results['plain'][0] * 1e3:.0f} | {results['qat'][0] * 1e3:.0f} | {ratio:.2f} | "
          f"{fmt(results['plain'][2])} / {fmt(results['qat'][2])} |")


if __name__ == "__main__":
    main()
