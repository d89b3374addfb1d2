"""Sweeps: many runs of one config, resumable, in parallel, aggregated into tables and plots.

    python -m tljax.sweep --sweep=experiments/freeze_lite0.py --workdir=runs/freeze_lite0
    python -m tljax.sweep --sweep=... --workdir=... --parallel=2      # two runs at a time
    python -m tljax.sweep --sweep=... --workdir=... --report_only     # tables and plots only
    python -m tljax.sweep --sweep=... --workdir=... --report_dir=experiments/NAME
                                                    # the report there (to commit), not in WORKDIR

A sweep file is plain Python defining

    CONFIG = "configs/quickstart.py:labels=1000"   # a config file, with arguments
    SEEDS = [0, 1, 2]                              # every arm runs once per seed
    ARMS = {"full": {"freeze": "full"},            # name -> config overrides ('a.b': value)
            "linear_probe": {"freeze": "linear_probe", "lr": 0.01}}
                                                   # (an arm's "config" key replaces CONFIG)
    METRIC = "accuracy"                            # optional: the final metric to tabulate
    COLUMNS = {"ID": "accuracy",                   # optional: several metric columns, a key
               "OOD": ["noise/accuracy", "blur/accuracy"],   # or the mean of several keys
               "test": "test/accuracy|accuracy"}   # 'a|b': the first of them a run has
    DESCRIPTION = "..."                            # optional: a line above the table

(`grid(freeze=[...], lr=[...])` builds ARMS from every combination, named by their values.)
Overrides are Python values set on the config, so lists, tuples and None need no quoting.

Each run gets WORKDIR/<arm>/seed_<s>/, an ordinary training workdir; a run whose
results.json exists is skipped, an interrupted one resumes from its checkpoint (the
trainer does that), so killing a sweep and starting it again redoes nothing finished.
Runs are separate processes (`--parallel` at a time). The report, WORKDIR/results.csv,
WORKDIR/results.md and the plots metric_vs_parameters.png, metric_vs_time.png and
curves.png, is rebuilt from the runs' results.json, config.json, metrics.jsonl and
sweep_run.json after every run: mean +- std over seeds (sample std, n - 1) per arm of the
metric (or of each of COLUMNS; the plots use the first), the trainable parameters, the step
time and the wall time.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from tljax.errors import InputError, report

RUN_FILE = "sweep_run.json"


@dataclasses.dataclass(frozen=True)
class Run:
    arm: str
    seed: int
    overrides: dict[str, Any]

    def workdir(self, root: str) -> str:
        return os.path.join(root, self.arm, f"seed_{self.seed}")


@dataclasses.dataclass
class Sweep:
    config: str
    arms: dict[str, dict[str, Any]]
    seeds: list[int]
    metric: str | None = None
    description: str = ""
    columns: dict[str, str | list[str]] | None = None  # label -> key, or keys to average

    def runs(self) -> list[Run]:
        """Seed-major order: every arm's first seed before any arm's second, so a partial
        sweep already compares every arm."""
        return [Run(arm, seed, {**overrides, "seed": seed})
                for seed in self.seeds for arm, overrides in self.arms.items()]


def grid(**values: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Arms for every combination of `values`, named 'key=value,key=value'."""
    keys = list(values)
    arms = {}
    for combination in itertools.product(*(values[k] for k in keys)):
        overrides = dict(zip(keys, combination, strict=True))
        arms[",".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items())] = overrides
    return arms


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.=,+-]+", "_", name)


def load_sweep(path: str) -> Sweep:
    """Reads a sweep file (see the module docstring)."""
    if not os.path.exists(path):
        raise InputError(f"Sweep file {path!r} not found.")
    spec = importlib.util.spec_from_file_location("_tljax_sweep", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = [k for k in ("CONFIG", "ARMS") if not hasattr(module, k)]
    if missing:
        raise InputError(f"Sweep file {path} defines no {' or '.join(missing)}; see "
                         "`python -m tljax.sweep --help`.")
    arms = {_safe_name(k): dict(v) for k, v in module.ARMS.items()}
    if len(arms) != len(module.ARMS):
        raise InputError(f"Sweep file {path}: two arms have the same name once made safe for "
                         "a directory.")
    return Sweep(config=module.CONFIG, arms=arms, seeds=list(getattr(module, "SEEDS", [0])),
                 metric=getattr(module, "METRIC", None),
                 description=getattr(module, "DESCRIPTION", ""),
                 columns=getattr(module, "COLUMNS", None))


# ---------------------------------------------------------------------------------------------
# One run (in its own process).


def load_config(spec: str, overrides: dict[str, Any]) -> Any:
    """The config `spec` ('FILE[:args]', defaults filled in) with `overrides` ('a.b': value)
    applied strictly: an unknown key names the closest valid one."""
    from tljax import config as config_lib

    config = config_lib.load(spec)
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        if last not in node:
            raise config_lib.ConfigError(f"Sweep override {key!r}: no such config key"
                                         f"{config_lib.closest(last, list(node.keys()))}.")
        node[last] = value
    return config


def run_one(workdir: str) -> None:
    """Trains the run described by WORKDIR/sweep_run.json (called in a child process)."""
    from absl import logging

    from tljax import train

    logging.set_verbosity(logging.WARNING)
    with open(os.path.join(workdir, RUN_FILE)) as f:
        spec = json.load(f)
    overrides = dict(spec["overrides"])
    config = load_config(overrides.pop("config", spec["config"]), overrides)
    train.train_and_evaluate(config, workdir)


def _start(run: Run, sweep: Sweep, root: str, threads: int | None) -> subprocess.Popen:
    workdir = run.workdir(root)
    os.makedirs(workdir, exist_ok=True)
    spec_path = os.path.join(workdir, RUN_FILE)
    spec = {"config": sweep.config, "overrides": run.overrides, "arm": run.arm,
            "seed": run.seed, "wall_seconds": 0.0}
    if os.path.exists(spec_path):  # a run resumed: keep the time already spent
        with open(spec_path) as f:
            spec["wall_seconds"] = json.load(f).get("wall_seconds", 0.0)
    with open(spec_path, "w") as f:
        json.dump(spec, f, indent=2, default=str)
    env = dict(os.environ)
    if threads:  # several runs share the cores: one XLA thread pool each, of this size
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                            f"intra_op_parallelism_threads={threads}").strip()
    log = open(os.path.join(workdir, "log.txt"), "a")  # noqa: SIM115 - closed by the caller
    process = subprocess.Popen([sys.executable, "-m", "tljax.sweep", f"--run={workdir}"],
                               stdout=log, stderr=subprocess.STDOUT, env=env)
    process.log, process.started, process.run = log, time.perf_counter(), run
    return process


def _finish(process: subprocess.Popen, root: str) -> None:
    process.log.close()
    spec_path = os.path.join(process.run.workdir(root), RUN_FILE)
    with open(spec_path) as f:
        spec = json.load(f)
    spec["wall_seconds"] += time.perf_counter() - process.started
    with open(spec_path, "w") as f:
        json.dump(spec, f, indent=2, default=str)


def is_finished(workdir: str) -> bool:
    return os.path.exists(os.path.join(workdir, "results.json"))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def run_sweep(sweep: Sweep, root: str, parallel: int = 1, report_dir: str | None = None
              ) -> list[Run]:
    """Runs every unfinished run, `parallel` at a time; returns the runs that failed."""
    runs = sweep.runs()
    todo = [r for r in runs if not is_finished(r.workdir(root))]
    done_before = len(runs) - len(todo)
    threads = max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 else None
    running: list[subprocess.Popen] = []
    failed: list[Run] = []
    start, finished = time.perf_counter(), 0
    print(f"[sweep] {len(runs)} runs ({len(sweep.arms)} arms x {len(sweep.seeds)} seeds): "
          f"{done_before} already finished, {len(todo)} to run, {parallel} at a time.",
          flush=True)
    while todo or running:
        while todo and len(running) < parallel:
            running.append(_start(todo.pop(0), sweep, root, threads))
        time.sleep(0.5)
        for process in [p for p in running if p.poll() is not None]:
            running.remove(process)
            _finish(process, root)
            finished += 1
            if process.returncode != 0:
                failed.append(process.run)
                print(f"[sweep] FAILED {process.run.arm} seed {process.run.seed} (exit "
                      f"{process.returncode}); see {process.run.workdir(root)}/log.txt",
                      flush=True)
            elapsed = time.perf_counter() - start
            left = len(todo) + len(running)
            eta = elapsed / finished * left if finished else 0.0
            print(f"[sweep] {done_before + finished}/{len(runs)} runs | {len(running)} running "
                  f"| {len(failed)} failed | elapsed {_duration(elapsed)} | ETA "
                  f"{_duration(eta)} | last: {process.run.arm} seed {process.run.seed}",
                  flush=True)
            write_report(sweep, root, report_dir)
    write_report(sweep, root, report_dir)
    return failed


# ---------------------------------------------------------------------------------------------
# Aggregation.


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _records(workdir: str) -> list[dict[str, Any]]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def collect(sweep: Sweep, root: str) -> list[dict[str, Any]]:
    """One row per finished run: arm, seed, metric, parameters, step time, wall time."""
    rows = []
    for run in sweep.runs():
        workdir = run.workdir(root)
        results = _read_json(os.path.join(workdir, "results.json"))
        if results is None:
            continue
        metric = sweep.metric or results.get("main_metric", "accuracy")
        columns = {label: _column(results["final_eval"], keys)
                   for label, keys in (sweep.columns or {}).items()}
        if columns:  # the first column is the table's metric (and the plots')
            metric = next(iter(sweep.columns.values()))
            metric = (metric if isinstance(metric, str) else metric[0]).split("|")[-1]
        config = _read_json(os.path.join(workdir, "config.json")) or {}
        spec = _read_json(os.path.join(workdir, RUN_FILE)) or {}
        rates = [r["examples_per_s"] for r in _records(workdir)
                 if r.get("kind") == "train" and "examples_per_s" in r]
        batch = (config.get("input") or {}).get("batch_size")
        parameters = results.get("parameters") or {}
        rows.append({
            "arm": run.arm, "seed": run.seed, "metric": metric,
            "value": (next(iter(columns.values())) if columns
                      else results["final_eval"][metric]),
            **columns,
            "trainable_parameters": parameters.get("trainable"),
            "parameters": parameters.get("total"),
            "step_seconds": batch / rates[-1] if rates and batch else None,
            "wall_seconds": spec.get("wall_seconds"),
        })
    return rows


def _metric(final_eval: dict[str, float], key: str) -> float | None:
    """final_eval[key]; 'a|b' is the first of a, b that the run reported."""
    return next((final_eval[k] for k in key.split("|") if k in final_eval), None)


def _column(final_eval: dict[str, float], keys: str | list[str]) -> float | None:
    """A run's value of one of COLUMNS: a metric, or the mean of several (None if missing)."""
    keys = [keys] if isinstance(keys, str) else list(keys)
    values = [_metric(final_eval, k) for k in keys]
    return None if None in values else sum(values) / len(values)


def summarize(sweep: Sweep, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm (in the sweep's order): mean and std over seeds of every column."""
    out = []
    for arm in sweep.arms:
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        summary = {"arm": arm, "seeds": len(mine), "metric": mine[0]["metric"]}
        for key in ("value", *(sweep.columns or {}), "trainable_parameters", "step_seconds",
                    "wall_seconds"):
            values = [r[key] for r in mine if r[key] is not None]
            summary[key], summary[f"{key}_std"] = mean_std(values) if values else (None, None)
        out.append(summary)
    return out


def _fmt(value: float | None, std: float | None = None, scale: float = 1.0,
         digits: int = 2) -> str:
    if value is None:
        return "-"
    text = f"{scale * value:.{digits}f}"
    return text + (f" +- {scale * std:.{digits}f}" if std else "")


PERCENT = ("accuracy", "f1", "map", "mean_iou", "token_accuracy")


def _is_percent(keys: str | list[str]) -> bool:
    keys = [keys] if isinstance(keys, str) else keys
    return all(k.split("|")[0].split("/")[-1] in PERCENT for k in keys)


def markdown_table(sweep: Sweep, summary: list[dict[str, Any]]) -> str:
    metric = summary[0]["metric"] if summary else (sweep.metric or "metric")
    # (header, summary key, scale) of each metric column.
    columns = [(f"{label}{' (%)' if _is_percent(keys) else ''}", label,
                100 if _is_percent(keys) else 1)
               for label, keys in sweep.columns.items()] if sweep.columns else [
        (f"{metric}{' (%)' if _is_percent(metric) else ''}", "value",
         100 if _is_percent(metric) else 1)]
    lines = ["| arm | " + " | ".join(c[0] for c in columns) + " | trainable parameters | "
             "step time (s) | wall time (s) | seeds |",
             "|---|" + "---|" * len(columns) + "---|---|---|---|"]
    for s in summary:
        params = "-" if s["trainable_parameters"] is None else f"{s['trainable_parameters']:,.0f}"
        values = " | ".join(_fmt(s[key], s[f"{key}_std"], scale) for _, key, scale in columns)
        lines.append(f"| {s['arm']} | {values} | {params} | {_fmt(s['step_seconds'], digits=3)}"
                     f" | {_fmt(s['wall_seconds'], digits=0)} | {s['seeds']} |")
    return "\n".join(lines)


def write_report(sweep: Sweep, root: str, report_dir: str | None = None) -> dict[str, str]:
    """results.csv (every run), results.md (mean +- std per arm) and the plots, from the runs
    under `root`, written into `report_dir` (default: `root`)."""
    import csv

    rows = collect(sweep, root)
    if not rows:
        return {}
    out = report_dir or root
    os.makedirs(out, exist_ok=True)
    paths = {"csv": os.path.join(out, "results.csv"), "md": os.path.join(out, "results.md")}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize(sweep, rows)
    header = f"{sweep.description}\n\n" if sweep.description else ""
    with open(paths["md"], "w") as f:
        f.write(f"{header}Config `{sweep.config}`, seeds {sweep.seeds}; mean +- sample std "
                f"over seeds.\n\n{markdown_table(sweep, summary)}\n")
    paths.update(plot(sweep, root, rows, summary, out))
    return paths


def plot(sweep: Sweep, root: str, rows: list[dict[str, Any]],
         summary: list[dict[str, Any]], out: str | None = None) -> dict[str, str]:
    """metric vs trainable parameters, metric vs wall time, eval curves per arm (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = summary[0]["metric"]
    paths = {}
    for key, label, name, log in (("trainable_parameters", "trainable parameters",
                                   "metric_vs_parameters.png", True),
                                  ("wall_seconds", "wall time per run (s)",
                                   "metric_vs_time.png", False)):
        points = [s for s in summary if s[key] is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for s in points:
            ax.errorbar(max(s[key], 1) if log else s[key], s["value"], yerr=s["value_std"],
                        fmt="o", capsize=3)
            ax.annotate(s["arm"], (max(s[key], 1) if log else s[key], s["value"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"final {metric}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths[name] = os.path.join(out or root, name)
        fig.savefig(paths[name], dpi=100)
        plt.close(fig)
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    for arm in sweep.arms:
        runs = [r for r in sweep.runs() if r.arm == arm]
        records = [_records(r.workdir(root)) for r in runs]
        records = [r for r in records if r]
        if not records:
            continue
        train = records[0]
        ax_loss.plot([r["step"] for r in train if r["kind"] == "train"],
                     [r["loss"] for r in train if r["kind"] == "train"], label=arm)
        evals = [r for r in train if r["kind"] == "eval" and metric in r]
        if evals:
            ax_eval.plot([r["step"] for r in evals], [r[metric] for r in evals], "o-",
                         label=arm)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel(f"train loss (seed {sweep.seeds[0]})")
    ax_eval.set_xlabel("step")
    ax_eval.set_ylabel(f"eval {metric} (seed {sweep.seeds[0]})")
    if ax_loss.get_lines():
        ax_loss.legend(fontsize=7)
    fig.tight_layout()
    paths["curves.png"] = os.path.join(out or root, "curves.png")
    fig.savefig(paths["curves.png"], dpi=100)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------
# Command line.


def main(argv: Iterable[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--sweep", help="the sweep file (experiments/NAME.py)")
    parser.add_argument("--workdir", help="where the runs and the report go")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument("--report_only", action="store_true", help="only rebuild the report")
    parser.add_argument("--report_dir", help="where the report goes (default: --workdir)")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # one run, in a child process
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        if args.run:
            run_one(args.run)
            return 0
        if not args.sweep or not args.workdir:
            raise InputError("both --sweep=FILE and --workdir=DIR are required.")
        if args.parallel < 1:
            raise InputError(f"--parallel={args.parallel}: must be at least 1.")
        sweep = load_sweep(args.sweep)
        failed: list[Run] = []
        if args.report_only:
            paths = write_report(sweep, args.workdir, args.report_dir)
        else:
            failed = run_sweep(sweep, args.workdir, args.parallel, args.report_dir)
            paths = write_report(sweep, args.workdir, args.report_dir)
            if failed:
                print(f"[sweep] {len(failed)} run(s) failed; start the sweep again to retry "
                      "them (finished runs are skipped).", file=sys.stderr)
        if "md" in paths:
            with open(paths["md"]) as f:
                print(f.read())
        return 1 if failed else 0
    except InputError as e:
        return report(e)


if __name__ == "__main__":
    from tljax.malloc import retain_freed_memory

    retain_freed_memory()  # the runs started from here inherit it
    sys.exit(main())
