"""fairy2i_jax.models.linear (Linear, LinearSpec, the linear kinds): construction rules, the forward against
``x @ A.T + b``, the straight-through gradient, tied heads and precomputed weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fairy2i_jax.models.linear import Linear, LinearSpec, PackedCodes
from fairy2i_jax.quant import QuantSpec, quantize_real_weight

def test_packed_kind_needs_phase_codes_and_is_not_trainable():
    with pytest.raises(ValueError, match="kind='packed' holds Fairy2i phase codes"):
        LinearSpec("packed")
    with pytest.raises(ValueError, match="kind='packed' holds Fairy2i phase codes"):
        LinearSpec("packed", QuantSpec("ternary"))
    spec = LinearSpec("packed", QuantSpec("complex_phase", 3))
    assert spec.phase_codes and spec.quantized and not spec.complex_masters
    layer = Linear(64, 32, spec=spec, use_bias=True, rngs=nnx.Rngs(0))
    assert layer.u_codes.get_value().shape == (3, 16, 2) and layer.u_scales.get_value().shape == (3, 2)
    assert isinstance(layer.u_codes, PackedCodes) and not isinstance(layer.u_codes, nnx.Param)
    assert set(nnx.state(layer, nnx.Param)) == {"bias"}  # the optimizer's filter never sees the codes


def test_linear_kind_rules():
    with pytest.raises(ValueError, match="needs even dims"):
        Linear(5, 4, spec=LinearSpec("widely_linear"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs quant=QuantSpec"):
        LinearSpec("qat")
    with pytest.raises(ValueError, match="unknown linear kind"):
        LinearSpec("complex")
    layer = Linear(8, 6, spec=LinearSpec("qat", QuantSpec("complex_phase", 2)), use_bias=True, rngs=nnx.Rngs(0))
    assert layer.U.get_value().dtype == jnp.complex64 and layer.U.get_value().shape == (3, 4)
    x = jax.random.normal(jax.random.key(1), (2, 8))
    weight = layer.effective_weight()
    np.testing.assert_allclose(layer(x), x @ weight.T + layer.bias.get_value(), atol=1e-6)

    # STE: for a loss linear in the weight, dL/dA does not depend on A, so the gradient reaching the complex
    # masters of the quantized layer equals that of the unquantized widely-linear layer with the same masters
    def grad_wrt_masters(module):
        graphdef, params = nnx.split(module)
        grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x))))(params)  # compiled: op by op is slower
        return np.asarray(grads["U"].get_value()), np.asarray(grads["W"].get_value())

    full = Linear(8, 6, spec=LinearSpec("widely_linear"), use_bias=True, rngs=nnx.Rngs(0))
    assert not np.array_equal(np.asarray(full.effective_weight()), np.asarray(weight))
    for got, want in zip(grad_wrt_masters(layer), grad_wrt_masters(full)):
        assert np.any(want != 0)
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_tied_heads_and_precomputed_weights():
    """A tied head owns no weight and multiplies by the embedding table it is given (widely-linear: the table
    itself; qat: its fake quantization); a precomputed weight must have the layer's [out, in] shape."""
    table = jax.random.normal(jax.random.key(0), (6, 8))
    x = jax.random.normal(jax.random.key(1), (2, 8))
    head = Linear(8, 6, spec=LinearSpec("widely_linear"), tied=True, rngs=nnx.Rngs(0))
    assert nnx.to_pure_dict(nnx.state(head, nnx.Param)) == {}
    np.testing.assert_allclose(head(x, master=table), x @ table.T, atol=1e-6)
    spec = QuantSpec("complex_phase", 2)
    qat_head = Linear(8, 6, spec=LinearSpec("qat", spec), tied=True, rngs=nnx.Rngs(0))
    quantized = quantize_real_weight(table, spec=spec)
    assert not np.allclose(quantized, table)
    np.testing.assert_allclose(qat_head(x, master=table), x @ quantized.T, atol=1e-6)
    with pytest.raises(ValueError, match="a tied head needs master="):
        head(x)
    with pytest.raises(ValueError, match="a tied output head has no bias"):
        Linear(8, 6, tied=True, use_bias=True, rngs=nnx.Rngs(0))
    layer = Linear(8, 6, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(layer(x, weight=2 * layer.kernel.get_value()), 2 * layer(x), rtol=1e-6)
    with pytest.raises(ValueError, match=r"weight of shape \(6, 6\) does not fit a linear \[out=6, in=8\]"):
        layer(x, weight=jnp.zeros((6, 6)))
