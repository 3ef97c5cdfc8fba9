"""fairy2i_jax.hf.export (export_model): HF directories (dequantized / master / packed), import of official
checkpoints, and the export's safety rules (the command line: test_export_cli.py).

Oracles: transformers' torch model loading the exported directory; the official fake quantizer
(``official_torch``) applied to the stored checkpoint tensors; the input safetensors files themselves.
"""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from fairy2i_jax import convert, load_pretrained
from fairy2i_jax.export import main as export_main
from fairy2i_jax.hf import export as export_mod
from fairy2i_jax.hf.export import ExportError, export_config, export_model, size_on_disk
from fairy2i_jax.hf.safetensors_io import CheckpointError, SafetensorsCheckpoint
from fairy2i_jax.quant import QuantSpec
from model_helpers import batch, checkpoint, jax_logits, max_diff_on_tokens, qat_logits, quartet_ulp, torch_logits
from official_torch import official_fake_quant

TOL = 1e-4
BF16_TOL = 0.01  # measured 0.0017 (llama_tied), 0.0023 (qwen2), logits up to 0.9: embeddings / norms rounded
FAMILIES = ("llama_tied", "qwen2")  # tied embeddings; q/k/v biases


def _load(path, **kw):
    return load_pretrained(path, dtype=jnp.float32, compute_dtype=jnp.float32, **kw)


def _hf_logits(path, ids, mask):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return torch_logits(model, ids, mask)


def _tensors(path) -> dict[str, np.ndarray]:
    source = SafetensorsCheckpoint(path)
    return {name: source.read(name) for name in source.keys()}


@pytest.fixture(scope="module", params=FAMILIES)
def w2(request):
    """(family, W2 PTQ model of the fp32 checkpoint) with its QAT logits on a padded batch."""
    model = convert(_load(checkpoint(request.param)), "w2")
    ids, mask = batch()
    return request.param, model, qat_logits(model, ids, mask)


def test_dequantized_float32_loads_in_transformers_with_the_qat_logits(w2, tmp_path):
    family, model, want = w2
    ids, mask = batch()
    out = tmp_path / "hf"
    result = export_model(model, out, "dequantized", dtype="float32", tokenizer_from=checkpoint(family),
                          progress=False)
    assert max_diff_on_tokens(_hf_logits(out, ids, mask), want, mask) <= TOL
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # a quantized head has its own matrix
    assert "lm_head.weight" in _tensors(out)
    assert config["fairy2i"]["quantization"]["model.layers.1.mlp.down_proj"]["stages"] == 2
    assert {"config.json", "generation_config.json", "model.safetensors"} <= set(result.files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary directory left behind


def test_dequantized_bfloat16_tolerance(w2, tmp_path):
    """bf16 export of an fp32 model: the quantized weights are exact in bf16 (bf16_exact numerics), the
    embeddings and norms are rounded; measured max |logit diff| 0.0017 / 0.0023, asserted <= BF16_TOL."""
    family, model, want = w2
    ids, mask = batch()
    export_model(model, tmp_path / "hf", "dequantized", dtype="bfloat16", progress=False)
    tensors = _tensors(tmp_path / "hf")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert tensors[q].dtype == ml_dtypes.bfloat16
    exact = np.asarray(model.named_linears()["model.layers.0.self_attn.q_proj"].forward_weight())
    np.testing.assert_array_equal(tensors[q].astype(np.float32), exact)
    diff = max_diff_on_tokens(_hf_logits(tmp_path / "hf", ids, mask), want, mask)
    assert 0 < diff <= BF16_TOL


def test_packed_loads_with_the_dequantized_logits_at_about_two_bits(w2, tmp_path):
    family, model, want = w2
    ids, mask = batch()
    export_model(model, tmp_path / "deq", "dequantized", dtype="float32", progress=False)
    result = export_model(model, tmp_path / "packed", "packed", dtype="float32", progress=False)
    dequantized = jax_logits(_load(tmp_path / "deq"), ids, mask)
    on_kernels = _load(tmp_path / "packed")  # the default: the codes stay packed, the kernels multiply
    assert {spec.kind for name, spec in on_kernels.linear_plan().items()} == {"packed"}
    packed = jax_logits(on_kernels, ids, mask)
    assert max_diff_on_tokens(packed, dequantized, mask) <= 1e-5 * np.abs(dequantized).max()  # other sum order
    decoded = _load(tmp_path / "packed", packed="decode")  # codes decoded to A_q: the dequantized model exactly
    np.testing.assert_array_equal(jax_logits(decoded, ids, mask), dequantized)
    assert max_diff_on_tokens(packed, want, mask) <= TOL
    measured = size_on_disk(tmp_path / "packed")
    assert measured == result.size
    assert 1.9 < measured.bits_per_packed_weight <= 2.1
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["layout_version"], qc["stages"]) == ("fairy2i", 1, 2)
    assert len(qc["modules"]) == 2 * 7 + 1
    words = _tensors(tmp_path / "packed")["model.layers.0.mlp.down_proj.u_codes"]
    assert words.dtype == np.uint32 and words.shape == (2, 32, 4)  # [T, n, ceil(m / 16)], m = 128 / 2


def test_packed_row_scales_fp32_numerics_and_scanned_layers(tmp_path):
    """Per-row scales (fp32 numerics) on some layers, per-tensor W1 on others, from a scanned model."""
    source = _load(checkpoint("llama"), scan_layers=True)
    model = convert(source, "w2", numerics="fp32", rules=[
        (r"mlp\.", QuantSpec("complex_phase", 2, "fp32", "row")), (r"o_proj", {"stages": 1})])
    ids, mask = batch()
    export_model(model, tmp_path / "packed", "packed", dtype="float32", progress=False)
    loaded = _load(tmp_path / "packed")
    assert max_diff_on_tokens(jax_logits(loaded, ids, mask), qat_logits(model, ids, mask), mask) <= TOL
    tensors = _tensors(tmp_path / "packed")
    assert tensors["model.layers.1.mlp.up_proj.u_scales"].shape == (2, 2, 64)  # [T, (re, im), n]
    assert tensors["model.layers.1.self_attn.o_proj.w_codes"].shape[0] == 1


def test_binary_has_no_packed_form(tmp_path):
    model = convert(_load(checkpoint("llama")), "binary")
    with pytest.raises(ExportError, match="binary layers have no packed form"):
        export_model(model, tmp_path / "packed", "packed", progress=False)
    assert not (tmp_path / "packed").exists()


def test_master_of_an_untrained_bf16_import_is_the_input(tmp_path):
    """An official Fairy2i checkpoint holds bf16 masters under LLaMA keys: import (W2) and export the masters."""
    source = checkpoint("llama_tied", "bfloat16")
    model = convert(_load(source), "w2")
    export_model(model, tmp_path / "master", "master", dtype="bfloat16", tokenizer_from=source, progress=False)
    original, exported = load_file(str(source / "model.safetensors")), load_file(str(tmp_path / "master" / "model.safetensors"))
    assert set(original) == set(exported)
    for name in original:
        assert exported[name].tobytes() == original[name].tobytes(), name
    config = json.loads((tmp_path / "master" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["fairy2i"]["format"] == "master"


def test_master_float32_of_an_fp32_import_is_within_the_design_bound(tmp_path):
    """fp32 weights -> complex64 masters -> float64 recompose: float32 cannot hold every (a + b) / 2, so the
    DESIGN.md bound applies to the linears: within one float32 ulp of the quartet's largest magnitude (other
    tensors are copied, exactly)."""
    source = checkpoint("qwen2")
    export_model(convert(_load(source), "w1"), tmp_path / "master", "master", progress=False)
    original, exported = load_file(str(source / "model.safetensors")), _tensors(tmp_path / "master")
    assert set(original) == set(exported)
    for name in original:
        if name.endswith("proj.weight") or name == "lm_head.weight":
            assert np.all(np.abs(exported[name] - original[name]) <= quartet_ulp(original[name])), name
        else:
            np.testing.assert_array_equal(exported[name], original[name], err_msg=name)


def test_official_checkpoint_import_reproduces_the_official_inference_weights(tmp_path):
    """``load_pretrained`` + ``convert(.., "w2")`` of a bf16 LLaMA-key checkpoint = the official inference-mode
    weights, i.e. the official fake quantizer (torch oracle) of each stored bf16 weight, bit for bit; the
    dequantized bf16 export stores exactly those."""
    source = checkpoint("llama", "bfloat16")
    model = convert(_load(source), "w2")
    exported = tmp_path / "inference"
    assert export_main(["--from", str(source), "--quant", "w2", "--out", str(exported), "--no-progress"]) == 0
    stored = {k: torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16)
              for k, v in _tensors(source).items()}
    tensors = _tensors(exported)
    ours = model.effective_weights()
    for name, weight in stored.items():
        if not name.endswith("proj.weight") and name != "lm_head.weight":
            continue
        official = official_fake_quant(weight, stages=2).float().numpy()
        np.testing.assert_array_equal(np.asarray(ours[name.removesuffix(".weight")], np.float32), official, name)
        np.testing.assert_array_equal(tensors[name].astype(np.float32), official, name)


def test_sharded_export_with_index_loads_everywhere(tmp_path):
    model = convert(_load(checkpoint("qwen2")), "w2")
    ids, mask = batch()
    result = export_model(model, tmp_path / "hf", "dequantized", dtype="float32", max_shard_bytes=100_000,
                          progress=False)
    shards = sorted(f for f in result.files if f.endswith(".safetensors"))
    assert len(shards) >= 4 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == result.size.total_bytes
    want = qat_logits(model, ids, mask)
    assert max_diff_on_tokens(_hf_logits(tmp_path / "hf", ids, mask), want, mask) <= TOL
    assert max_diff_on_tokens(jax_logits(_load(tmp_path / "hf"), ids, mask), want, mask) <= TOL


def test_non_empty_out_is_refused_and_overwrite_replaces_only_exports(tmp_path):
    """A foreign non-empty dir is refused with or without --overwrite; an earlier export is replaced only with it."""
    model = convert(_load(checkpoint("llama")), "w1")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_model(model, foreign, "master", progress=False)
    with pytest.raises(ExportError, match="is not an earlier export"):
        export_model(model, foreign, "master", overwrite=True, progress=False)
    assert sorted(os.listdir(foreign)) == ["keep.txt"] and (foreign / "keep.txt").read_text() == "precious"
    out = tmp_path / "out"
    export_model(model, out, "master", progress=False)
    (out / "stale.txt").write_text("from the old export")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_model(model, out, "master", progress=False)
    export_model(model, out, "master", overwrite=True, progress=False)
    assert "stale.txt" not in os.listdir(out) and (out / "model.safetensors").is_file()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("train: {steps: 1}\n")
    with pytest.raises(ExportError, match="training run directory"):
        export_model(model, run, "master", overwrite=True, progress=False)


def test_an_interrupted_export_leaves_no_partial_dir(tmp_path, monkeypatch):
    """A failure while writing the 5th tensor: one ExportError naming it, no ``out``, no temporary dir; an old
    export stays intact."""
    model = convert(_load(checkpoint("llama")), "w2")
    old = tmp_path / "old"
    export_model(model, old, "dequantized", progress=False)
    before = {name: (old / name).read_bytes() for name in os.listdir(old)}
    real_host, calls = export_mod._host, []

    def failing_host(x):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("simulated disk failure")
        return real_host(x)

    monkeypatch.setattr(export_mod, "_host", failing_host)
    with pytest.raises(ExportError, match="simulated disk failure"):
        export_model(model, tmp_path / "new", "dequantized", progress=False)
    assert os.listdir(tmp_path) == ["old"]
    calls.clear()
    with pytest.raises(ExportError, match="simulated disk failure"):
        export_model(model, old, "dequantized", overwrite=True, progress=False)
    assert os.listdir(tmp_path) == ["old"]
    assert {name: (old / name).read_bytes() for name in os.listdir(old)} == before


def test_packed_dir_with_a_damaged_code_tensor_is_refused(w2, tmp_path):
    family, model, _ = w2
    export_model(model, tmp_path / "packed", "packed", progress=False)
    config_path = tmp_path / "packed" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["modules"]["model.layers.0.self_attn.q_proj"]["stages"] = 3
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"q_proj.u_codes: found uint32\[2, 32, 2\], expected uint32\[3, 32, 2\]"):
        _load(tmp_path / "packed")
    config["quantization_config"]["layout_version"] = 7
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="layout_version 7"):
        _load(tmp_path / "packed")


def test_export_config_of_an_unquantized_tied_model_stays_tied():
    model = _load(checkpoint("llama_tied"))
    for fmt in ("dequantized", "master", "packed"):
        config = export_config(convert(model, "w2", lm_head=False), fmt)
        assert config["tie_word_embeddings"] is True, fmt
