"""The train command line (fairy2i_jax.train): --help lists every config key with the default run's value,
--print-config prints the resolved config; the refusals it meets are in test_refusals.py."""

from pathlib import Path

import pytest
import yaml

from fairy2i_jax.train import main as train_main

DEBUG = str(Path(__file__).resolve().parents[1] / "configs" / "debug.yaml")


def test_train_help_lists_every_key_and_print_config_prints_the_resolved_config(capsys):
    with pytest.raises(SystemExit):
        train_main(["--help"])
    text = capsys.readouterr().out
    assert "quant.preset = 'w2'  [w1 | w2 | w3 | w4 | binary | ternary | fp | none]" in text
    assert "optimizer.lr = 0.0005" in text and "export.format = 'dequantized'" in text
    assert train_main(["--config", DEBUG, "--print-config", "train.steps=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["steps"] == 7 and printed["model"]["path"] == "random:tiny"
    assert printed["data"]["train"] == ["pkg:fairy2i_jax/corpora/austen/train/prideprejudice.txt.gz"]
