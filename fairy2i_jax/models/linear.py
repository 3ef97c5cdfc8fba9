"""``Linear``: the one linear layer of the model, in HF layout ``y = x @ A.T + b`` with ``A [out, in]``.

What a layer stores and multiplies by is its *kind*, a small class registered in :data:`LINEAR_KINDS` by name
(:func:`register_kind`); a :class:`LinearSpec` (kind name + optional :class:`~fairy2i_jax.quant.QuantSpec`) is
the frozen, hashable description a model plan holds. Kinds:

* ``real`` (:class:`RealKind`): a :class:`LinearWeight` ``kernel [out, in]`` (``param_dtype``), ``A = kernel``.
* ``widely_linear`` (:class:`WidelyLinearKind`): :class:`ComplexMaster` params ``U, W [out/2, in/2]``
  (complex64 full-precision masters, ``A x = U z + W conj(z)``); the forward recomposes
  ``A = from_widely_linear(U, W)`` in float32. Exact: the same logits as the real model.
* ``qat`` (:class:`QATKind`, a ``QuantSpec`` is static metadata): ``complex_phase`` keeps complex masters ``U, W``
  and multiplies by the fake-quantized ``A_q = Q(recompose(U, W))`` (STE: the gradient reaches U and W straight
  through). With ``numerics="bf16_exact"`` the recomposed real master is rounded to bf16 and decomposed in bf16
  arithmetic (``quantize_real_weight(from_widely_linear(U, W))``), which is the official code path (real master
  cast to bf16, then fq); quantizing bf16-rounded U, W planes directly instead (``quantize_widely_linear``) would
  round ``(a + b) / 2`` once instead of ``bf16(a) + bf16(b)`` and, measured on a float32 128x64 matrix, changes
  1375 of 8192 entries of ``A_q`` (identical for bf16-representable masters). With ``numerics="fp32"`` the masters
  are quantized directly (``quantize_widely_linear(U, W)``, no rounding at all). ``binary`` / ``ternary`` keep a
  real ``kernel`` and multiply by ``quantize_real_weight(kernel)`` (STE).
* ``packed`` (:class:`PackedKind`, a ``complex_phase`` ``QuantSpec``): the 2-bit layer for inference. It holds
  the canonical codes and scales (:data:`~fairy2i_jax.packing.PACKED_SUFFIXES`: ``u_codes``, ``w_codes``
  ``[T, n, ceil(m/16)]`` uint32, ``u_scales``, ``w_scales`` ``[T, 2, *G]``) as :class:`PackedCodes` variables,
  which are not ``nnx.Param`` (no optimizer or QAT step ever sees them), and multiplies through
  :func:`fairy2i_jax.kernels.packed_matmul`: the codes select and negate the activations, no dense weight is
  formed. Its "weight" (:meth:`Linear.effective_weight`) is the layer's
  :class:`~fairy2i_jax.packing.PackedWidelyLinear`; :func:`prepare_weight` turns it into the kernels' prepared
  operand once (what generation and evaluation pass as ``weights=``).

Adding a kind = one subclass of :class:`LinearKind` with ``@register_kind``; nothing else branches on kind names
(ask a spec: :attr:`LinearSpec.complex_masters`, :attr:`~LinearSpec.quantized`, :attr:`~LinearSpec.phase_codes`).

Variable types. A layer's stored weight is a :class:`LinearWeight` (an ``nnx.Param``), complex masters are
:class:`ComplexMaster` (a ``LinearWeight``), packed codes :class:`PackedCodes` (not a param): the optimizer, the
converter and the exporter filter by these types (:data:`LINEAR_STORAGE`), never by attribute names. The two
masters of a layer are the attributes named in :data:`MASTER_NAMES`.

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
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fairy2i_jax import kernels
from fairy2i_jax.packing import (
    PACKED_SUFFIXES,
    PackedWidelyLinear,
    from_arrays,
    pack_real_weight,
    pack_widely_linear,
    packed_shapes,
    unpack_to_real,
)
from fairy2i_jax.quant import QuantSpec, quantize_real_weight, quantize_widely_linear
from fairy2i_jax.widely_linear import from_widely_linear, to_widely_linear

MASTER_DTYPE = jnp.complex64  # complex masters (no bf16 complex dtype exists in JAX)
MASTER_NAMES = ("U", "W")  # the attributes holding a layer's two complex masters
KERNEL_NAME = "kernel"  # the attribute holding a real weight (HF's ``weight``)


class LinearWeight(nnx.Param):
    """The stored weight of a linear layer (a real ``kernel``); trainable like any ``nnx.Param``."""


class ComplexMaster(LinearWeight):
    """A complex64 master ``U`` or ``W`` of a widely-linear layer (module docstring)."""


class PackedCodes(nnx.Variable):
    """One of the four arrays of a packed layer (codes or scales): stored, never trained."""


LINEAR_STORAGE = (LinearWeight, PackedCodes)  # what a linear layer stores (everything else is shared model state)


# ----------------------------------------------------------------------------------------------- kinds


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


class LinearKind:
    """What a layer of one kind stores and multiplies by. Subclasses are stateless and registered by ``name``.

    ``quantized``: the forward multiplies by a quantized matrix (what a ``dequantized`` export writes).
    """

    name: ClassVar[str] = ""
    quantized: ClassVar[bool] = False

    @classmethod
    def check_quant(cls, quant: QuantSpec | None) -> None:
        """``ValueError`` unless ``quant`` is what this kind takes (default: nothing)."""
        if quant is not None:
            raise ValueError(f"kind={cls.name!r} takes no quant spec, got {quant!r}")

    @classmethod
    def stores_masters(cls, quant: QuantSpec | None) -> bool:
        """True when the layer stores complex masters ``U, W`` instead of a real ``kernel``."""
        return False

    @classmethod
    def has_phase_codes(cls, quant: QuantSpec | None) -> bool:
        """True when the layer's matrix is made of Fairy2i 2-bit phase codes (it can be packed)."""
        return False

    @classmethod
    def forward_weight(cls, lin: "Linear", master: jax.Array | None, layer: int | None) -> jax.Array:
        """The real matrix ``[..., out, in]`` the forward multiplies by, before the cast to the compute dtype;
        ``master`` is the embedding table of a tied head."""
        return master if lin.tied else lin.real_master(layer)

    @classmethod
    def create_storage(cls, lin: "Linear", kernel: jax.Array, names: tuple) -> None:
        """Create the layer's stored weight from a random ``kernel`` (complex masters or the real kernel)."""
        if lin.spec.complex_masters:
            for name, value in zip(MASTER_NAMES, to_widely_linear(kernel, dtype=MASTER_DTYPE)):
                setattr(lin, name, ComplexMaster(value, out_sharding=names, eager_sharding=False))
        else:
            lin.kernel = LinearWeight(kernel.astype(lin.param_dtype), out_sharding=names, eager_sharding=False)

    @classmethod
    def effective_weight(cls, lin: "Linear", master: jax.Array | None) -> Any:
        """What ``__call__`` multiplies by: :meth:`forward_weight` in the compute dtype."""
        return lin.forward_weight(master).astype(lin.compute_dtype)

    @classmethod
    def matmul(cls, lin: "Linear", x: jax.Array, weight: Any) -> jax.Array:
        """``x [..., in] @ weight.T`` in the compute dtype, float32 accumulation."""
        if weight.shape[-2:] != (lin.out_features, lin.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit a linear [out={lin.out_features}, "
                             f"in={lin.in_features}]")
        return jax.lax.dot_general(
            x.astype(lin.compute_dtype), weight.astype(lin.compute_dtype), (((x.ndim - 1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32).astype(lin.compute_dtype)


LINEAR_KINDS: dict[str, type[LinearKind]] = {}


def register_kind(cls: type[LinearKind]) -> type[LinearKind]:
    """Class decorator: make ``cls`` the linear kind named ``cls.name``."""
    if not cls.name or cls.name in LINEAR_KINDS:
        raise ValueError(f"linear kind name {cls.name!r} is empty or already registered")
    LINEAR_KINDS[cls.name] = cls
    return cls


@register_kind
class RealKind(LinearKind):
    """``kernel [out, in]``; ``A = kernel`` (a tied head: the embedding table)."""

    name = "real"


@register_kind
class WidelyLinearKind(LinearKind):
    """Complex masters ``U, W``; ``A = from_widely_linear(U, W)`` in float32 (exact)."""

    name = "widely_linear"

    @classmethod
    def stores_masters(cls, quant):
        return True


@register_kind
class QATKind(LinearKind):
    """Fake-quantized forward with the STE (module docstring): masters for ``complex_phase``, a kernel otherwise."""

    name = "qat"
    quantized = True

    @classmethod
    def check_quant(cls, quant):
        if not isinstance(quant, QuantSpec):
            raise ValueError(f"kind='qat' needs quant=QuantSpec(...), got {quant!r}")
        if quant.method == "none":
            raise ValueError("kind='qat' with method 'none' is the unquantized layer: use kind='widely_linear'")

    @classmethod
    def stores_masters(cls, quant):
        return quant.method == "complex_phase"

    @classmethod
    def has_phase_codes(cls, quant):
        return quant.method == "complex_phase"

    @classmethod
    def forward_weight(cls, lin, master, layer):
        q = lin.spec.quant
        if lin.tied:
            return fake_quantize(master, q)
        if not q.method == "complex_phase":
            return fake_quantize(lin.stored_param(KERNEL_NAME, layer), q)
        U, W = (lin.stored_param(n, layer) for n in MASTER_NAMES)
        if q.numerics == "bf16_exact":
            return fake_quantize(from_widely_linear(U, W), q)
        return fake_quantize_masters(U, W, q)


@register_kind
class PackedKind(QATKind):
    """Canonical 2-bit codes and scales as :class:`PackedCodes`, multiplied through the packed kernels."""

    name = "packed"

    @classmethod
    def check_quant(cls, quant):
        if not isinstance(quant, QuantSpec) or quant.method != "complex_phase":
            raise ValueError(f"kind='packed' holds Fairy2i phase codes: it needs a complex_phase QuantSpec, got "
                             f"{quant!r}")

    @classmethod
    def stores_masters(cls, quant):
        return False

    @classmethod
    def create_storage(cls, lin, kernel, names):
        if lin.tied:
            raise ValueError("a packed output head holds its own codes: it cannot be tied to the embedding table")
        lead = names[:len(lin.stack)]
        for suffix, (shape, dtype) in packed_shapes(lin.out_features, lin.in_features, lin.spec.quant).items():
            axes = (*lead, None, lin.axes[0], None) if suffix.endswith("codes") else (*lead,) + (None,) * len(shape)
            setattr(lin, suffix, PackedCodes(jnp.zeros((*lin.stack, *shape), dtype), out_sharding=axes,
                                             eager_sharding=False))

    @classmethod
    def forward_weight(cls, lin, master, layer):
        return unpack_to_real(lin.packed(layer=layer))

    @classmethod
    def effective_weight(cls, lin, master):
        return lin.packed()

    @classmethod
    def matmul(cls, lin, x, weight):
        return kernels.packed_matmul(x.astype(lin.compute_dtype), weight).astype(lin.compute_dtype)


@dataclasses.dataclass(frozen=True)
class LinearSpec:
    """What a linear layer holds and multiplies by: ``kind`` (a name in :data:`LINEAR_KINDS`) and, for the kinds
    that take one, ``quant``. Frozen and hashable (static metadata of the model)."""

    kind: str = "real"
    quant: QuantSpec | None = None

    def __post_init__(self):
        if self.kind not in LINEAR_KINDS:
            raise ValueError(f"unknown linear kind {self.kind!r}; expected one of {tuple(LINEAR_KINDS)}")
        self.impl.check_quant(self.quant)

    @property
    def impl(self) -> type[LinearKind]:
        """The registered kind class."""
        return LINEAR_KINDS[self.kind]

    @property
    def complex_masters(self) -> bool:
        """True when the layer stores complex ``U, W`` (and so needs even ``out`` and ``in``)."""
        return self.impl.stores_masters(self.quant)

    @property
    def quantized(self) -> bool:
        """True when the forward multiplies by a quantized matrix."""
        return self.impl.quantized

    @property
    def phase_codes(self) -> bool:
        """True when the matrix is made of Fairy2i phase codes (packable)."""
        return self.impl.has_phase_codes(self.quant)


REAL = LinearSpec()


# ----------------------------------------------------------------------------------------------- the layer


class Linear(nnx.Module):
    """One linear layer ``y = x @ A.T + b`` of a kind in :data:`LINEAR_KINDS` (module docstring)."""

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
        if spec.complex_masters and (in_features % 2 or out_features % 2):
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
        names = (*lead, *self.axes)
        if tied:
            if use_bias:
                raise ValueError("a tied output head has no bias")
        else:
            shape = (*self.stack, out_features, in_features)
            kernel = init_std * jax.random.normal(rngs.params(), shape, jnp.float32)
            spec.impl.create_storage(self, kernel, names)
        bias = jnp.zeros((*self.stack, out_features), self.param_dtype)
        self.bias = (nnx.Param(bias, out_sharding=(*lead, self.axes[0]), eager_sharding=False)
                     if use_bias else None)  # one assignment (nnx data/static)

    # -- weights ---------------------------------------------------------------------------------------------

    def stored_param(self, name: str, layer: int | None) -> jax.Array:
        """Param ``name`` (``kernel`` / ``U`` / ``W``), or its slice ``layer`` of a stacked (scanned) layer."""
        value = getattr(self, name).get_value()
        return value if layer is None else value[layer]

    def masters(self, layer: int | None = None) -> tuple[jax.Array, jax.Array]:
        """The complex masters ``(U, W)`` (``layer``: one layer of a stacked param)."""
        if not self.spec.complex_masters or self.tied:
            raise ValueError(f"this layer ({self.spec}, tied={self.tied}) stores no complex masters")
        return tuple(self.stored_param(n, layer) for n in MASTER_NAMES)

    def real_master(self, layer: int | None = None) -> jax.Array:
        """The unquantized real matrix ``[..., out, in]`` this layer stores (float32 for complex masters);
        ``layer``: one layer of a stacked (scanned) param."""
        if self.tied:
            raise ValueError("a tied head stores no weight: its master is the embedding table")
        if self.spec.complex_masters:
            return from_widely_linear(*self.masters(layer))
        return self.stored_param(KERNEL_NAME, layer)

    def forward_weight(self, master: jax.Array | None = None, layer: int | None = None) -> jax.Array:
        """The real matrix ``[..., out, in]`` the forward multiplies by, before the cast to the compute dtype.

        ``real``: the kernel; ``widely_linear``: ``from_widely_linear(U, W)`` (float32); ``qat``: the
        fake-quantized matrix with the STE (module docstring; its values are exact in the quantizer's working
        dtype). Tied heads need ``master`` (the embedding table). ``layer``: one layer of a stacked param.
        """
        if self.tied and master is None:
            raise ValueError("a tied head needs master= (the embedding table) to form its weight")
        return self.spec.impl.forward_weight(self, master, layer)

    def packed(self, master: jax.Array | None = None, layer: int | None = None) -> PackedWidelyLinear:
        """The codes and scales of :meth:`forward_weight` (layers with phase codes only), formed from the same
        planes: ``unpack_to_real(packed())`` equals ``forward_weight()`` bit for bit in the working dtype.

        ``bf16_exact`` (and tied heads): ``pack_real_weight(real master)``; ``fp32``: ``pack_widely_linear(U, W)``.
        """
        if not self.spec.phase_codes:
            raise ValueError(f"only layers with phase codes (qat complex_phase) can be packed, this one is {self.spec}")
        spec = self.spec.quant
        if self.spec.kind == PackedKind.name:  # the stored codes themselves
            arrays = {k: self.stored_param(k, layer) for k in PACKED_SUFFIXES}
            return from_arrays(arrays, self.out_features // 2, self.in_features // 2, spec)
        if self.tied:
            if master is None:
                raise ValueError("a tied head needs master= (the embedding table) to form its codes")
            return _pack_real(master, spec=spec)
        U, W = self.masters(layer)
        if spec.numerics == "bf16_exact":
            return _pack_real(from_widely_linear(U, W), spec=spec)
        return _pack_masters(U, W, spec=spec)

    def effective_weight(self, master: jax.Array | None = None) -> Any:
        """What ``__call__`` multiplies by: :meth:`forward_weight` in the compute dtype (the layer's
        ``PackedWidelyLinear`` for the packed kind)."""
        return self.spec.impl.effective_weight(self, master)

    # -- forward ---------------------------------------------------------------------------------------------

    def __call__(self, x: jax.Array, weight: jax.Array | None = None, master: jax.Array | None = None) -> jax.Array:
        """``x [..., in] -> x @ A.T + b [..., out]`` in the compute dtype (float32 accumulation).

        ``weight``: a precomputed :meth:`effective_weight` (quantize once per step); ``master``: the embedding
        table of a tied head.
        """
        if weight is None:
            weight = self.effective_weight(master)
        return self.add_bias(self.spec.impl.matmul(self, x, weight))

    def add_bias(self, y: jax.Array) -> jax.Array:
        """``y + b`` in the compute dtype (``y`` unchanged without a bias)."""
        return y if self.bias is None else y + self.bias.get_value().astype(self.compute_dtype)


def prepare_weight(weight: Any) -> Any:
    """A weight of :meth:`Linear.effective_weight` ready for repeated forwards: a packed layer's
    ``PackedWidelyLinear`` becomes the kernels' prepared operand (:func:`fairy2i_jax.kernels.prepare`, a stack of
    layers prepared layer by layer), a dense matrix stays as it is."""
    if not isinstance(weight, PackedWidelyLinear):
        return weight
    if weight.u_words.ndim == 3:
        return kernels.prepare(weight)
    return jax.vmap(kernels.prepare)(weight)
