"""The trainer end to end on real Fashion-MNIST: learning, freezing, meshes, exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tljax import checkpoint, tree
from tljax.train import make_train_step, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import vit_finetune  # noqa: E402

# A tiny ViT on 2,000 real training images; every test below runs it for a few dozen steps.
TINY = {
    "input.split": "train[:2000]", "input.batch_size": 32, "eval.split": "test[:512]",
    "eval.batch_size": 128, "model.width": 32, "model.depth": 2, "model.mlp_dim": 64,
    "model.num_heads": 2, "total_steps": 40, "warmup_steps": 5, "log_every_steps": 1,
    "eval_every_steps": 20, "checkpoint_every_steps": 10, "lr": 0.003,
}


def tiny_config(**overrides):
    config = vit_finetune.get_config("runlocal")
    for key, value in {**TINY, **overrides}.items():
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return config


def _losses(workdir: str) -> list[float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r["loss"] for r in records if r["kind"] == "train"]


def _run_main(workdir: str, overrides: dict, env: dict | None = None) -> subprocess.Popen:
    args = [f"--config.{k}={v}" for k, v in {**TINY, **overrides}.items()]
    return subprocess.Popen(
        [sys.executable, "-m", "tljax.main", "--config=configs/vit_finetune.py:runlocal",
         f"--workdir={workdir}", *args], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                                  **(env or {})})


def test_tiny_vit_learns_fashion_mnist_and_writes_outputs(tmp_path, fashion_mnist_dir):
    workdir = str(tmp_path)
    final = train_and_evaluate(tiny_config(total_steps=60), workdir)
    losses = _losses(workdir)
    # Loss over the last 10 steps clearly below the first 10 (chance is ln 10 = 2.30).
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.25, losses
    assert final["examples"] == 512 and final["accuracy"] > 0.25  # chance: 0.1
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert results["class_names"][0] == "T-shirt/top" and results["final_eval"] == final
    for name in ("config.json", "curves.png", "tensorboard", "checkpoints/60"):
        assert os.path.exists(os.path.join(workdir, name)), name


def test_linear_probe_leaves_everything_but_the_head_bitwise_unchanged(tmp_path,
                                                                       fashion_mnist_dir):
    config = tiny_config(total_steps=15, freeze="linear_probe")
    config.optim = {"name": "sgd", "momentum": 0.9}
    config.lr = 0.1
    train_and_evaluate(config, str(tmp_path))
    # The same seed gives the same initial parameters: rebuild them for the comparison.
    final, _ = checkpoint.load_variables(str(tmp_path))
    start_config = tiny_config(total_steps=1, freeze="linear_probe")
    start_config.lr = 0.0
    train_and_evaluate(start_config, str(tmp_path / "start"))
    start, _ = checkpoint.load_variables(str(tmp_path / "start"))
    changed = {name for name, value in tree.flatten(final["params"]).items()
               if not np.array_equal(value, tree.flatten(start["params"])[name])}
    assert changed == {"head/kernel", "head/bias"}
    frozen = [n for n in tree.flatten(final["params"]) if not n.startswith("head/")]
    for name in frozen:
        a, b = tree.flatten(final["params"])[name], tree.flatten(start["params"])[name]
        assert a.tobytes() == b.tobytes(), name


MESH_SCRIPT = """
import json, sys
sys.path.insert(0, 'configs'); sys.path.insert(0, 'tests')
from test_train import tiny_config, _losses
from tljax.train import train_and_evaluate
import jax
mesh, rules, workdir = json.loads(sys.argv[1])
config = tiny_config(total_steps=8, eval_every_steps=None, mesh=[tuple(a) for a in mesh],
                     sharding_rules=[tuple(r) for r in rules])
config.optim = {'name': 'sgd', 'momentum': 0.9}
config.lr = 0.03
train_and_evaluate(config, workdir)
print(json.dumps({'devices': jax.device_count(), 'losses': _losses(workdir)}))
"""


def _mesh_losses(tmp_path, mesh, rules, devices: int) -> list[float]:
    workdir = str(tmp_path / "_".join(f"{n}{s}" for n, s in mesh))
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    out = subprocess.run([sys.executable, "-c", MESH_SCRIPT, json.dumps([mesh, rules, workdir])],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == devices
    return result["losses"]


def test_meshes_give_the_single_device_loss_curve(tmp_path, fashion_mnist_dir):
    single = _mesh_losses(tmp_path, [["data", 1]], [[".*", "replicate"]], 1)
    data8 = _mesh_losses(tmp_path, [["data", 8]], [[".*", "replicate"]], 8)
    fsdp = _mesh_losses(tmp_path, [["data", 4], ["fsdp", 2]], [[".*", "fsdp"]], 8)
    assert len(single) == 8
    # SGD, float32: sharded reductions only reorder sums, so the curves agree to ~1e-6.
    np.testing.assert_allclose(data8, single, rtol=0, atol=1e-5)
    np.testing.assert_allclose(fsdp, single, rtol=0, atol=1e-5)
    assert single[-1] != single[0]


@pytest.mark.slow
def test_killed_run_resumes_bitwise_equal(tmp_path, fashion_mnist_dir):
    # Evaluations (which leave the training state alone) every 5 steps keep the run busy
    # long enough after checkpoint 20 for the kill to land before the end.
    overrides = {"total_steps": 40, "checkpoint_every_steps": 10, "eval_every_steps": 5}
    reference = _run_main(str(tmp_path / "reference"), overrides)
    assert reference.wait(timeout=600) == 0, reference.stdout.read()[-3000:]

    interrupted = str(tmp_path / "interrupted")
    process = _run_main(interrupted, overrides)
    deadline = time.time() + 600
    while not os.path.isdir(os.path.join(interrupted, "checkpoints", "20")):
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not os.path.isdir(os.path.join(interrupted, "checkpoints", "40"))
    resumed = _run_main(interrupted, overrides)
    output = resumed.stdout.read()
    assert resumed.wait(timeout=600) == 0, output[-3000:]
    assert "Resumed from" in output

    expected, _ = checkpoint.load_variables(str(tmp_path / "reference"))
    actual, _ = checkpoint.load_variables(interrupted)
    for name, value in tree.flatten(expected).items():
        assert value.tobytes() == tree.flatten(actual)[name].tobytes(), name
    assert jax.tree_util.tree_structure(expected) == jax.tree_util.tree_structure(actual)


class _TinyBatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dense(4)(x)
        return nn.Dense(3)(nn.BatchNorm(use_running_average=not train, momentum=0.5)(x))


def test_a_nonfinite_step_leaves_the_state_bitwise_unchanged():
    net = _TinyBatchNormNet()
    x = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
    variables = net.init(jax.random.PRNGKey(0), x)

    def forward(params, model_state, batch, rng):
        return net.apply({"params": params, **model_state}, batch["x"],
                         mutable=["batch_stats"])

    def loss_fn(outputs, batch):
        return (outputs.sum() * batch["scale"]) ** 2

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
    trainable = jax.tree_util.tree_map(lambda _: True, variables["params"])
    step = jax.jit(make_train_step(forward, loss_fn, tx, trainable))
    state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
             "model_state": {"batch_stats": variables["batch_stats"]},
             "opt_state": tx.init(variables["params"]), "rng": jax.random.PRNGKey(1)}

    stepped, metrics = step(state, {"x": x, "scale": np.float32(1.0)})
    assert bool(metrics["finite"])
    changed = [not np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(stepped), strict=True)]
    assert sum(changed) >= len(changed) - 2  # everything moves but the rng (1 leaf of slack)

    for scale in (np.float32(np.nan), np.float32(np.inf)):
        kept, metrics = step(stepped, {"x": x, "scale": scale})
        assert not bool(metrics["finite"])
        assert int(kept["step"]) == int(stepped["step"]) + 1
        for name in ("params", "model_state", "opt_state", "rng"):
            for a, b in zip(jax.tree_util.tree_leaves(stepped[name]),
                            jax.tree_util.tree_leaves(kept[name]), strict=True):
                assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), name
