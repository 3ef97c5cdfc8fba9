"""fairy2i_jax.training.optim: the optimizer in real and complex coordinates of the complex masters. A W2 train
step's SGD update against the official real-coordinate update (torch oracle), the coordinate maps on a hand-made
param tree against JAX gradients of the real planes, the optimizer-space names, AdamW against torch, and the
parameter groups (labels by module type, the default chain unchanged, scales and no-decay, in a train step)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from fairy2i_jax.models.config import ModelConfig
from fairy2i_jax.models.linear import LinearSpec
from fairy2i_jax.models.llama import abstract_model
from fairy2i_jax.training.config import GroupsSection
from fairy2i_jax.training.optim import (
    grads_to_opt,
    make_optimizer,
    master_nodes,
    opt_space_names,
    params_to_opt,
    updates_from_opt,
)
from fairy2i_jax.training.schedule import make_schedule
from fairy2i_jax.training.state import Axes, ParamLayout
from fairy2i_jax.widely_linear import from_widely_linear, to_widely_linear
from model_helpers import model_cls_copy
from train_helpers import converted, harness, host, optimizer, random_batch

LR = 0.1


def _torch_real_grads(model, batch):
    """dL/dA_q of every linear (torch autograd on the fake-quantized weights) and dL/d(other params).

    The torch model gets the JAX model's effective (fake-quantized) matrices, so this is the official QAT
    gradient: the STE makes dL/dA = dL/dA_q for the real master A.
    """
    weights = {k: np.asarray(v, np.float32) for k, v in jax.device_get(model.effective_weights()).items()}
    oracle = model_cls_copy("llama")
    modules = dict(oracle.named_modules())
    with torch.no_grad():
        for name, w in weights.items():
            modules[name].weight.copy_(torch.from_numpy(w.copy()))
    out = oracle(input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long),
                 labels=torch.as_tensor(batch["labels"], dtype=torch.long))
    out.loss.backward()
    grads = {n: p.grad.double().numpy() for n, p in oracle.named_parameters()}
    return out.loss.item(), grads


@pytest.fixture(scope="module")
def w2_model():
    return converted("llama", "w2")


@pytest.mark.parametrize("coordinates, factor, grad_accum", [("real", 1.0, 2), ("complex", 2.0, 1)])
def test_sgd_update_equals_official_real_update(w2_model, coordinates, factor, grad_accum):
    """real: dU, dW = to_widely_linear(-lr dL/dA_q), exactly the official SGD step on A mapped to complex.
    complex: per-coordinate SGD on (Re, Im) of U, W equals the official update with lr doubled (R R^T = 2 I).
    The real case accumulates 2 micro-batches: the oracle's loss is the token mean of the whole batch. The train
    step of the harness (fairy2i_jax.training.step) then gets a non-finite gradient and skips its update."""
    batch = random_batch(4, 12, 256, seed=1)
    ref_loss, g = _torch_real_grads(w2_model, batch)
    h = harness(w2_model, optimizer("sgd", LR, coordinates), batch["input_ids"].shape, grad_accum=grad_accum)
    before = host(h.state.params)
    metrics = h.run(batch)
    after = host(h.state.params)
    assert bool(metrics["finite"]) and int(h.state.step) == 1
    np.testing.assert_allclose(float(metrics["loss"]), ref_loss, rtol=1e-5)
    checked = 0
    for i in range(2):
        for mod in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
            name = f"model.layers.{i}.{mod}"
            want_u, want_w = to_widely_linear(-factor * LR * g[name + ".weight"])
            node_b, node_a = before["layers"][i], after["layers"][i]
            for part in mod.split("."):
                node_b, node_a = node_b[part], node_a[part]
            for key, want in (("U", want_u), ("W", want_w)):
                got = node_a[key].astype(np.complex128) - node_b[key]
                np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4 * np.abs(want).max(), err_msg=name)
                checked += 1
    want_u, _ = to_widely_linear(-factor * LR * g["lm_head.weight"])
    np.testing.assert_allclose(after["lm_head"]["U"] - before["lm_head"]["U"], want_u, rtol=2e-3,
                               atol=2e-4 * np.abs(want_u).max())
    # real params get the plain SGD step in both coordinate systems
    d_embed = after["embed_tokens"]["embedding"] - before["embed_tokens"]["embedding"]
    np.testing.assert_allclose(d_embed, -LR * g["model.embed_tokens.weight"], rtol=2e-3, atol=1e-7)
    assert checked == 12

    # a non-finite gradient (an inf planted in a norm weight) skips the update and names the first bad leaf:
    # the inf reaches the loss and, backwards, every gradient upstream of layer 1, so it is the embedding table
    params = h.state.params
    params["layers"][1]["post_attention_layernorm"]["weight"] = (
        params["layers"][1]["post_attention_layernorm"]["weight"].at[3].set(jnp.inf))
    before = host(params)
    metrics = h.run(batch)
    assert not bool(metrics["finite"]) and int(h.state.step) == 1
    assert h.layout.paths[int(metrics["bad_leaf"])] == "embed_tokens.embedding"
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(host(h.state.params))):
        np.testing.assert_array_equal(x, y)


# -- the coordinate maps on a hand-made param tree ----------------------------------------------------------------

MASTERS = frozenset({("lin",)})


def _params(rng):
    """One converted linear ``lin`` (masters of a random real [4, 6] matrix, a bias) and a real norm weight."""
    U, W = to_widely_linear(jnp.asarray(rng.standard_normal((4, 6)), jnp.float32))
    return {"lin": {"U": U, "W": W, "bias": jnp.asarray(rng.standard_normal(4), jnp.float32)},
            "norm": {"weight": jnp.asarray(rng.standard_normal(6), jnp.float32)}}


def _loss(C):
    """``L = sum(C * A) + 2 sum(bias) + sum(norm^2)`` with ``A`` the recomposed real matrix: ``dL/dA = C``."""
    return lambda p: (jnp.sum(C * from_widely_linear(p["lin"]["U"], p["lin"]["W"])) + 2 * jnp.sum(p["lin"]["bias"])
                      + jnp.sum(p["norm"]["weight"] ** 2))


def test_real_coordinates_give_the_official_gradient_and_update():
    rng = np.random.default_rng(0)
    params, C = _params(rng), rng.standard_normal((4, 6)).astype(np.float32)
    g = grads_to_opt(jax.grad(_loss(C))(params), MASTERS, "real")
    assert set(g["lin"]) == {"A", "bias"} and g["lin"]["A"].dtype == jnp.float32
    np.testing.assert_allclose(g["lin"]["A"], C, rtol=1e-5, atol=1e-6)  # G = dL/dA, not a Wirtinger factor off
    np.testing.assert_allclose(g["lin"]["bias"], np.full(4, 2.0), rtol=1e-6)
    np.testing.assert_allclose(g["norm"]["weight"], 2 * params["norm"]["weight"], rtol=1e-6)
    A = params_to_opt(params, MASTERS, "real")["lin"]["A"]
    np.testing.assert_allclose(A, from_widely_linear(params["lin"]["U"], params["lin"]["W"]), rtol=1e-6)
    dA = rng.standard_normal((4, 6)).astype(np.float32)
    updates = {"lin": {"A": jnp.asarray(dA), "bias": jnp.ones(4)}, "norm": {"weight": jnp.ones(6)}}
    deltas = updates_from_opt(updates, params, MASTERS, "real")
    assert deltas["lin"]["U"].dtype == jnp.complex64 and deltas["lin"]["U"].shape == (2, 3)
    new_u, new_w = params["lin"]["U"] + deltas["lin"]["U"], params["lin"]["W"] + deltas["lin"]["W"]
    np.testing.assert_allclose(from_widely_linear(new_u, new_w), A + dA, rtol=1e-5, atol=1e-6)


def test_complex_coordinates_are_the_real_planes_of_u_and_w():
    """The gradient of each master is ``(dL/dRe, dL/dIm)`` of its planes (JAX's gradient of a complex leaf is the
    conjugate, ``Re g - i Im g``): checked against JAX gradients of the loss as a function of the four planes."""
    rng = np.random.default_rng(1)
    params, C = _params(rng), rng.standard_normal((4, 6)).astype(np.float32)
    g = grads_to_opt(jax.grad(_loss(C))(params), MASTERS, "complex")
    u, w = params["lin"]["U"], params["lin"]["W"]

    def of_planes(u_re, u_im, w_re, w_im):
        lin = dict(params["lin"], U=jax.lax.complex(u_re, u_im), W=jax.lax.complex(w_re, w_im))
        return _loss(C)(dict(params, lin=lin))

    want = jax.grad(of_planes, argnums=(0, 1, 2, 3))(jnp.real(u), jnp.imag(u), jnp.real(w), jnp.imag(w))
    assert g["lin"]["U"].shape == (2, 2, 3)
    np.testing.assert_allclose(g["lin"]["U"], np.stack(want[:2]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g["lin"]["W"], np.stack(want[2:]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(params_to_opt(params, MASTERS, "complex")["lin"]["W"], np.stack([w.real, w.imag]))
    planes = jnp.asarray(rng.standard_normal((2, 2, 3)), jnp.float32)
    updates = {"lin": {"U": planes, "W": planes, "bias": jnp.ones(4)}, "norm": {"weight": jnp.ones(6)}}
    deltas = updates_from_opt(updates, params, MASTERS, "complex")
    np.testing.assert_array_equal(deltas["lin"]["U"], jax.lax.complex(planes[0], planes[1]))


def test_optimizer_space_names_and_master_nodes():
    names = {"lin": {"U": Axes(("mlp", "embed")), "W": Axes(("mlp", "embed")), "bias": Axes(("mlp",))}}
    assert opt_space_names(names, MASTERS, "real") == {"lin": {"A": Axes(("mlp", "embed")), "bias": Axes(("mlp",))}}
    assert opt_space_names(names, MASTERS, "complex")["lin"]["U"] == Axes((None, "mlp", "embed"))
    config = ModelConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                         num_kv_heads=1)
    wl = LinearSpec("widely_linear")
    model = abstract_model(config, {"model.layers.1.mlp.up_proj": wl, "lm_head": wl})
    assert master_nodes(model) == {("layers", "1", "mlp", "up_proj"), ("lm_head",)}


def test_adamw_with_clipping_and_decay_equals_torch():
    """clip_by_global_norm -> Adam (bias-corrected, eps outside the root) -> decoupled decay -> lr, three steps,
    against torch's clip_grad_norm_ + AdamW on the same gradients."""
    rng = np.random.default_rng(2)
    p0, grads = rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal((3, 5, 3)).astype(np.float32)
    opt = optimizer("adamw", 1e-2, clip_norm=0.5, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    tx, schedule = make_optimizer(opt, 10)
    assert float(schedule(0)) == pytest.approx(1e-2)
    params = {"w": jnp.asarray(p0)}
    state = tx.init(params)
    theirs = torch.nn.Parameter(torch.tensor(p0))
    torch_opt = torch.optim.AdamW([theirs], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for g in grads:
        updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
        theirs.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_([theirs], 0.5)
        torch_opt.step()
    np.testing.assert_allclose(params["w"], theirs.detach().numpy(), rtol=1e-5, atol=1e-7)


# -- parameter groups ---------------------------------------------------------------------------------------------


def _flat_groups(tree) -> dict[str, str]:
    return {".".join(str(getattr(k, "key", k)) for k in path): g
            for path, g in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_param_groups_follow_the_module_types():
    """Embedding table, every RMSNorm weight, the untied head, everything else ``linear``; the optimizer-space
    leaves (``A``, planes) take their linear's group; a tied head has no param of its own."""
    config = ModelConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                         num_kv_heads=1, tie_word_embeddings=False)
    wl = LinearSpec("widely_linear")
    layout = ParamLayout(abstract_model(config, {"model.layers.1.mlp.up_proj": wl, "lm_head": wl}))
    groups = _flat_groups(layout.groups)
    assert groups["embed_tokens.embedding"] == "embed" and groups["norm.weight"] == "norm"
    assert groups["layers.0.input_layernorm.weight"] == groups["layers.1.post_attention_layernorm.weight"] == "norm"
    assert groups["lm_head.U"] == groups["lm_head.W"] == "head"
    assert groups["layers.1.mlp.up_proj.U"] == groups["layers.0.self_attn.q_proj.kernel"] == "linear"
    assert sorted(set(groups.values())) == ["embed", "head", "linear", "norm"]
    assert _flat_groups(layout.opt_groups("real"))["lm_head.A"] == "head"
    assert {k: v for k, v in _flat_groups(layout.opt_groups("complex")).items() if k.startswith("lm_head")} == \
        {"lm_head.U": "head", "lm_head.W": "head"}
    tied = ParamLayout(abstract_model(dataclasses.replace(config, tie_word_embeddings=True, scan_layers=True)))
    assert "head" not in _flat_groups(tied.groups).values()
    assert _flat_groups(tied.groups)["layers.input_layernorm.weight"] == "norm"


GROUPS = {"embed": {"embedding": "embed"}, "norm": {"weight": "norm"}, "head": {"A": "head"},
          "lin": {"A": "linear", "bias": "linear"}}


def _group_params(rng):
    shapes = {"embed": {"embedding": (6, 4)}, "norm": {"weight": (4,)}, "head": {"A": (6, 4)},
              "lin": {"A": (4, 4), "bias": (4,)}}
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def _updates(tx, params, grads):
    """The update of each of ``grads`` in turn (the params moved by each)."""
    state, out = tx.init(params), []
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        out.append(updates)
    return out


def _grads(rng, params, n=3):
    return [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params) for _ in range(n)]


def test_default_groups_leave_the_optimizer_unchanged():
    """With the default groups, with or without the group tree, the chain is the one of before (clip -> Adam ->
    decay -> lr), the same state layout and the same updates bit for bit over three steps."""
    rng = np.random.default_rng(3)
    params = _group_params(rng)
    grads = _grads(rng, params)
    opt = optimizer("adamw", 1e-2, clip_norm=0.5, weight_decay=0.1)
    before = optax.chain(optax.clip_by_global_norm(0.5), optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps),
                         optax.add_decayed_weights(0.1), optax.scale_by_learning_rate(make_schedule(opt, 10)))
    want = _updates(before, params, grads)
    for tx in (make_optimizer(opt, 10)[0], make_optimizer(opt, 10, GROUPS)[0]):
        assert jax.tree.structure(tx.init(params)) == jax.tree.structure(before.init(params))
        for got, ref in zip(_updates(tx, params, grads), want):
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
                np.testing.assert_array_equal(a, b)


def test_group_scales_and_no_decay():
    """First AdamW step (clipping and decay on): embed scale 0 gives a zero update (frozen exactly, also after
    three steps), norm scale 0.5 exactly half the default update, ``no_decay: [head]`` the head's update without
    the decay term, the other groups unchanged; a non-default section needs the group tree."""
    rng = np.random.default_rng(4)
    params = _group_params(rng)
    grads = _grads(rng, params)
    base = optimizer("adamw", 1e-2, clip_norm=0.5, weight_decay=0.1)
    grouped = dataclasses.replace(base, groups=GroupsSection(embed_lr_scale=0.0, norm_lr_scale=0.5,
                                                             no_decay=("head",)))
    (ref,) = _updates(make_optimizer(base, 10)[0], params, grads[:1])
    (no_wd,) = _updates(make_optimizer(dataclasses.replace(base, weight_decay=0.0), 10)[0], params, grads[:1])
    got = _updates(make_optimizer(grouped, 10, GROUPS)[0], params, grads)
    np.testing.assert_array_equal(got[0]["embed"]["embedding"], np.zeros((6, 4)))
    np.testing.assert_array_equal(got[0]["norm"]["weight"], 0.5 * ref["norm"]["weight"])
    np.testing.assert_array_equal(got[0]["head"]["A"], no_wd["head"]["A"])
    assert not np.array_equal(no_wd["head"]["A"], ref["head"]["A"])
    for key in ("A", "bias"):
        np.testing.assert_array_equal(got[0]["lin"][key], ref["lin"][key])
    moved = params
    for updates in got:
        moved = optax.apply_updates(moved, updates)
    np.testing.assert_array_equal(moved["embed"]["embedding"], params["embed"]["embedding"])
    with pytest.raises(ValueError, match="optimizer.groups is set"):
        make_optimizer(grouped, 10)


def test_group_scales_in_the_train_step(w2_model):
    """A W2 train step (real coordinates, AdamW lr 1e-3, no clipping): embed scale 0 leaves the embedding table
    exactly as it was, norm scale 0.5 moves every norm weight by 0.5 lr (the first Adam step is lr * g / (|g| +
    eps)), the linears' real matrices A = R(U, W) move by lr."""
    lr = 1e-3
    opt = optimizer("adamw", lr, groups=GroupsSection(embed_lr_scale=0.0, norm_lr_scale=0.5))
    batch = random_batch(4, 12, 256, seed=6)
    h = harness(w2_model, opt, batch["input_ids"].shape)
    before = host(h.state.params)
    h.run(batch)
    after = host(h.state.params)
    np.testing.assert_array_equal(after["embed_tokens"]["embedding"], before["embed_tokens"]["embedding"])
    for i in range(2):
        d = after["layers"][i]["input_layernorm"]["weight"] - before["layers"][i]["input_layernorm"]["weight"]
        np.testing.assert_allclose(np.abs(d), 0.5 * lr, rtol=2e-3)
    lin = lambda p: from_widely_linear(p["U"], p["W"])
    down_b, down_a = before["layers"][0]["mlp"]["down_proj"], after["layers"][0]["mlp"]["down_proj"]
    assert np.median(np.abs(np.asarray(lin(down_a)) - np.asarray(lin(down_b)))) == pytest.approx(lr, rel=1e-2)
