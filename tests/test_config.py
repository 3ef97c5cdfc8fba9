"""The YAML + dotted-override config loader: building, type checks, clear errors."""

import dataclasses

import pytest

from fairy2i_jax.config import ConfigError, load_config, parse_override, to_dict


@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float = 3e-5
    betas: tuple[float, float] = (0.9, 0.95)
    coordinates: str = "real"


@dataclasses.dataclass(frozen=True)
class Run:
    name: str = "debug"
    steps: int = 10
    eval_every: int | None = None
    optimizer: Optim = dataclasses.field(default_factory=Optim)


def test_yaml_then_overrides(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("name: tiny\nsteps: 5\noptimizer:\n  lr: 1e-4\n")
    cfg = load_config(Run, cfg_file, ["steps=7", "optimizer.betas=[0.8, 0.9]", "eval_every=null"])
    assert cfg == Run(name="tiny", steps=7, eval_every=None, optimizer=Optim(lr=1e-4, betas=(0.8, 0.9)))
    assert to_dict(cfg)["optimizer"]["betas"] == [0.8, 0.9]


def test_defaults_without_file():
    assert load_config(Run) == Run()


@pytest.mark.parametrize(
    "override, message",
    [
        ("stepz=3", "unknown config key(s) 'stepz' in the top level; valid keys: eval_every, name, optimizer, steps"),
        ("optimizer.lrr=1", "valid keys: betas, coordinates, lr"),
        ("steps=three", "config key 'steps': expected int, got 'three'"),
        ("steps=true", "expected int"),
        ("optimizer.betas=[1]", "expected 2 values"),
        ("optimizer=3", "is a section"),
        ("nonsense", "must look like key=value"),
    ],
)
def test_bad_input_names_the_problem(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(Run, None, [override])
    assert message in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Run, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(Run, bad)


def test_parse_override_scalars():
    # PyYAML reads "3e-5" (no dot) as a string; the loader converts it for float fields
    assert load_config(Run, None, ["optimizer.lr=3e-5"]).optimizer.lr == 3e-5
    assert parse_override("x=true") == ("x", True)
    assert parse_override("x=[1, 2]") == ("x", [1, 2])


def test_base_file_is_merged_under_the_file_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\nsteps: 5\noptimizer:\n  lr: 1e-4\n  coordinates: complex\n")
    (tmp_path / "gpu.yaml").write_text("base: base.yaml\nsteps: 500\noptimizer:\n  lr: 2e-4\n")
    cfg = load_config(Run, tmp_path / "gpu.yaml", ["name=gpu"])
    assert cfg == Run(name="gpu", steps=500, optimizer=Optim(lr=2e-4, coordinates="complex"))
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(Run, tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml' does not exist"):
        load_config(Run, tmp_path / "orphan.yaml")


def test_the_gpu_config_is_the_default_with_a_gpu_budget():
    from pathlib import Path

    from fairy2i_jax.training.config import load_train_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    default, gpu = load_train_config(configs / "smollm2_135m_w2.yaml"), load_train_config(configs / "smollm2_135m_w2_gpu.yaml")
    assert gpu.model == default.model
    assert gpu.quant == default.quant and gpu.data.train == default.data.train
    def tokens(c):
        return c.train.steps * c.data.global_batch * c.data.seq_len

    assert tokens(gpu) > 10 * tokens(default) and gpu.eval.ppl_max_tokens > default.eval.ppl_max_tokens
