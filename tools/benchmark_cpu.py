"""The cpu suite of tools/benchmark.py: tljax's train step against PyTorch on this CPU.

Two workloads, each built the way the trainer builds it (`config.load`, `models.from_config`,
`train.Phases`: freeze plan, optimizer, clipping, the jitted and donated step) and compared
with the same network, batch, optimizer and clipping in eager PyTorch:

  lite0: configs/quickstart.py - EfficientNet-Lite0 at 64 px, batch 64, AdamW, global-norm
         clipping at 1.0, frozen batch-norm statistics, dropout 0.2 and drop-connect 0.2;
         PyTorch: `efficientnet_lite_pytorch` (its batch norms in eval mode, the rest training).
  vit:   configs/vit_finetune.py:model=S/16 at 128 px, batch 16, SGD momentum 0.9, clipping
         at 1.0; PyTorch: timm `vit_small_patch16_224` with img_size=128.

Each workload runs in a process of its own, as a training run does (`_in_own_process`).
The machine may be shared, so within it the systems run interleaved: --rounds rounds of
--steps timed steps of tljax, then of PyTorch at each of --torch_threads thread counts (after
warm-up steps of each); the tables give the median step of each over all its timed steps, the
ratio of the medians (the fastest PyTorch's step time / tljax's: > 1 means tljax is faster)
and the load average at the start and end. PyTorch runs at several thread counts because its
OpenMP barriers make every thread wait for the slowest: on a loaded machine one thread can be
several times faster than one per core.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tljax import config as config_lib
from tljax import freeze, models, sharding, tasks, train
from tljax.data.sources import DatasetInfo, Feature

REPO = Path(__file__).resolve().parent.parent
NUM_CLASSES = 10

# name: (config spec, overrides, resolution, batch, PyTorch reference, description)
WORKLOADS = {
    "lite0": ("configs/quickstart.py", {}, 64, 64, "efficientnet_lite_pytorch",
              "EfficientNet-Lite0, 64 px, batch 64, AdamW, clip 1.0, frozen BN statistics, "
              "dropout 0.2 (configs/quickstart.py)"),
    "vit": ("configs/vit_finetune.py:model=S/16,dataset=fashion_mnist", {}, 128, 16,
            "timm vit_small_patch16_224", "ViT-S/16, 128 px, batch 16, SGD momentum 0.9, "
            "clip 1.0 (configs/vit_finetune.py)"),
}


def machine_name(cpu: str, cores: int | None) -> str:
    """A short file-name form of the CPU model: 'AMD EPYC 9654 96-Core Processor', 2 cores
    -> 'amd-epyc-9654-x2'."""
    cpu = re.sub(r"\((R|TM|tm|r)\)|\bCPU\b|\bProcessor\b|\d+-Core|@.*$", " ", cpu)
    slug = re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-") or "cpu"
    return f"{slug}-x{cores}" if cores else slug


def _info() -> DatasetInfo:
    names = tuple(f"class_{i}" for i in range(NUM_CLASSES))
    return DatasetInfo(name="synthetic", features={"image": Feature("image"),
                                                   "label": Feature("class_label", names)},
                       split_sizes={"train": 1000})


def _load_config(name: str, dtype: str | None) -> Any:
    spec, overrides, _, batch, _, _ = WORKLOADS[name]
    config = config_lib.load(str(REPO / spec))
    config.input.batch_size = batch
    for key, value in overrides.items():
        config[key] = value
    if dtype:
        config.compute_dtype = dtype
    return config


def tljax_step(name: str, dtype: str | None = None) -> tuple[Any, dict[str, Any]]:
    """(run one step, facts) of workload `name` through the trainer's own machinery."""
    _, _, res, batch_size, _, _ = WORKLOADS[name]
    config = _load_config(name, dtype)
    task = tasks.build_task(config.get("task"), _info())
    model = models.from_config(config, task)
    rng = jax.random.PRNGKey(0)
    images = np.asarray(jax.random.uniform(rng, (batch_size, res, res, 3), minval=-1,
                                           maxval=1))
    batch = jax.device_put({"image": images,
                            "label": (np.arange(batch_size) % NUM_CLASSES).astype(np.int32)})
    variables = jax.jit(lambda r: model.init({"params": r, "dropout": r}, images[:1],
                                             train=False))(rng)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    mesh = sharding.make_mesh(config.mesh)
    shardings = train.variable_shardings_of(config, variables, mesh)
    plan = freeze.Plan(config, params, model.blocks())
    phase = train.Phases(config, plan, train.model_forward(model), task.loss, mesh, shardings,
                         total_steps=1000, warmup_steps=0, prepare=task.train_batch).get(0)
    state = jax.device_put({"step": jnp.zeros((), jnp.int32), "params": params,
                            "model_state": model_state, "opt_state": phase.init(params),
                            "rng": rng}, phase.state_shardings)
    start = time.perf_counter()
    compiled = phase.step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def run() -> None:
        # The executable compiled above; the step donates its state, so feed each output back.
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics)

    from benchmark_suites import hlo_op_counts  # tools/, beside this file

    return run, {"compile_s": compile_s, "hlo_ops": hlo_op_counts(compiled),
                 "compute_dtype": config.compute_dtype}


def torch_step(name: str, threads: int | None = None) -> tuple[Any, dict[str, Any]]:
    """(run one step, facts) of the PyTorch reference of workload `name`, eager, on CPU."""
    import torch

    _, _, res, batch_size, _, _ = WORKLOADS[name]
    threads = threads or os.cpu_count() or 1
    torch.manual_seed(0)
    if name == "lite0":
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0", image_size=res,
                                     num_classes=NUM_CLASSES)
        net.train()
        for module in net.modules():  # frozen statistics, as config.model.bn_update=False
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    else:
        import timm

        net = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=res,
                                num_classes=NUM_CLASSES)
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch_size, 3, res, res) * 2 - 1
    y = torch.arange(batch_size) % NUM_CLASSES

    def run() -> None:
        torch.set_num_threads(threads)  # the systems alternate within one process
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()

    return run, {"threads": threads, "torch": torch.__version__}


def interleaved(runs: dict[str, Any], rounds: int, steps: int, warmup: int = 2
                ) -> dict[str, list[float]]:
    """Seconds of every timed step of each system, systems alternating round by round."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            for _ in range(steps):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return times


def _in_own_process(name: str, args: Any) -> dict[str, Any]:
    """The suite's entry for workload `name`, measured by a fresh `tools/benchmark.py`."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(REPO / "tools" / "benchmark.py"), "--suite=cpu",
                   f"--workloads={name}", f"--rounds={args.rounds}",
                   f"--torch_threads={args.torch_threads}", f"--out={out}"]
        command += [f"--steps={args.steps}"] if args.steps else []
        command += [f"--compute_dtype={args.compute_dtype}"] if args.compute_dtype else []
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        [path] = Path(out).glob("cpu_*.json")
        return json.loads(path.read_text())["workloads"][name]


def cpu_suite(args: Any) -> dict[str, Any]:
    workloads = [w for w in args.workloads.split(",") if w]
    results: dict[str, Any] = {"workloads": {}}
    if len(workloads) > 1:
        # Each workload in a process of its own, as training runs are: with malloc keeping
        # freed memory (tljax/malloc.py), one workload's heap would shape the next one's
        # (in one process the ViT step ran 0.85x PyTorch's after Lite0, 1.01x alone).
        for name in workloads:
            results["workloads"][name] = entry = _in_own_process(name, args)
            print(f"{name}: tljax {entry['tljax']['examples_per_s']:.1f} ex/s, ratio to "
                  f"PyTorch's best {entry['ratio']:.2f}", flush=True)
        results["setup"] = _setup(args, one_process_per_workload=True)
        return results
    for name in workloads:
        _, _, res, batch_size, reference, description = WORKLOADS[name]
        load_start = list(os.getloadavg())
        runs, facts = {}, {}
        runs["tljax"], facts["tljax"] = tljax_step(name, args.compute_dtype)
        for threads in sorted({int(t) for t in args.torch_threads.split(",")}, reverse=True):
            key = f"pytorch_{threads}t"
            runs[key], facts[key] = torch_step(name, threads)
        times = interleaved(runs, args.rounds, args.steps)
        entry: dict[str, Any] = {"description": description, "reference": reference,
                                 "res": res, "batch": batch_size,
                                 "load_average_start": load_start,
                                 "load_average_end": list(os.getloadavg()), **facts}
        for system, seconds in times.items():
            median = statistics.median(seconds)
            entry[system].update(step_s=median, examples_per_s=batch_size / median,
                                 min_step_s=min(seconds), step_times_s=seconds)
        # The reference is PyTorch at its best thread count: on a loaded machine OpenMP's
        # barriers make more threads slower.
        best = min((k for k in runs if k != "tljax"), key=lambda k: entry[k]["step_s"])
        entry["pytorch"] = {**entry[best], "best_of": sorted(k for k in runs if k != "tljax")}
        entry["ratio"] = entry["pytorch"]["step_s"] / entry["tljax"]["step_s"]
        results["workloads"][name] = entry
        print(f"{name}: tljax {entry['tljax']['examples_per_s']:.1f} ex/s, PyTorch "
              + ", ".join(f"{entry[k]['examples_per_s']:.1f} ex/s ({k[8:]})"
                          for k in entry["pytorch"]["best_of"])
              + f"; ratio to the best {entry['ratio']:.2f} "
              f"(load {load_start[0]:.2f} -> {entry['load_average_end'][0]:.2f})", flush=True)
    results["setup"] = _setup(args, one_process_per_workload=False)
    return results


def _setup(args: Any, one_process_per_workload: bool) -> dict[str, Any]:
    return {"rounds": args.rounds, "steps_per_round": args.steps,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "compute_dtype": args.compute_dtype or "the config's",
            "one_process_per_workload": one_process_per_workload}


def cpu_markdown(results: dict[str, Any]) -> str:
    setup = results["setup"]
    lines = [f"Train step, tljax vs PyTorch, interleaved in one process per workload "
             f"({setup['rounds']} rounds of {setup['steps_per_round']} steps each); CPU "
             f"{setup['cpu']} x{setup['cpu_count']}, jax {setup['jax']}, XLA_FLAGS="
             f"`{setup['xla_flags']}`, GLIBC_TUNABLES=`{setup.get('glibc_tunables', '')}` "
             "(tljax/malloc.py; both systems run with it). PyTorch (eager) at each thread "
             "count (`t`); ratio: the fastest PyTorch's median step time / tljax's (> 1: "
             "tljax faster).", "",
             "| workload | tljax train step | PyTorch train step | ratio | load average |",
             "|---|---|---|---|---|"]
    for entry in results["workloads"].values():
        theirs = ", ".join(f"{entry[k]['examples_per_s']:.1f} ex/s ({k[8:]})"
                           for k in entry["pytorch"]["best_of"])
        lines.append(f"| {entry['description']} (PyTorch: {entry['reference']}) | "
                     f"{entry['tljax']['examples_per_s']:.1f} ex/s | "
                     f"{theirs} | {entry['ratio']:.2f} | "
                     f"{entry['load_average_start'][0]:.2f} -> "
                     f"{entry['load_average_end'][0]:.2f} |")
    return "\n".join(lines)
