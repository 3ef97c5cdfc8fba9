"""Device mesh, the ONE table of logical axis rules, and helpers to place params and activations.

Mesh axes: ``("data", "fsdp", "tensor")``, all ``AxisType.Auto`` (the compiler propagates shardings; note that
``jax.make_mesh`` would default to Explicit axes). Every ``nnx.Param`` of the model carries its logical axis
names in the flax 0.12 ``out_sharding`` metadata (eager sharding off: params are placed by
:func:`shard_like_params` or directly by the checkpoint loader), e.g. ``q_proj.kernel [out, in]`` is
``("heads", "embed")``. :data:`LOGICAL_AXIS_RULES` maps each logical name to mesh axes.

Complex masters. ``U`` and ``W`` ``[n, m] = [out/2, in/2]`` carry the SAME logical names as the real
``[out, in]`` kernel they replace, so their n / m dims shard like the real out / in dims. (Under tensor
parallelism the quadrants ``A[:n]`` and ``A[n:]`` of the real matrix then live on different devices than the
rows of U they form; recomposing A is a cheap elementwise op that XLA turns into collectives. A packed serving
layout can revisit this for the packed kernels.)

A mesh axis is dropped from a dim (that dim replicated) when the dim is not divisible by the axis size, and a
mesh axis is used at most once per array (the first dim that asks for it gets it).

Activations. The model constrains its activations at its boundaries with :func:`constrain` (a no-op without a
mesh): the residual stream ``[B, T, hidden]`` is ``("batch", "seq", "act_embed")`` (batch over data x fsdp, the
hidden dim replicated), attention ``q / k / v [B, T, heads, head_dim]`` ``("batch", None, "heads" / "kv_heads",
"head_dim")``, the MLP's ``[B, T, ffn]`` ``("batch", None, "mlp")`` (heads and ffn over tensor), logits
``("batch", "seq", "vocab")``, KV caches ``("batch", "cache_len", "kv_heads", "head_dim")``. Inside a jitted
function :func:`activation_context` makes the mesh and any rule overrides visible to those calls (the train and
eval steps enter it). Sequence sharding is the ``seq`` rule, off (None) by default; ``activation_context(mesh,
seq="tensor")`` shards the residual stream's sequence over ``tensor`` (sequence parallelism: attention and MLP
interiors keep the full sequence, with heads / ffn over tensor), set by the ``mesh.seq`` config key.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes (None = replicated). One table for params, activations and caches.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),  # activations and caches: batch over data x fsdp
    ("seq", None),  # the residual stream's sequence (off; activation_context(seq=...) turns it on)
    ("cache_len", None),
    ("act_embed", None),  # hidden dim of activations (replicated)
    ("embed", "fsdp"),  # hidden dim of weights (ZeRO-3 style)
    ("vocab", "tensor"),
    ("heads", "tensor"),  # num_heads * head_dim (q_proj out, o_proj in)
    ("kv_heads", "tensor"),  # num_kv_heads * head_dim (k/v_proj out); caches: kv head axis
    ("mlp", "tensor"),  # intermediate dim
    ("head_dim", None),
    ("norm", None),  # RMSNorm weights
    ("layers", None),  # stacked (scanned) layer axis
)
_RULES = dict(LOGICAL_AXIS_RULES)
_OVERRIDES: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("axis_rule_overrides", default={})


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh with Auto axis types over ``devices`` (default: the first
    ``data * fsdp * tensor`` of ``jax.devices()``)."""
    sizes = (data, fsdp, tensor)
    if any(not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive integers, got data={data}, fsdp={fsdp}, tensor={tensor}")
    needed = data * fsdp * tensor
    available = list(jax.devices() if devices is None else devices)
    if len(available) < needed:
        raise ValueError(
            f"a mesh data={data} x fsdp={fsdp} x tensor={tensor} needs {needed} devices, "
            f"only {len(available)} available"
        )
    grid = np.array(available[:needed], dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _mesh_axes_of(name: str | None) -> tuple[str, ...]:
    if name is None:
        return ()
    if name not in _RULES:
        raise ValueError(f"logical axis {name!r} has no rule; known: {', '.join(_RULES)}")
    overrides = _OVERRIDES.get()
    target = overrides[name] if name in overrides else _RULES[name]
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None):
    """``PartitionSpec`` for logical ``names`` (one per dim) under :data:`LOGICAL_AXIS_RULES`.

    With ``shape`` and ``mesh``, mesh axes that do not divide their dim (or are absent from the mesh) are dropped.
    """
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"logical names {tuple(names)} do not match an array of rank {len(shape)} {tuple(shape)}")
    used: set[str] = set()
    entries = []
    for dim, name in enumerate(names):
        axes = []
        size = 1
        for axis in _mesh_axes_of(name):
            if axis in used:
                continue
            if mesh is not None:
                if axis not in mesh.shape:
                    continue
                if shape is not None and shape[dim] % (size * mesh.shape[axis]):
                    continue
                size *= mesh.shape[axis]
            axes.append(axis)
            used.add(axis)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*entries)


def logical_to_sharding(names: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None) -> NamedSharding:
    """``NamedSharding`` on ``mesh`` for logical ``names`` (see :func:`logical_to_spec`)."""
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh))


def variable_logical_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axis names of an ``nnx.Variable`` (``out_sharding`` metadata; replicated if absent)."""
    names = variable.get_metadata().get("out_sharding")
    value = variable.get_value()
    if not names:
        return (None,) * len(value.shape)
    return tuple(names)


def variable_sharding(variable: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """The ``NamedSharding`` a variable gets on ``mesh`` from its logical names and shape."""
    return logical_to_sharding(variable_logical_axes(variable), mesh, variable.get_value().shape)


def shard_like_params(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Move every variable of ``model`` (in place) to the sharding its logical names give on ``mesh``; returns it."""
    for _, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Variable) and hasattr(variable.get_value(), "shape"):
            variable.set_value(jax.device_put(variable.get_value(), variable_sharding(variable, mesh)))
    return model


@contextlib.contextmanager
def axis_rules(**overrides: Any) -> Iterator[None]:
    """Override rules of :data:`LOGICAL_AXIS_RULES` inside the block, e.g. ``axis_rules(seq="tensor")`` (a mesh
    axis, a tuple of them, or None). Enter it inside the traced function (as :func:`activation_context` does),
    so the jit cache keys on the function that holds it."""
    unknown = sorted(set(overrides) - set(_RULES))
    if unknown:
        raise ValueError(f"no logical axis rule named {unknown}; known: {', '.join(_RULES)}")
    token = _OVERRIDES.set({**_OVERRIDES.get(), **overrides})
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


@contextlib.contextmanager
def activation_context(mesh: Mesh | None, seq: str | None = None) -> Iterator[None]:
    """Inside a jitted function: :func:`constrain` calls (the model's activations) see ``mesh``'s abstract mesh,
    and the ``seq`` rule is ``seq`` (None = off). A no-op block when ``mesh`` is None."""
    if mesh is None:
        yield
        return
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), axis_rules(seq=seq):
        yield


def constrain(x: jax.Array, names: Sequence[str | None], mesh: Mesh | None = None) -> jax.Array:
    """``with_sharding_constraint`` of an activation to its logical names under ``mesh`` (or the current
    abstract mesh); a no-op without a mesh."""
    if mesh is None:
        abstract = jax.sharding.get_abstract_mesh()
        if abstract.empty:
            return x
        spec = logical_to_spec(names, x.shape, abstract)
        return jax.lax.with_sharding_constraint(x, spec)
    return jax.lax.with_sharding_constraint(x, logical_to_sharding(names, mesh, x.shape))
