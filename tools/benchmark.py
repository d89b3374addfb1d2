"""Benchmarks whose numbers go into benchmarks/ and the README.

    python tools/benchmark.py --suite=freeze [--model=S/16 --res=224 --batch=8 --reps=3]
    python tools/benchmark.py --suite=step   [--model=S/16 --batch=8 --dtype=float32 ...]
    python tools/benchmark.py --suite=memory [--model=L/16 --batch=64 --remat=none,full,...]
    python tools/benchmark.py --suite=input  [--workers=0,1,2 --batch=32 --images=256]
    python tools/benchmark.py --suite=cpu    [--workloads=lite0,vit --rounds=4 --steps=2]

freeze: on a ViT, per freeze preset, the train step time (median of --reps after one
warm-up call), its XLA FLOPs and the optimizer-state bytes, against a forward-only step
(loss without gradients); and one linear-probe epoch over --epoch_examples examples on
cached features vs through the frozen backbone.

step: tljax against timm/PyTorch on the same ViT, batch, resolution and precision
(--dtype bfloat16: bf16 compute with f32 parameters, torch autocast), AdamW with global-norm
clipping at 1.0, in one process: img/s of the full fine-tuning step, the tljax linear-probe
step and forward pass, timm eager and (--torch_compile) torch.compile; the step-time ratio;
model FLOPs utilisation = 3 x the forward FLOPs of XLA's cost analysis / step time / peak
(the device's bf16 dense peak on GPUs, a measured float32 matmul rate on CPUs); and a count
of the compiled step's HLO ops (fusions, converts, copies, transposes) for profiling.

memory: peak memory per device of the full fine-tuning step from XLA's buffer assignment
(`jit(...).lower(...).compile().memory_analysis()`: arguments + outputs - aliased + temporaries)
for each --remat policy (and --scan), with its compile time; nothing is run.

input: examples/s of the image pipeline - JPEG decode, inception_crop(--res), flip_lr,
value_range(-1, 1), batching - through `tljax.data.train_batches` on real photos (scikit-image,
cropped to ImageNet-like sizes and JPEG-encoded at quality 90) against --workers (0 = the
thread pool, N = worker processes); and the JPEG decoders alone (PIL, simplejpeg, OpenCV).

cpu: tljax's train step of the quickstart (EfficientNet-Lite0) and of a ViT-S/16 against the
same step in PyTorch, interleaved in one process (tools/benchmark_cpu.py); written to
benchmarks/cpu_<machine>.{json,md}, machine being the CPU model and its core count.

Each other suite writes benchmarks/<suite>_<platform>.{json,md} (or --out) with the machine: device,
CPU model, core count and the load average before and after (the machine may be shared).
Ratios are measured in one process on one machine; absolute times only mean something with
the load they were measured under.

lm_memory: on a Llama-family LM (SmolLM2-135M's shape; shapes only, no weights), per
preset, the bytes of parameters, optimizer state and activations (XLA's temporary
buffers of the compiled train step, `tljax.memory`) and the step's FLOPs: causal_lm with
full, bitfit, LoRA, LoRA with the frozen base stored in bfloat16, with per-layer remat,
and both; classification from the last token: LoRA, linear probe, and the linear probe
on cached features. Compile-only, so the numbers do not depend on machine load.
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
from tljax.malloc import retain_freed_memory  # noqa: E402
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


def machine() -> dict[str, Any]:
    """What the numbers were measured on (the CPU model, the accelerator, the load)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = jax.devices()[0]
    return {"platform": device.platform, "device": device.device_kind,
            "device_count": jax.device_count(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "host": platform.node(), "jax": jax.__version__,
            "load_average_start": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=["freeze", "step", "memory", "input", "lm_memory",
                                            "cpu"],
                        required=True)
    parser.add_argument("--model", default=None, help="ViT variant (S/16 freeze and step, "
                        "L/16 memory)")
    parser.add_argument("--variant", default="smollm2-135m", help="lm_memory: Llama variant")
    parser.add_argument("--length", type=int, default=128, help="lm_memory: tokens per row")
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--epoch_examples", type=int, default=1024)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--attention", default="xla", help="xla | cudnn | reference")
    parser.add_argument("--remat", default=None, help="policy (step) or comma list (memory)")
    parser.add_argument("--scan", action="store_true",
                        help="memory: every policy also with scanned blocks")
    parser.add_argument("--accum_steps", type=int, default=1, help="memory: microbatches")
    parser.add_argument("--systems", default="tljax,tljax_lp,tljax_forward,timm,timm_compile",
                        help="step: which of tljax, tljax_nd_dense, tljax_lp, tljax_forward, timm, "
                        "timm_compile")
    parser.add_argument("--torch_compile", action="store_true",
                        help="step: include timm + torch.compile (needs a C++ compiler on CPU)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="step: peak TFLOP/s for MFU (default: known GPU or measured CPU)")
    parser.add_argument("--workers", default="0,1,2", help="input: comma list of workers")
    parser.add_argument("--images", type=int, default=256, help="input: JPEGs to encode")
    parser.add_argument("--steps", type=int, default=None,
                        help="input: timed batches per setting (8); cpu: steps per round (2)")
    parser.add_argument("--workloads", default="lite0,vit", help="cpu: lite0 and/or vit")
    parser.add_argument("--rounds", type=int, default=4, help="cpu: interleaved rounds")
    parser.add_argument("--torch_threads", default=f"{os.cpu_count() or 1},1",
                        help="cpu: PyTorch thread counts to time (the fastest is the reference)")
    parser.add_argument("--compute_dtype", default=None,
                        help="cpu: override the configs' compute_dtype (e.g. bfloat16)")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent /
                                             "benchmarks"))
    args = parser.parse_args(argv)
    defaults = {"freeze": ("S/16", 8), "step": ("S/16", 8), "memory": ("L/16", 64),
                "input": (None, 32), "lm_memory": (None, 8), "cpu": (None, None)}[args.suite]
    args.model = args.model or defaults[0]
    args.batch = args.batch or defaults[1]
    args.steps = args.steps or (2 if args.suite == "cpu" else 8)
    setup = machine()
    where = setup["platform"]
    if args.suite == "freeze":
        results = freeze_suite(args)
        table = markdown(results)
    else:
        if args.suite == "cpu":
            import benchmark_cpu as suites  # tools/, beside this file

            where = suites.machine_name(setup["cpu"], setup["cpu_count"])
        else:
            import benchmark_suites as suites

        results = getattr(suites, f"{args.suite}_suite")(args)
        results["setup"] = {**setup, **results.get("setup", {})}
        results["setup"]["load_average_end"] = list(os.getloadavg())
        table = getattr(suites, f"{args.suite}_markdown")(results)
    os.makedirs(args.out, exist_ok=True)
    name = f"{args.suite}_{where}{args.tag}"
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    retain_freed_memory()
    sys.exit(main())
