"""tljax.models.layers: the CPU-friendly convolutions and matmuls equal the Flax layers they
replace."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax.models import layers
from tljax.models.layers import DepthwiseConv, PointwiseConv


def _value_and_grads(module: nn.Module, variables: dict, x: jnp.ndarray, g: jnp.ndarray):
    f = lambda v, x: jnp.sum(module.apply(v, x) * g)  # noqa: E731
    return module.apply(variables, x), jax.grad(f, argnums=(0, 1))(variables, x)


def _assert_same_function(ours: nn.Module, theirs: nn.Module, variables: dict,
                          x: jnp.ndarray, g: jnp.ndarray) -> None:
    """`ours` takes `theirs`'s parameter tree (so checkpoints and LoRA targets are unchanged)
    and gives its values, and gradients of <output, g>, to float32 rounding."""
    assert (jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(1), x))
            == jax.tree.map(jnp.shape, variables))
    ref_y, ref_grads = _value_and_grads(theirs, variables, x, g)
    y, grads = _value_and_grads(ours, variables, x, g)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    for mine, reference in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(mine, reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("use_bias", [False, True])
def test_pointwise_conv_equals_flax_conv(use_bias):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 6))
    conv = nn.Conv(4, (1, 1), padding="SAME", use_bias=use_bias)
    variables = conv.init(jax.random.PRNGKey(1), x)
    if use_bias:
        variables = jax.tree.map(lambda p: p + 0.5, variables)
    g = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 7, 4))
    _assert_same_function(PointwiseConv(4, (1, 1), use_bias=use_bias), conv, variables, x, g)


def test_pointwise_conv_rejects_other_shapes():
    x = jnp.zeros((1, 4, 4, 3))
    with pytest.raises(ValueError, match="1 x 1, stride 1"):
        PointwiseConv(4, (3, 3)).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="1 x 1, stride 1"):
        PointwiseConv(4, (1, 1), strides=2).init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize("batch", [2, 10, 12])
@pytest.mark.parametrize("kernel,stride,size", [(3, 1, 8), (5, 2, 9), (3, 2, 8)])
def test_depthwise_conv_equals_grouped_conv(kernel, stride, size, batch):
    """Batch 12 takes the CPU kernel-gradient loop (3 steps of 4 images), 2 and 10 do not."""
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 6))
    depthwise = DepthwiseConv(kernel, stride)
    variables = depthwise.init(jax.random.PRNGKey(1), x)
    grouped = nn.Conv(6, (kernel, kernel), strides=stride, padding="SAME", use_bias=False,
                      feature_group_count=6)
    g = jax.random.normal(jax.random.PRNGKey(2), depthwise.apply(variables, x).shape)
    ref_y, ref_grads = _value_and_grads(grouped, variables, x, g)
    y, grads = _value_and_grads(depthwise, variables, x, g)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)
    backward = jax.jit(jax.grad(lambda v: jnp.sum(depthwise.apply(v, x) * g))).lower(variables)
    uses_loop = "while" in backward.as_text()
    assert uses_loop == (batch % layers.KERNEL_GRADIENT_IMAGES == 0 and jax.device_count() == 1
                         and batch > layers.KERNEL_GRADIENT_IMAGES
                         and jax.default_backend() == "cpu")


@pytest.mark.parametrize("features, axis", [((3, 4), -1), (5, (-2, -1)), (6, -1)])
def test_matmul_dot_general_equals_dense_general(features, axis):
    """As `DenseGeneral(dot_general=...)`: the query/key/value (D -> (H, Dh)), out ((H, Dh) ->
    D) and plain Dense contractions give Flax's values and gradients, and the 2-D matmul is
    what XLA gets (no dot with more than two operand axes in the jaxpr)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 3, 4) if axis != -1 else (2, 7, 12))
    theirs = nn.DenseGeneral(features, axis=axis)
    ours = nn.DenseGeneral(features, axis=axis, dot_general=layers.matmul_dot_general)
    variables = jax.tree.map(lambda p: p + 0.25, theirs.init(jax.random.PRNGKey(1), x))
    g = jax.random.normal(jax.random.PRNGKey(2), theirs.apply(variables, x).shape)
    _assert_same_function(ours, theirs, variables, x, g)
    jaxpr = jax.make_jaxpr(lambda v: ours.apply(v, x))(variables)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dots and all(v.aval.ndim == 2 for e in dots for v in e.invars)


def test_matmul_dot_general_leaves_other_contractions_to_lax():
    """Batch dimensions, or contractions that are not trailing x leading, are not a Dense's:
    they go to `lax.dot_general` unchanged."""
    a = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4))
    b = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 5))
    for numbers in [(((2,), (1,)), ((0,), (0,))), (((1,), (0,)), ((), ()))]:
        rhs = b if numbers[1][0] else b[0, :3]
        np.testing.assert_array_equal(layers.matmul_dot_general(a, rhs, numbers),
                                      jax.lax.dot_general(a, rhs, numbers))


def test_matmul_dot_general_switched_off_is_lax(monkeypatch):
    """`DENSE_AS_2D_MATMUL = False` (the benchmarks' N-D baseline) gives lax's own dot: the
    jaxpr's dot keeps the 3-D operand."""
    monkeypatch.setattr(layers, "DENSE_AS_2D_MATMUL", False)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 12))
    dense = nn.DenseGeneral((3, 4), dot_general=layers.matmul_dot_general)
    variables = dense.init(jax.random.PRNGKey(1), x)
    np.testing.assert_array_equal(dense.apply(variables, x),
                                  nn.DenseGeneral((3, 4)).apply(variables, x))
    jaxpr = jax.make_jaxpr(lambda v: dense.apply(v, x))(variables)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert [e.invars[0].aval.ndim for e in dots] == [3]
