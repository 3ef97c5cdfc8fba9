"""Train-step cost of Fairy2i-W2 QAT next to the plain bf16 train step of the same model and mesh (issue [C]).

Both steps are the project's own jitted train step (:mod:`fairy2i_jax.training.step`: AdamW in real coordinates,
float32 masters and moments, bf16 compute, quantize once per step); they differ only in the linears:

* ``plain``: the real model (``convert(model, "none")``): real float32 kernels, bf16 matmuls;
* ``qat``: ``convert(model, "w2")``: complex64 masters ``U, W``, every linear (and the head) fake-quantized
  once per step with the phase quantizer (T = 2, ``bf16_exact``), STE back to the masters.

Random weights (the cost does not depend on the values). Times are medians over ``--repeats`` steps after two
warm-up steps (compilation), host timer around ``block_until_ready``. MFU = ``6 * N * tokens / time /
(peak * devices)`` with the peak from :data:`fairy2i_jax.training.devices.DEVICES` (n/a on CPU).

The sharded path of training: the state is placed with the logical rules on the ``--mesh`` (data, fsdp, tensor)
and the step runs under :func:`fairy2i_jax.sharding.activation_context` (activations constrained, the sequence
over ``tensor`` with ``--seq-shard tensor``), exactly as ``train.py`` runs it. Per variant it also prints the train
state's bytes on device 0 (from ``addressable_shards``) and, where the backend reports it, the peak memory in use
(``memory_stats()["peak_bytes_in_use"]``), to compare with ``python -m fairy2i_jax.training.plan``.

Loss (``--distill``): ``none`` = plain CE (default); ``self`` / ``frozen`` = logits KD (``distill.weight`` 0.5,
temperature 1) from the unquantized masters made each step, or from the frozen real model held on the devices
(:mod:`fairy2i_jax.training.teacher`): both add one teacher forward per micro-batch, ``self`` also the
recomposition of the teacher's matrices once per step. MFU still counts ``6 N`` FLOPs per token (the teacher's
``2 N`` are not counted).

Usage (repository root): ``python -m benchmarks.train_step --shape small`` (CPU), ``--shape 1b``
(``arch:llama3.2-1b``, 1.24B params, for a GPU), ``--batch``, ``--seq``, ``--grad-accum``, ``--remat``,
``--mesh 1,1,1`` (default: every device on data), ``--seq-shard tensor``, ``--distill none,self,frozen`` (one
loss, or several timed round-robin in one process, one step of each in turn, so that the ratios between them
see the same load of a shared machine), ``--variants qat`` (only the QAT step).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.quantizer import device_name
from fairy2i_jax import sources
from fairy2i_jax.convert import convert
from fairy2i_jax.models.config import ModelConfig
from fairy2i_jax.models.llama import init_model
from fairy2i_jax.sharding import make_mesh, shard_like_params
from fairy2i_jax.training.config import DistillSection, OptimizerSection
from fairy2i_jax.training.metrics import mfu
from fairy2i_jax.training.optim import make_optimizer
from fairy2i_jax.training.state import ParamLayout, init_state, param_count
from fairy2i_jax.training.step import jit_train_step, make_train_step
from fairy2i_jax.training.teacher import frozen_teacher, teacher_shardings

SHAPES = {
    # The smallest, for smoke runs (benchmarks/gpu_check.py --smoke).
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 tie_word_embeddings=False),
    # A small Llama that a 2-core CPU steps through in about a second.
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=4, num_heads=8,
                  num_kv_heads=4, tie_word_embeddings=False, max_position_embeddings=8192),
    # Llama-3.2-1B: 1.24B params, tied embeddings (the architecture table of fairy2i_jax.sources).
    "1b": "arch:llama3.2-1b",
    # SmolLM2-135M (the project's default model): 135M params, tied embeddings.
    "smollm2": "arch:smollm2-135m",
}
DISTILL = ("none", "self", "frozen")  # --distill: plain CE, KD from the drifting masters, KD from the real model


def distill_section(kind: str) -> DistillSection:
    """The loss of ``--distill kind``: CE alone, or KD with weight 0.5 and temperature 1 from that teacher."""
    return DistillSection() if kind == "none" else DistillSection(weight=0.5, temperature=1.0, teacher=kind)


def model_config(shape: str, remat: str) -> ModelConfig:
    layout = dict(param_dtype=jnp.float32, compute_dtype=jnp.bfloat16, scan_layers=True, remat=remat)
    spec = SHAPES[shape]
    return sources.model_config(spec, **layout) if isinstance(spec, str) else ModelConfig(**spec, **layout)


def build(shape: str, preset: str, remat: str, mesh, distill: DistillSection = DistillSection()):
    """``(model converted to preset, its frozen teacher or None)`` from one random real model on ``mesh``."""
    real = shard_like_params(init_model(model_config(shape, remat), seed=0), mesh)
    return convert(real, preset), frozen_teacher(real, mesh) if distill.frozen else None


def state_bytes_on_device0(state) -> int:
    """Bytes of the train state's shards on the first device (``addressable_shards``)."""
    dev = jax.devices()[0]
    return sum(s.data.nbytes for leaf in jax.tree.leaves(state) for s in leaf.addressable_shards if s.device == dev)


def peak_bytes() -> int | None:
    """``peak_bytes_in_use`` of device 0, None where the backend keeps no memory statistics (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


class StepTimer:
    """One model's jitted train step, compiled and warmed up (two steps) on construction; :meth:`once` times one
    more step (host timer around ``block_until_ready``)."""

    def __init__(self, model, mesh, batch: int, seq: int, grad_accum: int, seq_axis: str | None = None,
                 distill: DistillSection = DistillSection(), teacher=None):
        opt = OptimizerSection(lr=1e-5, schedule="constant", warmup_steps=0, decay_stages=(), clip_norm=2.0)
        tx, schedule = make_optimizer(opt, 100)
        layout = ParamLayout(model)
        self.state, shardings = init_state(layout, model, tx, "real", 0, mesh)
        self.n_params = param_count(self.state.params)
        self.teacher = teacher
        self.step = jit_train_step(make_train_step(layout, tx, schedule, coordinates="real", grad_accum=grad_accum,
                                                   distill=distill, mesh=mesh, seq=seq_axis), shardings, mesh,
                                   (batch, seq), teacher_shardings(model, mesh) if teacher is not None else None)
        ids = jax.random.randint(jax.random.key(1), (batch, seq), 0, model.config.vocab_size, dtype=jnp.int32)
        self.data = {"input_ids": ids, "labels": ids}
        for _ in range(2):
            self.state, metrics = self.step(self.state, self.data, teacher)
        jax.block_until_ready(metrics)

    def once(self) -> float:
        """Seconds of one more step."""
        start = time.perf_counter()
        self.state, metrics = self.step(self.state, self.data, self.teacher)
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - start

    def state_bytes(self) -> int:
        """The train state's bytes on device 0 (the frozen teacher, when there is one, is not part of it)."""
        return state_bytes_on_device0(self.state)


def time_step(model, mesh, batch: int, seq: int, grad_accum: int, repeats: int,
              seq_axis: str | None = None, distill: DistillSection = DistillSection(),
              teacher=None) -> tuple[float, int, int]:
    """Median seconds per optimizer step, the real parameter count and the state's bytes on device 0."""
    timer = StepTimer(model, mesh, batch, seq, grad_accum, seq_axis, distill, teacher)
    return statistics.median(timer.once() for _ in range(repeats)), timer.n_params, timer.state_bytes()


def time_interleaved(timers: dict, repeats: int) -> dict:
    """Median seconds per step of every :class:`StepTimer` of ``timers``, timed round-robin (``repeats`` rounds
    of one step each), so that all of them see the same load of a shared machine."""
    times = {key: [] for key in timers}
    for _ in range(repeats):
        for key, timer in timers.items():
            times[key].append(timer.once())
    return {key: statistics.median(t) for key, t in times.items()}


def _choices(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"{flag}: {text!r} must be a comma-separated list of {', '.join(allowed)}")
    return items


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences per optimizer step)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_with_no_batch_dims"])
    p.add_argument("--mesh", default=None, help="data,fsdp,tensor (default: all devices on data)")
    p.add_argument("--seq-shard", dest="seq_axis", default="none", choices=["none", "tensor"],
                   help="shard the residual stream's sequence over this mesh axis (default none)")
    p.add_argument("--distill", default="none",
                   help="loss, or a comma-separated list timed round-robin: none (plain CE), self, frozen (KD from "
                        "that teacher, weight 0.5, T 1)")
    p.add_argument("--variants", default="plain,qat", help="plain and/or qat (comma-separated)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    kinds = _choices(args.distill, DISTILL, "--distill")
    variants = _choices(args.variants, ("plain", "qat"), "--variants")
    sizes = tuple(int(x) for x in args.mesh.split(",")) if args.mesh else (jax.device_count(), 1, 1)
    mesh = make_mesh(*sizes)
    seq_axis = None if args.seq_axis == "none" else args.seq_axis
    tokens = args.batch * args.seq
    results = {}
    for name in variants:  # one variant at a time on the devices (its losses together, timed round-robin)
        preset = {"plain": "none", "qat": "w2"}[name]
        timers = {}
        for kind in kinds:
            distill = distill_section(kind)
            model, teacher = build(args.shape, preset, args.remat, mesh, distill)
            timers[kind] = StepTimer(model, mesh, args.batch, args.seq, args.grad_accum, seq_axis, distill, teacher)
            del model, teacher
        medians = time_interleaved(timers, args.repeats)
        for kind, timer in timers.items():
            seconds, n = medians[kind], timer.n_params
            u = mfu(n, tokens / seconds, jax.devices()[0].device_kind, jax.device_count())
            results[name, kind] = (seconds, n, u)
            peak = peak_bytes()
            label = name if len(kinds) == 1 else f"{name} (distill {kind})"
            print(f"{label}: {seconds * 1e3:.1f} ms/step, {tokens / seconds:.0f} tokens/s, params {n / 1e6:.1f}M, "
                  f"MFU {'n/a' if u is None else f'{100 * u:.1f}%'}, train state on device 0 "
                  f"{timer.state_bytes() / 1e9:.3f} GB, "
                  f"peak memory {'n/a' if peak is None else f'{peak / 1e9:.2f} GB'}", flush=True)
        del timers
    fmt = lambda u: "n/a" if u is None else f"{100 * u:.1f}%"
    ms = lambda r: "n/a" if r is None else f"{r[0] * 1e3:.0f}"
    for kind in kinds:
        plain, qat = results.get(("plain", kind)), results.get(("qat", kind))
        n = (plain or qat)[1]
        ratio = f"{qat[0] / plain[0]:.2f}" if plain and qat else "n/a"
        print(f"| {device_name()} | jax {jax.__version__} | {args.shape} ({n / 1e6:.1f}M) | "
              f"{args.batch}x{args.seq}, accum {args.grad_accum}, remat {args.remat}, mesh {sizes}, distill {kind} | "
              f"{ms(plain)} | {ms(qat)} | {ratio} | {fmt(plain and plain[2])} / {fmt(qat and qat[2])} |")
    if "none" in kinds and len(kinds) > 1:
        for name in variants:
            base = results[name, "none"][0]
            print(f"{name}: step time / plain CE: " + ", ".join(f"{kind} {results[name, kind][0] / base:.2f}"
                                                                for kind in kinds if kind != "none"))


if __name__ == "__main__":
    main()
