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
mesh axis is used at most once per array.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes (None = replicated). One table for params, activations and caches.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),  # activations and caches: batch over data x fsdp
    ("seq", None),
    ("cache_len", None),
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
    target = _RULES[name]
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
