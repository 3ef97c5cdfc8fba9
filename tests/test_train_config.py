"""Training config presets and errors, the learning-rate schedules, and the TensorBoard event-file writer."""

import math
from pathlib import Path

import numpy as np
import pytest

from fairy2i_jax.config import ConfigError
from fairy2i_jax.training.config import DEFAULT_CONFIG, load_train_config
from fairy2i_jax.training.loop import run
from fairy2i_jax.training.schedule import make_schedule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def test_presets_load_and_the_7b_preset_is_the_official_recipe():
    assert DEFAULT_CONFIG == CONFIGS / "smollm2_135m_w2.yaml"
    default = load_train_config()
    assert default.model.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and default.quant.preset == "w2"
    assert load_train_config(CONFIGS / "debug.yaml").model.path == "random:tiny"
    cfg = load_train_config(CONFIGS / "llama2_7b_w2.yaml")
    o, d, t = cfg.optimizer, cfg.data, cfg.train
    assert cfg.model.path == "meta-llama/Llama-2-7b-hf" and cfg.model.compute_dtype == "bfloat16"
    q = cfg.quant
    assert (q.preset, q.lm_head, q.numerics, cfg.distill.weight) == ("w2", True, "bf16_exact", 0)
    assert (o.name, o.lr, o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm) == ("adamw", 3e-5, 0.9, 0.95, 1e-8, 0.0, 2.0)
    assert (o.schedule, o.warmup_steps, o.coordinates) == ("wsd", 300, "real")
    assert o.decay_stages == ((8000, 10000, 0.1667), (19000, 20000, 0.03333))
    assert (d.seq_len, d.global_batch, t.steps) == (2048, 512, 30000)


def test_official_wsd_schedule_values():
    """The official lr_lambda: s/300 during warmup (0 at the first update), 1, cosine to 0.1667 over
    8000-10000, flat, cosine to 0.03333 over 19000-20000, flat; times the peak lr 3e-5."""
    cfg = load_train_config(CONFIGS / "llama2_7b_w2.yaml")
    lr = make_schedule(cfg.optimizer, cfg.train.steps)
    want = {0: 0.0, 150: 0.5, 300: 1.0, 7999: 1.0, 8000: 1.0, 9000: (1 + 0.1667) / 2, 10000: 0.1667,
            15000: 0.1667, 19500: (0.1667 + 0.03333) / 2, 20000: 0.03333, 29999: 0.03333}
    for step, factor in want.items():
        np.testing.assert_allclose(float(lr(step)), 3e-5 * factor, rtol=1e-5, atol=1e-12, err_msg=str(step))
    p = 0.25  # a quarter into the first decay
    np.testing.assert_allclose(float(lr(8500)), 3e-5 * (0.1667 + 0.8333 * 0.5 * (1 + math.cos(math.pi * p))),
                               rtol=1e-5)
    cos = load_train_config(CONFIGS / "debug.yaml", ["optimizer.schedule=cosine", "optimizer.warmup_steps=10",
                                                      "optimizer.min_lr_factor=0.1", "optimizer.lr=1.0"])
    f = make_schedule(cos.optimizer, 110)
    np.testing.assert_allclose([float(f(s)) for s in (0, 5, 10, 60, 110, 200)], [0, 0.5, 1, 0.55, 0.1, 0.1],
                               atol=1e-6)


@pytest.mark.parametrize("override, message", [
    ("optimizer.lrr=1", "unknown config key(s) 'optimizer.lrr' in section 'optimizer'; valid keys: b1, b2, "
                        "clip_norm, coordinates, decay_stages, eps, lr, min_lr_factor, name, schedule, "
                        "warmup_steps, weight_decay"),
    ("optimizer.coordinates=polar", "optimizer.coordinates = 'polar' is not one of ['real', 'complex']"),
    ("train.grad_accum=3", "data.global_batch 8 is not a multiple of train.grad_accum 3"),
    ("optimizer.decay_stages=[[10, 5, 0.5]]", "optimizer.decay_stages[0] = (10, 5, 0.5)"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_train_config(CONFIGS / "debug.yaml", [override])
    assert message in str(e.value)


def _debug(tmp_path, *overrides):
    """The debug config in ``tmp_path`` without the final export (tested in test_train_resume)."""
    return load_train_config(CONFIGS / "debug.yaml", [f"train.run_dir={tmp_path / 'run'}", "export.format=none",
                                                      *overrides])


def test_empty_corpus_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n   \n")
    with pytest.raises(ValueError, match=r"empty corpus: .*empty\.txt gave no tokens"):
        run(_debug(tmp_path, f"data.train=[{empty}]"))


def test_seq_len_above_the_model_positions_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="data.seq_len = 2048 exceeds the model's max_position_embeddings = 1024"):
        run(_debug(tmp_path, "data.seq_len=2048"))


def test_diverging_run_stops_naming_the_step_and_param_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from fairy2i_jax.training import TrainingDiverged

    monkeypatch.chdir(ROOT)
    cfg = _debug(tmp_path, "optimizer.name=sgd", "optimizer.lr=1e12", "optimizer.clip_norm=0",
                 "optimizer.warmup_steps=0", "train.checkpoint_every=1", "train.steps=6", "train.grad_accum=1",
                 "data.eval=[]", "mesh.data=1")
    with pytest.raises(TrainingDiverged) as e:
        run(cfg)
    message = str(e.value)
    assert message.startswith("step 2: non-finite loss")
    assert "first non-finite gradient: embed_tokens.embedding" in message
    assert f"the last good checkpoint is 1 in {tmp_path / 'run' / 'checkpoints'}" in message
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["1"]


def test_mesh_seq_and_data_entries_are_checked():
    cfg = load_train_config(CONFIGS / "debug.yaml", ["mesh.seq=tensor", "data.train=[store:/data/tok]",
                                                      "data.eval=[hf:allenai/c4:en:validation]"])
    assert cfg.mesh.seq_axis == "tensor" and load_train_config(CONFIGS / "debug.yaml").mesh.seq_axis is None
    assert cfg.data.train == ("store:/data/tok",)
    assert load_train_config(CONFIGS / "llama2_7b_w2.yaml").data.train[0].startswith("store:")  # a store to build
    for bad, match in (("mesh.seq=fsdp", r"mesh.seq = 'fsdp' is not one of \['none', 'tensor'\]"),
                       ("data.train=[store:/a, b.txt]", "data.train: a store:DIR entry must be the list's only"),
                       ("data.test=[hf::en]", "expected hf:NAME")):
        with pytest.raises(ConfigError, match=match):
            load_train_config(CONFIGS / "debug.yaml", [bad])
