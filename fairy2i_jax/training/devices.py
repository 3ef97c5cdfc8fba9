"""The one table of accelerators: memory per device (for memory plans) and dense bf16 peak FLOP/s (for MFU).

Memory is what one device offers a JAX program before any reservation: the GPUs' totals as ``nvidia-smi``
reports them (H100 SXM 81559 MiB, H200 143771 MiB, A100 80 GB 81920 MiB), the TPUs' HBM per chip from the Cloud
TPU documentation (v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB). A device is found by its short ``name``
(``h100``, ``v5p``, ...) or by a substring of JAX's ``device_kind`` (``"NVIDIA H100 80GB HBM3"``,
``"TPU v5 lite"``), first match in table order.
"""

from __future__ import annotations

import dataclasses

MIB, GIB = 2**20, 2**30


@dataclasses.dataclass(frozen=True)
class Device:
    """One accelerator: ``name`` (CLI), ``label`` (tables), ``memory_bytes``, ``peak_flops`` (dense bf16 per
    second), ``kinds`` (substrings of ``jax.Device.device_kind``)."""

    name: str
    label: str
    memory_bytes: int
    peak_flops: float
    kinds: tuple[str, ...]


DEVICES: tuple[Device, ...] = (
    Device("h100", "H100 80 GB", 81559 * MIB, 989e12, ("H100",)),
    Device("h200", "H200 141 GB", 143771 * MIB, 989e12, ("H200",)),
    Device("a100", "A100 80 GB", 81920 * MIB, 312e12, ("A100",)),
    Device("v4", "TPU v4 32 GiB", 32 * GIB, 275e12, ("TPU v4",)),
    Device("v5e", "TPU v5e 16 GiB", 16 * GIB, 197e12, ("TPU v5 lite", "TPU v5e")),
    Device("v5p", "TPU v5p 95 GiB", 95 * GIB, 459e12, ("TPU v5p", "TPU v5")),
    Device("v6e", "TPU v6e 32 GiB", 32 * GIB, 918e12, ("TPU v6",)),
)
DEVICE_NAMES: tuple[str, ...] = tuple(d.name for d in DEVICES)


def device_named(name: str) -> Device:
    """The device called ``name`` (case-insensitive); ``KeyError`` listing the known names otherwise."""
    for d in DEVICES:
        if d.name == name.lower():
            return d
    raise KeyError(f"unknown device {name!r}; known: {', '.join(DEVICE_NAMES)}")


def device_of_kind(device_kind: str) -> Device | None:
    """The device whose ``kinds`` has a substring of ``device_kind`` (first in table order), or None (CPU)."""
    kind = device_kind.lower()
    for d in DEVICES:
        if any(k.lower() in kind for k in d.kinds):
            return d
    return None
