"""fairy2i_jax.training.config: the preset files load (the 7B preset is the official recipe), bad overrides name
the key, and on resume a key the saved config lacks counts as its default. (Refusals of a whole run:
test_loop.py; the schedules: test_schedule.py.)"""

from pathlib import Path

import pytest

from fairy2i_jax.config import ConfigError, to_dict
from fairy2i_jax.training.config import DEFAULT_CONFIG, incompatible_changes, load_train_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_presets_load_and_the_7b_preset_is_the_official_recipe():
    assert DEFAULT_CONFIG.resolve() == (CONFIGS / "smollm2_135m_w2.yaml").resolve()  # shipped in the package
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


@pytest.mark.parametrize("override, message", [
    ("optimizer.lrr=1", "unknown config key(s) 'optimizer.lrr' in section 'optimizer'; valid keys: b1, b2, "
                        "clip_norm, coordinates, decay_stages, eps, groups, lr, min_lr_factor, name, schedule, "
                        "warmup_steps, weight_decay"),
    ("optimizer.coordinates=polar", "optimizer.coordinates = 'polar' is not one of ['real', 'complex']"),
    ("train.grad_accum=3", "data.global_batch 8 is not a multiple of train.grad_accum 3"),
    ("optimizer.decay_stages=[[10, 5, 0.5]]", "optimizer.decay_stages[0] = (10, 5, 0.5)"),
    ("distill.teacher=moving", "distill.teacher = 'moving' is not one of ['self', 'frozen']"),
    ("optimizer.groups.embed_lr_scale=-1", "optimizer.groups.embed_lr_scale must be >= 0, got -1.0"),
    ("optimizer.groups.no_decay=[bias]", "optimizer.groups.no_decay[0] = 'bias' is not one of ['embed', 'norm', "
                                         "'head', 'linear']"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_train_config(CONFIGS / "debug.yaml", [override])
    assert message in str(e.value)


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


def test_keys_a_saved_config_lacks_count_as_their_defaults():
    """A run saved before ``distill.teacher`` and ``optimizer.groups`` existed resumes with their defaults, not with
    another value."""
    current = to_dict(load_train_config(CONFIGS / "debug.yaml"))
    saved = to_dict(load_train_config(CONFIGS / "debug.yaml"))
    del saved["distill"]["teacher"], saved["optimizer"]["groups"]
    assert incompatible_changes(saved, current) == []
    frozen = to_dict(load_train_config(CONFIGS / "debug.yaml", ["distill.teacher=frozen",
                                                                "optimizer.groups.norm_lr_scale=0.5"]))
    assert incompatible_changes(saved, frozen) == ["distill.teacher", "optimizer.groups.norm_lr_scale"]
