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
