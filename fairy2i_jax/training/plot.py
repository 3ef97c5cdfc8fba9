"""Loss curves of training runs from their ``metrics.jsonl`` (see :mod:`fairy2i_jax.training.metrics`).

    python -m fairy2i_jax.training.plot RUN_DIR [RUN_DIR ...] --out docs/qat_loss.png [--labels A B ...] [--smooth N]

One figure: the training loss against the step for every run (moving average over ``--smooth`` steps, the raw
curve faint behind it), and the held-out losses (``{"event": "eval", "loss": ...}`` lines) as markers when the run
logged any. Needs matplotlib (``pip install matplotlib``, in the ``test`` extra), imported only when plotting.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fairy2i_jax.jsonl import iter_jsonl


@dataclass(frozen=True)
class Curve:
    """Training losses (``steps``, ``loss``) and held-out losses (``eval_steps``, ``eval_loss``) of one run."""

    steps: np.ndarray
    loss: np.ndarray
    eval_steps: np.ndarray
    eval_loss: np.ndarray


def read_curve(run_dir: str | Path) -> Curve:
    """The curves of ``<run_dir>/metrics.jsonl``, sorted by step. A step logged twice (a resumed run) keeps its
    last line. Raises FileNotFoundError (missing directory or file) or ValueError (bad JSON, no loss record)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (not a training run directory?)")
    train: dict[int, float] = {}
    evals: dict[int, float] = {}
    for _, entry in iter_jsonl(path):
        if not isinstance(entry, dict) or "step" not in entry or entry.get("loss") is None:
            continue
        event = entry.get("event")
        if event is None:
            train[int(entry["step"])] = float(entry["loss"])
        elif event == "eval":
            evals[int(entry["step"])] = float(entry["loss"])
    if not train:
        raise ValueError(f"{path} has no training loss records (lines with \"step\" and \"loss\")")

    def arrays(d: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
        keys = sorted(d)
        return np.asarray(keys, dtype=np.int64), np.asarray([d[k] for k in keys], dtype=np.float64)

    return Curve(*arrays(train), *arrays(evals))


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average: ``s_i = (1 / n_i) * sum_{j = i - n_i + 1}^{i} v_j`` with
    ``n_i = min(window, i + 1)`` (the first points average over what exists so far). ``window <= 1``: a copy."""
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or v.size == 0:
        return v.copy()
    csum = np.concatenate([[0.0], np.cumsum(v)])
    i = np.arange(v.size)
    n = np.minimum(window, i + 1)
    return (csum[i + 1] - csum[i + 1 - n]) / n


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or the project's `test` extra)") \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(curves: Sequence[Curve], labels: Sequence[str], out: str | Path, *, window: int = 1,
                title: str | None = None) -> Path:
    """Write one PNG with every curve (training loss smoothed over ``window`` steps, eval losses as markers)."""
    if len(curves) != len(labels):
        raise ValueError(f"{len(curves)} runs but {len(labels)} labels")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for i, (curve, label) in enumerate(zip(curves, labels)):
        color = f"C{i}"
        if window > 1:
            ax.plot(curve.steps, curve.loss, color=color, alpha=0.2, linewidth=0.8)
        ax.plot(curve.steps, smooth(curve.loss, window), color=color, linewidth=1.6, label=f"{label} (train)")
        if curve.eval_steps.size:
            ax.plot(curve.eval_steps, curve.eval_loss, color=color, marker="o", linestyle="--", linewidth=1.0,
                    label=f"{label} (held-out)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    smoothing = f"\ntraining loss: moving average over {window} steps (faint: raw)" if window > 1 else ""
    ax.set_title((title or "loss curves") + smoothing, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fairy2i_jax.training.plot", description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--labels", nargs="+", help="one label per run (default: the directory names)")
    parser.add_argument("--smooth", type=int, default=1, metavar="N",
                        help="trailing moving average over N steps (default 1: raw)")
    parser.add_argument("--title", help="figure title")
    args = parser.parse_args(argv)
    labels = args.labels or [Path(d).name for d in args.run_dirs]
    if len(labels) != len(args.run_dirs):
        parser.error(f"{len(args.run_dirs)} run directories but {len(labels)} labels")
    try:
        curves = [read_curve(d) for d in args.run_dirs]
        out = plot_curves(curves, labels, args.out, window=args.smooth, title=args.title)
    except (FileNotFoundError, ValueError, ImportError) as e:
        parser.exit(2, f"error: {e}\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
