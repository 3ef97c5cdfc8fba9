"""The model card (fairy2i_jax.hf.model_card) of every export format, from a real export of a tiny W2 model and a
train.py-style run directory (its summary from fairy2i_jax.runs, the card arguments from fairy2i_jax.sources)."""

import json
from pathlib import Path

import jax.numpy as jnp
import pytest
import yaml

from fairy2i_jax import convert, load_pretrained, sources
from fairy2i_jax.hf.export import export_model
from fairy2i_jax.hf.model_card import build_model_card, guess_base_model
from model_helpers import checkpoint


def write_run_dir(path: Path) -> Path:
    """A train.py-style run dir: config.yaml (the resolved TrainConfig) and metrics.jsonl (steps, events)."""
    from fairy2i_jax.config import load_config, to_dict
    from fairy2i_jax.training.config import TrainConfig

    debug = Path(__file__).parents[1] / "configs" / "debug.yaml"
    cfg = load_config(TrainConfig, debug, ["model.path=org/tiny-llama", "train.steps=4"])
    path.mkdir()
    (path / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    lines = [{"step": 1, "loss": 5.5, "lr": 0.0015}, {"step": 2, "loss": 5.0, "lr": 0.003},
             {"event": "resume", "step": 2}, {"step": 3, "loss": 4.5, "lr": 0.003},
             {"event": "eval", "step": 3, "loss": 4.75}, {"step": 4, "loss": 4.25, "lr": 0.003}]
    torn = '{"step": 5, "lo'  # a killed run's last line
    (path / "metrics.jsonl").write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in lines) + torn)
    return path


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture(scope="module")
def w2_tied():
    return convert(load_pretrained(checkpoint("llama_tied"), compute_dtype=jnp.float32), "w2")


def test_model_card_in_every_format(w2_tied, tmp_path):
    card = sources.card_info(sources.resolve(str(write_run_dir(tmp_path / "run"))), ppl=71.25,
                             repo_id="org/tiny-llama-w2")
    assert card["base_model"] == "org/tiny-llama" and card["preset"] == "w2"
    for fmt in ("dequantized", "master", "packed"):
        result = export_model(w2_tied, tmp_path / fmt, fmt, progress=False, model_card=card)
        assert "README.md" in result.files
        text = (tmp_path / fmt / "README.md").read_text()
        meta = _front_matter(text)
        assert meta["library_name"] == "transformers" and meta["base_model"] == "org/tiny-llama"
        assert {"fairy2i", "quantized", "2-bit", "widely-linear", fmt} <= set(meta["tags"])
        assert "Fairy2i W2" in text and "per tensor" in text and "bf16_exact" in text
        assert "15 of the model's 15 linears are quantized" in text
        assert "| `model.layers.*.self_attn.q_proj` | 2 | complex_phase | 2 | 2 | per tensor |" in text
        assert "| `lm_head` | 1 |" in text
        assert "- steps: 4 of 4" in text and "- tokens: 2,048" in text and "prideprejudice" in text
        assert "3e-03" in text or "0.003" in text
        assert "71.250 (trained)" in text
        assert 'from_pretrained("org/tiny-llama-w2"' in text and 'load_pretrained("org/tiny-llama-w2")' in text
        remote_code = 'from_pretrained("org/tiny-llama-w2", trust_remote_code=True)' in text
        assert remote_code is (fmt == "packed")
    assert "decodes its weight once" in (tmp_path / "packed" / "README.md").read_text()
    assert "UNQUANTIZED" in (tmp_path / "master" / "README.md").read_text()


def test_an_unquantized_card_has_no_training_and_no_base():
    plain = build_model_card({"model_type": "llama", "num_hidden_layers": 2, "dtype": "float32",
                              "fairy2i": {"format": "master", "quantization": {}}}, "master")
    meta = _front_matter(plain)
    assert "base_model" not in meta and "quantized" not in meta["tags"] and "## Training" not in plain


def test_base_model_is_guessed_only_from_hub_ids(tmp_path):
    assert guess_base_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert guess_base_model(str(tmp_path)) is None and guess_base_model("random:tiny") is None
    assert guess_base_model(None) is None
