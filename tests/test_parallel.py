"""Tensor parallelism over a 'model' mesh axis (Megatron rules) on 8 simulated CPU devices.

A child process with `--xla_force_host_platform_device_count=8` trains the same ViT (8 heads, so
every head count divides the axes) with SGD from the same parameters on the same batches on
one device and on meshes (data, fsdp, model) = (2, 2, 2) and (1, 1, 8) with
`tensor_parallel('vit') + [('.*', 'fsdp')]`, through the trainer's own sharding and step
(`train.variable_shardings_of`, `train.Phases`). It also saves a checkpoint on (2, 2, 2) and
restores it on (1, 1, 8) and on one device, and compares a BERT's loss and gradients with
the BERT rules on (1, 1, 8) against one device. Tolerances (float32, SGD): losses within 1e-5 of
the single-device curve (sharded matmuls only reorder sums; measured 2.4e-7 on (2, 2, 2),
4.8e-7 on (1, 1, 8); BERT gradients 9.5e-7 against a 1e-5 bound); a restored state
equals the saved one bitwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, ml_collections, numpy as np
from tljax import freeze, sharding, train, tree
from tljax.checkpoint import RunCheckpoints
from tljax.models import classifier
from tljax.tasks.classification import softmax_xent

workdir = sys.argv[1]
assert jax.device_count() == 8
model = classifier("vit", 10, head_zeroinit=False, patch_size=(8, 8), width=64, depth=2,
                   mlp_dim=128, num_heads=8)
rng = np.random.default_rng(0)
batches = [{"image": rng.standard_normal((16, 16, 16, 3)).astype(np.float32),
            "label": rng.integers(0, 10, 16).astype(np.int32)} for _ in range(6)]
variables = jax.device_get(model.init(jax.random.PRNGKey(0), batches[0]["image"][:1]))
rules = sharding.tensor_parallel("vit") + [(".*", "fsdp")]
config = ml_collections.ConfigDict(dict(
    optim=dict(name="sgd", momentum=0.9), lr=0.05, grad_clip_norm=1.0, freeze="full",
    schedule=None, lr_schedule=dict(decay_type="constant", linear_end=0.0),
    sharding_rules=rules))
loss_fn = lambda logits, batch: softmax_xent(logits, batch["label"]).mean()
MESHES = {"single": [("data", 1), ("fsdp", 1), ("model", 1)],
          "2x2x2": [("data", 2), ("fsdp", 2), ("model", 2)],
          "1x1x8": [("data", 1), ("fsdp", 1), ("model", 8)]}


def setup(name):
    axes = MESHES[name]
    mesh = sharding.make_mesh(axes, jax.devices()[:int(np.prod([s for _, s in axes]))])
    shardings = train.variable_shardings_of(config, variables, mesh)
    plan = freeze.Plan(config, variables["params"], model.blocks())
    phase = train.Phases(config, plan, train.model_forward(model), loss_fn, mesh, shardings,
                         total_steps=100, warmup_steps=0).get(0)
    params = jax.device_put(variables["params"], shardings["params"])
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": {},
             "opt_state": phase.init(params), "rng": jax.random.PRNGKey(1)}
    return mesh, phase, jax.device_put(state, phase.state_shardings)


def run(mesh, phase, state, steps):
    losses = []
    for b in steps:
        batch = jax.device_put(batches[b], sharding.batch_sharding(mesh))
        state, metrics = phase.step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


result = {"losses": {}, "shards": {}}
for name in MESHES:
    mesh, phase, state = setup(name)
    flat = tree.flatten(state["params"])
    result["shards"][name] = {
        n: list(flat[n].addressable_shards[0].data.shape) for n in (
            "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel",
            "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/kernel",
            "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel",
            "Transformer/encoderblock_0/MlpBlock_0/Dense_1/kernel", "head/kernel")}
    result["batch_spec_" + name] = list(sharding.batch_sharding(mesh).spec)
    if name == "2x2x2":
        state, first = run(mesh, phase, state, range(3))
        saver = RunCheckpoints(workdir)
        saver.save(3, state, {"step": 3})
        saver.close()
        saved = tree.flatten(jax.device_get(state))
        state, rest = run(mesh, phase, state, range(3, 6))
        result["losses"][name] = first + rest
    else:
        state, result["losses"][name] = run(mesh, phase, state, range(6))

# Cross-mesh restore: the (2, 2, 2) checkpoint onto (1, 1, 8) and onto one device.
for name in ("1x1x8", "single"):
    mesh, phase, fresh = setup(name)
    abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), fresh,
        phase.state_shardings)
    restored, data_state = RunCheckpoints(workdir).restore(3, abstract)
    flat = tree.flatten(jax.device_get(restored))
    result["restore_equal_" + name] = all(
        np.asarray(flat[n]).tobytes() == np.asarray(v).tobytes() for n, v in saved.items())
    result["restore_mesh_" + name] = dict(
        tree.flatten(restored["params"])["head/kernel"].sharding.mesh.shape)
    _, result["resumed_" + name] = run(mesh, phase, restored, range(3, 6))

# BERT with the BERT rules: loss and gradients on (1, 1, 8) against one device.
bert = classifier("bert", 3, head_zeroinit=False, vocab_size=50, hidden_size=64, num_layers=2,
                  num_heads=8, intermediate_size=128, dropout=0.0, attention_dropout=0.0)
ids = rng.integers(1, 50, (8, 12)).astype(np.int32)
mask = (np.arange(12)[None] < rng.integers(3, 13, (8, 1))).astype(np.int32)
tokens = {"input_ids": ids, "attention_mask": mask, "label": (ids[:, 0] % 3).astype(np.int32)}
bert_params = jax.device_get(bert.init(jax.random.PRNGKey(0), {k: v[:1] for k, v in
                                                                 tokens.items()})["params"])
bert_loss = lambda p, b: loss_fn(bert.apply({"params": p}, b), b)
grads = {}
for name in ("single", "1x1x8"):
    axes = MESHES[name]
    mesh = sharding.make_mesh(axes, jax.devices()[:int(np.prod([s for _, s in axes]))])
    shardings = sharding.param_shardings(bert_params, mesh,
                                         sharding.tensor_parallel("bert") + [(".*", "fsdp")])
    params = jax.device_put(bert_params, shardings)
    loss, g = jax.jit(jax.value_and_grad(bert_loss))(
        params, jax.device_put(tokens, sharding.batch_sharding(mesh)))
    grads[name] = (float(loss), tree.flatten(jax.device_get(g)))
    result["bert_query_shard_" + name] = list(tree.flatten(params)[
        "encoder/layer_0/attention/query/kernel"].addressable_shards[0].data.shape)
result["bert_loss_diff"] = abs(grads["single"][0] - grads["1x1x8"][0])
result["bert_grad_diff"] = max(float(np.abs(grads["single"][1][n] - v).max())
                               for n, v in grads["1x1x8"][1].items())

from tljax.config import ConfigError
try:
    sharding.param_shardings({"w": jax.ShapeDtypeStruct((3, 4), np.float32)},
                             sharding.make_mesh(MESHES["1x1x8"]), [("w", ("model", None))])
except ConfigError as e:
    result["divisibility_error"] = str(e)
print(json.dumps(result))
"""


pytestmark_slow = pytest.mark.slow  # one child process compiling 5 train steps: ~30-70 s


@pytest.fixture(scope="module")
def parallel(tmp_path_factory) -> dict:
    workdir = str(tmp_path_factory.mktemp("parallel") / "ckpt")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, workdir], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytestmark_slow
def test_tensor_parallel_meshes_give_the_single_device_loss_curve(parallel):
    single = parallel["losses"]["single"]
    assert len(single) == 6 and single[-1] < single[0]
    for name in ("2x2x2", "1x1x8"):
        np.testing.assert_allclose(parallel["losses"][name], single, rtol=0, atol=1e-5,
                                   err_msg=name)


@pytestmark_slow
def test_megatron_rules_split_heads_and_hidden_units(parallel):
    q, o = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/" + "query/kernel", (
        "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/kernel")
    mlp_in, mlp_out = ("Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel",
                       "Transformer/encoderblock_0/MlpBlock_0/Dense_1/kernel")
    shards = parallel["shards"]
    # Full shapes: query (64, 8, 8), out (8, 8, 64), Dense_0 (64, 128), Dense_1 (128, 64).
    assert shards["single"][q] == [64, 8, 8]
    assert shards["1x1x8"][q] == [64, 1, 8] and shards["1x1x8"][o] == [1, 8, 64]
    assert shards["1x1x8"][mlp_in] == [64, 16] and shards["1x1x8"][mlp_out] == [16, 64]
    assert shards["2x2x2"][q] == [32, 4, 8] and shards["2x2x2"][o] == [4, 8, 32]
    assert shards["2x2x2"][mlp_in] == [32, 64] and shards["2x2x2"][mlp_out] == [64, 32]
    # The batch is split over data and fsdp, never over the model axis.
    assert parallel["batch_spec_2x2x2"] == [["data", "fsdp"]]
    assert parallel["batch_spec_1x1x8"] == [["data", "fsdp"]]


@pytestmark_slow
def test_checkpoints_restore_across_meshes(parallel):
    single = parallel["losses"]["single"]
    for name in ("1x1x8", "single"):
        assert parallel[f"restore_equal_{name}"], name
        np.testing.assert_allclose(parallel[f"resumed_{name}"], single[3:], rtol=0, atol=1e-5)
    assert parallel["restore_mesh_1x1x8"] == {"data": 1, "fsdp": 1, "model": 8}


@pytestmark_slow
def test_bert_tensor_parallel_matches_one_device(parallel):
    assert parallel["bert_query_shard_single"] == [64, 64]
    assert parallel["bert_query_shard_1x1x8"] == [64, 8]  # 8 heads of 8: one head per device
    assert parallel["bert_loss_diff"] < 1e-6 and parallel["bert_grad_diff"] < 1e-5


@pytestmark_slow
def test_indivisible_dimension_is_refused(parallel):
    message = parallel["divisibility_error"]
    assert "dimension 3 of w (3, 4) is not divisible by mesh axes ('model',)" in message


def test_rule_errors_are_one_line():
    import jax

    from tljax import sharding
    from tljax.config import ConfigError

    mesh = sharding.make_mesh([("data", 1), ("model", 1)], jax.devices()[:1])
    shapes = {"a": jax.ShapeDtypeStruct((3, 4), np.float32)}
    specs = sharding.param_shardings(shapes, mesh, [("a", ("fsdp", "model"))])
    assert tuple(specs["a"].spec) == (None, "model")  # the mesh has no fsdp axis: dropped
    with pytest.raises(ConfigError, match="has 3 entries"):
        sharding.param_shardings(shapes, mesh, [("a", (None, None, "model"))])
    with pytest.raises(ConfigError, match="No tensor-parallel rules"):
        sharding.tensor_parallel("resnet")
    with pytest.raises(ConfigError, match="expected 'replicate', 'fsdp' or a tuple"):
        sharding.param_shardings(shapes, mesh, [("a", "megatron")])


@pytest.mark.slow
def test_trainer_runs_tensor_parallel_from_the_config(tmp_path, fashion_mnist_dir):
    """The whole trainer on real data: mesh (2, 2, 2) with the ViT rules gives the 1-device curve."""
    from tests.test_train import _mesh_losses
    from tljax import sharding

    rules = [[p, list(spec)] for p, spec in sharding.tensor_parallel("vit")] + [[".*", "fsdp"]]
    single = _mesh_losses(tmp_path, [["data", 1]], [[".*", "replicate"]], 1)
    tp = _mesh_losses(tmp_path, [["data", 2], ["fsdp", 2], ["model", 2]], rules, 8)
    np.testing.assert_allclose(tp, single, rtol=0, atol=1e-5)
