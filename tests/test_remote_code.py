"""Packed exports load in plain transformers (``trust_remote_code=True``), model cards, ``--push-to-hub`` offline.

Oracle: the ``dequantized`` export of the same model loaded by vanilla transformers. Each case builds a tiny
random HF model with transformers (``model_helpers``), imports it with ``load_pretrained``, converts it
(PTQ) and exports it ``packed`` and ``dequantized``; then ONE child process for all the cases
(``remote_code_child.py``, run as ``python -I -S``: neither the project nor its editable install on
``sys.path``, checked there) loads the packed dirs with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` and compares.

Measured (transformers 5.24, torch 2.13 CPU): the decoded weights equal the dequantized weights bit for bit
and the logits are identical (max |diff| 0.0) in fp32 and in bf16; asserted: fp32 within 1e-5 relative,
bf16 within BF16_REL (the same kernels run on the same bf16 weights, so 0 is what is expected).
"""

import functools
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
import yaml

from fairy2i_jax import convert, load_pretrained
from fairy2i_jax.hf.export import export_model, is_export_dir
from fairy2i_jax.hf.remote import AUTO_MAP, REMOTE_FILES
from fairy2i_jax.hf.remote import modeling_fairy2i as remote
from fairy2i_jax.packing import PackedWidelyLinear, num_words, unpack_to_real
from fairy2i_jax.quant import QuantSpec
from model_helpers import BASE, _randomize_norms_and_biases, batch, checkpoint, jax_logits

FP32_REL = 1e-5
BF16_REL = 1e-3  # measured 0.0 (identical bf16 weights and kernels); a margin for other torch builds
CHILD = Path(__file__).with_name("remote_code_child.py")
PROMPT = "the cat sat on the mat and the dog"
WORDS = ("the cat sat on mat and dog ran to a house with red door in garden").split()

# name: (source family, convert kwargs, export dtype, notes)
CASES = {
    "llama_tied": ("llama_tied", dict(quant="w2"), "float32"),  # quantized tied head -> exported untied
    "qwen2_group_fp32": ("qwen2", dict(quant="w2", numerics="fp32", rules=[  # q/k/v biases; group scales
        (r"mlp\.", QuantSpec("complex_phase", 2, "fp32", "group", 16))]), "float32"),
    "llama_bf16": ("llama", dict(quant="w2"), "bfloat16"),  # untied; loaded with the config's dtype
    "mistral": ("mistral", dict(quant="w2"), "float32"),  # sliding window; llama_tied's quantizers (no new compiles)
    # q/k norms; head stays tied; W3 q/k/v, W1 o_proj, row scales on the MLP
    "qwen3_tied_fp_head_mixed": ("qwen3_tied", dict(quant="w3", lm_head=False, rules=[
        (r"o_proj", {"stages": 1}), (r"mlp\.", QuantSpec("complex_phase", 2, "bf16_exact", "row"))]), "float32"),
}
FAST, SLOW = ("llama_tied", "qwen2_group_fp32", "llama_bf16"), ("mistral", "qwen3_tied_fp_head_mixed")


def _source(family: str, root: Path) -> Path:
    """An HF dir of ``family`` with a tiny word-level tokenizer saved next to it (``qwen3_tied``: built here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = root / f"{family}_src"
    if path.exists():
        return path
    if family == "qwen3_tied":
        torch.manual_seed(3)
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**BASE, tie_word_embeddings=True)).eval()
        _randomize_norms_and_biases(model, 4)
        model.save_pretrained(path)
    else:
        shutil.copytree(checkpoint(family), path)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: 4 + i for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                         unk_token="<unk>").save_pretrained(path)
    return path


@functools.lru_cache(maxsize=None)
def _model(name: str, root: Path):
    family, kw, _ = CASES[name]
    kw = dict(kw)
    return convert(load_pretrained(_source(family, root), dtype=jnp.float32, compute_dtype=jnp.float32),
                   kw.pop("quant"), **kw), _source(family, root)


def _export_case(name: str, root: Path) -> dict:
    """Export ``name`` packed and dequantized; the child's case spec."""
    model, source = _model(name, root)
    dtype = CASES[name][2]
    dirs = {fmt: root / f"{name}_{fmt}" for fmt in ("packed", "dequantized")}
    for fmt, out in dirs.items():
        export_model(model, out, fmt, dtype=dtype, tokenizer_from=source, progress=False)
    ids, mask = batch()
    return {"name": name, "packed": str(dirs["packed"]), "dequantized": str(dirs["dequantized"]),
            "dtype": None if dtype == "bfloat16" else dtype, "ids": ids.tolist(), "mask": mask.tolist(),
            "tokenizer": PROMPT}


def _run_child(cases: list[dict], root: Path) -> dict:
    """Run ``remote_code_child.py`` in an isolated Python without the project; its JSON results."""
    paths = sysconfig.get_paths()
    spec = {"site_packages": sorted({paths["purelib"], paths["platlib"]}), "cases": cases,
            "result": str(root / "result.json")}
    (root / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "HF_MODULES_CACHE": str(root / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-I", "-S", str(CHILD), str(root / "spec.json")], cwd=root, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((root / "result.json").read_text())


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[dict, Path]:
    """Every case exported, then ONE child process for all of them (one torch + transformers start-up)."""
    root = tmp_path_factory.mktemp("remote")
    return _run_child([_export_case(n, root) for n in (*FAST, *SLOW)], root), root


def _check_case(result: dict, name: str, root: Path) -> None:
    family, kw, dtype = CASES[name]
    packed = root / f"{name}_packed"
    config = json.loads((packed / "config.json").read_text())
    modules = config["quantization_config"]["modules"]
    base = family.removesuffix("_tied")
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}[base]
    assert (config["model_type"], config["base_model_type"], config["architectures"]) == (
        "fairy2i", base, ["Fairy2iForCausalLM"])
    assert config["auto_map"] == AUTO_MAP and is_export_dir(packed)
    assert {*REMOTE_FILES, "tokenizer.json", "tokenizer_config.json", "README.md"} <= set(os.listdir(packed))
    assert result["class"] == f"Fairy2i{arch}" and result["bases"] == ["Fairy2iForCausalLM", arch]
    assert result["config_class"] == arch.replace("ForCausalLM", "Config")
    assert result["loading_info"]["missing_keys"] == [] and result["loading_info"]["unexpected_keys"] == []
    assert result["fairy2i_linears"] == sorted(modules)
    assert all(result["weights_equal"].values()), result["weights_equal"]
    assert result["dtype"] == dtype
    tied_fp_head = "lm_head" not in modules
    assert result["tied"] is tied_fp_head and config["tie_word_embeddings"] is tied_fp_head
    if base == "qwen2":
        assert {n.rsplit(".", 1)[1] for n in result["biases"]} == {"q_proj", "k_proj", "v_proj"}
    rel = FP32_REL if dtype == "float32" else BF16_REL
    assert result["max_abs_diff"] <= rel * result["max_abs_ref"], (result["max_abs_diff"], result["max_abs_ref"])
    assert result["prompt"][:3] == [4, 5, 6]  # the exported tokenizer: "the cat sat"
    assert len(result["generated"]) == len(result["prompt"]) + 5
    assert result["generated"] == result["generated_ref"]
    assert result["save_refused"]["type"] == "NotImplementedError"


@pytest.mark.parametrize("name", FAST)
def test_packed_loads_in_plain_transformers_with_the_dequantized_logits(exported, name):
    results, root = exported
    _check_case(results["cases"][name], name, root)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_packed_loads_in_plain_transformers_more_families(exported, name):
    results, root = exported
    _check_case(results["cases"][name], name, root)


def test_child_has_no_fairy2i_jax_and_untrusted_loading_is_refused(exported):
    """Without trust_remote_code transformers raises ValueError (its own message), never random weights."""
    results, _ = exported
    assert results["fairy2i_jax_importable"] is False
    for key in ("refusal_default", "refusal_false"):
        refusal = results[key]
        assert refusal["type"] == "ValueError", refusal
        assert "contains custom code which must be executed" in refusal["message"]
        assert "trust_remote_code=True" in refusal["message"]


def test_load_pretrained_still_reads_the_packed_dir(exported):
    """Decoded to real weights: bit-equal to the dequantized export; on the packed kernels (the default): equal up
    to float32 summation order."""
    _, root = exported
    ids, mask = batch()
    load = lambda p, **kw: load_pretrained(root / p, dtype=jnp.float32, compute_dtype=jnp.float32, **kw)  # noqa: E731
    dequantized = jax_logits(load("llama_tied_dequantized"), ids, mask)
    np.testing.assert_array_equal(jax_logits(load("llama_tied_packed", packed="decode"), ids, mask), dequantized)
    np.testing.assert_allclose(jax_logits(load("llama_tied_packed"), ids, mask), dequantized, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("granularity,numerics,stages", [("tensor", "bf16_exact", 2), ("row", "fp32", 3),
                                                          ("group", "bf16_exact", 1)])
def test_torch_decoding_equals_unpack_to_real(granularity, numerics, stages):
    """Fairy2iLinear.dequantize on random words (m = 40: a padded tail word) == fairy2i_jax's unpack_to_real."""
    n, m, g = 6, 40, 8
    rng = np.random.default_rng(stages)
    spec = QuantSpec("complex_phase", stages, numerics, granularity, g)
    shape = (stages, 2, *{"tensor": (), "row": (n,), "group": (n, m // g)}[granularity])
    words = {k: rng.integers(0, 2**32, size=(stages, n, num_words(m)), dtype=np.uint64).astype(np.uint32)
             for k in ("u", "w")}
    scales = {k: rng.uniform(0.01, 0.1, size=shape).astype(spec.work_dtype) for k in ("u", "w")}
    want = np.asarray(unpack_to_real(PackedWidelyLinear(
        words["u"], words["w"], (scales["u"][:, 0], scales["u"][:, 1]), (scales["w"][:, 0], scales["w"][:, 1]),
        n=n, m=m, stages=stages, granularity=granularity, group_size=g)))
    layer = remote.Fairy2iLinear(2 * m, 2 * n, stages=stages, numerics=numerics, granularity=granularity,
                                 group_size=g)
    for k in ("u", "w"):
        getattr(layer, f"{k}_codes").copy_(torch.from_numpy(words[k].view(np.int32)).view(torch.uint32))
        getattr(layer, f"{k}_scales").copy_(torch.from_numpy(scales[k].astype(np.float32)).to(layer.u_scales.dtype))
    got = layer.dequantize()
    assert got.dtype == remote.WORK_DTYPES[numerics]
    np.testing.assert_array_equal(got.float().numpy(), want.astype(np.float32))
    x = torch.randn(3, 2 * m)
    torch.testing.assert_close(layer(x), x @ got.float().T, rtol=0, atol=0)
