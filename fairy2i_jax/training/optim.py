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
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fairy2i_jax.training.config import OptimizerSection
from fairy2i_jax.training.schedule import make_schedule
from fairy2i_jax.widely_linear import decompose_planes, recompose_planes

Tree = Any
OPT_DTYPE = jnp.float32


def is_complex_linear(node: Any) -> bool:
    """A param dict holding complex masters ``U`` and ``W``."""
    return (isinstance(node, dict) and "U" in node and "W" in node and hasattr(node["U"], "dtype")
            and jnp.issubdtype(node["U"].dtype, jnp.complexfloating))


def _walk(tree: Tree, on_linear: Callable[[dict], dict], on_leaf: Callable[[Any], Any]) -> Tree:
    """Rebuild a nested param dict, calling ``on_linear`` on complex-linear nodes and ``on_leaf`` elsewhere."""
    if is_complex_linear(tree):
        return on_linear(tree)
    if isinstance(tree, dict):
        return {k: _walk(v, on_linear, on_leaf) for k, v in tree.items()}
    return on_leaf(tree)


def _rest(node: dict, f: Callable[[Any], Any]) -> dict:
    return {k: f(v) for k, v in node.items() if k not in ("U", "W")}


def _f32(x):
    return x.astype(OPT_DTYPE)


def grad_planes(g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(dL/dRe U, dL/dIm U) = (Re g, -Im g)`` from JAX's gradient ``g`` of a complex leaf."""
    return jnp.real(g).astype(OPT_DTYPE), (-jnp.imag(g)).astype(OPT_DTYPE)


def grads_to_opt(grads: Tree, coordinates: str) -> Tree:
    """Optimizer-space gradient: real ``G = R(g_theta) / 2`` per linear, or the planes ``g_theta``."""
    if coordinates == "real":
        def linear(node):
            return {**_rest(node, _f32), "A": 0.5 * recompose_planes(*grad_planes(node["U"]), *grad_planes(node["W"]))}
    else:
        def linear(node):
            return {**_rest(node, _f32), "U": jnp.stack(grad_planes(node["U"])), "W": jnp.stack(grad_planes(node["W"]))}
    return _walk(grads, linear, _f32)


def params_to_opt(params: Tree, coordinates: str) -> Tree:
    """Optimizer-space params (for weight decay): ``A = R(theta)`` per linear, or the planes ``theta``."""
    def planes(z):
        return jnp.real(z).astype(OPT_DTYPE), jnp.imag(z).astype(OPT_DTYPE)

    if coordinates == "real":
        def linear(node):
            return {**_rest(node, _f32), "A": recompose_planes(*planes(node["U"]), *planes(node["W"]))}
    else:
        def linear(node):
            return {**_rest(node, _f32), "U": jnp.stack(planes(node["U"])), "W": jnp.stack(planes(node["W"]))}
    return _walk(params, linear, _f32)


def updates_from_opt(updates: Tree, params: Tree, coordinates: str) -> Tree:
    """Param-space deltas from optimizer-space updates: ``(dU, dW) = D(dA)``, or ``dU = d re + i d im``."""
    if isinstance(params, dict) and is_complex_linear(params):
        rest = {k: updates[k].astype(params[k].dtype) for k in params if k not in ("U", "W")}
        dtype = params["U"].dtype
        if coordinates == "real":
            u_re, u_im, w_re, w_im = decompose_planes(updates["A"])
            return {**rest, "U": jax.lax.complex(u_re, u_im).astype(dtype),
                    "W": jax.lax.complex(w_re, w_im).astype(dtype)}
        return {**rest, "U": jax.lax.complex(updates["U"][0], updates["U"][1]).astype(dtype),
                "W": jax.lax.complex(updates["W"][0], updates["W"][1]).astype(dtype)}
    if isinstance(params, dict):
        return {k: updates_from_opt(updates[k], v, coordinates) for k, v in params.items()}
    return updates.astype(params.dtype)


def opt_space_names(names: Tree, coordinates: str) -> Tree:
    """Logical axis names of the optimizer-space leaves from those of the params (``A`` shards like the real
    kernel, i.e. like U; planes get an unsharded leading axis)."""
    def is_linear(node):
        return isinstance(node, dict) and "U" in node and "W" in node and not isinstance(node["U"], dict)

    def walk(node):
        if is_linear(node):
            rest = {k: v for k, v in node.items() if k not in ("U", "W")}
            if coordinates == "real":
                return {**rest, "A": node["U"]}
            return {**rest, "U": node["U"].with_leading(None), "W": node["W"].with_leading(None)}
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        return node

    return walk(names)


def make_optimizer(opt: OptimizerSection, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """``(tx, schedule)``: [clip_by_global_norm] -> [scale_by_adam] -> [add_decayed_weights] -> lr schedule.

    ``adamw`` matches torch ``AdamW`` (bias-corrected moments, ``eps`` outside the square root, decoupled decay
    ``-lr * wd * A``); ``sgd`` is ``-lr * g`` (plus decay when set).
    """
    schedule = make_schedule(opt, total_steps)
    parts = []
    if opt.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(opt.clip_norm))
    if opt.name == "adamw":
        parts.append(optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps))
    if opt.weight_decay > 0:
        parts.append(optax.add_decayed_weights(opt.weight_decay))
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts), schedule
