"""Decode speed of a Llama-2-7B-shaped W2 model on packed weights against the same model in bf16 (issue [F]).

Both models have random weights (the speed does not depend on the values): the packed one random 2-bit codes
and positive bf16 scales in every linear (``packed`` kind, the ``lm_head`` too, as the official W2), the bf16
one random bf16 kernels; embeddings and norms are the same size in both. Each is measured as generation runs:
``model.inference_weights()`` once (the packed kernels' prepared operands, fused q/k/v and gate/up), a prefill of
``--context`` tokens filling the static KV cache, then one compiled ``lax.while_loop`` of ``--tokens`` decode
steps (:func:`fairy2i_jax.generate.engine._decode`, greedy, no EOS). The decode loop runs once to compile and
warm up, then ``--repeats`` times; tokens/s = ``batch * tokens / median seconds`` of the loop alone (host timer
around ``block_until_ready``: one device call of many steps, so dispatch is not what is measured).

``--small`` shrinks the model for a CPU (hidden 512, ffn 1376, 4 layers, vocab 4096); the default is the
Llama-2-7B shape (hidden 4096, ffn 11008, 32 layers, 32 heads, vocab 32000: 13.5 GB in bf16, 1.9 GB packed).

Usage (repository root): ``python -m benchmarks.decode [--small] [--batches 1,16] [--context 512]
[--tokens 64] [--repeats 3] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.quantizer import device_name
from fairy2i_jax.generate.engine import GREEDY, _decode, _prefill
from fairy2i_jax.models.config import ModelConfig
from fairy2i_jax.models.linear import LINEAR_STORAGE, LinearSpec, PackedCodes
from fairy2i_jax.models.llama import abstract_model
from fairy2i_jax.quant import QuantSpec

SHAPES = {
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
               num_kv_heads=32),
    "small": dict(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_layers=4, num_heads=8,
                  num_kv_heads=8),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=4),
}


def model_pair(shape: str, seed: int = 0):
    """``(packed W2 model, bf16 model)`` of the ``shape`` architecture with random weights (module docstring)."""
    cfg = ModelConfig(**SHAPES[shape], max_position_embeddings=4096, param_dtype=jnp.bfloat16,
                      compute_dtype=jnp.bfloat16, scan_layers=True)
    spec = LinearSpec("packed", QuantSpec("complex_phase", 2))
    plan = {name: spec for name in abstract_model(cfg).linear_plan()}
    key = jax.random.key(seed)
    models = []
    for p in (plan, {}):
        model = abstract_model(cfg, p)
        for i, (_, var) in enumerate(v for v in nnx.iter_graph(model) if isinstance(v[1], nnx.Variable)):
            shape_dtype = var.get_value()
            k = jax.random.fold_in(key, i)
            if isinstance(var, PackedCodes) and shape_dtype.dtype == jnp.uint32:
                value = jax.random.bits(k, shape_dtype.shape, jnp.uint32)
            elif isinstance(var, PackedCodes):
                value = jax.random.uniform(k, shape_dtype.shape, jnp.float32, 0.005, 0.02).astype(shape_dtype.dtype)
            else:
                value = (0.02 * jax.random.normal(k, shape_dtype.shape, jnp.float32)).astype(shape_dtype.dtype)
            var.set_value(value)
        models.append(model)
    return models[0], models[1]


def decode_seconds(model, batch: int, context: int, tokens: int, repeats: int) -> float:
    """Median seconds of one compiled loop of ``tokens`` decode steps after a ``context``-token prefill."""
    graphdef, state = nnx.split(model)
    weights = model.inference_weights()
    key = jax.random.key(0)
    ids = np.asarray(jax.random.randint(key, (batch, context), 3, model.config.vocab_size), np.int32)
    mask = np.ones_like(ids)
    cache = model.init_cache(batch, context + tokens + 1)
    token, cache = _prefill(graphdef, GREEDY, state, weights, ids, mask, cache, key)
    no_eos, budget = np.array([-1], np.int32), np.full((batch,), tokens + 1, np.int32)

    def loop():
        done, count = jnp.zeros((batch,), bool), jnp.ones((batch,), jnp.int32)
        out = _decode(graphdef, tokens, GREEDY, state, weights, cache, token, done, count, budget, no_eos,
                      np.int32(0), key)
        jax.block_until_ready(out)

    loop()  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loop()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def linear_bytes(model) -> int:
    """Bytes of every linear's stored arrays (kernels, or codes and scales; embeddings and norms excluded)."""
    values = [var.get_value() for _, var in nnx.iter_graph(model) if isinstance(var, LINEAR_STORAGE)]
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in values)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="a CPU-sized model instead of the Llama-2-7B shape")
    p.add_argument("--tiny", action="store_true", help="the smallest model (smoke runs)")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    shape = "tiny" if args.tiny else "small" if args.small else "7b"
    packed, dense = model_pair(shape)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        t_packed = decode_seconds(packed, batch, args.context, args.tokens, args.repeats)
        t_dense = decode_seconds(dense, batch, args.context, args.tokens, args.repeats)
        rows.append({"batch": batch, "context": args.context, "tokens": args.tokens,
                     "packed_tokens_per_s": batch * args.tokens / t_packed,
                     "bf16_tokens_per_s": batch * args.tokens / t_dense, "speedup": t_dense / t_packed})
    report = {"benchmark": "decode", "date": datetime.date.today().isoformat(), "device": device_name(),
              "jax": jax.__version__, "shape": shape, "packed_implementation": jax.default_backend(),
              "linear_bytes": {"packed": linear_bytes(packed), "bf16": linear_bytes(dense)}, "rows": rows}
    print(f"| model | batch | context | packed W2 tok/s | bf16 tok/s | speed-up |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {shape} | {r['batch']} | {r['context']} | {r['packed_tokens_per_s']:.1f} | "
              f"{r['bf16_tokens_per_s']:.1f} | {r['speedup']:.2f} |")
    print(f"linear bytes: packed {report['linear_bytes']['packed'] / 1e9:.3f} GB, bf16 "
          f"{report['linear_bytes']['bf16'] / 1e9:.3f} GB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
