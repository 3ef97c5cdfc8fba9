"""The jitted train and eval steps.

Train step ``(state, batch, teacher) -> (state, metrics)`` for a global batch ``{input_ids, labels} [B, T]``
(``teacher``: the frozen distillation teacher, :mod:`fairy2i_jax.training.teacher`, or None):

1. Quantize once: ``weights, pullback = jax.vjp(lambda p: model(p).effective_weights(), params)``: every linear's
   fake-quantized real matrix (STE inside), computed once per optimizer step.
2. Micro-batches: the batch is viewed as ``[grad_accum, B / grad_accum, T]`` (micro-batch ``a`` = rows
   ``a, a + k, a + 2k, ...`` with ``k = grad_accum``, so each micro-batch stays evenly spread over the data
   shards) and ``lax.scan`` accumulates, in float32, ``d loss / d params`` (embeddings, norms, biases) and
   ``d loss / d weights``; each micro-batch calls ``model(ids, weights=weights)``.
3. Back to the masters once: ``grads = g_params + pullback(g_weights)`` (the STE and the recomposition's
   adjoint run once per step).
4. Loss: mean over the scored tokens of the whole global batch, ``sum CE / #scored`` with
   ``CE = -log softmax(logits[:, :-1])[labels[:, 1:]]`` and labels -100 ignored; with distillation
   (``distill.weight = w > 0``) :func:`distill_loss` ``(1 - w) CE + w T^2 KL(softmax(z_teacher / T) ||
   softmax(z / T))``, both means over the same tokens, the teacher's logits under stop-gradient: ``self`` = the
   same masters unquantized (made each step), ``frozen`` = the original real model (the ``teacher`` argument).
5. Non-finite loss or gradient: the update is skipped (``lax.cond``) and the metrics carry ``finite = False`` and
   ``bad_leaf`` = the flatten index of the first non-finite gradient leaf (``-1`` if only the loss is bad).
6. Otherwise the optimizer runs in its coordinate space (:mod:`fairy2i_jax.training.optim`).

Sharding: the state and the batch come in with the shardings of the logical rules (:func:`jit_train_step`), and
the step runs inside :func:`fairy2i_jax.sharding.activation_context`, so the model's activations are constrained
too (batch over data x fsdp, heads and ffn over tensor, the sequence over ``seq`` when given).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from fairy2i_jax.data import IGNORE_INDEX
from fairy2i_jax.sharding import activation_context, constrain, logical_to_sharding
from fairy2i_jax.training.config import DistillSection
from fairy2i_jax.training.optim import grads_to_opt, updates_from_opt
from fairy2i_jax.training.state import ParamLayout, TrainState, replicated
from fairy2i_jax.training.teacher import Teacher, self_teacher, teacher_logits

Tree = Any


def token_nll(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum of -log p(labels[:, t+1] | logits[:, t]), #scored)`` over targets != -100 (float32)."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(mask, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask, logz - picked, 0.0)), jnp.sum(mask, dtype=jnp.float32)


def token_kl(teacher_logits: jax.Array, logits: jax.Array, labels: jax.Array, temperature: float) -> jax.Array:
    """``sum_t KL(p_T || q_T)`` over scored positions, ``p_T = softmax(teacher / T)``,
    ``q_T = softmax(student / T)``."""
    mask = labels[:, 1:] != IGNORE_INDEX
    lp = jax.nn.log_softmax(teacher_logits[:, :-1].astype(jnp.float32) / temperature, axis=-1)
    lq = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)
    return jnp.sum(jnp.where(mask, kl, 0.0))


def distill_loss(ce: jax.Array, kl: jax.Array, weight: float, temperature: float) -> jax.Array:
    """``(1 - w) CE + w T^2 KL`` (``CE``, ``KL``: means per scored token; the ``T^2`` keeps the KL term's
    gradient on the scale of the CE's as ``T`` grows, Hinton et al. 2015)."""
    return (1.0 - weight) * ce + weight * temperature**2 * kl


def micro_batches(x: jax.Array, grad_accum: int, mesh: Mesh | None) -> jax.Array:
    """``[B, T] -> [k, B / k, T]`` with micro-batch ``a`` = rows ``a::k`` (module docstring)."""
    b, t = x.shape
    return constrain(x.reshape(b // grad_accum, grad_accum, t).swapaxes(0, 1), (None, "batch", "seq"), mesh)


def global_norm(tree: Tree) -> jax.Array:
    """``sqrt(sum of squares of every entry)`` in float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _finite_flags(grads: Tree) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])


def make_train_step(layout: ParamLayout, tx: optax.GradientTransformation, schedule: Callable, *,
                    coordinates: str, grad_accum: int, distill: DistillSection, mesh: Mesh | None = None,
                    seq: str | None = None):
    """The pure train step (module docstring); jit it with :func:`jit_train_step`. ``mesh``: the mesh whose
    logical rules the activations follow (None: unconstrained); ``seq``: the mesh axis of the sequence (None)."""
    use_teacher = distill.weight > 0
    frozen = distill.frozen
    alpha, temp = float(distill.weight), float(distill.temperature)

    def loss_and_grads(params, batch, frozen_teacher: Teacher | None):
        weights, pullback = jax.vjp(lambda p: layout.merge(p).effective_weights(), params)
        if frozen and frozen_teacher is None:
            raise ValueError("distill.teacher = frozen: the train step needs the frozen teacher as its third "
                             "argument (fairy2i_jax.training.teacher.frozen_teacher)")
        teacher = None
        if use_teacher:
            teacher = frozen_teacher if frozen else jax.lax.stop_gradient(self_teacher(layout.merge(params)))
        ids = micro_batches(batch["input_ids"], grad_accum, mesh)
        labels = micro_batches(batch["labels"], grad_accum, mesh)
        denom = jnp.maximum(jnp.sum(labels[:, :, 1:] != IGNORE_INDEX, dtype=jnp.float32), 1.0)

        def micro_loss(p, w, mb_ids, mb_labels):
            model = layout.merge(p)
            logits = model(mb_ids, weights=w)
            nll, _ = token_nll(logits, mb_labels)
            loss = nll / denom
            if use_teacher:
                t_logits = teacher_logits(layout, p, teacher, mb_ids)
                kl = token_kl(t_logits, logits, mb_labels, temp) / denom
                loss = distill_loss(loss, kl, alpha, temp)
            return loss, nll

        grad_fn = jax.value_and_grad(micro_loss, argnums=(0, 1), has_aux=True)
        f32_zeros = lambda t: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32 if not jnp.iscomplexobj(x)
                                                                else x.dtype), t)

        def body(carry, mb):
            g_p, g_w, loss_acc, nll_acc = carry
            (loss, nll), (d_p, d_w) = grad_fn(params, weights, *mb)
            g_p = jax.tree.map(lambda a, d: a + d.astype(a.dtype), g_p, d_p)
            g_w = jax.tree.map(lambda a, d: a + d.astype(a.dtype), g_w, d_w)
            return (g_p, g_w, loss_acc + loss, nll_acc + nll), None

        init = (f32_zeros(params), f32_zeros(weights), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (g_p, g_w, loss, nll), _ = jax.lax.scan(body, init, (ids, labels))
        (g_from_w,) = pullback(jax.tree.map(lambda g, w: g.astype(w.dtype), g_w, weights))
        grads = jax.tree.map(lambda a, b: a + b.astype(a.dtype), g_p, g_from_w)
        return grads, loss, nll / denom, denom

    def step(state: TrainState, batch, teacher: Teacher | None = None):
        with activation_context(mesh, seq):
            return _step(state, batch, teacher)

    def _step(state: TrainState, batch, teacher):
        params, opt_state = state.params, state.opt_state
        grads, loss, ce, tokens = loss_and_grads(params, batch, teacher)
        flags = _finite_flags(grads)
        finite = jnp.isfinite(loss) & jnp.all(flags)
        bad_leaf = jnp.where(jnp.all(flags), -1, jnp.argmin(flags)).astype(jnp.int32)
        g_opt = grads_to_opt(grads, layout.masters, coordinates)
        grad_norm = global_norm(g_opt)

        def apply(_):
            updates, new_opt = tx.update(g_opt, opt_state, layout.to_opt(params, coordinates))
            deltas = updates_from_opt(updates, params, layout.masters, coordinates)
            new_params = jax.tree.map(lambda p, d: (p + d).astype(p.dtype), params, deltas)
            return new_params, new_opt, state.step + 1

        def skip(_):
            return params, opt_state, state.step

        new_params, new_opt, new_step = jax.lax.cond(finite, apply, skip, None)
        metrics = {"loss": loss, "ce": ce, "tokens": tokens, "grad_norm": grad_norm,
                   "lr": schedule(state.step), "finite": finite, "bad_leaf": bad_leaf}
        return TrainState(new_params, new_opt, new_step, state.rng), metrics

    return step


def batch_sharding(mesh: Mesh, shape: tuple[int, int]):
    """Sharding of a global ``[B, T]`` batch: rows over ``data x fsdp``."""
    return logical_to_sharding(("batch", "seq"), mesh, shape)


def jit_train_step(step_fn, shardings: Tree, mesh: Mesh, batch_shape: tuple[int, int],
                   teacher_shardings: Teacher | None = None):
    """``jax.jit`` with in/out shardings from the logical rules, the state donated; the jitted step takes
    ``(state, batch, teacher)`` (``teacher``: None, or the frozen teacher with ``teacher_shardings``)."""
    bs = batch_sharding(mesh, batch_shape)
    return jax.jit(step_fn, in_shardings=(shardings, {"input_ids": bs, "labels": bs}, teacher_shardings),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))


def make_eval_fns(layout: ParamLayout, shardings: Tree, mesh: Mesh, batch_shape: tuple[int, int],
                  seq: str | None = None):
    """``(weights_fn(params) -> weights, eval_fn(params, weights, batch) -> (nll_sum, count))``, jitted; the
    activations constrained like the train step's."""
    bs = batch_sharding(mesh, batch_shape)
    weights_fn = jax.jit(lambda p: layout.merge(p).effective_weights(), in_shardings=(shardings.params,))

    def eval_fn(params, weights, batch):
        with activation_context(mesh, seq):
            logits = layout.merge(params)(batch["input_ids"], weights=weights)
            return token_nll(logits, batch["labels"])

    eval_jit = jax.jit(eval_fn, in_shardings=(shardings.params, None, {"input_ids": bs, "labels": bs}),
                       out_shardings=replicated(mesh))
    return weights_fn, eval_jit
