"""The contract every packed-matmul implementation follows, and the prepared operand they return.

An implementation (tokamax shape) is a small frozen, hashable object with

* ``name``: its registry name;
* ``available()``: True when it runs on the current backend;
* ``prepare(layers)``: the one-time re-layout of the canonical codes of one or more layers that share their
  input (a tuple of :class:`~fairy2i_jax.packing.PackedWidelyLinear`), returned as a :class:`Prepared`;
  raises ``NotImplementedError`` (with the reason) for a case it cannot serve;
* ``__call__(x, prepared)``: ``x [B, 2m]`` -> one ``y [B, 2 n_l]`` per layer ``l``, with
  ``y_l = x @ unpack_to_real(layer_l).T`` (float32 accumulation, output in ``x.dtype``).

:mod:`fairy2i_jax.kernels.api` validates shapes before calling, so ``__call__`` sees a 2-D ``x`` whose last dim
is ``2m`` and at least one row.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from fairy2i_jax.kernels.decode import check_rounding
from fairy2i_jax.packing import PackedWidelyLinear, num_words

Array = Any


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A prepared operand: one or more layers (sharing the input dim ``m``) in one implementation's layout.

    A JAX pytree: ``arrays`` (a dict of arrays, or the canonical layers themselves) are the leaves; the
    implementation object, the per-layer out dims ``ns``, ``m`` and the layout's static ``meta`` (a tuple) are
    static, so a prepared operand can be passed through ``jax.jit`` and cached at load time.
    """

    arrays: Any
    implementation: Any
    ns: tuple[int, ...]
    m: int
    meta: tuple = ()

    @property
    def num_layers(self) -> int:
        return len(self.ns)


jax.tree_util.register_dataclass(Prepared, data_fields=["arrays"], meta_fields=["implementation", "ns", "m", "meta"])


class Implementation:
    """Base of the registry entries; subclasses are frozen dataclasses (hashable, usable as static metadata)."""

    name: str = "?"

    def available(self) -> bool:
        raise NotImplementedError

    def prepare(self, layers: tuple[PackedWidelyLinear, ...]) -> Prepared:
        raise NotImplementedError

    def __call__(self, x: Array, prepared: Prepared) -> list[Array]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class PallasImplementation(Implementation):
    """The options every Pallas entry takes: ``unroll_slots`` (unrolled code slots), ``rounding`` (one of
    :data:`~fairy2i_jax.kernels.decode.ROUNDINGS`), ``interpret`` (Pallas interpret mode, any backend)."""

    unroll_slots: bool = True
    rounding: str = "convert"
    interpret: bool = False

    def __post_init__(self):
        check_rounding(f"{type(self).__name__}.rounding", self.rounding)


def runs_here(import_error: BaseException | None, interpret: bool, backend: str) -> bool:
    """Whether a Pallas implementation can run now: its Pallas module imported (``import_error is None``), and
    it runs in interpret mode (any backend) or JAX's default backend is its own ``backend``."""
    return import_error is None and (bool(interpret) or jax.default_backend() == backend)


def prepared_meta(layers: tuple[PackedWidelyLinear, ...], offsets, rows: int, words: Any, scale_dtype) -> tuple:
    """The static metadata of stacked layers the Pallas kernels share: ``(stages, scale dtype name, row offsets
    of each layer, stacked rows, words per row)``."""
    return (layers[0].stages, str(scale_dtype), offsets, rows, words.shape[-1])


def check_layer(packed: Any, what: str = "packed") -> PackedWidelyLinear:
    """Raise ``ValueError`` naming the shapes unless ``packed`` is one unstacked, self-consistent packed layer.

    One layer: ``u_words``, ``w_words`` uint32 ``[T, n, ceil(m/16)]``; per-tensor scales ``[T]``, row ``[T, n]``,
    group ``[T, n, m // group_size]``. Stacked layers (extra leading dims) must be indexed first.
    """
    if not isinstance(packed, PackedWidelyLinear):
        raise ValueError(f"{what} must be a PackedWidelyLinear (or a prepared operand), got {type(packed).__name__}")
    T, n, m = packed.stages, packed.n, packed.m
    want = (T, n, num_words(m))
    for name, words in (("u_words", packed.u_words), ("w_words", packed.w_words)):
        if tuple(words.shape) != want:
            extra = " (a stack of layers: index one layer first)" if len(words.shape) > 3 else ""
            raise ValueError(
                f"{what}.{name} has shape {tuple(words.shape)}, expected [T, n, ceil(m/16)] = {want} for "
                f"T={T}, n={n}, m={m}{extra}"
            )
        if np.dtype(words.dtype) != np.uint32:
            raise ValueError(f"{what}.{name} must be uint32, got {np.dtype(words.dtype)}")
    scale_shape = {"tensor": (T,), "row": (T, n)}.get(packed.granularity)
    if scale_shape is None:
        if m % packed.group_size:
            raise ValueError(f"{what}: group scales need m={m} to be a multiple of group_size={packed.group_size}")
        scale_shape = (T, n, m // packed.group_size)
    for name, scales in (("u_scales", packed.u_scales), ("w_scales", packed.w_scales)):
        for part, s in zip(("s_re", "s_im"), scales):
            if tuple(s.shape) != scale_shape:
                raise ValueError(
                    f"{what}.{name} {part} has shape {tuple(s.shape)}, expected {scale_shape} for "
                    f"{packed.granularity} scales of a layer with T={T}, n={n}, m={m}"
                )
    return packed


def check_layers(layers: Sequence[Any]) -> tuple[PackedWidelyLinear, ...]:
    """:func:`check_layer` on each, and a shared input dim ``m`` (layers fused on one input)."""
    layers = tuple(layers)
    if not layers:
        raise ValueError("need at least one packed layer, got an empty sequence")
    for i, p in enumerate(layers):
        check_layer(p, f"layers[{i}]" if len(layers) > 1 else "packed")
    ms = {p.m for p in layers}
    if len(ms) > 1:
        shapes = ", ".join(f"[{2 * p.n}, {2 * p.m}]" for p in layers)
        raise ValueError(f"fused layers must share their input dim, got real shapes [out, in] = {shapes}")
    return layers


def same_scale_dtype(layers: Sequence[PackedWidelyLinear], who: str) -> np.dtype:
    """The scales' dtype shared by all ``layers`` (bf16 or f32), else ``NotImplementedError`` for ``who``."""
    dtypes = {np.dtype(s.dtype) for p in layers for s in (*p.u_scales, *p.w_scales)}
    if len(dtypes) != 1:
        raise NotImplementedError(f"{who} needs one scale dtype across fused layers, got {sorted(map(str, dtypes))}")
    (dtype,) = dtypes
    if dtype not in (np.dtype("float32"), np.dtype("bfloat16")):
        raise NotImplementedError(f"{who} serves bfloat16 or float32 scales, got {dtype}")
    return dtype
