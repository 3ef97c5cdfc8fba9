"""The train state, a typed pytree :class:`TrainState` ``(params, opt_state, step, rng)``, and its shardings.

* ``params``: the model's params as a pure nested dict (``nnx.to_pure_dict``): complex64 masters ``U, W`` of
  converted linears, float32 (``param_dtype``) real params. :class:`ParamLayout` turns it back into a model
  (``nnx.merge``) inside jitted code, and knows which nodes hold complex masters (by variable type).
* ``opt_state``: the optax state over the optimizer space (float32; see :mod:`fairy2i_jax.training.optim`).
* ``step``: int32 scalar, optimizer updates applied so far. ``rng``: uint32 key data of ``jax.random.key(seed)``
  (the run's root key; per-step keys are ``fold_in(key, step)``, so it never changes).

On disk (orbax, :mod:`fairy2i_jax.runs`) the state is the plain dict ``{"params", "opt_state", "step", "rng"}``
(:meth:`TrainState.as_dict` / :meth:`TrainState.from_dict`), so the checkpoint layout does not depend on this
class.

Shardings come from the params' logical axis names (:mod:`fairy2i_jax.sharding`): optimizer-space leaves take
the names of their param (``A`` those of U, planes an extra unsharded leading axis), optimizer scalars
(Adam's count) and ``step`` / ``rng`` are replicated. A ``TrainState`` of shardings is what ``jax.jit`` takes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fairy2i_jax.models.llama import CausalLM
from fairy2i_jax.sharding import logical_to_sharding, variable_logical_axes
from fairy2i_jax.training.optim import master_nodes, opt_space_groups, opt_space_names, param_groups, params_to_opt

Tree = Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a train step reads and writes (module docstring); a pytree (jit, shardings, donation)."""

    params: Tree
    opt_state: Tree
    step: Any
    rng: Any

    def as_dict(self) -> dict:
        """The checkpoint layout: ``{"params", "opt_state", "step", "rng"}``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, tree: dict) -> "TrainState":
        return cls(**tree)


@dataclasses.dataclass(frozen=True)
class Axes:
    """Logical axis names of one array (a pytree leaf, not a node)."""

    names: tuple[str | None, ...]

    def with_leading(self, name: str | None) -> "Axes":
        return Axes((name, *self.names))


class ParamLayout:
    """The static structure of a model: graphdef, the nnx.State treedef, the logical names and the optimizer
    group (:func:`~fairy2i_jax.training.optim.param_groups`) of every param, and the nodes holding complex
    masters (:func:`~fairy2i_jax.training.optim.master_nodes`).

    ``merge(params)`` rebuilds the model from a pure param dict (works on tracers); ``pure(model)`` is the
    inverse. The leaf order of the pure dict and of the nnx.State is checked once at construction.
    """

    def __init__(self, model: CausalLM):
        self.graphdef, state = nnx.split(model)
        self.state_treedef = jax.tree.structure(state)
        self.config = model.config
        self.masters = master_nodes(model)
        pure = nnx.to_pure_dict(state)
        state_paths = [_path_key(p, strip_value=True) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
        pure_paths = [_path_key(p) for p, _ in jax.tree_util.tree_flatten_with_path(pure)[0]]
        if state_paths != pure_paths:
            raise AssertionError(f"nnx.State and its pure dict flatten in different orders: {state_paths[:4]} vs "
                                 f"{pure_paths[:4]}")
        self.paths = pure_paths
        self.param_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), pure)
        self.names = nnx.to_pure_dict(
            state, extract_fn=lambda v: Axes(variable_logical_axes(v)) if isinstance(v, nnx.Variable) else v)
        self.groups = param_groups(model)

    def merge(self, params: Tree) -> CausalLM:
        """The model whose params are the pure dict ``params``."""
        state = jax.tree.unflatten(self.state_treedef, jax.tree.leaves(params))
        return nnx.merge(self.graphdef, state)

    @staticmethod
    def pure(model: CausalLM) -> Tree:
        """The pure param dict of ``model``."""
        return nnx.to_pure_dict(nnx.state(model))

    def to_opt(self, params: Tree, coordinates: str) -> Tree:
        """:func:`~fairy2i_jax.training.optim.params_to_opt` for this layout."""
        return params_to_opt(params, self.masters, coordinates)

    def opt_groups(self, coordinates: str) -> Tree:
        """The optimizer-space tree of param groups (what ``make_optimizer(..., groups=)`` takes)."""
        return opt_space_groups(self.groups, self.masters, coordinates)


def _path_key(path, strip_value: bool = False) -> str:
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    if strip_value and parts and parts[-1] == "value":
        parts = parts[:-1]
    return ".".join(parts)


def param_count(params: Tree) -> int:
    """Real parameters: every real entry counts 1, every complex entry 2 (= the real model's count)."""
    total = 0
    for leaf in jax.tree.leaves(params):
        total += int(np.prod(leaf.shape)) * (2 if jnp.issubdtype(leaf.dtype, jnp.complexfloating) else 1)
    return total


def _shardings_from_names(names: Tree, shapes: Tree, mesh: Mesh) -> Tree:
    return jax.tree.map(lambda n, s: logical_to_sharding(n.names, mesh, s.shape), names, shapes)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _abstract_opt_params(layout: ParamLayout, coordinates: str) -> Tree:
    return jax.eval_shape(lambda p: layout.to_opt(p, coordinates), layout.param_shapes)


def state_shardings(layout: ParamLayout, tx: optax.GradientTransformation, coordinates: str,
                    mesh: Mesh) -> TrainState:
    """Shardings of every leaf of the train state (see the module docstring)."""
    param_sh = _shardings_from_names(layout.names, layout.param_shapes, mesh)
    opt_params = _abstract_opt_params(layout, coordinates)
    opt_sh = _shardings_from_names(opt_space_names(layout.names, layout.masters, coordinates), opt_params, mesh)
    rep = replicated(mesh)
    opt_state_sh = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, opt_params), opt_sh,
                                         transform_non_params=lambda _: rep)
    return TrainState(params=param_sh, opt_state=opt_state_sh, step=rep, rng=rep)


def init_state(layout: ParamLayout, model: CausalLM, tx: optax.GradientTransformation, coordinates: str,
               seed: int, mesh: Mesh, copy: bool = True) -> tuple[TrainState, TrainState]:
    """``(state, shardings)``: the fresh train state of ``model`` placed on ``mesh``, and its shardings.

    The train step donates the state, so with ``copy`` (default) the params get their own buffers and
    ``model`` stays usable; ``copy=False`` saves one copy of the params when ``model`` is discarded.
    """
    shardings = state_shardings(layout, tx, coordinates, mesh)
    params = jax.device_put(ParamLayout.pure(model), shardings.params, may_alias=False if copy else None)
    opt_state = jax.jit(lambda p: tx.init(layout.to_opt(p, coordinates)), out_shardings=shardings.opt_state)(params)
    state = TrainState(
        params=params,
        opt_state=opt_state,
        step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
        rng=jax.device_put(jax.random.key_data(jax.random.key(seed)), shardings.rng),
    )
    return state, shardings


def abstract_state(layout: ParamLayout, tx: optax.GradientTransformation, coordinates: str,
                   shardings: TrainState) -> TrainState:
    """``jax.ShapeDtypeStruct`` (with shardings) of the whole train state: the restore target."""
    shapes = TrainState(
        params=layout.param_shapes,
        opt_state=jax.eval_shape(tx.init, _abstract_opt_params(layout, coordinates)),
        step=jax.ShapeDtypeStruct((), jnp.int32),
        rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
    )
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
