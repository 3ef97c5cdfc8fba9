"""A run directory on disk: its layout, orbax checkpoints (full and params-only restores), and clear refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairy2i_jax.runs import (
    CheckpointCorruptError,
    RunCheckpoints,
    RunDirError,
    is_run_dir,
    read_run_config,
)


def _state(scale: float):
    return {"params": {"layer": {"kernel": scale * jnp.arange(12.0).reshape(3, 4)}, "norm": jnp.ones(4) * scale},
            "opt_state": {"mu": jnp.full((3, 4), scale)}, "step": jnp.int32(int(scale))}


def _target(tree):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def test_save_restore_and_params_only_restore(tmp_path):
    ckpts = RunCheckpoints(tmp_path / "checkpoints", keep=2, async_save=False)
    for step in (1, 2, 3):
        assert ckpts.save(step, _state(float(step)), {"next_index": step}, {"step": step})
    assert not ckpts.save(3, _state(9.0), {}, {})  # an existing step is never overwritten
    ckpts.wait()
    assert ckpts.steps() == [2, 3] and ckpts.latest_step() == 3  # keep=2
    state, data, meta = ckpts.restore(3, _target(_state(0.0)))
    np.testing.assert_array_equal(state["params"]["layer"]["kernel"], 3.0 * np.arange(12.0).reshape(3, 4))
    assert data == {"next_index": 3} and meta == {"step": 3}
    params = ckpts.restore_params(2, _target(_state(0.0)["params"]))
    assert set(params) == {"layer", "norm"}
    np.testing.assert_array_equal(params["norm"], np.full(4, 2.0))
    ckpts.close()


def test_mismatching_target_is_refused_and_nothing_is_deleted(tmp_path):
    ckpts = RunCheckpoints(tmp_path / "checkpoints", async_save=False)
    ckpts.save(1, _state(1.0), {}, {})
    ckpts.wait()
    wrong = _state(0.0)["params"]
    wrong["norm"] = jnp.ones(5)
    with pytest.raises(CheckpointCorruptError, match=r"checkpoint step 1 in .*Nothing was deleted"):
        ckpts.restore_params(1, _target(wrong))
    assert ckpts.steps() == [1]
    ckpts.close()


def test_run_dir_layout_and_config(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert not is_run_dir(run) and not is_run_dir(tmp_path / "missing")
    (run / "config.yaml").write_text("train:\n  steps: 3\n")
    assert is_run_dir(run) and read_run_config(run) == {"train": {"steps": 3}}
    (run / "config.json").write_text("{}")
    assert not is_run_dir(run)  # an HF directory that happens to hold a config.yaml
    (run / "config.yaml").write_text("train: [unclosed\n")
    with pytest.raises(RunDirError, match=r"run/config.yaml: the run's config is not valid YAML"):
        read_run_config(run)
    (run / "config.yaml").write_text("- a list\n")
    with pytest.raises(RunDirError, match="must be a mapping, got list"):
        read_run_config(run)
    with pytest.raises(RunDirError, match="cannot read the run's config"):
        read_run_config(tmp_path / "missing")


def test_run_summary_reads_config_metrics_and_perplexity_events(tmp_path):
    import json

    from fairy2i_jax.runs import run_summary
    from test_model_card import write_run_dir

    run = write_run_dir(tmp_path / "run")
    s = run_summary(run)
    assert (s["steps"], s["planned_steps"], s["seq_len"], s["global_batch"]) == (4, 4, 64, 8)
    assert s["tokens"] == 4 * 8 * 64 and s["data"] == ["pkg:fairy2i_jax/corpora/austen/train/prideprejudice.txt.gz"]
    assert (s["lr"], s["final_lr"], s["final_loss"], s["eval_loss"]) == (3e-3, 0.003, 4.25, 4.75)
    assert (s["model"], s["preset"], s["ppl"]) == ("org/tiny-llama", "w2", None)
    with open(run / "metrics.jsonl", "a") as f:  # a resumed run appends after the torn line
        f.write("\n" + json.dumps({"event": "ppl", "step": 4, "name": "trained", "ppl": 70.5}) + "\n")
    assert run_summary(run)["ppl"] == {"trained": 70.5}
    assert run_summary(run, ppl=69.0)["ppl"] == {"trained": 69.0}
    early = run_summary(run, step=2)  # an export of checkpoint 2
    assert (early["steps"], early["tokens"], early["final_loss"], early["eval_loss"]) == (2, 2 * 8 * 64, 5.0, None)
    (run / "metrics.jsonl").write_text("")
    (run / "checkpoints" / "3").mkdir(parents=True)
    assert (run_summary(run)["steps"], run_summary(run)["final_loss"]) == (3, None)  # nothing logged
