"""fairy2i_jax.training.state: TrainState as a pytree and its checkpoint dict, and the shardings of a W2 model's
train state on an 8-device (data 2, fsdp 2, tensor 2) mesh from the logical axis rules (abstract params, nothing
allocated)."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from fairy2i_jax.convert import resolve_plan
from fairy2i_jax.models.config import ModelConfig
from fairy2i_jax.models.llama import abstract_model
from fairy2i_jax.sharding import make_mesh
from fairy2i_jax.training.optim import make_optimizer
from fairy2i_jax.training.state import ParamLayout, TrainState, abstract_state, param_count, state_shardings
from train_helpers import optimizer

CONFIG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                     num_kv_heads=2, scan_layers=True)


def test_train_state_is_a_pytree_and_round_trips_through_its_dict():
    state = TrainState(params={"w": jnp.ones(3)}, opt_state=(jnp.zeros(2),), step=jnp.int32(4),
                       rng=jax.random.key_data(jax.random.key(0)))
    as_dict = state.as_dict()
    assert list(as_dict) == ["params", "opt_state", "step", "rng"] and as_dict["params"] is state.params
    back = TrainState.from_dict(as_dict)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    assert all(a is b for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)))
    bumped = jax.tree.map(lambda x: x + 1, state)
    assert isinstance(bumped, TrainState) and int(bumped.step) == 5 and len(jax.tree.leaves(state)) == 4


@pytest.mark.parametrize("coordinates", ["real", "complex"])
def test_state_shardings_follow_the_logical_rules(coordinates):
    real = abstract_model(CONFIG)
    model = abstract_model(CONFIG, resolve_plan(real, "w2"))
    layout = ParamLayout(model)
    assert param_count(layout.param_shapes) == param_count(ParamLayout(real).param_shapes)  # complex counts 2
    tx, _ = make_optimizer(optimizer("adamw", 1e-3, coordinates, clip_norm=1.0), 10)
    mesh = make_mesh(2, 2, 2)
    shardings = state_shardings(layout, tx, coordinates, mesh)
    params = shardings.params
    # U of up_proj [layers, mlp/2, embed/2] = [2, 16, 8]: mlp over tensor, embed over fsdp (ZeRO-3)
    assert params["layers"]["mlp"]["up_proj"]["U"].spec == P(None, "tensor", "fsdp")
    assert params["embed_tokens"]["embedding"].spec == P("tensor", "fsdp")  # vocab, embed
    assert params["layers"]["self_attn"]["o_proj"]["W"].spec == P(None, "fsdp", "tensor")  # embed, heads
    assert params["norm"]["weight"].spec == P(None)
    assert shardings.step.spec == shardings.rng.spec == P()
    adam = shardings.opt_state[1]  # chain(clip, adam, lr): ScaleByAdamState(count, mu, nu)
    assert adam.count.spec == P()
    up = adam.mu["layers"]["mlp"]["up_proj"]
    if coordinates == "real":  # one real A [2, 32, 16] per linear, sharded like its U
        assert set(up) == {"A"} and up["A"].spec == P(None, "tensor", "fsdp")
    else:  # the (Re, Im) planes of U and W: an unsharded leading axis
        assert set(up) == {"U", "W"} and up["U"].spec == P(None, None, "tensor", "fsdp")
    target = abstract_state(layout, tx, coordinates, shardings)
    leaf = target.params["layers"]["mlp"]["up_proj"]["U"]
    assert (leaf.shape, leaf.dtype) == ((2, 16, 8), jnp.complex64)
    assert leaf.sharding == params["layers"]["mlp"]["up_proj"]["U"]
    assert target.step.shape == () and target.step.dtype == jnp.int32
