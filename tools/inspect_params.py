"""Prints the parameter tree of a pretrained checkpoint: shapes, dtypes and counts.

    python tools/inspect_params.py SPEC [--depth=N]
    python tools/inspect_params.py --config=CONFIG[:ARGS] [--step=N] [--memory]
                                   [--config.KEY=VALUE ...]

SPEC is any `tljax.load_pretrained` spec (hf:DIR, timm:[ARCH:]FILE, big_vision:FILE.npz,
vit_jax:FILE.npz, torchvision:ARCH:FILE, efficientnet_lite0, minilm, tljax:DIR, ...).

With --config, prints the freeze schedule of a training config at step N (default 0):
per parameter its block group, whether it trains in the phase of step N and its lr
multiplier; the totals of trainable and all parameters; for LoRA the adapter count.
--memory adds what the first phase's train step holds for one batch of the config
(tljax.memory: parameters as stored, optimizer state, activations from the compiled step's
memory analysis, FLOPs); it compiles the step, which takes a while for a large model.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tljax import tree  # noqa: E402


def _count(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape)) if shape else 1


def _natural_key(name: str) -> list[Any]:
    """'block10/x' after 'block9/x': digit runs compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def describe(variables: Mapping[str, Any], max_depth: int | None = None) -> str:
    """A tree of `variables`: one line per leaf (shape, dtype, count) under per-subtree totals.

    `max_depth` folds everything below that depth into its subtree's line. Works on
    arrays and on `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`).
    """
    flat = tree.flatten(dict(variables))
    totals: dict[str, int] = {}
    for name, leaf in flat.items():
        parts = name.split("/")
        for depth in range(1, len(parts)):
            prefix = "/".join(parts[:depth])
            totals[prefix] = totals.get(prefix, 0) + _count(tuple(np.shape(leaf)))
    lines, seen = [], set()
    for name in sorted(flat, key=_natural_key):
        parts = name.split("/")
        for depth in range(1, len(parts)):
            prefix = "/".join(parts[:depth])
            if prefix not in seen and (max_depth is None or depth <= max_depth):
                seen.add(prefix)
                lines.append(f"{'  ' * (depth - 1)}{parts[depth - 1]}/  "
                             f"[{totals[prefix]:,}]")
        if max_depth is None or len(parts) <= max_depth:
            leaf = flat[name]
            shape = tuple(np.shape(leaf))
            lines.append(f"{'  ' * (len(parts) - 1)}{parts[-1]}  {shape}  "
                         f"{np.dtype(leaf.dtype).name}  {_count(shape):,}")
    by_collection = {c: t for c, t in totals.items() if "/" not in c}
    summary = ", ".join(f"{c}: {t:,}" for c, t in sorted(by_collection.items()))
    lines.append(f"total: {sum(by_collection.values()):,} ({summary})")
    return "\n".join(lines)


def describe_schedule(config: Any, step: int = 0, memory: bool = False) -> str:
    """The freeze schedule of `config` at `step`: one line per parameter, then totals.

    Builds only shapes (`jax.eval_shape`): no weights are loaded or computed.
    """
    import jax

    from tljax import data, freeze, models, tasks
    from tljax.models import lora

    _, info = data.get_source(config.input.dataset, config.input.split,
                              config.input.get("data_dir"))
    batches = data.train_batches(dataset=config.input.dataset, split=config.input.split,
                                 pp=config.input.pp, batch_size=config.input.batch_size,
                                 seed=config.seed, data_dir=config.input.get("data_dir"))
    task = tasks.build_task(config.get("task"), info)
    model = models.from_config(config, task)
    sample = models.inputs_of(model, {k: np.asarray(v)[:1] for k, v in
                                      batches.batch_at(0).items()
                                      if np.asarray(v).dtype != object})
    rng = jax.random.PRNGKey(0)
    options = freeze.lora_options(config)
    params = jax.eval_shape(lambda r: model.init({"params": r, "dropout": r}, sample,
                                                 train=False), rng)["params"]
    train_size = len(data.get_source(config.input.dataset, config.input.split,
                                     config.input.get("data_dir"))[0])
    plan = freeze.Plan(config, params, model.blocks(),
                       steps_per_epoch=train_size / config.input.batch_size)
    index = plan.index_at(step)
    groups = plan.groups(index)
    blocks = plan.blocks
    lines = [f"step {step}: phase {index} {plan.phases[index].name!r} "
             f"(phases start at {[p.start for p in plan.phases]})",
             f"{'parameter':<72} {'group':>5} {'train':>5} {'lr mult':>9} {'size':>11}"]
    total = trainable = 0
    for name, leaf in tree.flatten(params).items():
        size = _count(tuple(leaf.shape))
        group = groups[name]
        block = freeze.block_index(name, blocks)
        total += size
        trainable += size if group is not None else 0
        lines.append(f"{name:<72} {'-' if block is None else block:>5} "
                     f"{'yes' if group else 'no':>5} "
                     f"{group.lr_mult if group else 0.0:>9.4g} {size:>11,}")
    lines.append(f"trainable: {trainable:,} of {total:,} parameters "
                 f"({100 * trainable / max(total, 1):.2f}%)")
    if options:
        count, size = lora.count_adapters(params)
        lines.append(f"LoRA: {count} adapted kernels, {size:,} adapter parameters "
                     f"(rank {options['rank']}, alpha {options['alpha']})")
    if memory:
        from tljax import memory as step_memory

        batch = {k: v for k, v in batches.batch_at(0).items() if np.asarray(v).dtype != object}
        result = step_memory.step_memory(config, model, task, batch)
        lines.append(f"train step of {config.input.batch_size} examples (phase 0"
                     f"{', uncached' if config.get('cache_features') else ''}): "
                     f"{step_memory.describe(result)}")
    return "\n".join(lines)


def _config_main(argv: list[str]) -> int:
    """--config=FILE[:ARGS] [--step=N] [--config.KEY=VALUE ...] through absl flags."""
    from absl import flags
    from ml_collections import config_flags

    from tljax.config import ConfigError

    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "training config", flag_values=flag_values,
                                    lock_config=True)
    flags.DEFINE_integer("step", 0, "training step to inspect", flag_values=flag_values)
    flags.DEFINE_boolean("memory", False, "also compile the train step and report its memory",
                         flag_values=flag_values)
    flag_values(["inspect_params", *argv])
    try:
        print(describe_schedule(flag_values.config, flag_values.step, flag_values.memory))
    except (ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a.startswith("--config") for a in argv):
        return _config_main(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("spec", help="a load_pretrained spec, e.g. efficientnet_lite0")
    parser.add_argument("--depth", type=int, default=None, help="fold subtrees below this depth")
    args = parser.parse_args(argv)
    from tljax.pretrained import load_pretrained

    try:
        _, variables, info = load_pretrained(args.spec)
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.spec}: {info.model_name} {info.model_kwargs}")
    print(describe(variables, args.depth))
    return 0


if __name__ == "__main__":
    sys.exit(main())
