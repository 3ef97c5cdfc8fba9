"""fairy2i_jax.hf.packed: a packed safetensors directory written here from the codes and scales of
fairy2i_jax.packing decodes (PackedSource) to the fake-quantized weight bit for bit; the shapes, the
``quantization_config`` dict and its refusals."""

import jax
import numpy as np
import pytest

from fairy2i_jax.hf.packed import (
    PackedSource,
    module_entry,
    packed_arrays,
    packed_shapes,
    quantization_config,
    read_quantization_config,
)
from fairy2i_jax.hf.safetensors_io import CheckpointError, SafetensorsCheckpoint, TensorPlan, write_safetensors
from fairy2i_jax.packing import pack_real_weight, pack_widely_linear
from fairy2i_jax.quant import QuantSpec, quantize_real_weight, quantize_widely_linear
from fairy2i_jax.widely_linear import to_widely_linear

BASE = "model.layers.0.mlp.up_proj"
OUT, IN = 12, 40  # n = 6, m = 20: two code words per row, the second one padded
TENSOR = QuantSpec("complex_phase", 2)  # per-tensor scales, bf16_exact: the official W2
ROW = QuantSpec("complex_phase", 1, "fp32", "row")  # one stage: the general T is covered by TENSOR


def _write(directory, spec):
    """A packed directory of one module (plus its bias and a norm) -> (SafetensorsCheckpoint, A_q, bias)."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((OUT, IN)).astype(np.float32)
    if spec.numerics == "bf16_exact":  # jitted: one compile each instead of one per eager op
        packed = jax.jit(pack_real_weight, static_argnums=1)(A, spec)
        want = jax.jit(quantize_real_weight, static_argnames="spec")(A, spec=spec)
    else:
        U, W = to_widely_linear(A)
        packed = jax.jit(pack_widely_linear, static_argnums=2)(U, W, spec)
        want = jax.jit(quantize_widely_linear, static_argnums=2)(U, W, spec)
    tensors = {f"{BASE}.{k}": v for k, v in packed_arrays(packed).items()}
    tensors[f"{BASE}.bias"] = rng.standard_normal(OUT).astype(np.float32)
    tensors["model.norm.weight"] = np.ones(IN, np.float32)
    directory.mkdir()
    write_safetensors(directory / "model.safetensors",
                      [TensorPlan(k, v.shape, v.dtype, lambda v=v: v) for k, v in sorted(tensors.items())])
    return SafetensorsCheckpoint(directory), np.asarray(jax.device_get(want)), tensors[f"{BASE}.bias"]


@pytest.mark.parametrize("spec", [TENSOR, ROW], ids=["tensor_bf16_exact", "row_fp32"])
def test_packed_source_decodes_the_fake_quantized_weight(tmp_path, spec):
    checkpoint, want, bias = _write(tmp_path / "packed", spec)
    shapes = packed_shapes(OUT, IN, spec)
    for suffix, (shape, dtype) in shapes.items():
        assert (checkpoint.shape(f"{BASE}.{suffix}"), checkpoint.dtype(f"{BASE}.{suffix}")) == (shape, dtype)
    assert shapes["u_codes"][0] == (spec.stages, 6, 2)
    assert shapes["u_scales"][0] == ((spec.stages, 2) if spec.granularity == "tensor" else (spec.stages, 2, 6))
    source = PackedSource(checkpoint, {BASE: (OUT, IN, spec)}, "packed")
    assert sorted(source.keys()) == sorted([f"{BASE}.bias", "model.norm.weight", f"{BASE}.weight"])
    assert source.shape(f"{BASE}.weight") == (OUT, IN)
    np.testing.assert_array_equal(source.read(f"{BASE}.weight"), want)
    np.testing.assert_array_equal(source.read(f"{BASE}.weight", (slice(2, 5),)), want[2:5])
    np.testing.assert_array_equal(source.read(f"{BASE}.bias"), bias)


def test_codes_that_do_not_match_the_config_are_refused(tmp_path):
    checkpoint, _, _ = _write(tmp_path / "packed", TENSOR)
    with pytest.raises(CheckpointError, match=rf"packed: packed tensors do not match quantization_config: "
                                              rf"{BASE}.u_codes: found uint32\[2, 6, 2\], expected uint32\[3, 6, 2\]"):
        PackedSource(checkpoint, {BASE: (OUT, IN, QuantSpec("complex_phase", 3))}, "packed")
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj.u_codes: missing"):
        PackedSource(checkpoint, {"model.layers.1.mlp.up_proj": (OUT, IN, TENSOR)}, "packed")
    with pytest.raises(CheckpointError, match=rf"{BASE}: odd shape \[12, 39\]"):
        PackedSource(checkpoint, {BASE: (OUT, 39, TENSOR)}, "packed")


def test_quantization_config_round_trip_and_refusals():
    modules = {BASE: module_entry(OUT, IN, TENSOR), "lm_head": module_entry(OUT, IN, ROW),
               "model.layers.0.mlp.down_proj": module_entry(IN, OUT, TENSOR)}
    qc = quantization_config(modules)
    assert (qc["quant_method"], qc["format"], qc["layout_version"], qc["stages"]) == ("fairy2i", "packed", 1, 2)
    assert read_quantization_config({"quantization_config": qc}, "dir") == {
        BASE: (OUT, IN, TENSOR), "lm_head": (OUT, IN, ROW), "model.layers.0.mlp.down_proj": (IN, OUT, TENSOR)}
    assert read_quantization_config({"model_type": "llama"}, "dir") is None
    key = "dir: config.json key 'quantization_config'"
    cases = [
        (dict(qc, quant_method="gptq"), f"{key}: quant_method 'gptq' is not supported"),
        (dict(qc, layout_version=2), f"{key}: layout_version 2, this version reads 1"),
        (dict(qc, modules={BASE: {"out_features": OUT}}), f"{key}: malformed entry for module '{BASE}'"),
        (dict(qc, modules={BASE: module_entry(OUT, IN, QuantSpec("binary"))}), "has method 'binary'"),
    ]
    for bad, message in cases:
        with pytest.raises(CheckpointError, match=message):
            read_quantization_config({"quantization_config": bad}, "dir")
