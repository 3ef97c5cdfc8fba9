"""Model surgery: real <-> widely-linear / QAT linears (PTQ = :func:`convert` with no training).

``convert(model, quant)`` builds a new :class:`CausalLM` whose linears have the kinds ``quant`` asks for:

============  ==============================================================================
``w1``..``w4``  ``qat`` complex_phase with 1..4 residual stages (``w2`` = Fairy2i-W2)
``binary``    ``qat`` real binary baseline (official ``bitnet``); ``ternary``: BitNet b1.58
``fp``        ``widely_linear``: unquantized complex masters (same logits as the real model)
``none``      ``real`` (a real model back, masters recomposed)
============  ==============================================================================

Which linears: every q/k/v/o/gate/up/down and, unless ``lm_head=False``, the output head (quantized by
default, as the official W2); embeddings and norms never. ``rules`` is an ordered list of ``(regex, action)``
matched with ``re.search`` against HF module names (``model.layers.3.self_attn.q_proj``, ``lm_head``); the
first match wins; ``action`` is ``"skip"`` (keep real), ``{"stages": k}`` (the preset's method with k stages)
or a :class:`QuantSpec`. A linear with an odd ``out`` or ``in`` dim has no widely-linear form: it stays real
and a note is logged.

Arithmetic. Complex masters are computed per tensor under ``jax.jit`` with the target sharding as
``U = (A11 + A22)/2 + i (A21 - A12)/2``, ``W = (A11 - A22)/2 + i (A12 + A21)/2`` in float32 (one rounding of
the exact result, the same as computing in float64 and rounding, while the quartet's magnitudes differ by less
than 2^16 / 2^29 for bf16 / fp32 weights). Masters already complex are copied, never recomposed. Going back
to real (:func:`to_real_state`, for export) recomposes in float64 numpy on the host, one tensor at a time.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fairy2i_jax.models.linear import MASTER_DTYPE, REAL, Linear, LinearSpec
from fairy2i_jax.models.llama import LM_HEAD, CausalLM, abstract_model
from fairy2i_jax.quant import QuantSpec
from fairy2i_jax.sharding import variable_sharding
from fairy2i_jax.widely_linear import from_widely_linear, to_widely_linear

logger = logging.getLogger(__name__)

QUANT_PRESETS = ("w1", "w2", "w3", "w4", "binary", "ternary", "fp", "none")


def preset_spec(quant: str, numerics: str = "bf16_exact", stages: int | None = None) -> LinearSpec:
    """The :class:`LinearSpec` of a ``quant`` preset (table in the module docstring)."""
    if quant not in QUANT_PRESETS:
        raise ValueError(f"unknown quant preset {quant!r}; expected one of {', '.join(QUANT_PRESETS)}")
    if quant in ("fp", "none"):
        if stages is not None:
            raise ValueError(f"a {{'stages': {stages}}} rule needs a quantized preset, not {quant!r}")
        return LinearSpec("widely_linear") if quant == "fp" else REAL
    if quant in ("binary", "ternary"):
        return LinearSpec("qat", QuantSpec(quant, stages, numerics))
    return LinearSpec("qat", QuantSpec("complex_phase", stages or int(quant[1]), numerics))


def _rule_spec(action: Any, quant: str, numerics: str, name: str) -> LinearSpec:
    if action == "skip":
        return REAL
    if isinstance(action, QuantSpec):
        return LinearSpec("widely_linear") if action.method == "none" else LinearSpec("qat", action)
    if isinstance(action, Mapping) and set(action) == {"stages"}:
        return preset_spec(quant, numerics, action["stages"])
    raise ValueError(f"rule action for {name!r} must be 'skip', {{'stages': k}} or a QuantSpec, got {action!r}")


def _linear_shapes(model: CausalLM) -> dict[str, tuple[int, int]]:
    """``[out, in]`` of every linear by per-layer HF name (a tied head: the embedding table's shape)."""
    by_name = {name: (lin.out_features, lin.in_features) for name, lin in model.named_linears().items()}
    return {name: by_name[re.sub(r"layers\.\d+\.", "layers.*.", name) if name not in by_name else name]
            for name in model.linear_plan()}


def resolve_plan(
    model: CausalLM,
    quant: str = "w2",
    *,
    numerics: str = "bf16_exact",
    rules: Sequence[tuple[str, Any]] = (),
    lm_head: bool = True,
) -> dict[str, LinearSpec]:
    """The :class:`LinearSpec` of every linear (per-layer HF names) for :func:`convert`'s arguments."""
    default = preset_spec(quant, numerics)
    compiled = [(re.compile(pattern), action) for pattern, action in rules]
    plan = {}
    for name, (out_dim, in_dim) in _linear_shapes(model).items():
        spec = default if (name != LM_HEAD or lm_head) else REAL
        for pattern, action in compiled:
            if pattern.search(name):
                spec = _rule_spec(action, quant, numerics, name)
                break
        if spec.needs_even_dims and (out_dim % 2 or in_dim % 2):
            logger.warning("%s: shape [%d, %d] has an odd dim, no widely-linear form; the layer stays real",
                        name, out_dim, in_dim)
            spec = REAL
        plan[name] = spec
    return plan


def _variables(model: nnx.Module) -> dict[tuple, nnx.Variable]:
    return {path: node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Variable)}


def _target_sharding(old_value: jax.Array, new_var: nnx.Variable):
    sharding = getattr(old_value, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return variable_sharding(new_var, sharding.mesh)
    return sharding


def _complex_masters(old: Linear, new_U: nnx.Variable) -> tuple[jax.Array, jax.Array]:
    """``(U, W)`` complex64 for ``old``: copied if it has masters, else from its real kernel under jit."""
    if old.spec.complex_masters:
        return old.U.get_value(), old.W.get_value()
    kernel = old.kernel.get_value()
    target = _target_sharding(kernel, new_U)
    fn = jax.jit(lambda A: to_widely_linear(A.astype(jnp.float32), dtype=MASTER_DTYPE), out_shardings=(target, target))
    return fn(kernel)


def _real_kernel(old: Linear, new_kernel: nnx.Variable, dtype: np.dtype) -> jax.Array:
    """``old``'s real master in ``dtype``: its kernel, or recomposed from its masters under jit."""
    if not old.spec.complex_masters:
        return old.kernel.get_value().astype(dtype)
    U = old.U.get_value()
    target = _target_sharding(U, new_kernel)
    fn = jax.jit(lambda u, w: from_widely_linear(u, w, dtype=dtype), out_shardings=target)
    return fn(U, old.W.get_value())


def rebuild(model: CausalLM, plan: Mapping[str, LinearSpec]) -> CausalLM:
    """A new :class:`CausalLM` with the same config and non-linear params as ``model`` and linears of ``plan``."""
    new = abstract_model(model.config, plan)
    old_vars = _variables(model)
    old_linears, new_linears = model.named_linears(), new.named_linears()
    for name, new_lin in new_linears.items():
        old_lin = old_linears[name]
        if new_lin.tied:
            continue
        if new_lin.spec.complex_masters:
            U, W = _complex_masters(old_lin, new_lin.U)
            new_lin.U.set_value(U)
            new_lin.W.set_value(W)
        else:
            new_lin.kernel.set_value(_real_kernel(old_lin, new_lin.kernel, np.dtype(model.config.param_dtype)))
    for path, var in _variables(new).items():
        if path[-1] in ("U", "W", "kernel"):
            continue
        if path not in old_vars:
            raise ValueError(f"param {'.'.join(map(str, path))} of the converted model has no source in the original")
        var.set_value(old_vars[path].get_value())
    return new


def convert(
    model: CausalLM,
    quant: str = "w2",
    *,
    numerics: str = "bf16_exact",
    rules: Sequence[tuple[str, Any]] = (),
    lm_head: bool = True,
) -> CausalLM:
    """A new model whose linears follow ``quant`` / ``rules`` / ``lm_head`` (module docstring); ``model`` is kept.

    Embeddings, norms and biases are shared (immutable arrays); masters are computed per tensor in the
    model's sharding. A scanned model needs the same kinds in every layer (else ``ValueError``).
    """
    if not isinstance(model, CausalLM):
        raise TypeError(f"convert expects a CausalLM, got {type(model).__name__}")
    return rebuild(model, resolve_plan(model, quant, numerics=numerics, rules=rules, lm_head=lm_head))


def to_real(model: CausalLM) -> CausalLM:
    """A real model (every linear ``real``) with the masters recomposed in float32 under jit (see
    :func:`to_real_state` for the float64 host path used by export)."""
    return rebuild(model, {})


def iter_real_state(model: CausalLM, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(HF tensor name, numpy array)`` one tensor at a time: the real HF state dict of ``model``.

    The tensors of the ``master`` export format (:mod:`fairy2i_jax.hf.export`): complex masters recomposed with
    the float64 numpy path of ``from_widely_linear`` (one rounding to ``dtype``), real params as they are,
    scanned layers split per layer; quantized layers give their masters. ``dtype``: default the param dtype.
    """
    from fairy2i_jax.hf.export import tensor_plans

    for plan in tensor_plans(model, "master", dtype or model.config.param_dtype):
        yield plan.name, plan.produce()


def to_real_state(model: CausalLM, dtype: Any = None) -> dict[str, np.ndarray]:
    """The whole real HF state dict of ``model`` (see :func:`iter_real_state`; prefer the iterator for big models)."""
    return dict(iter_real_state(model, dtype))
