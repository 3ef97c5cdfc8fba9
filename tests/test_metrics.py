"""Run metrics: metrics.jsonl, TensorBoard event files read back with TensorBoard's own reader, MFU."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fairy2i_jax.training.metrics import RunLogger, mfu, peak_flops


def test_logger_writes_jsonl_and_tensorboard_events_that_tensorboard_reads(tmp_path):
    logger = RunLogger(tmp_path, total_steps=3, start_step=0, progress=False)
    logger.log_step(1, {"loss": 2.5, "lr": 3e-5, "tokens_per_s": None, "mfu": None})
    logger.log_step(2, {"loss": 2.0, "lr": 6e-5, "tokens_per_s": 120.0, "mfu": None})
    logger.log_eval(2, {"loss": 2.25})
    logger.record({"event": "ppl", "name": "trained", "step": 2, "value": 9.5})
    logger.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line.get("event") for line in lines] == [None, None, "eval", "ppl"]
    assert lines[1] == {"step": 2, "loss": 2.0, "lr": 6e-5, "tokens_per_s": 120.0, "mfu": None}
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/loss"} <= set(scalars)
    assert "train/mfu" not in scalars  # None values are not written
    loss = events.Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(1, 2.5), (2, 2.0)]
    assert events.Scalars("train/lr")[1].value == pytest.approx(6e-5, rel=1e-6)
    assert [(e.step, e.value) for e in events.Scalars("eval/loss")] == [(2, 2.25)]


def test_a_resumed_run_appends_to_the_same_jsonl(tmp_path):
    for step in (1, 2):
        logger = RunLogger(tmp_path, total_steps=2, start_step=step - 1, progress=False)
        logger.log_step(step, {"loss": float(step), "lr": 0.1})
        logger.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_disabled_logger_writes_nothing(tmp_path):
    logger = RunLogger(tmp_path / "other", total_steps=1, start_step=0, enabled=False)
    logger.log_step(1, {"loss": 1.0, "lr": 0.1})
    logger.close()
    assert not (tmp_path / "other").exists()


def test_mfu_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("TPU v5 lite") == 197e12
    assert peak_flops("cpu") is None and mfu(10**9, 1e4, "cpu", 1) is None
    assert mfu(10**9, 1e4, "NVIDIA H100 80GB HBM3", 2) == pytest.approx(6e13 / (2 * 989e12))
