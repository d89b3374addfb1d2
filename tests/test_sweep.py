"""Sweeps: the table's mean and std come from the runs' results.json; a killed sweep, started
again, redoes nothing that finished."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

from tljax import sweep as sweep_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWEEP = '''
CONFIG = "configs/vit_finetune.py:runlocal"
SEEDS = [0, 1]
METRIC = "accuracy"
_TINY = {"model.width": 16, "model.depth": 1, "model.mlp_dim": 32, "model.num_heads": 2,
         "total_steps": 6, "warmup_steps": 1, "eval_every_steps": None, "log_every_steps": 3,
         "checkpoint_every_steps": 3, "input.split": "train[:512]", "input.batch_size": 32,
         "eval.split": "test[:200]", "eval.batch_size": 100}
ARMS = {"full": {**_TINY, "freeze": "full"},
        "probe": {**_TINY, "freeze": "linear_probe", "lr": 0.01}}
'''


def test_grid_names_arms_by_their_values():
    arms = sweep_lib.grid(freeze=["full", "bitfit"], lr=[0.1, 0.01])
    assert list(arms) == ["freeze=full,lr=0.1", "freeze=full,lr=0.01", "freeze=bitfit,lr=0.1",
                          "freeze=bitfit,lr=0.01"]
    assert arms["freeze=bitfit,lr=0.01"] == {"freeze": "bitfit", "lr": 0.01}


def test_report_from_hand_written_results(tmp_path):
    """Mean and sample std per arm, parameters and times, from results.json files alone."""
    sweep = sweep_lib.Sweep(config="c.py", arms={"a": {}, "b": {}}, seeds=[0, 1, 2])
    values = {"a": [0.5, 0.7, 0.9], "b": [0.2, 0.4]}  # b's third seed has not finished
    for arm, accs in values.items():
        for seed, acc in enumerate(accs):
            run = tmp_path / arm / f"seed_{seed}"
            run.mkdir(parents=True)
            (run / "results.json").write_text(json.dumps({
                "final_eval": {"accuracy": acc}, "main_metric": "accuracy",
                "parameters": {"total": 100, "trainable": 10 if arm == "a" else 100}}))
            (run / sweep_lib.RUN_FILE).write_text(json.dumps({"wall_seconds": 60.0 + seed}))
    paths = sweep_lib.write_report(sweep, str(tmp_path))
    table = open(paths["md"]).read()
    mean_a, std_a = statistics.mean(values["a"]), statistics.stdev(values["a"])
    assert f"| a | {100 * mean_a:.2f} +- {100 * std_a:.2f} | 10 |" in table
    assert f"| b | {100 * statistics.mean(values['b']):.2f} +- " in table
    assert table.rstrip().endswith("| 2 |")  # b: two seeds so far
    rows = open(paths["csv"]).read().splitlines()
    assert len(rows) == 1 + 5
    for name in ("metric_vs_parameters.png", "metric_vs_time.png"):
        assert os.path.getsize(paths[name]) > 1000


def test_columns_tabulate_several_metrics_and_means_of_metrics(tmp_path):
    columns = {"ID": "accuracy", "OOD": ["noise/accuracy", "blur/accuracy"], "loss": "loss",
               "test": "test/accuracy|accuracy", "absent": "ema/accuracy"}
    sweep = sweep_lib.Sweep(config="c.py", arms={"a": {}}, seeds=[0, 1], columns=columns)
    finals = [{"accuracy": 0.8, "noise/accuracy": 0.5, "blur/accuracy": 0.7, "loss": 0.5,
               "test/accuracy": 0.6},
              {"accuracy": 0.9, "noise/accuracy": 0.6, "blur/accuracy": 0.7, "loss": 0.3}]
    for seed, final in enumerate(finals):
        run = tmp_path / "a" / f"seed_{seed}"
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps({
            "final_eval": final, "main_metric": "accuracy",
            "parameters": {"total": 100, "trainable": 10}}))
    paths = sweep_lib.write_report(sweep, str(tmp_path), report_dir=str(tmp_path / "report"))
    assert set(os.listdir(tmp_path / "report")) == {
        "results.md", "results.csv", "metric_vs_parameters.png", "curves.png"}  # no wall time
    assert not os.path.exists(tmp_path / "results.md")
    table = open(paths["md"]).read()
    assert "| arm | ID (%) | OOD (%) | loss | test (%) | absent (%) | trainable parameters |" \
        in table
    ood = [statistics.mean([0.5, 0.7]), statistics.mean([0.6, 0.7])]  # per run, then seeds
    assert (f"| a | {85:.2f} +- {100 * statistics.stdev([0.8, 0.9]):.2f} | "
            f"{100 * statistics.mean(ood):.2f} +- {100 * statistics.stdev(ood):.2f} | "
            f"{0.4:.2f} +- {statistics.stdev([0.5, 0.3]):.2f} | "
            f"{75:.2f} +- {100 * statistics.stdev([0.6, 0.9]):.2f} | - | 10 |") in table


def test_bad_sweeps_fail_in_one_line(tmp_path):
    assert sweep_lib.main(["--sweep=nope.py", f"--workdir={tmp_path}"]) == 2
    bad = tmp_path / "bad.py"
    bad.write_text("SEEDS = [0]\n")
    assert sweep_lib.main([f"--sweep={bad}", f"--workdir={tmp_path}"]) == 2
    typo = tmp_path / "typo.py"
    typo.write_text('CONFIG = "configs/vit_finetune.py:runlocal"\nARMS = {"a": {"lrr": 1}}\n')
    with pytest.raises(Exception, match="closest valid key: lr"):
        sweep_lib.load_config("configs/vit_finetune.py:runlocal", {"lrr": 1})


def _start(sweep_file, workdir):
    return subprocess.Popen(
        [sys.executable, "-m", "tljax.sweep", f"--sweep={sweep_file}", f"--workdir={workdir}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)


@pytest.mark.slow
def test_killed_sweep_restarts_without_redoing_finished_runs(tmp_path, fashion_mnist_dir):
    sweep_file = tmp_path / "tiny.py"
    sweep_file.write_text(SWEEP)
    workdir = tmp_path / "sweep"
    first = _start(sweep_file, workdir)
    deadline = time.monotonic() + 600
    while not (workdir / "full" / "seed_0" / "results.json").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # the sweep and the run it had going
    first.wait()
    finished = {p: p.stat().st_mtime_ns for p in workdir.glob("*/seed_*/results.json")}
    assert finished

    second = _start(sweep_file, workdir)
    out, _ = second.communicate(timeout=900)
    assert second.returncode == 0, out
    assert f"{len(finished)} already finished" in out
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was run again"
    sweep = sweep_lib.load_sweep(str(sweep_file))
    rows = sweep_lib.collect(sweep, str(workdir))
    assert sorted((r["arm"], r["seed"]) for r in rows) == [
        ("full", 0), ("full", 1), ("probe", 0), ("probe", 1)]
    table = (workdir / "results.md").read_text()
    for arm in ("full", "probe"):
        accs = [r["value"] for r in rows if r["arm"] == arm]
        mean, std = sweep_lib.mean_std(accs)
        assert f"| {arm} | {100 * mean:.2f} +- {100 * std:.2f} |" in table or (
            std == 0 and f"| {arm} | {100 * mean:.2f} |" in table)
    probe = [r for r in rows if r["arm"] == "probe"][0]
    full = [r for r in rows if r["arm"] == "full"][0]
    assert probe["trainable_parameters"] < full["trainable_parameters"]
    assert (workdir / "curves.png").exists()
