"""The optimizer and the coordinates it works in, for complex master weights.

Notation. A converted linear stores complex masters ``U, W [..., n, m]`` (complex64) with real coordinates
``theta = (Re U, Im U, Re W, Im W)``. The real weight is ``A = R(theta)`` with ``R`` = ``recompose_planes``
(``A11 = Re W + Re U``, ``A12 = Im W - Im U``, ``A21 = Im W + Im U``, ``A22 = Re U - Re W``) and
``theta = D(A)`` with ``D = R^-1`` = ``decompose_planes``. ``R^T = 2 D``, so ``R R^T = 2 I``.

Gradients. For a real loss ``L`` JAX returns, for a complex leaf ``U``, ``g = dL/dRe U - i dL/dIm U`` (the
conjugate of the ascent direction; ``= 2 dL/dU`` in Wirtinger terms). So the real-coordinate gradient of
``theta`` is ``g_theta = (Re g, -Im g)`` per leaf, and plain ``optax`` on the complex leaf would move ``Im U`` the
wrong way. Everything here therefore runs the optimizer on real float32 arrays ("optimizer space"):

* ``coordinates="real"`` (default, faithful): per linear, ``{U, W}`` becomes one real ``A [..., 2n, 2m]``.
  The chain rule ``g_theta = R^T G`` gives the official real gradient ``G = dL/dA = (R^T)^-1 g_theta =
  R(g_theta) / 2``; the optimizer (clipping, Adam, decay, lr) produces a real update ``dA``; it is mapped back
  with the exact decomposition ``d theta = D(dA)``, so ``R(theta + d theta) = A + dA``: the official update of
  the real master, exactly (up to the float32 rounding of the stored planes).
* ``coordinates="complex"``: every complex leaf becomes its planes ``[2, ..., n, m] = (Re, Im)`` with gradient
  ``g_theta``, and the optimizer runs per real coordinate of U and W. With SGD this equals the real update with
  twice the learning rate (``R(-lr g_theta) = -lr R R^T G = -2 lr G``); with Adam it is a different method
  (per-coordinate normalisation is not invariant under the rotation R / sqrt 2).

Real params (embeddings, norms, real kernels, biases) are the same in both spaces (cast to float32).
Clipping uses the global norm of the optimizer-space gradient, so with ``real`` it is the official norm.

Parameter groups (``optimizer.groups``, :data:`ParamGroup`), found by module type (:func:`param_groups`):
``embed`` the embedding table (``nnx.Embed``; with tied embeddings also the head's matrix), ``norm`` every
``RMSNorm`` weight, ``head`` the untied output head (``lm_head``), ``linear`` everything else (the decoder
linears' weights and biases). Group ``g``'s update is ``s_g * u`` with ``u`` the update of the chain below
(clipping over all groups together, Adam, decay unless ``g`` is in ``no_decay``, lr), i.e. its own learning rate
``s_g * lr(s)``; ``s_g = 0`` freezes it exactly (its moments still run). With the defaults (every scale 1, no
``no_decay``) no group transform is added: the optimizer is the one of before, bit for bit.
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Any, Callable, Literal

import jax
import jax.numpy as jnp
import optax

from flax import nnx

from fairy2i_jax.convert import model_variables
from fairy2i_jax.models.layers import RMSNorm
from fairy2i_jax.models.linear import MASTER_NAMES, ComplexMaster
from fairy2i_jax.training.schedule import make_schedule
from fairy2i_jax.widely_linear import decompose_planes, recompose_planes

if TYPE_CHECKING:
    from fairy2i_jax.training.config import OptimizerSection

Tree = Any
OPT_DTYPE = jnp.float32
Coordinates = Literal["real", "complex"]
OptimizerName = Literal["adamw", "sgd"]
COORDINATES: tuple[str, ...] = typing.get_args(Coordinates)
OPT_REAL_NAME = "A"  # the optimizer-space leaf of a linear's real weight (real coordinates)
OPTIMIZERS: tuple[str, ...] = typing.get_args(OptimizerName)
ParamGroup = Literal["embed", "norm", "head", "linear"]
PARAM_GROUPS: tuple[str, ...] = typing.get_args(ParamGroup)
DEFAULT_GROUP = "linear"


MasterNodes = frozenset  # paths (tuples of str keys) of the param-dict nodes that hold complex masters


def master_nodes(model) -> MasterNodes:
    """The paths of ``model``'s linears that store :class:`~fairy2i_jax.models.linear.ComplexMaster` variables
    (found by variable type), as tuples of string keys of the pure param dict."""
    return frozenset(tuple(str(k) for k in path[:-1]) for path, var in model_variables(model).items()
                     if isinstance(var, ComplexMaster))


def _walk(tree: Tree, masters: MasterNodes, on_linear: Callable[[dict], dict], on_leaf: Callable[[Any], Any],
          path: tuple[str, ...] = ()) -> Tree:
    """Rebuild a nested param dict, calling ``on_linear`` on the nodes in ``masters`` and ``on_leaf`` elsewhere."""
    if path in masters:
        return on_linear(tree)
    if isinstance(tree, dict):
        return {k: _walk(v, masters, on_linear, on_leaf, (*path, str(k))) for k, v in tree.items()}
    return on_leaf(tree)


def _rest(node: dict, f: Callable[[Any], Any]) -> dict:
    return {k: f(v) for k, v in node.items() if k not in MASTER_NAMES}


def _f32(x):
    return x.astype(OPT_DTYPE)


def grad_planes(g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(dL/dRe U, dL/dIm U) = (Re g, -Im g)`` from JAX's gradient ``g`` of a complex leaf."""
    return jnp.real(g).astype(OPT_DTYPE), (-jnp.imag(g)).astype(OPT_DTYPE)


def _value_planes(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.real(z).astype(OPT_DTYPE), jnp.imag(z).astype(OPT_DTYPE)


def _to_opt(tree: Tree, masters: MasterNodes, coordinates: str, planes: Callable, scale: float) -> Tree:
    """Optimizer space of a param-shaped tree: per master node ``scale * R(planes(U), planes(W))`` as ``A``
    (real coordinates) or the stacked planes of ``U`` and ``W`` (complex coordinates)."""
    u, w = MASTER_NAMES
    if coordinates == "real":
        def linear(node):
            return {**_rest(node, _f32), OPT_REAL_NAME: scale * recompose_planes(*planes(node[u]), *planes(node[w]))}
    else:
        def linear(node):
            return {**_rest(node, _f32), u: jnp.stack(planes(node[u])), w: jnp.stack(planes(node[w]))}
    return _walk(tree, masters, linear, _f32)


def grads_to_opt(grads: Tree, masters: MasterNodes, coordinates: str) -> Tree:
    """Optimizer-space gradient: real ``G = R(g_theta) / 2`` per linear, or the planes ``g_theta``."""
    return _to_opt(grads, masters, coordinates, grad_planes, 0.5)


def params_to_opt(params: Tree, masters: MasterNodes, coordinates: str) -> Tree:
    """Optimizer-space params (for weight decay): ``A = R(theta)`` per linear, or the planes ``theta``."""
    return _to_opt(params, masters, coordinates, _value_planes, 1.0)


def updates_from_opt(updates: Tree, params: Tree, masters: MasterNodes, coordinates: str,
                     path: tuple[str, ...] = ()) -> Tree:
    """Param-space deltas from optimizer-space updates: ``(dU, dW) = D(dA)``, or ``dU = d re + i d im``."""
    if path in masters:
        u, w = MASTER_NAMES
        rest = {k: updates[k].astype(params[k].dtype) for k in params if k not in MASTER_NAMES}
        dtype = params[u].dtype
        if coordinates == "real":
            u_re, u_im, w_re, w_im = decompose_planes(updates[OPT_REAL_NAME])
            return {**rest, u: jax.lax.complex(u_re, u_im).astype(dtype), w: jax.lax.complex(w_re, w_im).astype(dtype)}
        return {**rest, u: jax.lax.complex(updates[u][0], updates[u][1]).astype(dtype),
                w: jax.lax.complex(updates[w][0], updates[w][1]).astype(dtype)}
    if isinstance(params, dict):
        return {k: updates_from_opt(updates[k], v, masters, coordinates, (*path, str(k))) for k, v in params.items()}
    return updates.astype(params.dtype)


def _opt_space_like(tree: Tree, masters: MasterNodes, coordinates: str, plane: Callable[[Any], Any]) -> Tree:
    """A param-shaped tree of per-leaf metadata in optimizer space: ``A`` takes U's entry (real coordinates), the
    planes ``plane(entry)`` of U and W (complex coordinates)."""
    u, w = MASTER_NAMES

    def linear(node):
        rest = {k: v for k, v in node.items() if k not in MASTER_NAMES}
        if coordinates == "real":
            return {**rest, OPT_REAL_NAME: node[u]}
        return {**rest, u: plane(node[u]), w: plane(node[w])}

    return _walk(tree, masters, linear, lambda leaf: leaf)


def opt_space_names(names: Tree, masters: MasterNodes, coordinates: str) -> Tree:
    """Logical axis names of the optimizer-space leaves from those of the params (``A`` shards like the real
    kernel, i.e. like U; planes get an unsharded leading axis)."""
    return _opt_space_like(names, masters, coordinates, lambda axes: axes.with_leading(None))


def param_groups(model) -> Tree:
    """The :data:`ParamGroup` of every param of ``model`` (module docstring), as a tree shaped like its pure param
    dict: the group of the nearest enclosing ``nnx.Embed`` / ``RMSNorm`` / ``model.lm_head``, else ``linear``."""
    owners = {}
    for path, node in nnx.iter_graph(model):
        key = tuple(str(k) for k in path)
        if isinstance(node, nnx.Embed):
            owners[key] = "embed"
        elif isinstance(node, RMSNorm):
            owners[key] = "norm"
        elif node is model.lm_head:
            owners[key] = "head"

    def group(key_path, _):
        path = tuple(str(getattr(k, "key", k)) for k in key_path)
        return next((owners[path[:i]] for i in range(len(path), 0, -1) if path[:i] in owners), DEFAULT_GROUP)

    return jax.tree_util.tree_map_with_path(group, nnx.to_pure_dict(nnx.state(model)))


def opt_space_groups(groups: Tree, masters: MasterNodes, coordinates: str) -> Tree:
    """:func:`param_groups` carried to the optimizer-space leaves (``A`` and the planes take their linear's)."""
    return _opt_space_like(groups, masters, coordinates, lambda group: group)


def make_optimizer(opt: OptimizerSection, total_steps: int,
                   groups: Tree | None = None) -> tuple[optax.GradientTransformation, Callable]:
    """``(tx, schedule)``: [clip_by_global_norm] -> [scale_by_adam] -> [add_decayed_weights, masked by
    ``groups.no_decay``] -> lr schedule -> [per-group scale].

    ``adamw`` matches torch ``AdamW`` (bias-corrected moments, ``eps`` outside the square root, decoupled decay
    ``-lr * wd * A``); ``sgd`` is ``-lr * g`` (plus decay when set). ``groups``: the optimizer-space tree of
    :data:`ParamGroup` names (:meth:`~fairy2i_jax.training.state.ParamLayout.opt_groups`), needed only when
    ``opt.groups`` is not the default (a ``ValueError`` otherwise).
    """
    schedule = make_schedule(opt, total_steps)
    g = opt.groups
    if not g.is_default and groups is None:
        raise ValueError("optimizer.groups is set: make_optimizer needs the param groups (ParamLayout.opt_groups)")
    parts = []
    if opt.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(opt.clip_norm))
    if opt.name == "adamw":
        parts.append(optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps))
    if opt.weight_decay > 0:
        mask = jax.tree.map(lambda group: group not in g.no_decay, groups) if g.no_decay else None
        parts.append(optax.add_decayed_weights(opt.weight_decay, mask=mask))
    parts.append(optax.scale_by_learning_rate(schedule))
    scales = g.lr_scales()
    if any(scale != 1.0 for scale in scales.values()):
        parts.append(optax.multi_transform({name: optax.scale(scale) for name, scale in scales.items()}, groups))
    return optax.chain(*parts), schedule
