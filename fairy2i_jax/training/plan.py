"""A memory plan: the bytes per device a training config needs, from the abstract model (no weight is loaded).

    python -m fairy2i_jax.training.plan --config CFG [--devices N] [--device h100] [key=value ...]

``--devices N`` plans for N devices (default: the devices JAX sees); the ``mesh`` section resolves against it.
``model.path`` may be any model source whose architecture is known without weights, e.g. ``arch:llama2-7b``
(:data:`fairy2i_jax.sources.ARCHITECTURES`) or a local HF directory. The device table is
:mod:`fairy2i_jax.training.devices`.

What is counted, per device (the shard shapes of the train state's own shardings, :func:`state_shardings`, on an
abstract mesh of ``N`` devices; a leaf whose dims do not divide is counted replicated, as it is placed):

* **params**: the real params in ``param_dtype`` (embeddings, norms, biases, real kernels);
* **complex masters**: ``U, W`` of every converted linear, complex64 (8 bytes per entry = 4 per real weight);
* **optimizer moments**: the optax state over optimizer space (Adam ``mu`` and ``nu`` in float32);
* **gradients**: the param-shaped gradient (complex64 for masters) plus the float32 accumulator of the
  weight gradients ``d loss / d A_q`` (one real matrix per linear) that lives through the micro-batches;
* **effective weights**: the fake-quantized real matrices in the compute dtype, made once per step (a second set
  for a distillation teacher: made each step for ``distill.teacher: self``, held for the run for ``frozen``,
  whose embeddings and norms in the compute dtype are not counted), sharded like the weights they come from;
* **activations** of one micro-batch, an estimate by :func:`activation_bytes` with the remat policy.

The total is compared with each device's memory: it *fits* when it is at most ``HEADROOM`` (90 %) of it (XLA's
workspace, fragmentation and the collectives' buffers take the rest; on GPUs also let JAX take the memory:
``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95``). The estimate ignores XLA's temporaries beyond those named here; check
it on a device with ``jax.devices()[0].memory_stats()["peak_bytes_in_use"]`` (``benchmarks/train_step.py``
prints it).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from fairy2i_jax.errors import CheckpointError, Fairy2iError, run_cli
from fairy2i_jax.models.config import ModelConfig
from fairy2i_jax.sharding import MESH_AXES, logical_to_sharding
from fairy2i_jax.sources import ARCHITECTURES
from fairy2i_jax.training import setup
from fairy2i_jax.training.config import TrainConfig, load_train_config
from fairy2i_jax.training.devices import DEVICE_NAMES, DEVICES, Device, device_named
from fairy2i_jax.training.optim import make_optimizer
from fairy2i_jax.training.state import ParamLayout, abstract_state, state_shardings

HEADROOM = 0.9
ROWS = ("params", "complex masters", "optimizer moments", "gradients", "effective weights", "activations")


def _divided(size: int, divisor: int) -> int:
    return size // divisor if divisor and size % divisor == 0 else size


def activation_bytes(mc: ModelConfig, *, rows: int, seq_len: int, tensor: int = 1, seq_shards: int = 1,
                     remat: str | None = None) -> int:
    """Estimated activation bytes of one micro-batch on one device.

    Notation: ``b`` rows per device, ``T`` = seq_len, ``s = T / seq_shards`` (the residual stream's share of
    the sequence), ``a`` bytes per compute-dtype element, ``L`` layers, ``D`` hidden, and per device ``h``
    heads, ``k`` kv heads, ``f`` ffn, ``v`` vocab (each divided by ``tensor`` when it divides), ``d`` head_dim.

    * residual saved per layer: ``R = b s D a``;
    * one layer's forward intermediates kept for its backward: ``I = b T a (2D + 2(h + 2k)d + hd + 2D + 3f)
      + b h T^2 (4 + a)`` (two norms, q/k/v before and after RoPE, attention output, o/down outputs, gate / up /
      their product, the float32 softmax and the probabilities), plus the float32 scores ``b h T^2 4`` as a
      transient;
    * saved by the policy per layer: ``none`` everything (``I``), ``full`` nothing, ``dots`` the matmul outputs
      ``b T a ((h + 2k)d + 2D + 2f) + b h T^2 4 + b T h d 4``, ``dots_with_no_batch_dims`` the linears' outputs
      ``b T a ((h + 2k)d + 2D + 2f)``;
    * the head: bf16 logits, float32 logits and their gradient, ``b T v (a + 8)``.

    Total: ``L (R + saved) + I (the layer being recomputed / differentiated) + b h T^2 4 + head``, with
    ``saved = I`` and no extra ``I`` for ``none``.
    """
    remat = remat or mc.remat
    b, t, a = rows, seq_len, np.dtype(mc.compute_dtype).itemsize
    s = _divided(t, seq_shards)
    h, k = _divided(mc.num_heads, tensor), _divided(mc.num_kv_heads, tensor)
    f, v = _divided(mc.intermediate_size, tensor), _divided(mc.vocab_size, tensor)
    D, d = mc.hidden_size, mc.head_dim
    residual = b * s * D * a
    linear_out = b * t * a * ((h + 2 * k) * d + 2 * D + 2 * f)
    interior = b * t * a * (2 * D + 2 * (h + 2 * k) * d + h * d + 2 * D + 3 * f) + b * h * t * t * (4 + a)
    saved = {"none": interior, "full": 0, "dots": linear_out + b * h * t * t * 4 + b * t * h * d * 4,
             "dots_with_no_batch_dims": linear_out}[remat]
    extra = 0 if remat == "none" else interior
    head = b * t * v * (a + 8)
    return mc.num_layers * (residual + saved) + extra + b * h * t * t * 4 + head


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of each row of :data:`ROWS`, and what they were computed for."""

    model: str
    preset: str
    mesh: dict[str, int]
    rows_per_device: int
    seq_len: int
    remat: str
    per_device: dict[str, int]
    unsharded: dict[str, int]

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def total(self) -> int:
        return sum(self.per_device.values())

    def fits(self, device: Device) -> bool:
        """``total <= HEADROOM * memory``."""
        return self.total <= HEADROOM * device.memory_bytes


def _bytes(shapes, shardings) -> tuple[int, int]:
    """``(per device, unsharded)`` bytes of a tree of ShapeDtypeStructs under a matching tree of shardings."""
    per = whole = 0
    for s, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
        item = np.dtype(s.dtype).itemsize
        per += math.prod(sh.shard_shape(s.shape)) * item
        whole += math.prod(s.shape) * item
    return per, whole


def _weights_bytes(model, mesh, itemsize: int, copies: int = 1) -> tuple[int, int]:
    """Bytes of one real matrix per linear, sharded like the linear's weight, ``copies`` times."""
    per = whole = 0
    for lin in model.named_linears().values():
        shape = (*lin.stack, lin.out_features, lin.in_features)
        names = (*("layers",) * len(lin.stack), *lin.axes)
        per += math.prod(logical_to_sharding(names, mesh, shape).shard_shape(shape)) * itemsize
        whole += math.prod(shape) * itemsize
    return per * copies, whole * copies


def plan_memory(cfg: TrainConfig, num_devices: int) -> MemoryPlan:
    """The :class:`MemoryPlan` of ``cfg`` on ``num_devices`` devices (module docstring)."""
    mc = setup.model_config(cfg)
    model = setup.abstract_training_model(cfg, mc)
    sizes = cfg.mesh.resolve(num_devices)
    mesh = AbstractMesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    layout = ParamLayout(model)
    coords = cfg.optimizer.coordinates
    tx, _ = make_optimizer(cfg.optimizer, cfg.train.steps, layout.opt_groups(coords))
    shardings = state_shardings(layout, tx, coords, mesh)
    state = abstract_state(layout, tx, coords, shardings)
    is_complex = [np.issubdtype(np.dtype(s.dtype), np.complexfloating) for s in jax.tree.leaves(state.params)]
    leaves, shards = jax.tree.leaves(state.params), jax.tree.leaves(shardings.params)
    real = _bytes([x for x, c in zip(leaves, is_complex) if not c], [y for y, c in zip(shards, is_complex) if not c])
    masters = _bytes([x for x, c in zip(leaves, is_complex) if c], [y for y, c in zip(shards, is_complex) if c])
    opt = _bytes(state.opt_state, shardings.opt_state)
    accumulator = _weights_bytes(model, mesh, 4)
    grads = (real[0] + masters[0] + accumulator[0], real[1] + masters[1] + accumulator[1])
    effective = _weights_bytes(model, mesh, np.dtype(mc.compute_dtype).itemsize,
                               copies=2 if cfg.distill.weight > 0 else 1)
    d = cfg.data
    micro = d.global_batch // cfg.train.grad_accum
    rows = -(-micro // (sizes[0] * sizes[1]))
    seq_shards = sizes[2] if cfg.mesh.seq_axis == "tensor" else 1
    act = activation_bytes(mc, rows=rows, seq_len=d.seq_len, tensor=sizes[2], seq_shards=seq_shards)
    whole_act = activation_bytes(mc, rows=micro, seq_len=d.seq_len)
    per = dict(zip(ROWS, (real[0], masters[0], opt[0], grads[0], effective[0], act)))
    whole = dict(zip(ROWS, (real[1], masters[1], opt[1], grads[1], effective[1], whole_act)))
    return MemoryPlan(cfg.model.path, cfg.quant.preset, dict(zip(MESH_AXES, sizes)), rows, d.seq_len, mc.remat,
                      per, whole)


def _gb(n: int) -> str:
    return f"{n / 1e9:9.2f}"


def format_plan(plan: MemoryPlan, devices: Sequence[Device] = DEVICES) -> str:
    """The plan as a text table (GB = 1e9 bytes), then one line per device: fits or not, and the share used."""
    mesh = " x ".join(f"{k} {v}" for k, v in plan.mesh.items())
    lines = [f"memory plan: {plan.model}, quant {plan.preset}, mesh {mesh} ({plan.devices} devices), micro-batch "
             f"{plan.rows_per_device} x {plan.seq_len} tokens per device, remat {plan.remat}",
             f"{'':20s} {'per device (GB)':>16s} {'unsharded (GB)':>16s}"]
    lines += [f"{row:20s} {_gb(plan.per_device[row]):>16s} {_gb(plan.unsharded[row]):>16s}" for row in ROWS]
    lines.append(f"{'total':20s} {_gb(plan.total):>16s}")
    for dev in devices:
        share = plan.total / dev.memory_bytes
        verdict = "fits" if plan.fits(dev) else "does NOT fit"
        lines.append(f"  {dev.label:16s} ({dev.memory_bytes / 1e9:6.1f} GB): {verdict} ({100 * share:.0f}% of memory,"
                     f" limit {100 * HEADROOM:.0f}%)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fairy2i_jax.training.plan", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="training config (default: configs/smollm2_135m_w2.yaml)")
    p.add_argument("--devices", type=int, default=None, help="number of devices to plan for (default: jax's)")
    p.add_argument("--device", action="append", choices=DEVICE_NAMES,
                   help="compare with this device only (repeatable; default: every device of the table)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. mesh.fsdp=8 train.grad_accum=2")
    return run_cli(_print_plan, p.parse_intermixed_args(sys.argv[1:] if argv is None else argv))


def _print_plan(args) -> None:
    cfg = load_train_config(args.config, args.overrides)
    n = args.devices if args.devices is not None else jax.device_count()
    if n < 1:
        raise Fairy2iError(f"--devices must be >= 1, got {n}")
    devices = [device_named(d) for d in args.device] if args.device else DEVICES
    try:
        plan = plan_memory(cfg, n)
    except (OSError, CheckpointError) as e:  # e.g. a hub id offline: the architecture is unknown here
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise Fairy2iError(f"cannot read the architecture of model.path = {cfg.model.path} ({reason}); plan "
                           f"without it: model.path=arch:NAME, NAME one of {', '.join(ARCHITECTURES)}") from None
    print(format_plan(plan, devices))


if __name__ == "__main__":
    sys.exit(main())
