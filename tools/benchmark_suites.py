"""The step, memory and input suites of tools/benchmark.py (see its docstring)."""

from __future__ import annotations

import argparse
import collections
import io
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tljax import freeze, sharding, train
from tljax.models import classifier, layers
from tljax.tasks.classification import softmax_xent

# Dense bf16 peak TFLOP/s of accelerators by jax device_kind prefix (vendor data sheets).
PEAK_BF16_TFLOPS = {"NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0,
                    "NVIDIA L4": 121.0, "NVIDIA GH200": 989.0, "NVIDIA B200": 2250.0}
TIMM_NAMES = {"Ti/16": "vit_tiny_patch16_224", "S/16": "vit_small_patch16_224",
              "B/16": "vit_base_patch16_224", "L/16": "vit_large_patch16_224",
              "B/32": "vit_base_patch32_224"}


def _median_time(fn: Any, reps: int, sync: Any = jax.block_until_ready, warmup: int = 2
                 ) -> float:
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return float(statistics.median(times))


def _cost(stage: Any) -> dict[str, float]:
    """XLA's cost analysis of a `Lowered` or `Compiled` computation."""
    cost = stage.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {k: float(v) for k, v in (cost or {}).items()
            if k in ("flops", "bytes accessed", "transcendentals")}


def hlo_op_counts(compiled: Any) -> dict[str, int]:
    """Counts of the ops of the compiled module worth a look when profiling a step."""
    text = compiled.as_text()
    ops = re.findall(r"=\s*\S+\s+([a-z][a-z0-9-]*)\(", text)
    counts = collections.Counter(ops)
    keep = ("fusion", "convert", "copy", "transpose", "custom-call", "dot", "convolution",
            "all-reduce", "all-gather", "reduce-scatter", "while")
    return {k: counts.get(k, 0) for k in keep}


def _config(spec: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        optim=dict(name="adamw", weight_decay=1e-4), lr=1e-3, grad_clip_norm=1.0, freeze=spec,
        schedule=None, lr_schedule=dict(decay_type="constant", linear_end=0.0),
        sharding_rules=[(".*", "replicate")]))


def _loss(logits: Any, batch: dict) -> Any:
    return softmax_xent(logits, batch["label"]).mean()


def _phase(model: Any, params: Any, spec: str, accum_steps: int = 1) -> Any:
    config = _config(spec)
    config.accum_steps = accum_steps
    mesh = sharding.make_mesh([("data", -1)])
    shardings = {"params": jax.tree_util.tree_map(lambda _: sharding.replicated(mesh), params)}
    plan = freeze.Plan(config, params, model.blocks())
    return train.Phases(config, plan, train.model_forward(model), _loss, mesh, shardings,
                        total_steps=1000, warmup_steps=0).get(0)


def _vit(args: Any, **overrides: Any) -> Any:
    kwargs = dict(variant=args.model, gelu_approximate=False, attention=args.attention,
                  remat=args.remat)
    kwargs.update(overrides)
    dtype = "bfloat16" if args.dtype == "bfloat16" else None
    return classifier("vit", args.classes, head_zeroinit=False, dtype=dtype, **kwargs)


def measured_matmul_tflops(size: int = 2048) -> float:
    """float32 matmul rate of this device (the CPU 'peak' MFU is quoted against)."""
    a = jnp.ones((size, size), jnp.float32)
    dot = jax.jit(lambda x: x @ x)
    seconds = min(_median_time(lambda: dot(a), 1, warmup=1) for _ in range(5))
    return 2 * size**3 / seconds / 1e12


def _peak_tflops(args: Any) -> tuple[float, str]:
    if args.peak_tflops:
        return args.peak_tflops, "given"
    kind = jax.devices()[0].device_kind
    for prefix, peak in PEAK_BF16_TFLOPS.items():
        if kind.startswith(prefix):
            return peak, f"{prefix} dense bf16 data-sheet peak"
    return measured_matmul_tflops(), "measured float32 2048x2048 matmul on this device"


def step_suite(args: Any) -> dict[str, Any]:
    systems = [s for s in args.systems.split(",") if s]
    if not args.torch_compile:
        systems = [s for s in systems if s != "timm_compile"]
    rng = jax.random.PRNGKey(0)
    images = np.asarray(jax.random.normal(rng, (args.batch, args.res, args.res, 3)))
    labels = np.arange(args.batch) % args.classes
    batch = jax.device_put({"image": images, "label": labels.astype(np.int32)})
    model = _vit(args)
    params = jax.jit(lambda r: model.init(r, batch["image"][:1]))(rng)["params"]
    results: dict[str, Any] = {"systems": {}}

    @jax.jit
    def forward(params: Any, batch: dict) -> Any:
        return _loss(model.apply({"params": params}, batch["image"], train=True), batch)

    lowered = forward.lower(params, batch)
    # FLOPs of the lowered module: XLA:GPU's compiled cost analysis leaves out the matmuls
    # (ViT-B/16's bf16 forward on an H200: 1,544 GFLOP per batch of 256 instead of 9,144).
    forward_flops = _cost(lowered).get("flops", 0.0)
    model_flops = 3 * forward_flops  # per step: forward + backward (2x forward)
    peak, peak_source = _peak_tflops(args)
    results["model_flops_per_step"] = model_flops
    results["peak_tflops"] = {"value": peak, "source": peak_source}

    def record(name: str, seconds: float, **extra: Any) -> None:
        entry = {"step_s": seconds, "img_per_s": args.batch / seconds, **extra}
        if name in ("tljax", "tljax_nd_dense", "timm", "timm_compile"):
            entry["mfu"] = model_flops / seconds / (peak * 1e12)
        results["systems"][name] = entry
        mfu = f", MFU {entry['mfu']:.1%}" if "mfu" in entry else ""
        print(f"{name}: {seconds * 1e3:.1f} ms/step, {entry['img_per_s']:.1f} img/s{mfu}",
              flush=True)

    if "tljax_forward" in systems:
        forward_compiled = lowered.compile()
        record("tljax_forward", _median_time(lambda: forward_compiled(params, batch),
                                             args.reps), flops=forward_flops)
    # tljax_nd_dense: the full step with Flax's N-D dot in the Dense layers instead of the
    # 2-D matmuls (`layers.DENSE_AS_2D_MATMUL`), to show what those change on this device.
    for name, spec in (("tljax", "full"), ("tljax_nd_dense", "full"),
                       ("tljax_lp", "linear_probe")):
        if name not in systems:
            continue
        phase = _phase(model, params, spec)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": {},
                 "opt_state": phase.init(params), "rng": rng}
        start = time.perf_counter()
        two_d = layers.DENSE_AS_2D_MATMUL
        layers.DENSE_AS_2D_MATMUL = two_d and name != "tljax_nd_dense"
        try:
            compiled = phase.step.lower(state, batch).compile()
        finally:
            layers.DENSE_AS_2D_MATMUL = two_d
        compile_s = time.perf_counter() - start
        holder = {"state": jax.tree_util.tree_map(jnp.array, state)}

        def run(holder: dict = holder, compiled: Any = compiled) -> Any:
            # The executable compiled above (calling the jitted function would compile again).
            holder["state"], metrics = compiled(holder["state"], batch)
            return metrics

        record(name, _median_time(run, args.reps), compile_s=compile_s,
               step_flops=_cost(compiled).get("flops"), hlo_ops=hlo_op_counts(compiled))
        del holder
    for name in ("timm", "timm_compile"):
        if name in systems:
            try:
                record(name, _timm_step_time(args, compiled=name == "timm_compile"))
            except Exception as e:  # noqa: BLE001 - e.g. no C++ compiler for inductor on CPU
                results["systems"][name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                print(f"{name}: unavailable ({type(e).__name__}: {str(e)[:200]})", flush=True)
    tl = results["systems"].get("tljax", {}).get("step_s")
    for ref in ("timm", "timm_compile"):
        theirs = results["systems"].get(ref, {}).get("step_s")
        if tl and theirs:
            results[f"tljax_speed_vs_{ref}"] = theirs / tl  # > 1: tljax faster
    results["setup"] = {"model": f"ViT-{args.model}", "res": args.res, "batch": args.batch,
                        "dtype": args.dtype, "attention": args.attention, "remat": args.remat,
                        "optimizer": "adamw + clip 1.0", "reps": args.reps,
                        "xla_flags": os.environ.get("XLA_FLAGS", "")}
    return results


def _timm_step_time(args: Any, compiled: bool) -> float:
    import timm
    import torch

    cuda = jax.devices()[0].platform == "gpu" and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    net = timm.create_model(TIMM_NAMES[args.model], pretrained=False, img_size=args.res,
                            num_classes=args.classes).to(device)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4,
                            fused=cuda or None)
    forward = torch.compile(net) if compiled else net
    x = torch.randn(args.batch, 3, args.res, args.res, device=device)
    y = torch.arange(args.batch, device=device) % args.classes
    bf16 = args.dtype == "bfloat16"

    def step() -> Any:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        return loss

    sync = (lambda _: torch.cuda.synchronize()) if cuda else (lambda _: None)
    return _median_time(step, args.reps, sync=sync, warmup=3 if compiled else 2)


def step_markdown(results: dict[str, Any]) -> str:
    s, setup = results["systems"], results["setup"]
    lines = [f"{setup['model']} at {setup['res']} px, batch {setup['batch']}, {setup['dtype']} "
             f"compute (f32 parameters), {setup['optimizer']}, attention={setup['attention']}, "
             f"median of {setup['reps']} steps; {setup['device']} ({setup['device_count']}), "
             f"CPU {setup['cpu']} x{setup['cpu_count']}, load average "
             f"{setup['load_average_start'][0]:.1f} at start, "
             f"{setup['load_average_end'][0]:.1f} at end. MFU: 3 x forward FLOPs "
             f"({results['model_flops_per_step'] / 1e9:.1f} GFLOP/step) against "
             f"{results['peak_tflops']['value']:.2f} TFLOP/s "
             f"({results['peak_tflops']['source']}).", "",
             "| system | step (ms) | img/s | MFU |", "|---|---|---|---|"]
    for name, r in s.items():
        if "error" in r:
            lines.append(f"| {name} | - | - | unavailable: {r['error'][:80]} |")
            continue
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        lines.append(f"| {name} | {r['step_s'] * 1e3:.1f} | {r['img_per_s']:.1f} | {mfu} |")
    for ref in ("timm", "timm_compile"):
        if f"tljax_speed_vs_{ref}" in results:
            lines.append(f"\ntljax full fine-tuning step vs {ref}: "
                         f"{results[f'tljax_speed_vs_{ref}']:.2f}x its img/s.")
    if "tljax" in s and "hlo_ops" in s["tljax"]:
        ops = ", ".join(f"{k} {v}" for k, v in s["tljax"]["hlo_ops"].items() if v)
        lines.append(f"\ntljax step: compiled in {s['tljax']['compile_s']:.1f} s; HLO ops: {ops}.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# memory


def memory_suite(args: Any) -> dict[str, Any]:
    policies = (args.remat or "none,full,dots_no_batch,dots").split(",")
    variants = [(p, False) for p in policies] + ([(p, True) for p in policies] if args.scan
                                                 else [])
    rng = jax.random.PRNGKey(0)
    images = jax.ShapeDtypeStruct((args.batch, args.res, args.res, 3), jnp.float32)
    batch = {"image": images, "label": jax.ShapeDtypeStruct((args.batch,), jnp.int32)}
    results: dict[str, Any] = {"variants": {}}
    for policy, scan in variants:
        model = _vit(args, remat=None if policy == "none" else policy, scan=scan)
        params = jax.eval_shape(lambda r, m=model: m.init(r, jnp.zeros((1, args.res, args.res,
                                                                        3))), rng)["params"]
        phase = _phase(model, params, "full", args.accum_steps)
        state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
                 "model_state": {}, "opt_state": jax.eval_shape(phase.tx.init, params),
                 "rng": jax.eval_shape(lambda: rng)}
        start = time.perf_counter()
        compiled = phase.step.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        m = compiled.memory_analysis()
        peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                + m.temp_size_in_bytes)
        name = f"{policy}{' + scan' if scan else ''}"
        results["variants"][name] = {
            "peak_bytes": int(peak), "arguments_bytes": int(m.argument_size_in_bytes),
            "temp_bytes": int(m.temp_size_in_bytes), "compile_s": compile_s,
            "flops": _cost(compiled).get("flops")}
        print(f"remat {name}: peak {peak / 2**30:.2f} GiB (state "
              f"{m.argument_size_in_bytes / 2**30:.2f} GiB, temporaries "
              f"{m.temp_size_in_bytes / 2**30:.2f} GiB), compiled in {compile_s:.0f} s",
              flush=True)
    results["setup"] = {"model": f"ViT-{args.model}", "res": args.res, "batch": args.batch,
                        "dtype": args.dtype, "attention": args.attention,
                        "accum_steps": args.accum_steps, "optimizer": "adamw + clip 1.0"}
    return results


def memory_markdown(results: dict[str, Any]) -> str:
    setup = results["setup"]
    base = results["variants"].get("none", {}).get("peak_bytes")
    lines = [f"{setup['model']} full fine-tuning at {setup['res']} px, batch {setup['batch']} per "
             f"device, {setup['dtype']} compute, {setup['optimizer']}, accum_steps "
             f"{setup['accum_steps']}: XLA buffer assignment of the compiled step on "
             f"{setup['device']} (nothing run). Load average {setup['load_average_start'][0]:.1f}.",
             "GFLOP/step is XLA's cost analysis, which counts a scanned loop's body once.",
             "", "| remat | peak per device (GiB) | of which params + optimizer state (GiB) | "
             "temporaries (GiB) | vs none | GFLOP/step | compile (s) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results["variants"].items():
        ratio = f"{r['peak_bytes'] / base:.2f}" if base else "-"
        lines.append(f"| {name} | {r['peak_bytes'] / 2**30:.2f} | "
                     f"{r['arguments_bytes'] / 2**30:.2f} | {r['temp_bytes'] / 2**30:.2f} | "
                     f"{ratio} | {(r['flops'] or 0) / 1e9:.0f} | {r['compile_s']:.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# input


def _photo_folder(root: Path, count: int) -> Path:
    """`count` JPEGs (quality 90) cut from scikit-image's photos at ImageNet-like sizes
    (about 500 x 375), in two class folders: a `folder:` dataset."""
    from PIL import Image
    from skimage import data as photos

    images = [photos.astronaut(), photos.coffee(), photos.chelsea(), photos.rocket()]
    rng = np.random.default_rng(0)
    for i in range(count):
        image = images[i % len(images)]
        h = int(rng.integers(image.shape[0] // 2, image.shape[0] + 1))
        w = int(rng.integers(image.shape[1] // 2, image.shape[1] + 1))
        top = int(rng.integers(0, image.shape[0] - h + 1))
        left = int(rng.integers(0, image.shape[1] - w + 1))
        crop = Image.fromarray(image[top:top + h, left:left + w])
        scale = 500 / max(h, w)
        crop = crop.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        folder = root / "train" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"{i:05d}.jpg", quality=90)
    return root


def _decoders(files: list[Path]) -> dict[str, float]:
    """Milliseconds per JPEG of each decoder available (best of 3 passes)."""
    from PIL import Image

    blobs = [f.read_bytes() for f in files]

    def pil(data: bytes) -> Any:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im)

    decoders = {"PIL": pil}
    try:
        import simplejpeg

        decoders["simplejpeg"] = lambda data: simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ImportError:
        pass
    try:
        import cv2

        cv2.setNumThreads(1)

        def opencv(data: bytes) -> Any:
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

        decoders["opencv"] = opencv
    except ImportError:
        pass
    out = {}
    for name, fn in decoders.items():
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for blob in blobs:
                fn(blob)
            best = min(best, time.perf_counter() - start)
        out[name] = 1e3 * best / len(blobs)
    return out


def _op_costs(files: list[Path], pp: str) -> dict[str, float]:
    """Milliseconds per example of each stage of `pp` in one thread: reading + decoding the
    file, each example op, and collation (stacking the batch)."""
    from tljax.data.preprocess import Preprocess, decode_image

    preprocess = Preprocess(pp)
    names = [spec.split("(")[0] for spec in pp.split("|")]
    rng = np.random.default_rng(0)
    costs = collections.defaultdict(float)
    start = time.perf_counter()
    examples = [{"image": decode_image(f), "label": 0} for f in files]
    costs["read + decode"] = time.perf_counter() - start
    for name, op in zip(names, preprocess.example_ops, strict=True):
        start = time.perf_counter()
        examples = [op(e, rng) for e in examples]
        costs[name] += time.perf_counter() - start
    start = time.perf_counter()
    preprocess.collate(examples)
    costs["collate"] = time.perf_counter() - start
    return {k: 1e3 * v / len(files) for k, v in costs.items()}


def input_suite(args: Any) -> dict[str, Any]:
    from tljax import data

    workers = [int(w) for w in args.workers.split(",")]
    root = Path(tempfile.mkdtemp(prefix="tljax_jpegs_"))
    results: dict[str, Any] = {"pipeline": {}}
    try:
        _photo_folder(root, args.images)
        files = sorted(root.glob("train/*/*.jpg"))
        results["decode_ms_per_image"] = _decoders(files[:64])
        print("decode ms/image:", {k: round(v, 2) for k, v in
                                  results["decode_ms_per_image"].items()}, flush=True)
        pp = f"decode|inception_crop({args.res})|flip_lr|value_range(-1, 1)"
        results["ms_per_example_by_op"] = _op_costs(files[:64], pp)
        print("ms/example by op:", {k: round(v, 2) for k, v in
                                    results["ms_per_example_by_op"].items()}, flush=True)
        for count in workers:
            batches = data.train_batches(dataset=f"folder:{root}", split="train", pp=pp,
                                         batch_size=args.batch, seed=0, workers=count)
            for _ in range(max(2, count)):  # warm-up: workers started, first batches built
                next(batches)
            start = time.perf_counter()
            for _ in range(args.steps):
                next(batches)
            seconds = time.perf_counter() - start
            batches.close()
            rate = args.steps * args.batch / seconds
            results["pipeline"][str(count)] = {"examples_per_s": rate}
            print(f"workers {count}: {rate:.0f} examples/s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["setup"] = {"pp": pp, "batch": args.batch, "images": args.images,
                        "timed_batches": args.steps,
                        "threads_when_0_workers": int(os.environ.get("TLJAX_DATA_THREADS", 4)),
                        "jpeg_size": "about 500 x 375, quality 90"}
    return results


def input_markdown(results: dict[str, Any]) -> str:
    setup, pipe = results["setup"], results["pipeline"]
    base = pipe.get("1", {}).get("examples_per_s")
    lines = [f"`{setup['pp']}` on {setup['images']} JPEGs ({setup['jpeg_size']}, cut from "
             f"scikit-image's photos), batch {setup['batch']}, {setup['timed_batches']} batches "
             f"timed after warm-up; CPU {setup['cpu']} x{setup['cpu_count']}, load average "
             f"{setup['load_average_start'][0]:.1f} at start, "
             f"{setup['load_average_end'][0]:.1f} at end.", "",
             "| workers | examples/s | vs 1 worker |", "|---|---|---|"]
    for count, r in pipe.items():
        label = (f"0 (threads: {setup['threads_when_0_workers']})" if count == "0" else count)
        ratio = f"{r['examples_per_s'] / base:.2f}" if base else "-"
        lines.append(f"| {label} | {r['examples_per_s']:.0f} | {ratio} |")
    decode = ", ".join(f"{k} {v:.2f} ms" for k, v in results["decode_ms_per_image"].items())
    lines.append(f"\nJPEG decoding alone, per image: {decode}.")
    ops = ", ".join(f"{k} {v:.2f}" for k, v in results["ms_per_example_by_op"].items())
    lines.append(f"\nOne thread, ms per example by stage: {ops}.")
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


def lm_memory_markdown(results: dict[str, Any]) -> str:
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
