"""The ``packed`` HF format: Fairy2i 2-bit phase codes and scales in safetensors, described in ``config.json``.

A packed directory is an HF directory whose phase-quantized linears (``qat`` ``complex_phase``) are stored as
codes instead of a ``weight``. For the module ``<base>`` (e.g. ``model.layers.0.self_attn.q_proj``, real shape
``[out, in] = [2n, 2m]``, T stages):

=====================  ========================  ===================================================
tensor                 shape, dtype              holds
=====================  ========================  ===================================================
``<base>.u_codes``     ``[T, n, ceil(m/16)]`` U32  the codes of U, stage-major, 16 per word
``<base>.w_codes``     ``[T, n, ceil(m/16)]`` U32  the codes of W
``<base>.u_scales``    ``[T, 2, *G]``              ``(s_re, s_im)`` of each stage of U (axis 1)
``<base>.w_scales``    ``[T, 2, *G]``              the same for W
``<base>.bias``        ``[out]``                   unchanged (never quantized)
=====================  ========================  ===================================================

``G`` is ``()`` for per-tensor scales (the official W2), ``(n,)`` per row, ``(n, m // group_size)`` per group;
scales are in the quantizer's working dtype (BF16 for ``bf16_exact``, F32 for ``fp32``). Code ``k`` in 0..3 is
the value ``i^k`` (0 = +1, 1 = +i, 2 = -1, 3 = -i); code ``j`` of word ``w`` sits at bits ``2j, 2j+1`` of that
word, lowest bits first, along the complex input dim (layout of :mod:`fairy2i_jax.packing`, version
:data:`LAYOUT_VERSION`). Everything else (embeddings, norms, unquantized linears) is an ordinary HF tensor.

``config.json`` carries::

    "quantization_config": {"quant_method": "fairy2i", "format": "packed", "layout_version": 1,
                            "stages": 2, "modules": {"<base>": {"out_features": 2n, "in_features": 2m,
                            "method": "complex_phase", "stages": 2, "numerics": "bf16_exact",
                            "granularity": "tensor", "group_size": 128}, ...}}

and ``tie_word_embeddings: false`` when the output head is quantized (its codes are its own tensors).

Loading: ``load_pretrained(packed_dir)`` keeps the codes (the ``packed`` linear kind: its variables are these
tensors, multiplied through :mod:`fairy2i_jax.kernels`); with ``packed="decode"``, :class:`PackedSource` shows each
``<base>.weight`` as the decoded ``A_q = unpack_to_real(codes, scales)``, equal bit for bit to the QAT model's
fake-quantized weight, and an ordinary real model is built from it.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fairy2i_jax.hf.safetensors_io import CheckpointError
from fairy2i_jax.packing import (
    PACKED_SUFFIXES,
    PackedWidelyLinear,
    from_arrays,
    packed_shapes,
    scale_group_shape,
    to_arrays,
    unpack_to_real,
)
from fairy2i_jax.quant import QuantSpec

QUANT_METHOD = "fairy2i"
LAYOUT_VERSION = 1
_SPEC_KEYS = ("method", "stages", "numerics", "granularity", "group_size")


def packed_arrays(packed: PackedWidelyLinear) -> dict[str, np.ndarray]:
    """``{suffix: numpy array}`` of one layer's :class:`PackedWidelyLinear` (:func:`fairy2i_jax.packing.to_arrays`
    fetched to the host)."""
    return {k: np.asarray(v) for k, v in to_arrays(packed).items()}


def module_entry(out_features: int, in_features: int, spec: QuantSpec) -> dict[str, Any]:
    """One ``quantization_config["modules"]`` entry."""
    return {"out_features": out_features, "in_features": in_features,
            **{k: getattr(spec, k) for k in _SPEC_KEYS}}


def quantization_config(modules: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``quantization_config`` dict of a packed export (``stages``: the most common stage count)."""
    stages = [m["stages"] for m in modules.values()]
    common = max(set(stages), key=stages.count) if stages else None
    return {"quant_method": QUANT_METHOD, "format": "packed", "layout_version": LAYOUT_VERSION,
            "stages": common, "modules": dict(modules)}


def read_quantization_config(hf: Mapping[str, Any], where: str) -> dict[str, tuple[int, int, QuantSpec]] | None:
    """``{module: (out, in, QuantSpec)}`` of a packed ``config.json`` dict, or None when it has no
    ``quantization_config``. Raises :class:`CheckpointError` naming the key for any other quantization method,
    another layout version or a malformed entry."""
    qc = hf.get("quantization_config")
    if qc is None:
        return None
    key = f"{where}: config.json key 'quantization_config'"
    if not isinstance(qc, Mapping) or qc.get("quant_method") != QUANT_METHOD:
        method = qc.get("quant_method") if isinstance(qc, Mapping) else qc
        raise CheckpointError(f"{key}: quant_method {method!r} is not supported; only {QUANT_METHOD!r} packed "
                              "exports (and unquantized checkpoints) load")
    if qc.get("layout_version") != LAYOUT_VERSION:
        raise CheckpointError(f"{key}: layout_version {qc.get('layout_version')!r}, this version reads "
                              f"{LAYOUT_VERSION}")
    modules = {}
    for name, entry in (qc.get("modules") or {}).items():
        try:
            spec = QuantSpec(**{k: entry[k] for k in _SPEC_KEYS})
            modules[name] = (int(entry["out_features"]), int(entry["in_features"]), spec)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{key}: malformed entry for module {name!r}: {e!r}") from None
        if spec.method != "complex_phase":
            raise CheckpointError(f"{key}: module {name!r} has method {spec.method!r}; packed holds complex_phase")
    return modules


class PackedSource:
    """A loader tensor source over a packed checkpoint: ``<base>.weight`` of every packed module is the decoded
    ``A_q`` (computed when first read, one module cached), every other tensor is passed through."""

    def __init__(self, checkpoint, modules: Mapping[str, tuple[int, int, QuantSpec]], where: str):
        self._checkpoint, self._modules, self._where = checkpoint, dict(modules), where
        self._check()
        packed_names = {f"{base}.{s}" for base in self._modules for s in PACKED_SUFFIXES}
        self._keys = [k for k in checkpoint.keys() if k not in packed_names]
        self._keys += [f"{base}.weight" for base in self._modules]
        self._cached: tuple[str, np.ndarray] | None = None

    def _check(self) -> None:
        problems = []
        for base, (out_f, in_f, spec) in self._modules.items():
            if out_f % 2 or in_f % 2:
                problems.append(f"{base}: odd shape [{out_f}, {in_f}]")
                continue
            for suffix, (shape, dtype) in packed_shapes(out_f, in_f, spec).items():
                name = f"{base}.{suffix}"
                if name not in self._checkpoint:
                    problems.append(f"{name}: missing")
                elif tuple(self._checkpoint.shape(name)) != shape or self._checkpoint.dtype(name) != dtype:
                    problems.append(f"{name}: found {self._checkpoint.dtype(name)}{list(self._checkpoint.shape(name))}"
                                    f", expected {dtype}{list(shape)}")
        if problems:
            raise CheckpointError(f"{self._where}: packed tensors do not match quantization_config: "
                                  + "; ".join(problems))

    def keys(self):
        return self._keys

    def shape(self, name: str) -> tuple[int, ...]:
        base = name.removesuffix(".weight")
        if name.endswith(".weight") and base in self._modules:
            return self._modules[base][:2]
        return self._checkpoint.shape(name)

    def decoded(self, base: str) -> np.ndarray:
        """``A_q [out, in]`` of packed module ``base`` in the scales' dtype."""
        out_f, in_f, spec = self._modules[base]
        arrays = {suffix: self._checkpoint.read(f"{base}.{suffix}") for suffix in PACKED_SUFFIXES}
        return np.asarray(unpack_to_real(from_arrays(arrays, out_f // 2, in_f // 2, spec)))

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        base = name.removesuffix(".weight")
        if not (name.endswith(".weight") and base in self._modules):
            return self._checkpoint.read(name, index)
        if self._cached is None or self._cached[0] != name:
            self._cached = (name, self.decoded(base))
        return self._cached[1][index]

