"""The loss-curve plot (`fairy2i_jax.training.plot`) on metrics.jsonl files written by the real `RunLogger`."""

import json

import numpy as np
import pytest

from fairy2i_jax.training import plot
from fairy2i_jax.training.metrics import RunLogger

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, losses, *, evals=(), start=0, resume=False):
    """A run directory as the training loop leaves it: steps start+1.., eval events, an optional resume event."""
    logger = RunLogger(run_dir, total_steps=start + len(losses), start_step=start, progress=False)
    if resume:
        logger.record({"event": "resume", "step": start})
    for i, loss in enumerate(losses, start=start + 1):
        logger.log_step(i, {"loss": loss, "ce": loss, "lr": 1e-3, "grad_norm": 1.0, "tokens": 512.0,
                            "tokens_per_s": None, "mfu": None})
    for step, loss in evals:
        logger.log_eval(step, {"loss": loss})
    logger.close()
    return run_dir


def test_read_curve_train_and_eval(tmp_path):
    run = write_run(tmp_path / "w2", [3.0, 2.5, 2.0, 1.5], evals=[(2, 2.7), (4, 2.2)])
    curve = plot.read_curve(run)
    np.testing.assert_array_equal(curve.steps, [1, 2, 3, 4])
    np.testing.assert_allclose(curve.loss, [3.0, 2.5, 2.0, 1.5])
    np.testing.assert_array_equal(curve.eval_steps, [2, 4])
    np.testing.assert_allclose(curve.eval_loss, [2.7, 2.2])


def test_read_curve_resumed_run_keeps_last_line_per_step(tmp_path):
    run = write_run(tmp_path / "r", [3.0, 2.5, 2.0])
    write_run(run, [2.4, 1.9], start=1, resume=True)  # resumed after step 1: steps 2, 3 logged again
    curve = plot.read_curve(run)
    np.testing.assert_array_equal(curve.steps, [1, 2, 3])
    np.testing.assert_allclose(curve.loss, [3.0, 2.4, 1.9])
    assert curve.eval_steps.size == 0 and curve.eval_loss.size == 0


def test_smooth_formula():
    v = np.array([1.0, 3.0, 5.0, 7.0, 9.0])
    # s_i = mean(v[max(0, i - N + 1) : i + 1])
    expected = [np.mean(v[max(0, i - 2): i + 1]) for i in range(len(v))]
    np.testing.assert_allclose(plot.smooth(v, 3), expected)
    np.testing.assert_allclose(plot.smooth(v, 3), [1.0, 2.0, 3.0, 5.0, 7.0])
    np.testing.assert_allclose(plot.smooth(v, 1), v)
    np.testing.assert_allclose(plot.smooth(v, 100), np.cumsum(v) / np.arange(1, 6))
    assert plot.smooth([], 5).size == 0


def test_missing_run_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        plot.read_curve(tmp_path / "nowhere")


def test_missing_metrics_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot.read_curve(tmp_path)


def test_no_loss_records_names_the_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "resume", "step": 0}) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl has no training loss"):
        plot.read_curve(tmp_path)


def test_bad_json_names_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{not json\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not valid JSON"):
        plot.read_curve(tmp_path)


def test_label_count_must_match(tmp_path):
    curve = plot.read_curve(write_run(tmp_path / "a", [1.0, 0.5]))
    with pytest.raises(ValueError, match="2 labels"):
        plot.plot_curves([curve], ["a", "b"], tmp_path / "x.png")


def test_cli_writes_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    fp = write_run(tmp_path / "fp", list(np.linspace(3.0, 2.0, 12)), evals=[(6, 2.6)])
    w2 = write_run(tmp_path / "w2", list(np.linspace(9.0, 4.0, 12)))
    out = tmp_path / "docs" / "loss.png"
    assert plot.main([str(fp), str(w2), "--out", str(out), "--smooth", "4", "--labels", "fp", "W2"]) == 0
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert str(out) in capsys.readouterr().out


def test_cli_error_exits_with_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        plot.main([str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    assert "missing does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_names_pip_install(tmp_path, monkeypatch):
    curve = plot.read_curve(write_run(tmp_path / "a", [1.0, 0.5]))
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot.plot_curves([curve], ["a"], tmp_path / "x.png")
