"""Benchmarks whose numbers go into benchmarks/ and the README.

    python tools/benchmark.py --suite=freeze [--model=S/16 --res=224 --batch=8 --reps=3]

freeze: on a ViT, per freeze preset, the train step time (median of --reps after one
warm-up call), its XLA FLOPs and the optimizer-state bytes, against a forward-only step
(loss without gradients); and one linear-probe epoch over --epoch_examples examples on
cached features vs through the frozen backbone. Writes benchmarks/freeze_<platform>.json
and prints a markdown table. Ratios are measured in one process on one machine.

    python tools/benchmark.py --suite=lm_memory [--variant=smollm2-135m --batch=8 --length=128]

lm_memory: on a Llama-family LM (SmolLM2-135M's shape; shapes only, no weights), per
preset, the bytes of parameters, optimizer state and activations (XLA's temporary
buffers of the compiled train step, `tljax.memory`) and the step's FLOPs: causal_lm with
full, bitfit, LoRA, LoRA with the frozen base stored in bfloat16, with per-layer remat,
and both; classification from the last token: LoRA, linear probe, and the linear probe
on cached features. Compile-only, so the numbers do not depend on machine load. Writes
benchmarks/lm_memory_<platform>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from tljax import features, freeze, sharding, train  # noqa: E402
from tljax.models import classifier, lora  # noqa: E402
from tljax.tasks.classification import softmax_xent  # noqa: E402

PRESETS = ("full", "last_k_blocks(2)", "bitfit", "lora(rank=8, alpha=16)", "linear_probe")


def _time(fn: Any, *args: Any, reps: int) -> float:
    """Median seconds of `fn(*args)` over `reps` calls after a warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _flops(jitted: Any, *args: Any) -> float | None:
    try:
        cost = jitted.lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost.get("flops")) if cost and "flops" in cost else None
    except Exception:  # cost analysis is best effort (backend dependent)
        return None


def _config(spec: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        optim=dict(name="adamw", weight_decay=1e-4), lr=1e-3, grad_clip_norm=1.0, freeze=spec,
        schedule=None, lr_schedule=dict(decay_type="cosine", linear_end=0.0)))


def loss_fn(logits: Any, batch: dict) -> Any:
    return softmax_xent(logits, batch["label"]).mean()


def _nbytes(tree_: Any) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree_)))


def freeze_suite(args: argparse.Namespace) -> dict[str, Any]:
    model = classifier("vit", args.classes, head_zeroinit=False, variant=args.model)
    rng = jax.random.PRNGKey(0)
    images = jax.random.normal(rng, (args.batch, args.res, args.res, 3))
    labels = jnp.arange(args.batch) % args.classes
    batch = {"image": images, "label": labels}
    base_vars = jax.jit(lambda r: model.init(r, images[:1]))(rng)
    mesh = sharding.make_mesh([("data", -1)])
    results: dict[str, Any] = {"presets": {}}

    @jax.jit
    def forward_only(params: Any, batch: dict) -> jnp.ndarray:
        logits = model.apply({"params": params}, batch["image"], train=True)
        return loss_fn(logits, batch)

    forward_s = _time(forward_only, base_vars["params"], batch, reps=args.reps)
    results["forward_only"] = {"step_s": forward_s,
                               "flops": _flops(forward_only, base_vars["params"], batch)}
    print(f"forward only: {forward_s:.3f} s", flush=True)

    for spec in PRESETS:
        config = _config(spec)
        step_model, variables = model, base_vars
        options = freeze.lora_options(config)
        if options:
            step_model = lora.LoRA(model, **options)
            variables = step_model.add_adapters(base_vars, rng, images[:1])
        params = variables["params"]
        plan = freeze.Plan(config, params, model.blocks())
        shardings = {"params": jax.tree_util.tree_map(lambda _: sharding.replicated(mesh), params)}
        phases = train.Phases(config, plan, train.model_forward(step_model), loss_fn,
                              mesh, shardings, total_steps=1000, warmup_steps=0)
        phase = phases.get(0)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": {},
                 "opt_state": phase.init(params), "rng": rng}
        flops = _flops(phase.step, state, batch)

        # The step donates its state: time a loop that feeds each output back in.
        holder = {"state": jax.tree_util.tree_map(jnp.array, state)}

        def run(batch: dict, holder: dict = holder, phase: Any = phase) -> Any:
            holder["state"], metrics = phase.step(holder["state"], batch)
            return metrics

        step_s = _time(run, batch, reps=args.reps)
        trainable = phase.num_trainable
        total = int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
        results["presets"][spec] = {
            "step_s": step_s, "ratio_to_forward": step_s / forward_s, "flops": flops,
            "opt_state_bytes": _nbytes(holder["state"]["opt_state"]),
            "trainable_params": trainable, "params": total}
        print(f"{spec}: {step_s:.3f} s ({step_s / forward_s:.2f}x forward), opt state "
              f"{_nbytes(holder['state']['opt_state']) / 2**20:.1f} MiB, trainable "
              f"{trainable:,}/{total:,}", flush=True)

    # Linear-probe epoch: through the frozen backbone vs on cached features.
    steps = max(args.epoch_examples // args.batch, 1)
    config = _config("linear_probe")
    params = base_vars["params"]
    plan = freeze.Plan(config, params, model.blocks())
    shardings = {"params": jax.tree_util.tree_map(lambda _: sharding.replicated(mesh), params)}
    cached = train.Phases(config, plan, features.head_forward(model), loss_fn, mesh,
                          shardings, total_steps=1000, warmup_steps=0).get(0)
    embed = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False, head=False))
    feats = embed(params, images)
    feature_s = _time(embed, params, images, reps=args.reps)
    holder = {"state": {"step": jnp.zeros((), jnp.int32),
                        "params": jax.tree_util.tree_map(jnp.array, params), "model_state": {},
                        "opt_state": cached.init(params), "rng": rng}}

    def cached_step(feats: Any) -> Any:
        holder["state"], metrics = cached.step(holder["state"], {"features": feats,
                                                                 "label": labels})
        return metrics

    cached_step_s = _time(cached_step, feats, reps=max(args.reps, 20))
    uncached_epoch = steps * results["presets"]["linear_probe"]["step_s"]
    cached_epoch = steps * cached_step_s
    results["linear_probe_epoch"] = {
        "examples": steps * args.batch, "uncached_s": uncached_epoch, "cached_s": cached_epoch,
        "speedup": uncached_epoch / cached_epoch,
        "feature_extraction_once_s": steps * feature_s}
    results["setup"] = {"model": f"ViT-{args.model}", "res": args.res, "batch": args.batch,
                        "optimizer": "adamw", "device": jax.devices()[0].device_kind,
                        "platform": jax.devices()[0].platform, "cpu_count": os.cpu_count(),
                        "machine": platform.machine(), "jax": jax.__version__,
                        "reps": args.reps}
    return results


def markdown(results: dict[str, Any]) -> str:
    forward = results["forward_only"]["step_s"]
    setup = results["setup"]
    lines = [f"{setup['model']} at {setup['res']} px, batch {setup['batch']}, adamw, "
             f"{setup['platform']} ({setup['cpu_count']} cores), median of {setup['reps']}.", "",
             "| preset | step (s) | / forward-only | GFLOPs | optimizer state (MiB) | trainable |",
             "|---|---|---|---|---|---|",
             f"| forward only (no grad) | {forward:.3f} | 1.00 | "
             f"{(results['forward_only']['flops'] or 0) / 1e9:.1f} | - | - |"]
    for spec, r in results["presets"].items():
        lines.append(f"| `{spec}` | {r['step_s']:.3f} | {r['ratio_to_forward']:.2f} | "
                     f"{(r['flops'] or 0) / 1e9:.1f} | {r['opt_state_bytes'] / 2**20:.1f} | "
                     f"{r['trainable_params']:,} / {r['params']:,} |")
    e = results["linear_probe_epoch"]
    lines += ["", f"Linear-probe epoch of {e['examples']} examples: uncached "
              f"{e['uncached_s']:.2f} s,"
              f" cached features {e['cached_s']:.4f} s ({e['speedup']:.0f}x faster; the one-time "
              f"feature extraction takes {e['feature_extraction_once_s']:.2f} s)."]
    return "\n".join(lines)


LM_PRESETS = (  # (row name, task, freeze, config changes)
    ("full", "causal_lm", "full", {}),
    ("bitfit", "causal_lm", "bitfit", {}),
    ("lora(8)", "causal_lm", "lora(rank=8, alpha=16)", {}),
    ("lora(8), frozen bf16", "causal_lm", "lora(rank=8, alpha=16)",
     {"frozen_dtype": "bfloat16"}),
    ("lora(8), remat", "causal_lm", "lora(rank=8, alpha=16)", {"remat": True}),
    ("lora(8), frozen bf16, remat", "causal_lm", "lora(rank=8, alpha=16)",
     {"frozen_dtype": "bfloat16", "remat": True}),
    ("lora(8), bf16 compute", "causal_lm", "lora(rank=8, alpha=16)",
     {"compute_dtype": "bfloat16"}),
    ("lora(8), bf16 compute, frozen bf16", "causal_lm", "lora(rank=8, alpha=16)",
     {"compute_dtype": "bfloat16", "frozen_dtype": "bfloat16"}),
    ("lora(8), bf16 compute, frozen bf16, remat", "causal_lm", "lora(rank=8, alpha=16)",
     {"compute_dtype": "bfloat16", "frozen_dtype": "bfloat16", "remat": True}),
    ("classification: lora(8)", "classification", "lora(rank=8, alpha=16)", {}),
    ("classification: linear_probe", "classification", "linear_probe", {}),
    ("classification: linear_probe, cached features", "classification", "linear_probe",
     {"cache_features": True}),
)


def lm_memory_suite(args: argparse.Namespace) -> dict[str, Any]:
    from tljax import memory, models, tasks
    from tljax.data import DatasetInfo, Feature

    info = DatasetInfo("bench", {"text": Feature("text"), "label": Feature(
        "class_label", tuple(f"c{i}" for i in range(args.classes)))}, {})
    ids = jnp.zeros((args.batch, args.length), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": ids,
             "label": jnp.zeros((args.batch,), jnp.int32)}
    results: dict[str, Any] = {"presets": {}}
    for row, task_name, preset, changes in LM_PRESETS:
        changes = dict(changes)
        model_kwargs = {"variant": args.variant, "remat": changes.pop("remat", False)}
        config = ml_collections.ConfigDict(dict(
            model_name="llama", model=model_kwargs, optim=dict(name="adamw"), lr=1e-3,
            lr_schedule=dict(decay_type="cosine", linear_end=0.0), grad_clip_norm=1.0,
            freeze=preset, schedule=None, **changes))
        spec = ({"name": "causal_lm"} if task_name == "causal_lm" else
                {"name": "classification", "head_input": "last_token"})
        task = tasks.build_task(spec, info)
        model = models.from_config(config, task)
        cached = None
        if changes.get("cache_features"):
            width = model.backbone.hidden_size
            cached = {"features": jnp.zeros((args.batch, width)), "label": batch["label"]}
        start = time.perf_counter()
        result = memory.step_memory(config, model, task, batch, cached=cached)
        results["presets"][row] = result
        print(f"{row}: {memory.describe(result)} (compiled in "
              f"{time.perf_counter() - start:.0f} s)", flush=True)
    results["setup"] = {"model": f"llama {args.variant}", "batch": args.batch,
                        "length": args.length, "optimizer": "adamw",
                        "platform": jax.devices()[0].platform, "jax": jax.__version__}
    return results


def lm_markdown(results: dict[str, Any]) -> str:
    setup = results["setup"]
    mib = lambda b: f"{(b or 0) / 2**20:,.1f}"
    lines = [f"{setup['model']}, batch {setup['batch']} x {setup['length']} tokens, adamw, "
             f"compiled on {setup['platform']} (XLA memory and cost analysis).", "",
             "| preset | trainable | params (MiB) | optimizer state (MiB) | activations (MiB) "
             "| GFLOPs / step |", "|---|---|---|---|---|---|"]
    for row, r in results["presets"].items():
        lines.append(f"| {row} | {r['num_trainable']:,} | {mib(r['params'])} | "
                     f"{mib(r['opt_state'])} | {mib(r['activations'])} | "
                     f"{(r['flops'] or 0) / 1e9:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=["freeze", "lm_memory"], required=True)
    parser.add_argument("--variant", default="smollm2-135m", help="lm_memory: Llama variant")
    parser.add_argument("--length", type=int, default=128, help="lm_memory: tokens per row")
    parser.add_argument("--model", default="S/16")
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--epoch_examples", type=int, default=1024)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent /
                                             "benchmarks"))
    args = parser.parse_args(argv)
    if args.suite == "lm_memory":
        results = lm_memory_suite(args)
        name, table = f"lm_memory_{results['setup']['platform']}", lm_markdown(results)
    else:
        results = freeze_suite(args)
        name, table = f"freeze_{results['setup']['platform']}", markdown(results)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
