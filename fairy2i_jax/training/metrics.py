"""Run metrics: ``metrics.jsonl``, TensorBoard event files, a tqdm progress bar, throughput and MFU.

* ``metrics.jsonl``: one JSON object per logged step (``{"step", "loss", "ce", "lr", "grad_norm", "tokens_per_s",
  "mfu", ...}``) or event (``{"event": "resume", "step": k}``, ``{"event": "eval", ...}``); appended, never
  truncated, so a resumed run adds to it (a step logged twice has the same values when the resume is exact).
* TensorBoard: ``tensorboardX.SummaryWriter`` when that package is installed (optional extra ``tensorboard``);
  otherwise :class:`EventFileWriter`, a minimal writer of scalar summaries in the TensorBoard event-file format:
  TFRecord framing (``uint64 length, uint32 masked_crc32c(length), data, uint32 masked_crc32c(data)``, little
  endian, ``masked = ((crc >> 15) | (crc << 17)) + 0xa282ead8 mod 2^32``) around serialized ``Event`` protos
  (``wall_time = 1`` double, ``step = 2`` int64, ``file_version = 3`` string, ``summary = 5`` message;
  ``Summary.value = 1`` repeated; ``Value.tag = 1`` string, ``Value.simple_value = 2`` float).
* MFU = ``6 * N * tokens / s / (peak_flops_per_device * devices)`` with ``N`` the real parameter count; the peak
  is looked up by ``device_kind`` in :data:`PEAK_FLOPS` (dense bf16); unknown devices (CPU) report ``None``.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

# Dense bf16 peak FLOP/s per device, matched by substring of jax's device_kind (first match wins).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v6", 918e12),
)


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device of ``device_kind`` (None when unknown, e.g. CPU)."""
    for key, value in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return value
    return None


def mfu(param_count: int, tokens_per_s: float, device_kind: str, num_devices: int) -> float | None:
    """``6 N tokens_per_s / (peak * devices)``, or None for an unknown device kind."""
    peak = peak_flops(device_kind)
    if peak is None or num_devices < 1:
        return None
    return 6.0 * param_count * tokens_per_s / (peak * num_devices)


# ------------------------------------------------------------------------------------------ event files

def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78); ``crc32c(b"123456789") == 0xE3069283``."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's mask: ``((crc >> 15) | (crc << 17)) + 0xa282ead8`` modulo 2^32."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        bits = n & 0x7F
        n >>= 7
        if n:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def encode_event(wall_time: float, step: int, *, file_version: str | None = None,
                 scalars: dict[str, float] | None = None) -> bytes:
    """A serialized ``Event`` proto (module docstring) with a file version or scalar summary values."""
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(int(step)))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(v))))
            for tag, v in scalars.items())
        out += _bytes_field(5, values)
    return out


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


class EventFileWriter:
    """Scalar summaries in a TensorBoard event file ``events.out.tfevents.<time>.<host>`` under ``logdir``."""

    def __init__(self, logdir: str | Path):
        Path(logdir).mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = Path(logdir) / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
        self._file = open(self.path, "ab")
        self._file.write(tfrecord(encode_event(now, 0, file_version="brain.Event:2")))
        self._file.flush()

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self._file.write(tfrecord(encode_event(time.time(), step, scalars=scalars)))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class _TensorboardX:
    def __init__(self, logdir: str | Path):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(logdir))

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def summary_writer(logdir: str | Path):
    """``tensorboardX`` if installed, else the built-in :class:`EventFileWriter`."""
    try:
        return _TensorboardX(logdir)
    except ImportError:
        return EventFileWriter(logdir)


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

    @property
    def tensorboard_kind(self) -> str:
        return "tensorboardX" if isinstance(self._tb, _TensorboardX) else "built-in event writer"

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
        self._tb.add_scalars(step, {f"train/{k}": v for k, v in values.items()
                                    if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None})
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
        self._tb.add_scalars(step, {f"eval/{k}": v for k, v in values.items() if isinstance(v, (int, float))})

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
        if self._bar is not None:
            self._bar.close()
        self._jsonl.close()
        self._tb.close()
