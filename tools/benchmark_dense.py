"""Cost of a frozen-backbone (head-only) step against full fine-tuning, for the dense tasks.

    python tools/benchmark_dense.py [--configs=detection,segmentation] [--reps=5]

For each config (configs/<name>.py, EfficientNet-Lite0 on fashion_scenes, batch 32 at 64 px)
and each of the presets `full` and `linear_probe`: XLA's FLOPs of the compiled train step and
the median wall time of a step, the presets' steps interleaved (A B A B ...) so that both see
the same machine load. Writes benchmarks/dense_<platform>.{json,md}; the FLOPs ratio is the
stable number, times on a shared machine are indicative.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "configs"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from tljax import data, freeze, models, sharding, tasks, train  # noqa: E402
from tljax.malloc import retain_freed_memory  # noqa: E402

PRESETS = ("full", "linear_probe")


def _flops(compiled: Any) -> float | None:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost["flops"]) if cost and "flops" in cost else None
    except Exception:  # cost analysis is best effort (backend dependent)
        return None


def measure(name: str, reps: int) -> dict[str, Any]:
    module = importlib.import_module(name)
    config = module.get_config("init=scratch")
    _, info = data.get_source(config.input.dataset, "train[:32]")
    task = tasks.build_task(config.task, info)
    model = models.from_config(config, task)
    batches = data.train_batches(dataset=config.input.dataset, split="train[:64]",
                                 pp=config.input.pp, batch_size=config.input.batch_size, seed=0)
    batch = {k: jnp.asarray(v) for k, v in next(batches).items()
             if np.asarray(v).dtype != object}
    rng = jax.random.PRNGKey(0)
    variables = jax.jit(lambda r: model.init({"params": r, "dropout": r}, batch["image"][:1]))(
        rng)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    mesh = sharding.make_mesh([("data", -1)])
    shardings = jax.tree_util.tree_map(lambda _: sharding.replicated(mesh), dict(variables))
    runs, out = {}, {}
    for preset in PRESETS:
        config.freeze = preset
        plan = freeze.Plan(config, params, model.blocks())
        phases = train.Phases(config, plan, train.model_forward(model), task.loss, mesh,
                              shardings, total_steps=1000, warmup_steps=0)
        phase = phases.get(0)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": model_state,
                 "opt_state": phase.init(params), "rng": rng}
        # One compilation serves both the FLOPs count and the timed steps.
        step = phase.step.lower(state, batch).compile()
        flops = _flops(step)
        holder = {"state": jax.tree_util.tree_map(jnp.array, state)}

        def run(holder: dict = holder, step: Any = step) -> None:
            holder["state"], metrics = step(holder["state"], batch)
            jax.block_until_ready(metrics)

        run()  # compile
        runs[preset] = run
        out[preset] = {"flops": flops, "trainable_params": phase.num_trainable, "times": []}
    for _ in range(reps):
        for preset in PRESETS:
            start = time.perf_counter()
            runs[preset]()
            out[preset]["times"].append(time.perf_counter() - start)
    for preset in PRESETS:
        out[preset]["step_s"] = float(np.median(out[preset]["times"]))
    full, probe = out["full"], out["linear_probe"]
    result = {"presets": out, "flops_ratio": (full["flops"] or 0) / max(probe["flops"] or 1, 1),
              "time_ratio": full["step_s"] / probe["step_s"],
              "batch": config.input.batch_size, "model": config.model_name}
    print(f"{name}: full {full['step_s']:.2f} s, {(full['flops'] or 0) / 1e9:.1f} GFLOPs; "
          f"linear_probe {probe['step_s']:.2f} s, {(probe['flops'] or 0) / 1e9:.1f} GFLOPs; "
          f"full / probe: {result['time_ratio']:.2f}x time, {result['flops_ratio']:.2f}x FLOPs",
          flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="detection,segmentation")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = parser.parse_args(argv)
    train.enable_compilation_cache()
    results = {"setup": {"platform": jax.devices()[0].platform, "cpu_count": os.cpu_count(),
                         "machine": platform.machine(), "reps": args.reps}}
    for name in args.configs.split(","):
        results[name] = measure(name, args.reps)
    os.makedirs(args.out, exist_ok=True)
    stem = f"dense_{results['setup']['platform']}"
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump(results, f, indent=2)
    lines = ["| config | preset | step (s) | GFLOPs | trainable |", "|---|---|---|---|---|"]
    for name in args.configs.split(","):
        for preset, r in results[name]["presets"].items():
            lines.append(f"| {name} | `{preset}` | {r['step_s']:.2f} | "
                         f"{(r['flops'] or 0) / 1e9:.1f} | {r['trainable_params']:,} |")
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    retain_freed_memory()
    sys.exit(main())
