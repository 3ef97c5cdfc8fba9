"""lm-eval's own command line runs the registered `fairy2i` model (offline, on the local tiny_mc task), with the
accuracy the adapter computes in process."""

import json
import os

import pytest

from fairy2i_jax.evaluation.lm_eval_adapter import Fairy2iLM, evaluate_tasks
from fairy2i_jax.evaluation.lm_eval_cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK_DIR = os.path.join("tests", "data", "tiny_mc")
MODEL_ARGS = "pretrained=random:tiny,quant=w2,max_length=128"


def test_lm_eval_cli_runs_the_fairy2i_model(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the task's data_files path is relative to the repository root
    main(["run", "--model", "fairy2i", "--model_args", MODEL_ARGS, "--tasks", "tiny_mc", "--include_path",
          TASK_DIR, "--batch_size", "4", "--output_path", str(tmp_path)])
    (result_file,) = tmp_path.rglob("results_*.json")
    results = json.loads(result_file.read_text())["results"]["tiny_mc"]
    lm = Fairy2iLM(pretrained="random:tiny", quant="w2", max_length=128, batch_size=4)
    own = evaluate_tasks(lm, ["tiny_mc"], include_path=TASK_DIR, include_defaults=False)["results"]["tiny_mc"]
    assert results["acc,none"] == pytest.approx(own["acc,none"], abs=1e-12)
    assert results["acc_stderr,none"] == pytest.approx(own["acc_stderr,none"], abs=1e-12)


def test_unknown_model_args_are_refused():
    with pytest.raises(ValueError, match=r"unknown fairy2i model_args \['qaunt'\]"):
        Fairy2iLM(pretrained="random:tiny", qaunt="w2")
