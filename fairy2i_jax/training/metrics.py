"""Run metrics: ``metrics.jsonl``, TensorBoard event files, a tqdm progress bar, throughput and MFU.

* ``metrics.jsonl``: one JSON object per logged step (``{"step", "loss", "ce", "lr", "grad_norm", "tokens_per_s",
  "mfu", ...}``) or event (``{"event": "resume", "step": k}``, ``{"event": "eval", ...}``); appended, never
  truncated, so a resumed run adds to it (a step logged twice has the same values when the resume is exact).
* TensorBoard: scalar summaries (``train/<metric>``, ``eval/<metric>``) through ``tensorboardX.SummaryWriter``
  in ``<run_dir>/tensorboard`` (imported lazily: without tensorboardX a warning, and no event files).
* MFU = ``6 * N * tokens / s / (peak_flops_per_device * devices)`` with ``N`` the real parameter count; the peak
  is looked up by ``device_kind`` in :data:`fairy2i_jax.training.devices.DEVICES` (dense bf16); unknown devices
  (CPU) report ``None``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fairy2i_jax.training.devices import device_of_kind

logger = logging.getLogger(__name__)

def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device of ``device_kind`` (None when unknown, e.g. CPU)."""
    device = device_of_kind(device_kind)
    return None if device is None else device.peak_flops


def mfu(param_count: int, tokens_per_s: float, device_kind: str, num_devices: int) -> float | None:
    """``6 N tokens_per_s / (peak * devices)``, or None for an unknown device kind."""
    peak = peak_flops(device_kind)
    if peak is None or num_devices < 1:
        return None
    return 6.0 * param_count * tokens_per_s / (peak * num_devices)


# ------------------------------------------------------------------------------------------ TensorBoard

def summary_writer(logdir: str | Path):
    """A ``tensorboardX.SummaryWriter`` over ``logdir``, or None (with a warning) where tensorboardX is not
    installed (e.g. a bare accelerator image): ``metrics.jsonl`` still holds every number."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        logger.warning("tensorboardX is not installed: no TensorBoard event files (metrics.jsonl has every value)")
        return None
    return SummaryWriter(str(logdir))


def add_scalars(writer, step: int, scalars: dict[str, Any]) -> None:
    """Write the numeric ``scalars`` (``None`` and bools skipped) at ``step`` and flush."""
    if writer is None:
        return
    for tag, value in scalars.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(tag, value, step)
    writer.flush()


# ------------------------------------------------------------------------------------------ the run logger

class RunLogger:
    """Writes metrics (process 0 only): jsonl + TensorBoard + progress bar; other processes stay silent."""

    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int, enabled: bool = True,
                 progress: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._bar = None
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a")
        self._tb = summary_writer(self.run_dir / "tensorboard")
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def record(self, entry: dict[str, Any]) -> None:
        """Append one JSON line (flushed, so a killed run keeps every line written)."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(entry, sort_keys=True) + "\n")
        self._jsonl.flush()

    def log_step(self, step: int, values: dict[str, Any]) -> None:
        """A training step's metrics: jsonl, TensorBoard scalars, progress-bar postfix."""
        if not self.enabled:
            return
        self.record({"step": step, **values})
        add_scalars(self._tb, step, {f"train/{k}": v for k, v in values.items()})
        if self._bar is not None:
            post = {"loss": f"{values['loss']:.4f}", "lr": f"{values['lr']:.2e}",
                    "tok/s": "n/a" if values.get("tokens_per_s") is None else f"{values['tokens_per_s']:.0f}",
                    "mfu": "n/a" if values.get("mfu") is None else f"{100 * values['mfu']:.1f}%"}
            self._bar.set_postfix(post, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def log_eval(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.record({"event": "eval", "step": step, **values})
        add_scalars(self._tb, step, {f"eval/{k}": v for k, v in values.items()})

    def end_progress(self) -> None:
        """Close the progress bar (later messages print as plain lines)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def write(self, message: str) -> None:
        """A log line that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.end_progress()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
