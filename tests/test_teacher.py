"""fairy2i_jax.training.teacher: the frozen teacher is the original real model and stays fixed while the ``self``
teacher drifts; the KD loss of a train step against a hand computation; the teacher's shardings and restore
target; a run with a frozen teacher resumed from a checkpoint equals the uninterrupted run bit for bit."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fairy2i_jax import convert
from fairy2i_jax.models.llama import init_model
from fairy2i_jax.runs import RunCheckpoints
from fairy2i_jax.sharding import make_mesh
from fairy2i_jax.sources import tiny_config
from fairy2i_jax.training import setup
from fairy2i_jax.training.config import DistillSection, load_train_config
from fairy2i_jax.training.loop import Trainer, checkpoint_tree, run
from fairy2i_jax.training.state import abstract_state
from fairy2i_jax.training.teacher import abstract_teacher, frozen_teacher, overlay, self_teacher, teacher_logits
from train_helpers import DEBUG_CONFIG, ROOT, harness, host, logged_losses, optimizer, random_batch

VOCAB = 260  # random:tiny's byte vocabulary


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_frozen_teacher_is_the_real_model_fixed_while_self_drifts_and_the_kd_loss():
    """The frozen teacher holds the real model's kernels and embeddings bit for bit. Loss of the first step =
    ``(1 - w) CE + w T^2 KL(p_T || q_T)`` computed here in float64 from the student's (fake-quantized) logits and
    the teacher's, means over the scored tokens; after two AdamW steps the frozen teacher's logits are bit for bit
    those of step 0, the self teacher's are not."""
    real = init_model(tiny_config(jnp.float32, jnp.float32, True, "none"), seed=0)
    model = convert(real, "w2")
    w, t = 0.25, 2.0
    batch = random_batch(2, 8, VOCAB, seed=3, ignore_every=3)
    h = harness(model, optimizer("adamw", 1e-2), (2, 8), distill=DistillSection(w, t, "frozen"),
                teacher_model=real)
    for name, lin in real.named_linears().items():
        np.testing.assert_array_equal(h.teacher.weights[name], lin.real_master())
    np.testing.assert_array_equal(h.teacher.params["embed_tokens"]["embedding"],
                                  real.embed_tokens.embedding.get_value())
    ids = jnp.asarray(batch["input_ids"])

    @jax.jit
    def logits(params, teacher):  # student, frozen teacher, self teacher
        student = h.layout.merge(params)
        return (student(ids), teacher_logits(h.layout, params, teacher, ids),
                teacher_logits(h.layout, params, self_teacher(student), ids))

    z, frozen0, self0 = (np.asarray(x, np.float64) for x in logits(h.state.params, h.teacher))
    m = h.run(batch)
    targets, scored = batch["labels"][:, 1:], batch["labels"][:, 1:] != -100
    lq = _log_softmax(z[:, :-1])
    ce = -np.take_along_axis(lq, np.where(scored, targets, 0)[..., None], -1)[..., 0][scored].mean()
    lp_t, lq_t = _log_softmax(frozen0[:, :-1] / t), _log_softmax(z[:, :-1] / t)
    kl = (np.exp(lp_t) * (lp_t - lq_t)).sum(-1)[scored].mean()
    assert float(m["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(m["loss"]) == pytest.approx((1 - w) * ce + w * t**2 * kl, rel=1e-5)
    assert kl > 1e-4  # W2 fake quantization moves the student away from its teacher

    h.run(random_batch(2, 8, VOCAB, seed=4))
    _, frozen2, self2 = (np.asarray(x, np.float64) for x in logits(h.state.params, h.teacher))
    np.testing.assert_array_equal(frozen2, frozen0)
    assert np.abs(self2 - self0).max() > 1e-3


def test_teacher_shardings_dtype_and_restore_target():
    """On (data 2, fsdp 2, tensor 2) every teacher matrix is sharded like the U of its converted linear, every
    param like itself, in the compute dtype (bf16 here); the abstract target of the converted model has the same
    shapes, dtypes and shardings as the teacher made from the real model."""
    mesh = make_mesh(2, 2, 2)
    real = init_model(tiny_config(jnp.float32, jnp.bfloat16, True, "none"), seed=0)
    teacher = frozen_teacher(real, mesh)
    names = sorted(teacher.weights)
    assert "lm_head" in names and len(names) == 8  # q, k, v, o, gate, up, down (stacked) and the head
    up = next(v for k, v in teacher.weights.items() if k.endswith("mlp.up_proj"))
    assert up.shape == (2, 128, 64) and up.sharding.spec == P(None, "tensor", "fsdp")  # like U: [layers, mlp, embed]
    assert teacher.params["embed_tokens"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert set(teacher.params["layers"]) == {"input_layernorm", "post_attention_layernorm"}  # no linear storage
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(teacher))
    target = abstract_teacher(convert(real, "w2"), mesh)
    assert jax.tree.structure(target) == jax.tree.structure(teacher)
    for a, b in zip(jax.tree.leaves(target), jax.tree.leaves(teacher)):
        assert (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, b.sharding)
    kept = overlay({"a": {"x": 1, "y": 2}, "b": 3}, {"a": {"y": 5}})
    assert kept == {"a": {"x": 1, "y": 5}, "b": 3}


def _saved_state(cfg, run_dir, step):
    """The whole ``state`` item (train state and frozen teacher) of checkpoint ``step``, on the host."""
    model, mesh = setup.abstract_training_model(cfg), setup.build_mesh(cfg)
    trainer = Trainer.for_model(model, cfg, mesh)
    target = checkpoint_tree(abstract_state(trainer.layout, trainer.tx, cfg.optimizer.coordinates,
                                            trainer.shardings), abstract_teacher(model, mesh))
    checkpoints = RunCheckpoints(run_dir / "checkpoints", async_save=False)
    try:
        return host(checkpoints.restore(step, target)[0])
    finally:
        checkpoints.close()


def test_resume_with_a_frozen_teacher_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    """3 steps of the debug config with KD from a frozen teacher (checkpoints at 2 and 3); a copy with checkpoint
    3 removed resumes from 2: step 3 logs the same loss (metrics.jsonl holds it twice) and checkpoint 3 holds the
    same bits (params, Adam moments, step, rng and the teacher)."""
    monkeypatch.chdir(ROOT)
    args = ["train.steps=3", "train.checkpoint_every=2", "train.grad_accum=1", "mesh.data=1", "data.eval=[]",
            "distill.weight=0.5", "distill.temperature=2.0", "distill.teacher=frozen", "export.format=none"]
    first = tmp_path / "first"
    cfg = load_train_config(DEBUG_CONFIG, [*args, f"train.run_dir={first}"])
    run(cfg)
    again = tmp_path / "again"
    shutil.copytree(first, again)
    shutil.rmtree(again / "checkpoints" / "3")
    cfg_again = load_train_config(DEBUG_CONFIG, [*args, f"train.run_dir={again}"])
    assert run(cfg_again).step == 3
    assert logged_losses(again) == logged_losses(first) and sorted(logged_losses(first)) == [1, 2, 3]
    want, got = _saved_state(cfg, first, 3), _saved_state(cfg_again, again, 3)
    assert "teacher" in got and jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)
