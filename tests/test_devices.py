"""The accelerator table: lookup by name and by JAX's device_kind, and the MFU peak that metrics reads from it."""

import pytest

from fairy2i_jax.training import devices
from fairy2i_jax.training.metrics import peak_flops


def test_lookup_by_device_kind_and_name():
    kinds = {"NVIDIA H100 80GB HBM3": "h100", "NVIDIA H200": "h200", "NVIDIA A100-SXM4-80GB": "a100",
             "TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
             "TPU v6 lite": "v6e"}
    for kind, name in kinds.items():
        assert devices.device_of_kind(kind).name == name, kind
        assert peak_flops(kind) == devices.device_named(name).peak_flops
    assert devices.device_of_kind("cpu") is None and peak_flops("cpu") is None
    assert devices.device_named("H100").memory_bytes == 81559 * 2**20
    assert devices.device_named("v5e").memory_bytes == 16 * 2**30
    with pytest.raises(KeyError, match="unknown device 'tpu9'; known: h100, h200"):
        devices.device_named("tpu9")


def test_table_is_well_formed():
    assert len(set(devices.DEVICE_NAMES)) == len(devices.DEVICES)
    assert {"h100", "h200", "v5e", "v5p", "v6e"} <= set(devices.DEVICE_NAMES)
    assert all(d.memory_bytes > 2**30 and d.peak_flops > 1e14 and d.kinds for d in devices.DEVICES)
