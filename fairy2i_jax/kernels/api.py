"""Public entry points of the packed matmul and the registry of implementations.

``packed_matmul(x, packed) = x @ unpack_to_real(packed).T``: ``x [..., 2m]`` (bf16 or f32), ``packed`` one
:class:`~fairy2i_jax.packing.PackedWidelyLinear` (as ``pack_real_weight`` / ``Linear.packed()`` make it) or a
prepared operand; ``y [..., 2n]`` with float32 accumulation, in ``x.dtype``.
``packed_matmul_fused(x, [p_q, p_k, p_v])`` computes several layers sharing ``x`` (one launch on the Pallas
backends, each layer with its own scales) and equals the separate calls.

Registry (tokamax shape): :data:`IMPLEMENTATIONS` maps a name to an object with ``available()``,
``prepare(layers)`` and ``__call__(x, prepared)`` (:mod:`fairy2i_jax.kernels.base`). ``implementation=None``
tries the available ones in the preference order of ``jax.default_backend()`` (:data:`PREFERENCE`); one that
raises ``NotImplementedError`` (in ``prepare`` or the call) hands over to the next. A name (or an
implementation object, e.g. an interpret-mode Pallas instance) forces one: its ``NotImplementedError``
propagates. A sequence of names/objects is a custom preference order (with fallthrough).

Prepared operands: :func:`prepare` returns the re-laid-out codes of the implementation that would serve the
layer(s); cache it at load time and pass it instead of the canonical layer. A prepared operand belongs to
its implementation (no fallthrough: the canonical codes are not kept).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fairy2i_jax.kernels.base import Implementation, Prepared, check_layers
from fairy2i_jax.kernels.pallas_gpu import PallasGpu
from fairy2i_jax.kernels.pallas_tpu import PallasTpu
from fairy2i_jax.kernels.reference import Reference
from fairy2i_jax.kernels.xla import Xla
from fairy2i_jax.packing import PackedWidelyLinear

Array = Any

IMPLEMENTATIONS: dict[str, Implementation] = {
    impl.name: impl for impl in (PallasGpu(), PallasTpu(), Xla(), Reference())
}
PREFERENCE: dict[str, tuple[str, ...]] = {
    "gpu": ("pallas_gpu", "xla", "reference"),
    "tpu": ("pallas_tpu", "xla", "reference"),
}
DEFAULT_PREFERENCE = ("xla", "reference")  # cpu and any other backend


def _resolve(implementation: str | Implementation) -> Implementation:
    if isinstance(implementation, Implementation):
        return implementation
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown packed-matmul implementation {implementation!r}; known: {sorted(IMPLEMENTATIONS)}")
    return IMPLEMENTATIONS[implementation]


def _candidates(implementation: Any) -> tuple[list[Implementation], bool]:
    """``(implementations to try in order, forced)`` for the ``implementation=`` argument.

    None: the backend's preference order; a name or object: that one alone, forced (it must be available);
    a sequence of names/objects: those that are available, in that order, with fallthrough.
    """
    if implementation is None:
        return list(preference_order()), False
    if isinstance(implementation, (str, Implementation)):
        impl = _resolve(implementation)
        if not impl.available():
            raise ValueError(
                f"implementation {impl.name!r} does not run on backend {jax.default_backend()!r}; "
                f"available: {available_implementations()}"
            )
        return [impl], True
    impls = [_resolve(i) for i in implementation]
    usable = [i for i in impls if i.available()]
    if not usable:
        raise ValueError(
            f"none of {[i.name for i in impls]} runs on backend {jax.default_backend()!r}; "
            f"available: {available_implementations()}"
        )
    return usable, False


@functools.partial(jax.jit, static_argnums=0)
def _prepare(impl: Implementation, layers: tuple[PackedWidelyLinear, ...]) -> Prepared:
    """``impl.prepare(layers)`` as one compiled program (not op by op when called eagerly)."""
    return impl.prepare(layers)


@jax.jit
def _call(x: Array, prepared: Prepared) -> list[Array]:
    """``prepared.implementation(x, prepared)`` as one compiled program (the implementation is static)."""
    return prepared.implementation(x, prepared)


@functools.partial(jax.jit, static_argnums=0)
def _prepare_and_call(impl: Implementation, layers: tuple[PackedWidelyLinear, ...], x: Array) -> list[Array]:
    """``impl(x, impl.prepare(layers))`` as one compiled program (canonical layers passed per call)."""
    return impl(x, impl.prepare(layers))


def _first_serving(impls: list[Implementation], forced: bool, attempt):
    """``attempt(impl)`` for each in turn; ``NotImplementedError`` hands over to the next unless forced."""
    if forced:
        return attempt(impls[0])
    reasons = []
    for impl in impls:
        try:
            return attempt(impl)
        except NotImplementedError as e:
            reasons.append(f"{impl.name}: {e}")
    raise NotImplementedError("no implementation serves this case: " + "; ".join(reasons))


def preference_order() -> tuple[Implementation, ...]:
    """The available implementations for ``jax.default_backend()``, best first."""
    names = PREFERENCE.get(jax.default_backend(), DEFAULT_PREFERENCE)
    return tuple(IMPLEMENTATIONS[n] for n in names if IMPLEMENTATIONS[n].available())


def available_implementations() -> tuple[str, ...]:
    """Names of the implementations that run on the current backend, in preference order."""
    return tuple(impl.name for impl in preference_order())


def _as_layers(packed: PackedWidelyLinear | Sequence[PackedWidelyLinear]) -> tuple[PackedWidelyLinear, ...]:
    return check_layers([packed] if isinstance(packed, PackedWidelyLinear) else packed)


def prepare(packed: PackedWidelyLinear | Sequence[PackedWidelyLinear], implementation: Any = None) -> Prepared:
    """The prepared operand of one layer, or of several layers sharing their input (for the fused entry).

    ``implementation``: as for :func:`packed_matmul`; the first candidate whose ``prepare`` serves the
    layer(s) makes it (a forced one's ``NotImplementedError`` propagates).
    """
    layers = _as_layers(packed)
    impls, forced = _candidates(implementation)
    return _first_serving(impls, forced, lambda impl: _prepare(impl, layers))


def _check_x(x: Array, m: int, ns: Sequence[int]) -> None:
    dtype = np.dtype(x.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"activations must be floating point (bf16 or f32), got {dtype} of shape {tuple(x.shape)}")
    if x.ndim < 1 or x.shape[-1] != 2 * m:
        weights = ", ".join(f"[{2 * n}, {2 * m}]" for n in ns)
        raise ValueError(
            f"activations of shape {tuple(x.shape)} do not fit packed weight(s) of real shape [out, in] = "
            f"{weights}: expected x [..., {2 * m}]"
        )


def _run(x: Array, ns: Sequence[int], call) -> list[Array]:
    """Flatten the leading dims of ``x`` (shape already checked), ``call(x2d)``, restore them."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return [jnp.zeros((*lead, 2 * n), x.dtype) for n in ns]
    return [y.reshape(*lead, 2 * n).astype(x.dtype) for y, n in zip(call(x2), ns)]


def _dispatch(x: Array, layers: Any, implementation: Any) -> list[Array]:
    if isinstance(layers, Prepared):
        impl = layers.implementation
        if implementation is not None and (
            not isinstance(implementation, (str, Implementation)) or _resolve(implementation) != impl
        ):
            raise ValueError(f"this operand was prepared for {impl.name!r}; pass implementation=None or that one")
        _check_x(x, layers.m, layers.ns)
        return _run(x, layers.ns, lambda x2: _call(x2, layers))
    layers = _as_layers(layers)
    ns = [p.n for p in layers]
    _check_x(x, layers[0].m, ns)
    impls, forced = _candidates(implementation)
    return _first_serving(impls, forced, lambda impl: _run(x, ns, lambda x2: _prepare_and_call(impl, layers, x2)))


def packed_matmul(x: Array, packed: PackedWidelyLinear | Prepared, *, implementation: Any = None) -> Array:
    """``y [..., 2n] = x [..., 2m] @ unpack_to_real(packed).T``, float32 accumulation, in ``x.dtype``.

    ``packed``: one layer or a one-layer prepared operand. ``implementation``: None (the backend's
    preference order, with fallthrough), a name or implementation object (forced: its ``NotImplementedError``
    propagates), or a sequence of them (tried in order, with fallthrough). Raises ``ValueError`` for
    mismatched shapes or dtypes (naming them), an unknown or unavailable implementation, or a fused
    (multi-layer) prepared operand.
    """
    if isinstance(packed, Prepared) and packed.num_layers != 1:
        raise ValueError(f"a prepared operand of {packed.num_layers} fused layers needs packed_matmul_fused")
    if not isinstance(packed, (Prepared, PackedWidelyLinear)):
        raise ValueError(f"packed must be a PackedWidelyLinear or a prepared operand, got {type(packed).__name__}")
    return _dispatch(x, packed, implementation)[0]


def packed_matmul_fused(
    x: Array, layers: Sequence[PackedWidelyLinear] | Prepared, *, implementation: Any = None
) -> list[Array]:
    """``[x @ unpack_to_real(p).T for p in layers]`` for layers sharing the input dim (q/k/v, gate/up).

    ``layers``: a sequence of packed layers or the prepared operand ``prepare([p_q, p_k, p_v])``. The Pallas
    implementations run all layers in one kernel launch; reference and xla loop over them.
    """
    if isinstance(layers, PackedWidelyLinear):
        raise ValueError("packed_matmul_fused takes a sequence of layers (or a fused prepared operand), got one layer")
    return _dispatch(x, layers, implementation)
