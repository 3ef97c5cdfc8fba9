"""Model surgery: real <-> widely-linear / QAT linears (PTQ = :func:`convert` with no training), frozen and teacher
weights, and the one walk over a model's variables.

``convert(model, quant)`` builds a new :class:`CausalLM` whose linears follow the preset ``quant``, one row of
:data:`PRESETS` (the one table of presets: adding a preset is adding a row):

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
and a note is logged. :class:`QuantSection` is the same choice as a config section (``train.py``'s ``quant:``).

Arithmetic. Complex masters are computed per tensor under ``jax.jit`` with the target sharding as
``U = (A11 + A22)/2 + i (A21 - A12)/2``, ``W = (A11 - A22)/2 + i (A12 + A21)/2`` in float32 (one rounding of
the exact result, the same as computing in float64 and rounding, while the quartet's magnitudes differ by less
than 2^16 / 2^29 for bf16 / fp32 weights). Masters already complex are copied, never recomposed. The float64
host path used by export lives with the exporter (:func:`fairy2i_jax.hf.export.iter_real_state`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Callable, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fairy2i_jax.config import check_choices
from fairy2i_jax.errors import Fairy2iError
from fairy2i_jax.models.linear import LINEAR_STORAGE, MASTER_DTYPE, REAL, Linear, LinearSpec
from fairy2i_jax.models.llama import LM_HEAD, CausalLM, abstract_model
from fairy2i_jax.packing import PACKED_SUFFIXES, to_arrays
from fairy2i_jax.quant import Numerics, QuantSpec
from fairy2i_jax.sharding import variable_sharding
from fairy2i_jax.widely_linear import from_widely_linear, to_widely_linear

logger = logging.getLogger(__name__)

Path = tuple


@dataclasses.dataclass(frozen=True)
class Preset:
    """One quantization preset: what it is, and its :class:`LinearSpec` for ``(numerics, stages override)``."""

    description: str
    build: Callable[[str, int | None], LinearSpec]


def _phase(stages: int) -> Preset:
    return Preset(f"Fairy2i phase codes, {stages} residual stage(s) ({stages} bit(s) per real weight)",
                  lambda numerics, k: LinearSpec("qat", QuantSpec("complex_phase", k or stages, numerics)))


def _real_baseline(method: str, description: str) -> Preset:
    return Preset(description, lambda numerics, k: LinearSpec("qat", QuantSpec(method, k, numerics)))


def _fixed(spec: LinearSpec, description: str) -> Preset:
    def build(numerics: str, stages: int | None) -> LinearSpec:
        if stages is not None:
            raise ValueError(f"a {{'stages': {stages}}} rule needs a quantized preset, not {spec.kind!r}")
        return spec

    return Preset(description, build)


PRESETS: dict[str, Preset] = {
    "w1": _phase(1),
    "w2": _phase(2),
    "w3": _phase(3),
    "w4": _phase(4),
    "binary": _real_baseline("binary", "real binary baseline (official bitnet: mean|w| * sign(w - mean w))"),
    "ternary": _real_baseline("ternary", "real ternary baseline (BitNet b1.58 absmean)"),
    "fp": _fixed(LinearSpec("widely_linear"), "widely-linear, unquantized complex masters (exact)"),
    "none": _fixed(REAL, "real linears (masters recomposed)"),
}
QUANT_PRESETS: tuple[str, ...] = tuple(PRESETS)
QuantPreset = Literal[QUANT_PRESETS]  # the config type of a preset name, derived from the table


class PresetError(Fairy2iError, ValueError):
    """An unknown quantization preset or evaluation setting (the message lists the known ones)."""


def preset_spec(quant: str, numerics: str = "bf16_exact", stages: int | None = None) -> LinearSpec:
    """The :class:`LinearSpec` of preset ``quant`` (:data:`PRESETS`), optionally with ``stages`` residual stages."""
    if quant not in PRESETS:
        raise PresetError(f"unknown quant preset {quant!r}; expected one of {', '.join(QUANT_PRESETS)}")
    return PRESETS[quant].build(numerics, stages)


def quantized_presets() -> tuple[str, ...]:
    """The presets whose linears are quantized (every row but ``fp`` and ``none``)."""
    return tuple(name for name in PRESETS if preset_spec(name).quantized)


@dataclasses.dataclass(frozen=True)
class QuantSection:
    """Which linears are quantized and how (the ``quant:`` section of a training config; see :func:`convert`)."""

    preset: QuantPreset = "w2"
    numerics: Numerics = "bf16_exact"
    lm_head: bool = True  # quantize the output head too (official W2)
    skip: tuple[str, ...] = ()  # regexes of HF module names kept real

    def __post_init__(self):
        check_choices(self, "quant")

    @property
    def spec(self) -> LinearSpec:
        """The preset's :class:`LinearSpec` (what most linears get)."""
        return preset_spec(self.preset, self.numerics)

    def convert_kwargs(self) -> dict:
        """Keyword arguments of :func:`convert` / :func:`resolve_plan` besides the preset."""
        return dict(numerics=self.numerics, rules=[(pattern, "skip") for pattern in self.skip], lm_head=self.lm_head)


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
        if spec.complex_masters and (out_dim % 2 or in_dim % 2):
            logger.warning("%s: shape [%d, %d] has an odd dim, no widely-linear form; the layer stays real",
                           name, out_dim, in_dim)
            spec = REAL
        plan[name] = spec
    return plan


# ----------------------------------------------------------------------------------------------- surgery


def model_variables(model: nnx.Module, *, linear_weights: bool = True) -> dict[Path, nnx.Variable]:
    """Every ``nnx.Variable`` of ``model`` by graph path, in graph order; ``linear_weights=False`` leaves out the
    linears' stored weights (:data:`LINEAR_STORAGE`: kernels, complex masters, packed codes), keeping embeddings,
    norms and biases. The one walk over a model's variables (loader, converter, exporter)."""
    return {path: node for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Variable) and (linear_weights or not isinstance(node, LINEAR_STORAGE))}


def _target_sharding(old_value: jax.Array, new_var: nnx.Variable):
    sharding = getattr(old_value, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return variable_sharding(new_var, sharding.mesh)
    return sharding


def _complex_masters(old: Linear, new: Linear) -> tuple[jax.Array, jax.Array]:
    """``(U, W)`` complex64 for ``new``: ``old``'s masters copied, or formed from its real kernel under jit."""
    if old.spec.complex_masters:
        return old.masters()
    target = _target_sharding(old.kernel.get_value(), new.U)
    fn = jax.jit(lambda A: to_widely_linear(A.astype(jnp.float32), dtype=MASTER_DTYPE), out_shardings=(target, target))
    return fn(old.kernel.get_value())


def _real_kernel(old: Linear, new: Linear, dtype: np.dtype) -> jax.Array:
    """``old``'s real master in ``dtype``: its kernel, or recomposed from its masters under jit."""
    if not old.spec.complex_masters:
        return old.kernel.get_value().astype(dtype)
    U, W = old.masters()
    fn = jax.jit(lambda u, w: from_widely_linear(u, w, dtype=dtype), out_shardings=_target_sharding(U, new.kernel))
    return fn(U, W)


def _copy_other_variables(source: CausalLM, target: CausalLM) -> None:
    """Set every variable of ``target`` that is not a linear weight from the same path of ``source``."""
    old = model_variables(source)
    for path, var in model_variables(target, linear_weights=False).items():
        if path not in old:
            raise ValueError(f"param {'.'.join(map(str, path))} of the new model has no source in the original")
        var.set_value(old[path].get_value())


def rebuild(model: CausalLM, plan: Mapping[str, LinearSpec], progress: bool = False) -> CausalLM:
    """A new :class:`CausalLM` with the same config and non-linear params as ``model`` and linears of ``plan``
    (``progress``: a bar over the linears)."""
    from tqdm.auto import tqdm

    new = abstract_model(model.config, plan)
    old_linears = model.named_linears()
    new_linears = new.named_linears()
    for name, new_lin in tqdm(new_linears.items(), total=len(new_linears), desc="convert", unit="linear",
                              disable=not progress):
        old_lin = old_linears[name]
        if new_lin.tied:
            continue
        if new_lin.spec.complex_masters:
            U, W = _complex_masters(old_lin, new_lin)
            new_lin.U.set_value(U)
            new_lin.W.set_value(W)
        else:
            new_lin.kernel.set_value(_real_kernel(old_lin, new_lin, np.dtype(model.config.param_dtype)))
    _copy_other_variables(model, new)
    return new


def convert(model: CausalLM, quant: str = "w2", *, progress: bool = False, **options) -> CausalLM:
    """A new model whose linears follow preset ``quant`` and the ``options`` of :func:`resolve_plan` (``numerics``,
    ``rules``, ``lm_head``; module docstring); ``model`` is kept; ``progress``: a bar over the linears.

    Embeddings, norms and biases are shared (immutable arrays); masters are computed per tensor in the
    model's sharding. A scanned model needs the same kinds in every layer (else ``ValueError``).
    """
    if not isinstance(model, CausalLM):
        raise TypeError(f"convert expects a CausalLM, got {type(model).__name__}")
    return rebuild(model, resolve_plan(model, quant, **options), progress=progress)


def to_real(model: CausalLM) -> CausalLM:
    """A real model (every linear ``real``) with the masters recomposed in float32 under jit (for the float64 host
    path of export see :func:`fairy2i_jax.hf.export.iter_real_state`)."""
    return rebuild(model, {})


def to_packed(model: CausalLM) -> CausalLM:
    """A new model whose phase-quantized linears (``qat`` ``complex_phase``) are ``packed``: their codes and scales
    (:meth:`Linear.packed`, the same numbers as the fake-quantized forward) stored, the masters dropped; every
    other linear, embeddings, norms and biases as they are. A quantized tied head is untied (it keeps its own
    codes; the embedding lookup keeps the full-precision table). The result is for inference: it has no masters
    to train."""
    plan = {name: LinearSpec("packed", spec.quant) if spec.phase_codes else spec
            for name, spec in model.linear_plan().items()}
    cfg = model.config
    untie = cfg.tie_word_embeddings and model.lm_head.spec.phase_codes
    new = abstract_model(cfg.replace(tie_word_embeddings=False) if untie else cfg, plan)
    table = model.embed_tokens.embedding.get_value()
    old_linears = model.named_linears()
    for name, new_lin in new.named_linears().items():
        old = old_linears[name]
        if new_lin.tied:
            continue
        if new_lin.spec.kind == "packed":
            layers = range(cfg.num_layers) if new_lin.stack else [None]
            arrays = [to_arrays(old.packed(table if old.tied else None, layer)) for layer in layers]
            for suffix in PACKED_SUFFIXES:
                value = jnp.stack([a[suffix] for a in arrays]) if new_lin.stack else arrays[0][suffix]
                getattr(new_lin, suffix).set_value(value)
        elif new_lin.spec.complex_masters:
            U, W = _complex_masters(old, new_lin)
            new_lin.U.set_value(U)
            new_lin.W.set_value(W)
        else:
            new_lin.kernel.set_value(_real_kernel(old, new_lin, np.dtype(cfg.param_dtype)))
    _copy_other_variables(model, new)
    return new


def has_packed(model: CausalLM) -> bool:
    """True when some linear of ``model`` is ``packed`` (a model for inference, without masters)."""
    return any(spec.kind == "packed" for spec in model.linear_plan().values())


def is_real(model: CausalLM) -> bool:
    """True when every linear of ``model`` is ``real``."""
    return all(spec == REAL for spec in model.linear_plan().values())


def freeze_weights(model: CausalLM) -> CausalLM:
    """A real :class:`CausalLM` whose kernels are ``model``'s effective (fake-quantized) weights, computed once.

    Same logits as ``model`` (each kernel is the matrix ``model``'s forward multiplies by, in the compute dtype,
    stored in the param dtype); a tied output head whose matrix differs from the embedding table (a quantized
    head) becomes an untied head.
    """
    cfg, weights = model.config, model.effective_weights()
    untie = cfg.tie_word_embeddings and model.lm_head.spec.quantized
    frozen = abstract_model(cfg.replace(tie_word_embeddings=False) if untie else cfg)
    for name, lin in frozen.named_linears().items():
        if not lin.tied:
            lin.kernel.set_value(weights[name].astype(cfg.param_dtype))
    _copy_other_variables(model, frozen)
    return frozen


EVALUATION_SETTINGS = ("trained", "fp")  # besides the quantized presets (see evaluation_model)


def evaluation_model(model: CausalLM, setting: str, *, numerics: str = "bf16_exact", lm_head: bool = True) -> CausalLM:
    """The real model to evaluate ``model`` as ``setting``, its quantized weights frozen once (:func:`freeze_weights`):
    ``trained`` = ``model`` as it is (a trained QAT model: its own quantization), ``fp`` = every linear real with
    the masters recomposed unquantized, a quantized preset (``w2``, ``binary``, ...) = its PTQ model with
    ``numerics``, the head quantized unless ``lm_head=False``."""
    if setting == "trained":
        return model if is_real(model) or has_packed(model) else freeze_weights(model)
    if has_packed(model):
        raise PresetError(f"a packed model has only its 2-bit codes, no full-precision weights: evaluate it as "
                          f"'trained', not {setting!r}")
    if setting == "fp":
        return model if is_real(model) else to_real(model)
    if setting not in quantized_presets():
        raise PresetError(f"unknown evaluation setting {setting!r}; expected one of "
                         f"{', '.join((*EVALUATION_SETTINGS, *quantized_presets()))}")
    return freeze_weights(convert(model, setting, numerics=numerics, lm_head=lm_head))


def teacher_weights(model: CausalLM) -> dict[str, jax.Array]:
    """The unquantized matrices of every linear in the compute dtype (recomposed masters, real kernels, the tied
    embedding), keyed like :meth:`CausalLM.effective_weights`: ``model(ids, weights=teacher_weights(model))`` is
    the model with quantization off (the ``self`` distillation teacher)."""
    table = model.embed_tokens.embedding.get_value()
    return {name: (table if lin.tied else lin.real_master()).astype(lin.compute_dtype)
            for name, lin in model.named_linears().items()}
