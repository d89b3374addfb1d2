"""Two JAX processes on localhost train like one: same loss curve, one writer, shared checkpoints.

Each run is `python -m tljax.main` with `--coordinator_address/--num_processes/--process_id`,
CPU devices and gloo collectives, on the tiny Fashion-MNIST config of test_train with SGD.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.test_train import TINY
from tljax import checkpoint, tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 900
STEPS = 8
EVAL_EXAMPLES = 500  # not a multiple of the eval batch: the last batch is padded and masked
OVERRIDES = {**TINY, "total_steps": STEPS, "warmup_steps": 2, "eval_every_steps": 4,
             "checkpoint_every_steps": 4, "lr": 0.03, "eval.split": f"test[:{EVAL_EXAMPLES}]"}
# SGD, float32: sharding over processes only reorders the sums of reductions (measured:
# 2.4e-7 on the loss, 1.5e-8 on the parameters after 8 steps).
ATOL = 1e-6

# The runlocal recipe with SGD (Adam would amplify last-bit differences), optionally with
# every parameter split over an 'fsdp' axis; config.optim and config.mesh can't be set by flags.
CONFIG = """
import sys

sys.path.insert(0, {configs!r})
import vit_finetune


def get_config(arg=None):
    config = vit_finetune.get_config("runlocal")
    config.optim = {{"name": "sgd", "momentum": 0.9}}
    if arg == "fsdp":
        config.mesh = [("fsdp", 2), ("data", -1)]
        config.sharding_rules = [(".*", "fsdp")]
    return config
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _run(workdir: str, config: str, *, processes: int, local_devices: int):
    """Starts a run of `processes` processes; yields their logs once all have exited 0.

    On any failure or timeout every process still running is killed, so none outlives the test.
    """
    os.makedirs(workdir, exist_ok=True)
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={local_devices}"}
    args = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    children, logs = [], []
    try:
        for i in range(processes):
            distributed = [f"--coordinator_address=127.0.0.1:{port}",
                           f"--num_processes={processes}", f"--process_id={i}"]
            logs.append(f"{workdir}.{i}.log")
            with open(logs[-1], "w") as log:
                children.append(subprocess.Popen(
                    [sys.executable, "-m", "tljax.main", f"--config={config}",
                     f"--workdir={workdir}", *args, *(distributed if processes > 1 else [])],
                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.time() + TIMEOUT_S
        while any(c.poll() is None for c in children):
            failed = [i for i, c in enumerate(children) if c.poll() not in (None, 0)]
            assert not failed, f"process {failed[0]} failed:\n{_tail(logs[failed[0]])}"
            assert time.time() < deadline, f"timed out:\n{_tail(logs[0])}"
            time.sleep(0.2)
        outputs = [open(path).read() for path in logs]
        for i, c in enumerate(children):
            assert c.returncode == 0, f"process {i} exited {c.returncode}:\n{outputs[i][-3000:]}"
        yield outputs
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()


def _tail(path: str) -> str:
    with open(path) as f:
        return f.read()[-3000:]


def _records(workdir: str, kind: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def _losses(workdir: str) -> list[float]:
    return [r["loss"] for r in _records(workdir, "train")]


def _params(workdir: str, step: int | None = None) -> dict:
    variables, _ = checkpoint.load_variables(workdir, step)
    return tree.flatten(variables["params"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fashion_mnist_dir) -> dict:
    """Workdirs of a 1-process run on 1 device and a 2-process run on 2 x 2 devices."""
    root = tmp_path_factory.mktemp("multihost")
    config = str(root / "sgd_config.py")
    with open(config, "w") as f:
        f.write(CONFIG.format(configs=os.path.join(ROOT, "configs")))
    single, multi = str(root / "single"), str(root / "multi")
    with _run(single, config, processes=1, local_devices=1):
        pass
    with _run(multi, config, processes=2, local_devices=2) as outputs:
        pass
    return {"config": config, "single": single, "multi": multi, "outputs": outputs}


@pytest.mark.slow
def test_two_processes_give_the_single_process_loss_curve(runs):
    single, multi = _losses(runs["single"]), _losses(runs["multi"])
    assert len(single) == STEPS and single[-1] != single[0]
    np.testing.assert_allclose(multi, single, rtol=0, atol=ATOL)
    for a, b in zip(_records(runs["multi"], "eval"), _records(runs["single"], "eval"),
                    strict=True):
        assert a["step"] == b["step"] and a["examples"] == b["examples"] == EVAL_EXAMPLES
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=0, atol=ATOL)


@pytest.mark.slow
def test_only_process_0_writes_and_eval_covers_the_split_once(runs):
    workdir, (chief, other) = runs["multi"], runs["outputs"]
    assert "2 process(es)" in chief and "4 cpu device(s)" in chief
    assert "[train]" in chief and "[train]" not in other and "Model vit" not in other
    # One writer: one line per logged step and one TensorBoard event file.
    assert [r["step"] for r in _records(workdir, "train")] == list(range(1, STEPS + 1))
    assert [r["step"] for r in _records(workdir, "eval")] == [4, STEPS]
    assert len(glob.glob(os.path.join(workdir, "tensorboard", "events.*"))) == 1
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert results["steps"] == STEPS
    assert results["final_eval"]["examples"] == EVAL_EXAMPLES
    single = json.load(open(os.path.join(runs["single"], "results.json")))["final_eval"]
    assert results["final_eval"]["accuracy"] == pytest.approx(single["accuracy"], abs=1e-9)


@pytest.mark.slow
def test_two_process_checkpoints_restore_in_one_process(runs):
    assert sorted(os.listdir(os.path.join(runs["multi"], "checkpoints"))) == ["4", str(STEPS)]
    expected, actual = _params(runs["single"]), _params(runs["multi"])
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=0, atol=ATOL, err_msg=name)
    start = _params(runs["multi"], step=4)
    assert any(not np.array_equal(start[n], actual[n]) for n in actual)


@pytest.mark.slow
def test_two_process_run_resumes_from_its_checkpoint(runs, tmp_path):
    """The run interrupted after step 4's checkpoint (later outputs removed) resumes exactly."""
    workdir = str(tmp_path / "resumed")
    shutil.copytree(runs["multi"], workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(STEPS)))
    os.remove(os.path.join(workdir, "results.json"))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        kept = [line for line in f if json.loads(line)["step"] <= 4]
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(kept)

    with _run(workdir, runs["config"], processes=2, local_devices=2) as (chief, _):
        pass
    assert "Resumed from" in chief and "at step 4" in chief
    assert [r["step"] for r in _records(workdir, "train")] == list(range(1, STEPS + 1))
    # Same processes, devices and batches: the resumed run is bitwise the uninterrupted one.
    assert _losses(workdir) == _losses(runs["multi"])
    expected, actual = _params(runs["multi"]), _params(workdir)
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert actual[name].tobytes() == value.tobytes(), name
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["final_eval"]["examples"] == EVAL_EXAMPLES


@pytest.mark.slow
def test_parameters_split_across_processes(runs, tmp_path):
    """FSDP over the two processes (1 device each): each process holds and saves half of
    every parameter; the loss curve and the restored parameters still match one process."""
    workdir = str(tmp_path / "fsdp")
    with _run(workdir, runs["config"] + ":fsdp", processes=2, local_devices=1) as (chief, _):
        pass
    assert "Mesh {'fsdp': 2, 'data': 1}" in chief
    np.testing.assert_allclose(_losses(workdir), _losses(runs["single"]), rtol=0, atol=ATOL)
    expected, actual = _params(runs["single"]), _params(workdir)
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=0, atol=ATOL, err_msg=name)
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["final_eval"]["examples"] == EVAL_EXAMPLES
