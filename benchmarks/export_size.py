"""Bytes on disk of each export format for real model shapes, without weights (issue [E]).

The export plans every tensor (name, shape, dtype) before computing any (:func:`fairy2i_jax.hf.export.tensor_plans`),
so an abstract model of the real shape (``abstract_model``: nothing allocated) gives the exact sizes of the files
``python -m fairy2i_jax.export`` writes: safetensors tensor bytes, headers (a few kB) excluded.

Usage (from the repository root): ``python -m benchmarks.export_size`` (prints a markdown table).
"""

from __future__ import annotations

import jax.numpy as jnp

from fairy2i_jax.convert import resolve_plan
from fairy2i_jax.hf.export import export_config, plans_size, tensor_plans
from fairy2i_jax.models.config import ModelConfig
from fairy2i_jax.models.llama import abstract_model

SHAPES = {
    "Llama-2-7B": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                              num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=4096),
    "SmolLM2-135M (tied)": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                                       num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192,
                                       tie_word_embeddings=True),
}
EXPORTS = [("dequantized", "bfloat16"), ("master", "float32"), ("packed", "bfloat16")]


def export_sizes(cfg: ModelConfig, quant: str = "w2") -> list[tuple[str, str, int, float | None]]:
    """``(format, dtype, total bytes, bits per packed weight)`` of each export of ``cfg`` quantized with ``quant``."""
    real = abstract_model(cfg.replace(param_dtype=jnp.float32))
    model = abstract_model(real.config, resolve_plan(real, quant))
    rows = []
    for fmt, dtype in EXPORTS:
        size = plans_size(tensor_plans(model, fmt, dtype), export_config(model, fmt, dtype))
        rows.append((fmt, dtype, size.total_bytes, size.bits_per_packed_weight))
    return rows


def main() -> None:
    print("| model (W2, lm_head quantized) | format | dtype | size | bits per quantized weight (codes + scales) |")
    print("|---|---|---|---|---|")
    for name, cfg in SHAPES.items():
        for fmt, dtype, total, bits in export_sizes(cfg):
            b = f"{bits:.4f}" if bits is not None else "-"
            print(f"| {name} | {fmt} | {dtype} | {total / 1e9:.3f} GB | {b} |")


if __name__ == "__main__":
    main()
