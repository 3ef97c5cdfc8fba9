"""Distillation teachers (``distill.teacher``): what the train step's KL term compares the student with.

A :class:`Teacher` is ``(weights, params)``: ``weights`` the real matrix of every linear in the compute dtype,
keyed like :meth:`~fairy2i_jax.models.llama.CausalLM.effective_weights` (what ``model(ids, weights=...)``
multiplies by), and ``params`` the model state it replaces in the student's pure param dict before the forward
(embeddings, norms, biases; ``{}`` = the student's own). Its logits are :func:`teacher_logits`:
``merge(overlay(student params, teacher.params))(ids, weights=teacher.weights)``, under ``stop_gradient``.

* ``self`` (default; the behaviour before ``distill.teacher`` existed): :func:`self_teacher`, made inside every
  step from the current masters, unquantized (:func:`fairy2i_jax.convert.teacher_weights`), with the student's
  current embeddings and norms: a teacher that drifts with training.
* ``frozen``: :func:`frozen_teacher` of the original real model, made once at the start of a run (by the loop,
  from the loaded real model before conversion, so its matrices are the pretrained kernels bit for bit; the
  conversion is exact, so this is also the converted model at step 0, up to the float32 rounding of the stored
  masters): every linear's matrix and the embeddings, norms and biases, all in the compute dtype (the forward
  casts every param to it, so this loses nothing), placed like the weights they come from
  (:func:`teacher_shardings`). It is a separate argument of the train step, never trained and outside the
  optimizer. Its bytes: one compute-dtype copy of the model per device share.

Resume. The frozen teacher is stored in the checkpoint (``state["teacher"]``, :data:`fairy2i_jax.runs.TEACHER`),
not rebuilt from the model source: a restore gives back its exact bits whatever the mesh of the resumed run and
whether or not ``model.path`` still holds the same weights (a hub model re-downloaded, a file replaced, a source
read on another backend), and a resume keeps restoring into the abstract model without loading the real weights.
It costs ``2`` bytes per weight per checkpoint in bf16 next to the ``12`` of the params and Adam's moments.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

import jax
from flax import nnx
from jax.sharding import Mesh

from fairy2i_jax.convert import teacher_weights
from fairy2i_jax.models.linear import LINEAR_STORAGE
from fairy2i_jax.models.llama import CausalLM
from fairy2i_jax.sharding import logical_to_sharding, variable_logical_axes

Tree = Any
TeacherName = Literal["self", "frozen"]
TEACHERS: tuple[str, ...] = typing.get_args(TeacherName)
_SHARED_STATE = nnx.All(nnx.Param, nnx.Not(LINEAR_STORAGE))  # embeddings, norms, biases


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Teacher:
    """``weights``: ``{linear name: [..., out, in]}`` (compute dtype); ``params``: the leaves of the student's pure
    param dict it replaces (a sub-dict of the same nesting; ``{}`` = none)."""

    weights: dict[str, jax.Array]
    params: Tree

    def as_dict(self) -> dict:
        """The checkpoint layout: ``{"weights", "params"}``."""
        return {"weights": self.weights, "params": self.params}

    @classmethod
    def from_dict(cls, tree: dict) -> "Teacher":
        return cls(weights=tree["weights"], params=tree["params"])


def overlay(params: Tree, replace: Tree) -> Tree:
    """``params`` with every leaf present in ``replace`` (a sub-dict of the same nesting) taken from it."""
    if not isinstance(replace, dict):
        return replace
    return {k: overlay(v, replace[k]) if k in replace else v for k, v in params.items()}


def self_teacher(model: CausalLM) -> Teacher:
    """The ``self`` teacher: ``model``'s masters unquantized (:func:`~fairy2i_jax.convert.teacher_weights`) with
    the student's own embeddings and norms (``params = {}``)."""
    return Teacher(teacher_weights(model), {})


def teacher_of(model: CausalLM) -> Teacher:
    """The whole real model ``model`` is (real or converted; no quantization) as a teacher: its unquantized
    matrices (:func:`~fairy2i_jax.convert.teacher_weights`, compute dtype) and its embeddings, norms and biases
    cast to the compute dtype."""
    dtype = model.config.compute_dtype
    shared = nnx.to_pure_dict(nnx.state(model, _SHARED_STATE))
    return Teacher(teacher_weights(model), jax.tree.map(lambda x: x.astype(dtype), shared))


def teacher_shardings(model: CausalLM, mesh: Mesh) -> Teacher:
    """Shardings of :func:`teacher_of` ``(model)`` from the logical rules: each matrix like the weight it comes
    from (``("layers",) * stacked + lin.axes``: like U of a converted linear), each param like itself. ``model``
    may be abstract (shapes only)."""
    weights = {}
    for name, lin in model.named_linears().items():
        shape = (*lin.stack, lin.out_features, lin.in_features)
        weights[name] = logical_to_sharding((*("layers",) * len(lin.stack), *lin.axes), mesh, shape)
    params = nnx.to_pure_dict(nnx.state(model, _SHARED_STATE), extract_fn=lambda v: logical_to_sharding(
        variable_logical_axes(v), mesh, v.get_value().shape) if isinstance(v, nnx.Variable) else v)
    return Teacher(weights, params)


def abstract_teacher(model: CausalLM, mesh: Mesh) -> Teacher:
    """``jax.ShapeDtypeStruct`` (with shardings) of :func:`teacher_of` ``(model)``: the restore target of a
    frozen teacher. ``model`` may be abstract."""
    graphdef, state = nnx.split(model)
    shapes = jax.eval_shape(lambda s: teacher_of(nnx.merge(graphdef, s)), state)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        teacher_shardings(model, mesh))


def frozen_teacher(model: CausalLM, mesh: Mesh) -> Teacher:
    """The ``frozen`` teacher of ``model`` (the real model before conversion, or the converted one at step 0) on
    ``mesh``, in buffers of its own (``may_alias=False``): the train step donates the state, whose arrays may be
    ``model``'s own (a cast to the dtype a param already has is no copy)."""
    return jax.device_put(teacher_of(model), teacher_shardings(model, mesh), may_alias=False)


def teacher_logits(layout, params: Tree, teacher: Teacher, ids: jax.Array) -> jax.Array:
    """``stop_gradient(merge(overlay(params, teacher.params))(ids, weights=teacher.weights))``: the teacher's
    logits ``[B, T, vocab]`` (``layout``: the student's :class:`~fairy2i_jax.training.state.ParamLayout`; the
    student's complex masters stay in the tree but are never read, every linear takes its matrix from
    ``teacher.weights``)."""
    model = layout.merge(overlay(params, teacher.params))
    return jax.lax.stop_gradient(model(ids, weights=teacher.weights))
