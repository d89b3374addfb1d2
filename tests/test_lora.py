"""LoRA adapters: step 0 equals the base model, merge equals the adapted model."""

from __future__ import annotations

import zlib

import jax
import numpy as np
import pytest

from tljax import tree
from tljax.models import classifier, lora

VIT = dict(num_classes=3, patch_size=(4, 4), width=16, depth=2, mlp_dim=32, num_heads=2,
           head_zeroinit=False)
BERT = dict(num_classes=3, vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
            intermediate_size=32, max_position_embeddings=16, dropout=0.0, attention_dropout=0.0,
            head_zeroinit=False)


def _case(family):
    if family == "vit":
        return classifier("vit", **VIT), jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 50)
    return classifier("bert", **BERT), {"input_ids": ids}


def _perturb_b(variables, scale=0.1):
    """Non-zero B (as after training), so the adapters change the output.

    Keyed by a checksum of the name: Python's str hash differs from process to process."""
    rng = jax.random.PRNGKey(7)
    return tree.map_with_names(
        lambda n, x: jax.random.normal(jax.random.fold_in(rng, zlib.crc32(n.encode())), x.shape)
        * scale if n.endswith("lora_b") else x, variables)


@pytest.mark.parametrize("family", ["vit", "bert"])
def test_init_equals_base_and_merge_equals_adapted(family):
    base, x = _case(family)
    model = lora.LoRA(base, rank=4, alpha=8.0)
    variables = model.init({"params": jax.random.PRNGKey(0)}, x)
    plain = {"params": {k: v for k, v in variables["params"].items() if k != "lora"}}
    # B = 0: the adapted model is exactly the dense one at initialisation.
    np.testing.assert_array_equal(model.apply(variables, x), base.apply(plain, x))
    np.testing.assert_array_equal(base.apply(model.merge(variables), x), base.apply(plain, x))
    trained = _perturb_b(variables)
    adapted = model.apply(trained, x)
    assert np.abs(adapted - base.apply(plain, x)).max() > 1e-3  # the adapters do something
    merged = model.merge(trained)
    assert set(tree.flatten(merged)) == set(tree.flatten(plain))  # the plain model's tree
    np.testing.assert_allclose(base.apply(merged, x), adapted, rtol=1e-5, atol=1e-5)


def test_adapters_names_shapes_and_default_targets():
    base, x = _case("vit")
    model = lora.LoRA(base, rank=3, alpha=6.0)
    params = model.init({"params": jax.random.PRNGKey(0)}, x)["params"]
    flat = tree.flatten(params)
    # 2 blocks x (q, k, v, out, mlp0, mlp1) adapters.
    assert lora.count_adapters(params)[0] == 12
    prefix = "lora/Transformer/encoderblock_0/MultiHeadDotProductAttention_0"
    assert flat[f"{prefix}/query/lora_a"].shape == (16, 3)  # d_in = 16
    assert flat[f"{prefix}/query/lora_b"].shape == (3, 16)  # d_out = heads * head_dim
    assert flat[f"{prefix}/out/lora_a"].shape == (16, 3)  # (heads, head_dim) flattened
    assert not np.any(flat[f"{prefix}/out/lora_b"])


def test_only_selected_targets_and_gradients_reach_adapters():
    base, x = _case("vit")
    model = lora.LoRA(base, rank=2, alpha=2.0, targets=[r"/query/kernel$"])
    variables = _perturb_b(model.init({"params": jax.random.PRNGKey(0)}, x))
    assert lora.count_adapters(variables["params"])[0] == 2
    grads = tree.flatten(jax.grad(lambda v: model.apply(v, x).sum())(variables))
    assert all(np.any(g) for n, g in grads.items() if "lora_" in n)


def test_non_dense_target_is_an_error():
    base, x = _case("vit")
    with pytest.raises(ValueError, match="Dense, DenseGeneral, Conv or DepthwiseConv kernels"):
        lora.LoRA(base, targets=[r"encoder_norm/scale$"]).init({"params": jax.random.PRNGKey(0)},
                                                               x)


@pytest.mark.parametrize("family,kwargs", [
    ("efficientnet_lite", dict(variant="lite0", dropout=0.0, drop_connect_rate=0.0)),
    ("resnet", dict(depth=18)),
])
def test_convolution_adapters(family, kwargs):
    """1x1, k x k (strided) and depthwise convolutions: B = 0 equals the base model, a merged
    adapter equals the adapted model (so the factorised conv(x, A) B is the rank-r kernel)."""
    base = classifier(family, 3, head_zeroinit=False, **kwargs)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    model = lora.LoRA(base, rank=2, alpha=4.0)
    variables = model.init({"params": jax.random.PRNGKey(0)}, x)
    flat = tree.flatten(variables["params"]["lora"])
    plain = {**variables, "params": {k: v for k, v in variables["params"].items() if k != "lora"}}
    np.testing.assert_array_equal(model.apply(variables, x), base.apply(plain, x))
    if family == "efficientnet_lite":
        assert flat["block1/expand_conv/lora_a"].shape == (16, 2)  # 1x1: d_in = Cin
        assert flat["block1/depthwise_conv/lora_a"].shape == (9, 2)  # 3x3x1
        assert flat["block1/depthwise_conv/lora_b"].shape == (2, 96)
    else:
        assert flat["layer2_0/conv1/lora_a"].shape == (3 * 3 * 64, 2)  # strided 3x3
    trained = _perturb_b(variables)
    adapted = model.apply(trained, x)
    # An untrained Lite0's logits are ~4e-4 and ResNet-18's ~0.8: compare on their own scale.
    scale = np.abs(adapted).max()
    assert np.abs(adapted - base.apply(plain, x)).max() > 0.05 * scale
    np.testing.assert_allclose(base.apply(model.merge(trained), x), adapted, rtol=0,
                               atol=1e-4 * scale)  # measured: <= 3e-6 * scale
    grads = tree.flatten(jax.grad(lambda v: model.apply(v, x).sum())(trained)["params"]["lora"])
    assert all(np.any(g) for g in grads.values())
