"""``Linear``: the one linear layer of the model, in HF layout ``y = x @ A.T + b`` with ``A [out, in]``.

Kinds (:class:`LinearSpec`):

* ``real``: param ``kernel [out, in]`` (``param_dtype``), ``A = kernel``.
* ``widely_linear``: complex64 params ``U, W [out/2, in/2]`` (full-precision complex masters,
  ``A x = U z + W conj(z)``); the forward recomposes ``A = from_widely_linear(U, W)`` in float32 and casts it to
  the compute dtype. Exact: the same logits as the real model.
* ``qat``: a :class:`~fairy2i_jax.quant.QuantSpec` (method, stages, numerics, granularity) is static metadata.
  ``complex_phase`` keeps complex64 masters ``U, W`` and multiplies by the fake-quantized
  ``A_q = Q(recompose(U, W))`` (STE: the gradient reaches U and W straight through). With
  ``numerics="bf16_exact"`` the recomposed real master is rounded to bf16 and decomposed in bf16 arithmetic
  (``quantize_real_weight(from_widely_linear(U, W))``), which is the official code path (real master cast to
  bf16, then fq); quantizing bf16-rounded U, W planes directly instead (``quantize_widely_linear``) would round
  ``(a + b) / 2`` once instead of ``bf16(a) + bf16(b)`` and, measured on a float32 128x64 matrix, changes 1375 of
  8192 entries of ``A_q`` (identical for bf16-representable masters). With ``numerics="fp32"`` the masters are
  quantized directly (``quantize_widely_linear(U, W)``, no rounding at all). ``binary`` / ``ternary`` keep a
  real ``kernel`` and multiply by ``quantize_real_weight(kernel)`` (STE).
* ``packed``: not available yet (2-bit codes and Pallas kernels arrive with issue [F]); constructing it raises
  ``NotImplementedError``.

Bias (``[out]``, real, never quantized) is added after the matmul. :meth:`Linear.effective_weight` returns the
real matrix the forward multiplies by (fake-quantized for ``qat``) and ``__call__(x, weight=w)`` accepts it
precomputed, so a training step can quantize once per optimizer step and reuse ``w`` across micro-batches.

Odd ``out`` or ``in`` dims have no widely-linear form: the converter keeps such a layer ``real`` and logs a note.

Tied embeddings. With ``tie_word_embeddings`` the embedding table ``E [vocab, hidden]`` is the only master: the
embedding lookup always uses ``E`` in full precision, and the output head is a ``Linear(tied=True)`` that owns
no weight param and derives its matrix from ``E`` on every forward (``__call__(x, master=E)``): ``real`` and
``widely_linear`` multiply by ``E`` itself (``from_widely_linear(to_widely_linear(E)) = E``), ``qat
complex_phase`` multiplies by ``quantize_real_weight(E)``, i.e. the phase quantization of
``to_widely_linear(E)`` recomposed, recomputed each forward; the master stays the real embedding table and
receives the gradients of both uses (lookup and head, the latter straight through the quantizer).

Params carry logical axis names (``out_sharding`` metadata): ``kernel`` / ``U`` / ``W`` get ``(out_axis,
in_axis)`` (U and W shard like the real matrix they replace), ``bias`` gets ``(out_axis,)``, each prefixed by
``"layers"`` when the layer is stacked for ``scan``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fairy2i_jax.packing import PackedWidelyLinear, pack_real_weight, pack_widely_linear
from fairy2i_jax.quant import QuantSpec, quantize_real_weight, quantize_widely_linear
from fairy2i_jax.widely_linear import from_widely_linear, to_widely_linear

LINEAR_KINDS = ("real", "widely_linear", "qat", "packed")
PACKED_NOT_AVAILABLE = (
    "the packed linear kind is not available yet: packed kernels arrive with issue [F]; use kind='qat' "
    "(fake-quantized weights, same numbers) until then. Packed exports (python -m fairy2i_jax.export --format "
    "packed) already load with load_pretrained, decoded to real weights"
)
MASTER_DTYPE = jnp.complex64  # complex masters (no bf16 complex dtype exists in JAX)


@dataclasses.dataclass(frozen=True)
class LinearSpec:
    """What a linear layer holds and multiplies by: ``kind`` (see module docstring) and, for ``qat``, ``quant``."""

    kind: str = "real"
    quant: QuantSpec | None = None

    def __post_init__(self):
        if self.kind not in LINEAR_KINDS:
            raise ValueError(f"unknown linear kind {self.kind!r}; expected one of {LINEAR_KINDS}")
        if self.kind == "packed":
            raise NotImplementedError(PACKED_NOT_AVAILABLE)
        if self.kind == "qat":
            if not isinstance(self.quant, QuantSpec):
                raise ValueError(f"kind='qat' needs quant=QuantSpec(...), got {self.quant!r}")
            if self.quant.method == "none":
                raise ValueError("kind='qat' with method 'none' is the unquantized layer: use kind='widely_linear'")
        elif self.quant is not None:
            raise ValueError(f"kind={self.kind!r} takes no quant spec, got {self.quant!r}")

    @property
    def complex_masters(self) -> bool:
        """True when the layer stores complex ``U, W`` instead of a real ``kernel``."""
        return self.kind == "widely_linear" or (self.kind == "qat" and self.quant.method == "complex_phase")

    @property
    def needs_even_dims(self) -> bool:
        """True when the kind needs even ``out`` and ``in`` (widely-linear form)."""
        return self.complex_masters


REAL = LinearSpec()


def _param(value: jax.Array, names: tuple[str | None, ...]) -> nnx.Param:
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


@functools.partial(jax.jit, static_argnames="spec")
def fake_quantize(A: jax.Array, spec: QuantSpec) -> jax.Array:
    """``quantize_real_weight(A, spec=spec)`` (STE) as one jitted function per (shape, spec): eager callers
    (PTQ, :meth:`CausalLM.effective_weights`) compile it once per distinct layer shape; inside a jit it inlines."""
    return quantize_real_weight(A, spec=spec)


@functools.partial(jax.jit, static_argnames="spec")
def fake_quantize_masters(U: jax.Array, W: jax.Array, spec: QuantSpec) -> jax.Array:
    """``quantize_widely_linear(U, W, spec)`` (STE) jitted like :func:`fake_quantize`."""
    return quantize_widely_linear(U, W, spec)


_pack_real = jax.jit(pack_real_weight, static_argnames="spec")
_pack_masters = jax.jit(pack_widely_linear, static_argnames="spec")


def realize_weight(spec: LinearSpec, master: jax.Array) -> jax.Array:
    """The matrix a layer of ``spec`` multiplies by when its master is the real matrix ``master``.

    ``real`` / ``widely_linear``: ``master``; ``qat``: ``quantize_real_weight(master, spec=quant)`` (STE).
    Used by tied heads, whose master is the embedding table.
    """
    if spec.kind == "qat":
        return fake_quantize(master, spec.quant)
    return master


class Linear(nnx.Module):
    """One linear layer ``y = x @ A.T + b`` of the kinds in :data:`LINEAR_KINDS` (module docstring)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        spec: LinearSpec = REAL,
        use_bias: bool = False,
        axes: tuple[str | None, str | None] = (None, None),
        stack: tuple[int, ...] = (),
        tied: bool = False,
        param_dtype: Any = jnp.float32,
        compute_dtype: Any = jnp.float32,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        if spec.needs_even_dims and (in_features % 2 or out_features % 2):
            raise ValueError(
                f"linear kind {spec.kind!r} needs even dims, got out={out_features}, in={in_features}; "
                "keep such a layer real"
            )
        self.in_features, self.out_features = in_features, out_features
        self.spec = spec
        self.tied = tied
        self.param_dtype = np.dtype(param_dtype)
        self.compute_dtype = np.dtype(compute_dtype)
        self.axes = tuple(axes)
        self.stack = tuple(stack)
        lead = ("layers",) * len(self.stack)
        if tied:
            if use_bias:
                raise ValueError("a tied output head has no bias")
        else:
            shape = (*self.stack, out_features, in_features)
            kernel = init_std * jax.random.normal(rngs.params(), shape, jnp.float32)
            if spec.complex_masters:
                U, W = to_widely_linear(kernel, dtype=MASTER_DTYPE)
                self.U = _param(U, (*lead, *self.axes))
                self.W = _param(W, (*lead, *self.axes))
            else:
                self.kernel = _param(kernel.astype(self.param_dtype), (*lead, *self.axes))
        bias = jnp.zeros((*self.stack, out_features), self.param_dtype)
        self.bias = _param(bias, (*lead, self.axes[0])) if use_bias else None  # one assignment (nnx data/static)

    # -- weights ---------------------------------------------------------------------------------------------

    def stored_param(self, name: str, layer: int | None) -> jax.Array:
        """Param ``name`` (``kernel`` / ``U`` / ``W``), or its slice ``layer`` of a stacked (scanned) layer."""
        value = getattr(self, name).get_value()
        return value if layer is None else value[layer]

    def real_master(self, layer: int | None = None) -> jax.Array:
        """The unquantized real matrix ``[..., out, in]`` this layer stores (float32 for complex masters);
        ``layer``: one layer of a stacked (scanned) param."""
        if self.tied:
            raise ValueError("a tied head stores no weight: its master is the embedding table")
        if self.spec.complex_masters:
            return from_widely_linear(self.stored_param("U", layer), self.stored_param("W", layer))
        return self.stored_param("kernel", layer)

    def quantized_weight(self, master: jax.Array | None = None, layer: int | None = None) -> jax.Array:
        """The real matrix ``[..., out, in]`` the forward multiplies by, before the cast to the compute dtype.

        ``real``: kernel; ``widely_linear``: ``from_widely_linear(U, W)`` (float32); ``qat``: the fake-quantized
        matrix with the STE (module docstring; its values are exact in the quantizer's working dtype). Tied heads
        need ``master`` (the embedding table). ``layer``: one layer of a stacked (scanned) param.
        """
        if self.tied:
            if master is None:
                raise ValueError("a tied head needs master= (the embedding table) to form its weight")
            return realize_weight(self.spec, master)
        if self.spec.kind == "qat" and self.spec.complex_masters:
            U, W = self.stored_param("U", layer), self.stored_param("W", layer)
            if self.spec.quant.numerics == "bf16_exact":
                return fake_quantize(from_widely_linear(U, W), self.spec.quant)
            return fake_quantize_masters(U, W, self.spec.quant)
        if self.spec.kind == "qat":
            return fake_quantize(self.stored_param("kernel", layer), self.spec.quant)
        return self.real_master(layer)

    @property
    def phase_quantized(self) -> bool:
        """True for a ``qat`` layer of the Fairy2i phase quantizer (the layers with 2-bit codes)."""
        return self.spec.kind == "qat" and self.spec.quant.method == "complex_phase"

    def packed(self, master: jax.Array | None = None, layer: int | None = None) -> PackedWidelyLinear:
        """The codes and scales of :meth:`quantized_weight` (phase-quantized layers only), formed from the same
        planes: ``unpack_to_real(packed())`` equals ``quantized_weight()`` bit for bit in the working dtype.

        ``bf16_exact`` (and tied heads): ``pack_real_weight(real master)``; ``fp32``: ``pack_widely_linear(U, W)``.
        """
        if not self.phase_quantized:
            raise ValueError(f"only phase-quantized (qat complex_phase) layers have codes, this one is {self.spec}")
        spec = self.spec.quant
        if self.tied:
            if master is None:
                raise ValueError("a tied head needs master= (the embedding table) to form its codes")
            return _pack_real(master, spec=spec)
        U, W = self.stored_param("U", layer), self.stored_param("W", layer)
        if spec.numerics == "bf16_exact":
            return _pack_real(from_widely_linear(U, W), spec=spec)
        return _pack_masters(U, W, spec=spec)

    def effective_weight(self, master: jax.Array | None = None) -> jax.Array:
        """:meth:`quantized_weight` in the compute dtype: what ``__call__`` multiplies by."""
        return self.quantized_weight(master).astype(self.compute_dtype)

    # -- forward ---------------------------------------------------------------------------------------------

    def __call__(self, x: jax.Array, weight: jax.Array | None = None, master: jax.Array | None = None) -> jax.Array:
        """``x [..., in] -> x @ A.T + b [..., out]`` in the compute dtype (float32 accumulation).

        ``weight``: a precomputed :meth:`effective_weight` (quantize once per step); ``master``: the embedding
        table of a tied head.
        """
        if weight is None:
            weight = self.effective_weight(master)
        if weight.shape[-2:] != (self.out_features, self.in_features):
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} does not fit a linear [out={self.out_features}, "
                f"in={self.in_features}]"
            )
        y = jax.lax.dot_general(
            x.astype(self.compute_dtype),
            weight.astype(self.compute_dtype),
            (((x.ndim - 1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
        ).astype(self.compute_dtype)
        if self.bias is not None:
            y = y + self.bias.get_value().astype(self.compute_dtype)
        return y
