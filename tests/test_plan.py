"""The memory plan: its state rows equal the bytes a placed train state holds on a device (fsdp 8 on the fake
CPU devices), the Llama-2-7B figures follow from the architecture by hand, the activation formula by hand, and
the command line."""

import jax

from fairy2i_jax.sharding import make_mesh
from fairy2i_jax.training import plan, setup
from fairy2i_jax.training.config import load_train_config
from fairy2i_jax.training.loop import Trainer
from fairy2i_jax.training.state import init_state

DEBUG, LLAMA = "configs/debug.yaml", "configs/llama2_7b_w2.yaml"


def _device0_bytes(tree, keep=lambda leaf: True) -> int:
    dev = jax.devices()[0]
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) if keep(leaf) for s in leaf.addressable_shards
               if s.device == dev)


def test_state_rows_equal_the_placed_state_on_fsdp_8():
    cfg = load_train_config(DEBUG, ["mesh.data=1", "mesh.fsdp=8", "data.global_batch=16", "train.grad_accum=2"])
    p = plan.plan_memory(cfg, 8)
    assert p.mesh == {"data": 1, "fsdp": 8, "tensor": 1} and p.rows_per_device == 1  # 16 / 2 / 8
    mesh = make_mesh(1, 8, 1)
    model = setup.convert_for_training(cfg, setup.load_real_model(cfg, mesh))
    trainer = Trainer.for_model(model, cfg, mesh)
    state, _ = init_state(trainer.layout, model, trainer.tx, "real", 0, mesh)
    is_complex = lambda x: jax.numpy.iscomplexobj(x)
    assert p.per_device["complex masters"] == _device0_bytes(state.params, is_complex) > 0
    assert p.per_device["params"] == _device0_bytes(state.params, lambda x: not is_complex(x))
    assert p.per_device["optimizer moments"] == _device0_bytes(state.opt_state)
    # 1/8 of every sharded leaf on each device, plus the replicated ones (norms, step counters): about 1/8
    for row, tree, keep in (("complex masters", state.params, is_complex), ("optimizer moments", state.opt_state,
                                                                           lambda x: True)):
        leaves = [x for x in jax.tree.leaves(tree) if keep(x)]
        replicated = sum(x.nbytes for x in leaves if x.sharding.is_fully_replicated)
        assert p.per_device[row] == (p.unsharded[row] - replicated) // 8 + replicated
        assert replicated < 0.003 * p.unsharded[row]


def test_llama2_7b_w2_figures_by_hand():
    cfg = load_train_config(LLAMA, ["model.path=arch:llama2-7b"])
    p = plan.plan_memory(cfg, 8)
    L, D, F, V = 32, 4096, 11008, 32000
    linear = L * (4 * D * D + 3 * D * F) + V * D  # every linear and the head are W2: complex masters
    real = V * D + (2 * L + 1) * D  # the embedding table and the norms stay real float32
    assert p.unsharded["complex masters"] == 4 * linear and p.unsharded["params"] == 4 * real
    assert 0 <= p.unsharded["optimizer moments"] - 8 * (linear + real) < 64  # mu, nu (+ step counters)
    assert p.unsharded["gradients"] == 4 * linear + 4 * real + 4 * linear
    assert p.unsharded["effective weights"] == 2 * linear
    assert p.per_device["complex masters"] == 4 * linear // 8
    assert p.rows_per_device == 512 // 16 // 8 and p.remat == "full"
    assert p.fits(plan.device_named("h100")) and not p.fits(plan.device_named("v5e"))


def test_activation_formula_by_hand():
    from fairy2i_jax.sources import tiny_config

    mc = tiny_config(compute_dtype="bfloat16")  # L 2, D 64, F 128, H 4, K 2, d 16, V 260
    b, t, a = 2, 8, 2
    residual = b * t * 64 * a
    interior = b * t * a * (2 * 64 + 2 * (4 + 4) * 16 + 4 * 16 + 2 * 64 + 3 * 128) + b * 4 * t * t * (4 + a)
    scores, head = b * 4 * t * t * 4, b * t * 260 * (a + 8)
    got = {r: plan.activation_bytes(mc, rows=b, seq_len=t, remat=r) for r in ("none", "full")}
    assert got["none"] == 2 * (residual + interior) + scores + head
    assert got["full"] == 2 * residual + interior + scores + head
    # tensor 2 halves heads, kv heads, ffn and vocab; seq sharding over 2 halves the residual stream only
    halved = plan.activation_bytes(mc, rows=b, seq_len=t, tensor=2, seq_shards=2, remat="full")
    interior2 = b * t * a * (2 * 64 + 2 * (2 + 2) * 16 + 2 * 16 + 2 * 64 + 3 * 64) + b * 2 * t * t * (4 + a)
    assert halved == 2 * residual // 2 + interior2 + b * 2 * t * t * 4 + b * t * 130 * (a + 8)
    assert got["full"] < plan.activation_bytes(mc, rows=b, seq_len=t, remat="dots_with_no_batch_dims") < got["none"]


def test_command_line(capsys):
    assert plan.main(["--config", LLAMA, "--devices", "8", "--device", "h100", "--device", "v5e",
                      "model.path=arch:llama2-7b"]) == 0
    out = capsys.readouterr().out
    assert "mesh data 1 x fsdp 8 x tensor 1 (8 devices)" in out and "micro-batch 4 x 2048" in out
    assert "H100 80 GB" in out and "fits" in out and "TPU v5e 16 GiB" in out and "does NOT fit" in out
    assert plan.main(["--config", LLAMA, "--devices", "0", "model.path=arch:llama2-7b"]) == 2
    assert "--devices must be >= 1" in capsys.readouterr().err
    assert plan.main(["--config", LLAMA, "--devices", "6", "model.path=arch:llama2-7b", "mesh.data=-1",
                      "mesh.fsdp=4"]) == 2
    assert "6 devices are not a multiple of 4" in capsys.readouterr().err
    assert plan.main(["--config", LLAMA, "--devices", "8"]) == 2  # a hub id, offline
    err = capsys.readouterr().err
    assert "model.path=arch:NAME" in err and err.count("\n") == 1
