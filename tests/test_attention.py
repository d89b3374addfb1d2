"""Attention implementations: fused ('xla') against the written-out reference, and Flax's layer.

Forward outputs and gradients of whole models (ViT with class token and with MAP pooling, BERT
with a padding mask) are compared between `attention='xla'` and `attention='reference'` with
the same parameters. Tolerances, relative to the output scale: float32 forward 1e-5 (the two
differ only in the order of floating-point operations; measured 2.9e-7), float32 gradients
1e-4 (measured 6.0e-5 on ViT's class token, whose gradient gathers every attention weight;
2.2e-5 with MAP pooling); bfloat16 compute 2e-2 (one bfloat16 ulp is 8e-3). On GPUs run them
with JAX_DEFAULT_MATMUL_PRECISION=highest (benchmarks/gpu.sh does): float32 matmuls may
otherwise use TF32. 'cudnn' needs an NVIDIA GPU: its parity check is in benchmarks/gpu.sh.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import tree
from tljax.models import attention as attn
from tljax.models import bert, vit

TOL_F32 = 1e-5
TOL_GRAD = 1e-4


@pytest.fixture(autouse=True)
def _xla_is_jax_nn(monkeypatch):
    """'xla' on CPU computes the reference formula (faster there); compare jax.nn's instead,
    the path 'xla' takes on other backends."""
    monkeypatch.setattr(attn, "XLA_IS_REFERENCE_ON_CPU", False)


def _max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def _tree_max_rel(a, b) -> float:
    """Largest difference over all leaves relative to the largest gradient of the leaf's kind.

    Per leaf, against the larger of its own scale and 1e-3 of the whole tree's: some
    gradients are zero in exact arithmetic (the key bias: softmax ignores a constant shift)
    and are rounding noise in both implementations.
    """
    fa, fb = tree.flatten(a), tree.flatten(b)
    assert fa.keys() == fb.keys()
    scale = max(float(np.abs(np.asarray(x)).max()) for x in fb.values())
    return max(float(np.abs(np.asarray(fa[k]) - np.asarray(fb[k])).max())
               / max(float(np.abs(np.asarray(fb[k])).max()), 1e-3 * scale) for k in fa)


def test_functional_attention_matches_reference_with_padding_mask():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 5, 3, 8)), jnp.float32) for _ in range(3))
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    ref = attn.attention(q, k, v, mask, implementation="reference")
    fused = attn.attention(q, k, v, mask, implementation="xla")
    assert _max_rel(fused, ref) < TOL_F32
    # Hand check: padded keys get no weight, so changing their values changes nothing.
    v2 = v.at[0, 3:].set(100.0)
    np.testing.assert_allclose(attn.attention(q, k, v2, mask), fused, atol=1e-6)
    # ... and one query over two keys with equal logits averages the two values.
    ones = jnp.ones((1, 1, 1, 4))
    two_v = jnp.asarray([[[[1.0] * 4]], [[[3.0] * 4]]]).reshape(1, 2, 1, 4)
    out = attn.attention(ones, jnp.ones((1, 2, 1, 4)), two_v, implementation="xla")
    np.testing.assert_allclose(out, jnp.full((1, 1, 1, 4), 2.0), atol=1e-6)


def test_xla_on_cpu_computes_the_reference_formula(monkeypatch):
    """On CPU, 'xla' takes the written-out formula (jax.nn's costs XLA:CPU layout copies);
    other backends keep jax.nn's. The fixture above turns that off for the other tests of this
    file."""
    monkeypatch.setattr(attn, "XLA_IS_REFERENCE_ON_CPU", True)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 5, 3, 8)), jnp.float32) for _ in range(3))
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    xla = jax.make_jaxpr(lambda *a: attn.attention(*a, mask, implementation="xla"))(q, k, v)
    ref = jax.make_jaxpr(lambda *a: attn.reference_attention(*a, mask))(q, k, v)
    assert (str(xla) == str(ref)) == (jax.default_backend() == "cpu")
    monkeypatch.setattr(attn, "XLA_IS_REFERENCE_ON_CPU", False)
    jax_nn = jax.make_jaxpr(lambda *a: attn.attention(*a, mask, implementation="xla"))(q, k, v)
    assert str(jax_nn) != str(ref)


def test_cudnn_shape_refusal_says_what_to_do(monkeypatch):
    """cuDNN's own shape checks (NotImplementedError while tracing) come back as a ValueError
    naming the shapes and the way out; other implementations' errors pass unchanged."""
    def refuse(*args, **kwargs):
        raise NotImplementedError("Unsupported sequence length Q 197, KV 197.")

    monkeypatch.setattr(jax.nn, "dot_product_attention", refuse)
    x = jnp.ones((2, 197, 12, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"\(2, 197, 12, 64\).*Q 197, KV 197.*attention='xla'"):
        attn.attention(x, x, x, implementation="cudnn")
    with pytest.raises(NotImplementedError):
        attn.attention(x, x, x, implementation="xla")


def test_unknown_implementation_and_cudnn_dropout_are_refused():
    x = jnp.ones((1, 2, 1, 8))
    with pytest.raises(ValueError, match="expected one of xla, cudnn, reference"):
        attn.attention(x, x, x, implementation="flash")
    with pytest.raises(ValueError, match="attention_dropout to 0"):
        attn.attention(x, x, x, implementation="cudnn", dropout=lambda p: p)
    with pytest.raises(ValueError, match="set compute_dtype='bfloat16'"):
        attn.attention(x, x, x, implementation="cudnn")


def test_layer_has_flax_parameters_initial_values_and_outputs():
    """Same names, shapes and initial values as nn.MultiHeadDotProductAttention, same output."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 16))
    init = nn.initializers.xavier_uniform()
    theirs = nn.MultiHeadDotProductAttention(num_heads=4, kernel_init=init, deterministic=True)
    ours = attn.MultiHeadDotProductAttention(num_heads=4, kernel_init=init)
    v_theirs = theirs.init(jax.random.PRNGKey(1), x, x)
    v_ours = ours.init(jax.random.PRNGKey(1), x, x)
    flat_t, flat_o = tree.flatten(v_theirs), tree.flatten(v_ours)
    assert {k: v.shape for k, v in flat_o.items()} == {k: v.shape for k, v in flat_t.items()}
    assert flat_o["params/query/kernel"].shape == (16, 4, 4)
    assert flat_o["params/out/kernel"].shape == (4, 4, 16)
    for name in flat_t:
        np.testing.assert_array_equal(flat_o[name], flat_t[name], err_msg=name)
    assert _max_rel(ours.apply(v_theirs, x, x), theirs.apply(v_theirs, x, x)) < TOL_F32


def _vit(pool_type: str, implementation: str, dtype=jnp.float32) -> vit.ViT:
    return vit.make(patch_size=(8, 8), width=32, depth=2, mlp_dim=64, num_heads=4,
                    pool_type=pool_type, attention=implementation, dtype=dtype)


@pytest.mark.parametrize("pool_type", ["tok", "map"])
def test_vit_fused_matches_reference_forward_and_gradients(pool_type):
    images = jax.random.normal(jax.random.PRNGKey(0), (3, 32, 32, 3))
    variables = _vit(pool_type, "reference").init(jax.random.PRNGKey(1), images)

    def loss(params, implementation):
        features, out = _vit(pool_type, implementation).apply({"params": params}, images)
        return jnp.sum(features**2) + jnp.mean(out["tokens"] ** 3), (features, out["tokens"])

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    (g_ref, (f_ref, t_ref)), (g_xla, (f_xla, t_xla)) = (
        grad(variables["params"], i) for i in ("reference", "xla"))
    assert _max_rel(f_xla, f_ref) < TOL_F32 and _max_rel(t_xla, t_ref) < TOL_F32
    assert _tree_max_rel(g_xla, g_ref) < TOL_GRAD
    if pool_type == "map":
        assert "MAPHead_0/MultiHeadDotProductAttention_0/out/kernel" in tree.flatten(g_xla)


def test_vit_bfloat16_fused_matches_reference():
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    variables = _vit("tok", "reference").init(jax.random.PRNGKey(1), images)
    ref, _ = _vit("tok", "reference", jnp.bfloat16).apply(variables, images)
    fused, _ = _vit("tok", "xla", jnp.bfloat16).apply(variables, images)
    assert _max_rel(fused, ref) < 2e-2


def test_bert_fused_matches_reference_with_padding_forward_and_gradients():
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 100, (3, 12)), jnp.int32)
    mask = jnp.asarray([[1] * 12, [1] * 7 + [0] * 5, [1] * 3 + [0] * 9], jnp.int32)
    inputs = {"input_ids": ids, "attention_mask": mask}
    make = lambda implementation: bert.make("tiny", vocab_size=100, pooling="mean",
                                            attention=implementation)
    variables = make("reference").init(jax.random.PRNGKey(1), inputs)

    def loss(params, implementation):
        features, out = make(implementation).apply({"params": params}, inputs)
        real = mask[..., None]
        return jnp.sum(features**2) + jnp.sum(out["tokens"] * real), (features, out["tokens"])

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    (g_ref, (f_ref, t_ref)), (g_xla, (f_xla, t_xla)) = (
        grad(variables["params"], i) for i in ("reference", "xla"))
    real = np.asarray(mask, bool)
    assert _max_rel(f_xla, f_ref) < TOL_F32
    assert _max_rel(np.asarray(t_xla)[real], np.asarray(t_ref)[real]) < TOL_F32
    assert _tree_max_rel(g_xla, g_ref) < TOL_GRAD
    # Padding does not leak: the padded tail of row 1 changes nothing of its real tokens.
    ids2 = ids.at[1, 7:].set(5)
    _, out2 = make("xla").apply(variables, {"input_ids": ids2, "attention_mask": mask})
    np.testing.assert_allclose(np.asarray(out2["tokens"])[1, :7], np.asarray(t_xla)[1, :7],
                               atol=1e-5)


def test_bert_attention_dropout_in_training_uses_probabilities():
    """Dropout on the attention probabilities: same masks whatever implementation is named."""
    ids = jnp.ones((2, 6), jnp.int32)
    inputs = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
    make = lambda implementation: bert.make("tiny", vocab_size=10, dropout=0.0,
                                            attention_dropout=0.5, attention=implementation)
    variables = make("xla").init(jax.random.PRNGKey(0), inputs)
    rngs = {"dropout": jax.random.PRNGKey(3)}
    a, _ = make("xla").apply(variables, inputs, train=True, rngs=rngs)
    b, _ = make("reference").apply(variables, inputs, train=True, rngs=rngs)
    c, _ = make("xla").apply(variables, inputs, train=False)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    with pytest.raises(ValueError, match="attention_dropout to 0"):
        make("cudnn").apply(variables, inputs, train=True, rngs=rngs)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_matches_reference_on_gpu():
    """bfloat16, ViT-B/16's shape (197 tokens, 12 heads of 64; 196 where cuDNN refuses odd
    lengths in training) and BERT's (128 with padding)."""
    rng = np.random.default_rng(0)

    def check(shape, mask):
        q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for _ in range(3))

        def loss(q, k, v, implementation):
            out = attn.attention(q, k, v, mask, implementation=implementation)
            return jnp.sum(out.astype(jnp.float32) ** 2), out

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
        (g_ref, out_ref), (g_cudnn, out_cudnn) = (grad(q, k, v, i) for i in ("reference", "cudnn"))
        assert _max_rel(out_cudnn, out_ref) < 2e-2
        for a, b in zip(g_cudnn, g_ref, strict=True):
            assert _max_rel(a, b) < 2e-2

    check((4, 196, 12, 64), None)
    try:  # ViT-B/16's 197 tokens: refused in training by some cuDNN versions, with a way out
        check((4, 197, 12, 64), None)
    except ValueError as e:
        assert "set attention='xla'" in str(e)
    lengths = np.asarray([128, 100, 37, 5])
    check((4, 128, 12, 64), jnp.asarray(np.arange(128)[None] < lengths[:, None]))
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    make = lambda i: vit.make(patch_size=(8, 8), width=128, depth=2, mlp_dim=256, num_heads=2,
                              attention=i, dtype=jnp.bfloat16)
    variables = make("reference").init(jax.random.PRNGKey(1), images)
    ref, _ = make("reference").apply(variables, images)
    fused, _ = make("cudnn").apply(variables, images)
    assert _max_rel(fused, ref) < 2e-2


def _float32_matmuls(fn, *args) -> list[str]:
    """dot_generals of a traced function that would run in float32 on half-precision data:
    mixed float32 x bfloat16 operands without a half-precision algorithm."""
    found = []

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "dot_general":
                dtypes = {str(v.aval.dtype) for v in e.invars}
                if dtypes == {"float32", "bfloat16"} and "BF16" not in str(
                        e.params.get("precision")):
                    found.append(str(e))
            for value in e.params.values():
                inner = getattr(value, "jaxpr", None)
                if inner is not None:
                    walk(inner if hasattr(inner, "eqns") else inner.jaxpr)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_bfloat16_training_has_no_float32_matmuls(implementation):
    """With bfloat16 compute every matmul of forward and backward multiplies in bfloat16
    (float32 logits and softmax included): a float32 matmul is several times slower on GPUs."""
    images = jnp.zeros((2, 32, 32, 3))
    model = _vit("tok", implementation, jnp.bfloat16)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)["params"]
    loss = lambda p: jnp.sum(model.apply({"params": p}, images, train=True)[0])
    assert _float32_matmuls(jax.grad(loss), params) == []
    ids = jnp.ones((2, 8), jnp.int32)
    inputs = {"input_ids": ids, "attention_mask": ids}
    text = bert.make("tiny", vocab_size=10, attention=implementation, dtype=jnp.bfloat16)
    text_params = jax.eval_shape(text.init, jax.random.PRNGKey(0), inputs)["params"]
    text_loss = lambda p: jnp.sum(text.apply({"params": p}, inputs, train=True,
                                             rngs={"dropout": jax.random.PRNGKey(1)})[0])
    assert _float32_matmuls(jax.grad(text_loss), text_params) == []
